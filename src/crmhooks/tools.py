"""Operator tools over the topics: replay dead letters, tail results."""

from __future__ import annotations

import base64
import sys
from collections.abc import Callable
from typing import Any, TextIO

import orjson

from crmhooks.config import Config
from crmhooks.intake import REPLAY_HEADER
from crmhooks.kafka_io import produce_records, read_topic
from crmhooks.logs import escape_controls
from crmhooks.progress import Progress


async def replay_dlq(
    config: Config,
    error_code: str | None,
    idle_timeout_s: float = 5.0,
    progress: Progress | None = None,
    on_skipped: Callable[[str], None] | None = None,
) -> int:
    """Re-publish dead-lettered events to the events topic; returns how many.

    Actions keep their deterministic ids, so what was delivered is never sent again.
    ``progress`` counts the dead letters read (on a terminal). A letter whose event was
    cut to fit its topic (``truncated``) is not replayed: ``on_skipped`` gets a line
    saying where its whole event is.
    """
    k = config.kafka
    out: list[tuple[str, bytes | None, bytes]] = []
    read = 0
    async for rec in read_topic(k, k.dlq_topic, idle_timeout_s=idle_timeout_s):
        read += 1
        if progress is not None:
            progress.update(read, note=f"dead letters read, {len(out):,} to replay")
        if rec.value is None:
            continue
        letter = orjson.loads(rec.value)
        if error_code is not None and letter.get("error_code") != error_code:
            continue
        if letter.get("truncated") and letter.get("event") is None:
            if on_skipped is not None:
                on_skipped(_not_replayed(letter))
            continue
        if letter.get("event") is not None:
            value = orjson.dumps(letter["event"])
        elif letter.get("raw") is not None:
            value = base64.b64decode(letter["raw"])
        else:
            continue
        out.append((k.events_topic, rec.key, value))
    if out:
        if progress is not None:
            progress.update(read, note=f"dead letters read; producing {len(out):,} events")
        await produce_records(k, out, headers=[(REPLAY_HEADER, b"1")])
    return len(out)


def _not_replayed(letter: dict[str, Any]) -> str:
    src = letter.get("source") or {}
    whole = letter.get("original_bytes")
    size = f"{whole:,} bytes, sha256 {letter.get('sha256')}" if whole is not None else "cut"
    return escape_controls(
        f"not replayed: the {letter.get('error_code')} dead letter of {src.get('topic')} "
        f"partition {src.get('partition')} offset {src.get('offset')} holds only the start "
        f"of its event ({size}); the whole event is there while that topic keeps it"
    )


RESULT_HEADER = (
    f"{'time (UTC)':<24} {'status':<14} {'try':>3} {'rule':<20} {'webhook':<20} {'http':>4}  detail"
)
DLQ_HEADER = f"{'failed at (UTC)':<24} {'error_code':<22} {'source':<14} message"


def _detail(r: dict[str, Any]) -> str:
    parts = [str(r[k]) for k in ("error_class", "reason", "error") if r.get(k)]
    if r.get("next_attempt_at"):
        parts.append(f"next attempt {r['next_attempt_at']}")
    parts.append(f"action {r.get('action_id')}")
    return "; ".join(parts)


def format_result(r: dict[str, Any]) -> str:
    """One result record as one line: when, what happened, and why.

    Control characters (from events and receivers: a reason phrase with ESC, an id
    with a newline) are escaped, so a record is one line and never drives the terminal.
    """
    when = r.get("sent_at") or r.get("due_at") or ""
    http = r.get("http_status") or "-"
    return escape_controls(
        f"{when!s:<24} {r.get('status', '')!s:<14} {r.get('attempt', 0)!s:>3} "
        f"{r.get('rule_id', '')!s:<20} {r.get('webhook', '')!s:<20} {http!s:>4}  {_detail(r)}"
    )


def format_dead_letter(d: dict[str, Any]) -> str:
    """One dead letter as one line, control characters escaped (see format_result)."""
    src = d.get("source") or {}
    where = f"p{src.get('partition')}@{src.get('offset')}"
    about = f" (action {d['action_id']})" if d.get("action_id") else ""
    return escape_controls(
        f"{d.get('failed_at', '')!s:<24} {d.get('error_code', '')!s:<22} {where:<14} "
        f"{d.get('message', '')}{about}"
    )


def _matches(r: dict[str, Any], org: str | None, event_id: str | None) -> bool:
    event = r.get("event") or {}
    org_of = r.get("org_id") or event.get("org_id") or (r.get("source") or {}).get("key")
    if org is not None and org_of != org:
        return False
    return event_id is None or (r.get("event_id") or event.get("event_id")) == event_id


async def tail_results(
    config: Config,
    *,
    org: str | None = None,
    event_id: str | None = None,
    follow: bool = False,
    topic: str = "results",
    limit: int = 0,
    stream: TextIO = sys.stdout,
) -> int:
    """Print results (or dead letters) one per line, oldest first; returns how many."""
    k = config.kafka
    dlq = topic != "results"
    name = k.dlq_topic if dlq else k.results_topic
    print(DLQ_HEADER if dlq else RESULT_HEADER, file=stream, flush=True)
    printed = 0
    async for rec in read_topic(k, name, follow=follow):
        if rec.value is None:
            continue
        r = orjson.loads(rec.value)
        if not _matches(r, org, event_id):
            continue
        print(format_dead_letter(r) if dlq else format_result(r), file=stream, flush=True)
        printed += 1
        if limit and printed >= limit:
            break
    return printed
