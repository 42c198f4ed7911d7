"""Wire records we produce: result records (SPEC §7) and dead-letter envelopes (SPEC §8)."""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from crmhooks.actions import Action
from crmhooks.events import RecordEvent
from crmhooks.outcomes import Outcome

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# A dead letter must fit its topic (SPEC §10): one the broker refuses fails its
# batch, the process exits, and the restart meets the same record: its partition
# stops for good. The processor passes what the dead-letter topic takes
# (``Reporter``); where that is not known, 512 KiB: half of Kafka's default
# message.max.bytes (1 MiB), which managed services keep or raise, so a letter
# fits a topic whose limit was lowered too, and a whole ordinary event (tens of
# KiB) always fits.
DEAD_LETTER_MAX_BYTES = 512 << 10
# Of a record key, a dead letter carries this much (``source.key``): keys are
# organisation ids; a longer one is a producer's bug, and counts against the limit.
KEY_MAX_BYTES = 1024
# What a cut message ends with (its length in characters when whole).
_CUT_NOTE = " ... (cut to fit the dead-letter topic: {} characters)"


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
    max_bytes: int = DEAD_LETTER_MAX_BYTES,
) -> dict[str, Any]:
    """A dead-letter envelope (SPEC §8); the schema is ``docs/dead-letter.schema.json``.

    ``event`` is the event when it parsed as a JSON object; otherwise ``raw`` holds
    the bytes, base64. Both are null only when there is nothing to carry: a
    tombstone, or an action whose record snapshot is gone.

    A letter that would be larger than ``max_bytes`` encoded is cut to fit (SPEC
    §10, ``fit``): it carries the first bytes of its payload in ``raw``, ``event``
    null, ``truncated`` true, and the whole payload's ``original_bytes`` and
    ``sha256``. Its payload is ``raw`` when given (the record's value as read), else
    ``event`` as JSON (an action's event; a config document with its secrets masked).
    """
    letter = {
        "error_code": error_code,
        "message": message,
        "failed_at": rfc3339_ms(failed_at_ms),
        "source": {
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "key": key[:KEY_MAX_BYTES].decode("utf-8", "replace") if key is not None else None,
        },
        "action_id": action_id,
        "rule_id": rule_id,
        "webhook": webhook,
        "event": dict(event) if event is not None else None,
        "raw": base64.b64encode(raw).decode("ascii") if event is None and raw is not None else None,
        "truncated": False,
        "original_bytes": None,
        "sha256": None,
    }
    if len(encode(letter)) <= max_bytes:
        return letter
    payload = raw if raw is not None else encode(event) if event is not None else None
    return fit(letter, payload, max_bytes)


def fit(letter: dict[str, Any], payload: bytes | None, max_bytes: int) -> dict[str, Any]:
    """``letter`` cut to at most ``max_bytes`` encoded, where its ids allow (in place).

    The payload goes first: ``raw`` keeps as many of its first bytes as there is
    room for, and ``original_bytes`` and ``sha256`` say what it was (the whole is
    still at ``source`` while that topic keeps it). Then the message, if the letter
    does not fit without a payload (an ``invalid_config`` letter lists every error
    of a document), leaving a quarter of ``max_bytes`` to the payload. What is left
    is ids and coordinates; should they alone be too long, the letter is returned
    larger than ``max_bytes`` (the caller skips it).
    """
    if payload is not None:
        letter |= {
            "event": None,
            "raw": "",
            "truncated": True,
            "original_bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
    # Room kept for the payload's first bytes when the message must be cut too.
    reserve = min(len(payload) * 4 // 3 + 4, max_bytes // 4) if payload is not None else 0
    message: str = letter["message"]
    note = _CUT_NOTE.format(len(message))
    note_bytes = len(note.encode())
    kept = len(message)
    while (over := len(encode(letter)) + reserve - max_bytes) > 0 and kept > 0:
        # A character is at least one byte encoded: one round is enough unless the
        # message runs out (then ids and coordinates alone are too long).
        kept = max(0, kept - over - note_bytes)
        letter["message"] = message[:kept] + note
        letter["truncated"] = True
    if payload is not None:
        room = max_bytes - len(encode(letter))
        letter["raw"] = base64.b64encode(payload[: max(0, room) // 4 * 3]).decode("ascii")
    return letter


def shrink(letter: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """A dead letter already made (as decoded from its bytes) cut to ``max_bytes``, for a
    topic that takes less than it said: what ``fit`` would have made of it, keeping the
    size and hash of the whole payload when it was cut before. Changes ``letter``."""
    if letter.get("original_bytes") is not None:  # its raw is the payload's start
        whole = letter["original_bytes"], letter["sha256"]
        letter = fit(letter, base64.b64decode(letter["raw"]), max_bytes)
        letter["original_bytes"], letter["sha256"] = whole
        return letter
    raw = letter.get("raw")
    event = letter.get("event")
    payload = base64.b64decode(raw) if raw else encode(event) if event is not None else None
    return fit(letter, payload, max_bytes)


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
