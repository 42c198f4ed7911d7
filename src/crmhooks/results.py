"""Wire records we produce: result records (SPEC §7) and dead-letter envelopes (SPEC §8)."""

from __future__ import annotations

import base64
import functools
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from crmhooks.actions import Action
from crmhooks.events import RecordEvent
from crmhooks.outcomes import Outcome

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@functools.lru_cache(maxsize=4096)
def rfc3339_ms(epoch_ms: int | None) -> str | None:
    """Epoch ms → ``2026-11-28T09:00:00.012Z`` (UTC, milliseconds, 4-digit year).

    Integer arithmetic, so exact for any epoch ms of years 1..9999 (a float
    division can be off by one ms); formatted by hand, because ``strftime("%Y")``
    does not pad years below 1000 on glibc. Remembered, whole and up to the
    second: the results of one moment share their stamps (the actions of a batch
    one due time; ~12 deliveries a millisecond at full speed), and a hit costs
    0.07 µs against 0.43 for the formatting.
    """
    if epoch_ms is None:
        return None
    second, ms = divmod(epoch_ms, 1000)
    return f"{_rfc3339_second(second)}.{ms:03d}Z"


@functools.lru_cache(maxsize=4096)
def _rfc3339_second(epoch_s: int) -> str:
    t = _EPOCH + timedelta(seconds=epoch_s)
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"


def result_record(
    action: Action,
    status: str,
    *,
    attempt: int | None = None,
    outcome: Outcome | None = None,
    error_class: str | None = None,
    error: str | None = None,
    reason: str | None = None,
    next_attempt_ms: int | None = None,
    request: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One result record: one state change of one action (SPEC §7).

    The schema is ``docs/results.schema.json``. ``request`` is shown as given:
    callers pass the redacted URL (secrets as ``***``).
    """
    if outcome is not None:
        error_class = error_class or outcome.error_class
        error = error or outcome.error
    return {
        "action_id": action.action_id,
        "event_id": action.event_id,
        "org_id": action.org_id,
        "module": action.module,
        "record_id": action.record_id,
        "rule_id": action.rule_id,
        "webhook": action.webhook,
        "kind": action.kind,
        "status": status,
        "attempt": action.attempt if attempt is None else attempt,
        "due_at": rfc3339_ms(action.due_ms),
        "sent_at": rfc3339_ms(outcome.sent_at_ms) if outcome else None,
        "http_status": outcome.http_status if outcome else None,
        "error_class": error_class,
        "error": error,
        "latency_ms": round(outcome.latency_ms, 1) if outcome and outcome.sent_at_ms else None,
        "next_attempt_at": rfc3339_ms(next_attempt_ms),
        "reason": reason,
        "request": dict(request) if request is not None else None,
        "response_excerpt": outcome.response_excerpt if outcome else None,
    }


def dead_letter(
    *,
    error_code: str,
    message: str,
    failed_at_ms: int,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    event: Mapping[str, Any] | None,
    raw: bytes | None,
    action_id: str | None = None,
    rule_id: str | None = None,
    webhook: str | None = None,
) -> dict[str, Any]:
    """A dead-letter envelope (SPEC §8); the schema is ``docs/dead-letter.schema.json``.

    ``event`` is the event when it parsed as a JSON object; otherwise ``raw`` holds
    the bytes, base64. Both are null only when there is nothing to carry: a
    tombstone, or an action whose record snapshot is gone.
    """
    return {
        "error_code": error_code,
        "message": message,
        "failed_at": rfc3339_ms(failed_at_ms),
        "source": {
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "key": key.decode("utf-8", "replace") if key is not None else None,
        },
        "action_id": action_id,
        "rule_id": rule_id,
        "webhook": webhook,
        "event": dict(event) if event is not None else None,
        "raw": base64.b64encode(raw).decode("ascii") if event is None and raw is not None else None,
    }


def encode(record: Mapping[str, Any]) -> bytes:
    """A result record or dead letter as the bytes of its topic's value."""
    return orjson.dumps(record)


def event_dead_letter(
    event: RecordEvent,
    error_code: str,
    message: str,
    failed_at_ms: int,
    action: Action,
    topic: str,
) -> dict[str, Any]:
    """A dead letter about one action of a parsed event (quota, template failure)."""
    return dead_letter(
        error_code=error_code,
        message=message,
        failed_at_ms=failed_at_ms,
        topic=topic,
        partition=action.partition,
        offset=action.source_offset,
        key=action.org_id.encode(),
        event=event.data,
        raw=None,
        action_id=action.action_id,
        rule_id=action.rule_id,
        webhook=action.webhook,
    )
