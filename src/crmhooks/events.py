"""Record events: the bytes of the events topic decoded into values, or rejected."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson

from crmhooks.errors import InvalidEvent

Operation = Literal["create", "edit", "delete"]
OPERATIONS: frozenset[str] = frozenset({"create", "edit", "delete"})

# Why 1 MiB: a CRM record with 3000-character fields and a few related records
# is a few tens of KiB; anything much larger is a producer bug, and decoding it
# would cost the whole partition time. Configurable (kafka.max_event_bytes).
DEFAULT_MAX_EVENT_BYTES = 1 << 20

Record = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class RecordEvent:
    """One CRM record event (SPEC §2). ``data`` is the JSON object as received."""

    event_id: str
    org_id: str
    module: str
    operation: Operation
    occurred_at_ms: int
    record_id: str
    record: Record
    previous: Record | None
    related: Mapping[str, Record]
    user: Record | None
    organization: Record | None
    data: Mapping[str, Any]

    @property
    def record_key(self) -> str:
        """Identifies the record across events: ``org/module/record_id``."""
        return f"{self.org_id}/{self.module}/{self.record_id}"

    def __repr__(self) -> str:
        return (
            f"RecordEvent({self.event_id!r}, org={self.org_id!r}, {self.module}/"
            f"{self.record_id} {self.operation})"
        )


def parse_rfc3339_ms(text: str) -> int:
    """Epoch ms of an RFC 3339 timestamp with an offset or ``Z``; ValueError otherwise."""
    if "T" not in text and "t" not in text:
        raise ValueError("not an RFC 3339 date-time")
    parsed = datetime.fromisoformat(text.replace("z", "Z"))
    if parsed.tzinfo is None:
        raise ValueError("RFC 3339 date-time without an offset")
    return int(parsed.timestamp() * 1000)


def _require_str(obj: Mapping[str, Any], key: str, parsed: dict[str, Any]) -> str:
    if key not in obj:
        raise InvalidEvent(f"missing required field {key!r}", parsed)
    value = obj[key]
    if not isinstance(value, str) or not value:
        raise InvalidEvent(f"field {key!r} must be a non-empty string", parsed)
    return value


def _optional_object(obj: Mapping[str, Any], key: str, parsed: dict[str, Any]) -> Record | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidEvent(f"field {key!r} must be an object", parsed)
    return value


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def decode_json_object(data: bytes, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> dict[str, Any]:
    """Bytes → a JSON object, or InvalidEvent saying what is wrong (parsed=None)."""
    if len(data) > max_bytes:
        raise InvalidEvent(f"event of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidEvent(f"event must be a JSON object, not {type(parsed).__name__}")
    return parsed


def decode_event(data: bytes | None, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> RecordEvent:
    """The one place where events-topic bytes become a RecordEvent (SPEC §2)."""
    if data is None:
        raise InvalidEvent("empty record value (tombstone)")
    parsed = decode_json_object(data, max_bytes)
    return event_from_json(parsed)


def event_from_json(parsed: dict[str, Any]) -> RecordEvent:
    """Validate a parsed JSON object as a record event (SPEC §2)."""
    event_id = _require_str(parsed, "event_id", parsed)
    org_id = _require_str(parsed, "org_id", parsed)
    module = _require_str(parsed, "module", parsed)
    operation = _require_str(parsed, "operation", parsed)
    if operation not in OPERATIONS:
        raise InvalidEvent(
            f"field 'operation' must be one of create, edit, delete, not {operation!r}", parsed
        )
    occurred_at = _require_str(parsed, "occurred_at", parsed)
    try:
        occurred_at_ms = parse_rfc3339_ms(occurred_at)
    except ValueError as exc:
        raise InvalidEvent(f"field 'occurred_at' is not RFC 3339: {exc}", parsed) from None
    record_id_value = parsed.get("record_id")
    if isinstance(record_id_value, int) and not isinstance(record_id_value, bool):
        record_id = str(record_id_value)
    else:
        record_id = _require_str(parsed, "record_id", parsed)
    if "record" not in parsed:
        raise InvalidEvent("missing required field 'record'", parsed)
    record = _optional_object(parsed, "record", parsed)
    if record is None:
        raise InvalidEvent("field 'record' must be an object", parsed)
    related = _optional_object(parsed, "related", parsed) or {}
    for name, value in related.items():
        if not isinstance(value, dict):
            raise InvalidEvent(f"field 'related.{name}' must be an object", parsed)
    return RecordEvent(
        event_id=event_id,
        org_id=org_id,
        module=module,
        operation=operation,  # type: ignore[arg-type]  # checked against OPERATIONS
        occurred_at_ms=occurred_at_ms,
        record_id=record_id,
        record=record,
        previous=_optional_object(parsed, "previous", parsed),
        related=related,
        user=_optional_object(parsed, "user", parsed),
        organization=_optional_object(parsed, "organization", parsed),
        data=parsed,
    )
