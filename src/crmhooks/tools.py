"""Operator tools over the topics: replay dead letters, tail results."""

from __future__ import annotations

import base64
import sys
from typing import Any, TextIO

import orjson

from crmhooks.app import REPLAY_HEADER
from crmhooks.config import Config
from crmhooks.kafka_io import produce_records, read_topic


async def replay_dlq(config: Config, error_code: str | None, idle_timeout_s: float = 5.0) -> int:
    """Re-publish dead-lettered events to the events topic; returns how many.

    Actions keep their deterministic ids, so what was delivered is never sent again.
    """
    k = config.kafka
    out: list[tuple[str, bytes | None, bytes]] = []
    async for rec in read_topic(k.bootstrap_servers, k.dlq_topic, idle_timeout_s=idle_timeout_s):
        if rec.value is None:
            continue
        letter = orjson.loads(rec.value)
        if error_code is not None and letter.get("error_code") != error_code:
            continue
        if letter.get("event") is not None:
            value = orjson.dumps(letter["event"])
        elif letter.get("raw") is not None:
            value = base64.b64decode(letter["raw"])
        else:
            continue
        out.append((k.events_topic, rec.key, value))
    if out:
        await produce_records(k.bootstrap_servers, out, headers=[(REPLAY_HEADER, b"1")])
    return len(out)


COLUMNS = ("due_at", "status", "attempt", "org_id", "rule_id", "webhook", "http_status", "detail")


def _detail(r: dict[str, Any]) -> str:
    parts = [str(r[k]) for k in ("error_class", "reason", "error") if r.get(k)]
    if r.get("next_attempt_at"):
        parts.append(f"next {r['next_attempt_at']}")
    return "; ".join(parts) or str(r.get("action_id", ""))


async def tail_results(
    config: Config,
    *,
    org: str | None = None,
    follow: bool = False,
    topic: str = "results",
    limit: int = 0,
    stream: TextIO = sys.stdout,
) -> int:
    """Print results (or dead letters) as one line each; returns how many were printed."""
    k = config.kafka
    name = k.results_topic if topic == "results" else k.dlq_topic
    printed = 0
    async for rec in read_topic(k.bootstrap_servers, name, follow=follow):
        if rec.value is None:
            continue
        r = orjson.loads(rec.value)
        if org is not None and r.get("org_id", (r.get("source") or {}).get("key")) != org:
            continue
        if topic == "results":
            line = "  ".join(str(r.get(c) if c != "detail" else _detail(r)) for c in COLUMNS)
        else:
            line = f"{r.get('failed_at')}  {r.get('error_code')}  {r.get('message')}"
        print(line, file=stream, flush=True)
        printed += 1
        if limit and printed >= limit:
            break
    return printed
