"""The demo driver: produce sample CRM events for both seed scenarios, show what happened."""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from crmhooks.config import Config, KafkaSettings, load_config
from crmhooks.kafka_io import ensure_topics, produce_records, read_topic

FINAL = {"delivered", "failed", "cancelled", "skipped", "quota_exceeded", "suspended"}


def sample_events(run: str, now: datetime) -> list[tuple[str, bytes]]:
    """(description, value) of each sample event; each carries the run id (the
    event ids, the malformed one's bytes), so a run shows its own outcomes only."""
    at = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    due = (now + timedelta(days=7)).strftime("%Y-%m-%d")

    def deal(n: int, stage: str, name: str, account: str) -> bytes:
        return orjson.dumps(
            {
                "event_id": f"demo-{run}-{n}",
                "org_id": "org-acme",
                "module": "Potentials",
                "operation": "create" if n != 3 else "edit",
                "occurred_at": at,
                "record_id": f"41508680000002240{n:02d}",
                "record": {
                    "Potential Name": name,
                    "Amount": 25000 + n,
                    "Stage": stage,
                    "Type": "New Business",
                    "Closing Date": due,
                    "Potential Owner": "Ana Silva",
                    "Payment Due": f"{due} 09:30",
                },
                "previous": {"Stage": "Negotiation"} if n == 3 else None,
                "related": {
                    "Accounts": {"Account Name": account},
                    "Contacts": {"Last Name": "Wong", "Mobile": "+8613800000000"},
                },
                "user": {"Last Name": "Silva", "Mobile": "+351900000000"},
                "organization": {"Company Name": "Acme"},
            }
        )

    return [
        (
            "a deal created as Closed Won / New Business (both scenarios fire)",
            deal(1, "Closed Won", "Big deal", "Acme & Sons <华南分公司>"),
        ),
        (
            "a deal still in Negotiation (no rule matches: nothing is sent)",
            deal(2, "Negotiation", "Small deal", "Beta Ltd"),
        ),
        (
            "a malformed event (not JSON: goes to the dead-letter topic)",
            f"{{not json, demo run {run}}}".encode(),
        ),
        (
            "a deal edited to Closed Won (the next good event still flows)",
            deal(3, "Closed Won", 'Deal "Q4" & more', "Gamma GmbH"),
        ),
    ]


async def demo(config: Config, wait_s: float) -> int:
    k = config.kafka
    run = uuid.uuid4().hex[:8]
    events = sample_events(run, datetime.now(UTC))
    print(f"\n== producing {len(events)} sample events to {k.events_topic} (run {run}) ==")
    for i, (what, _) in enumerate(events, 1):
        print(f"  {i}. {what}")
    await ensure_topics(k, [k.events_topic, k.results_topic, k.dlq_topic], k.partitions)
    await produce_records(k, [(k.events_topic, b"org-acme", value) for _, value in events])
    print(f"\n== waiting up to {wait_s:.0f} s for every action to reach a final status ==\n")
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait_s
    prefix = f"demo-{run}-"
    while time.monotonic() < deadline:
        results = [
            r
            async for r in _records(k, k.results_topic)
            if str(r.get("event_id", "")).startswith(prefix)
        ]
        last: dict[str, str] = {r["action_id"]: r["status"] for r in results}
        if last and all(s in FINAL for s in last.values()) and len(last) >= 3:
            break
        await asyncio.sleep(1.0)
    # This run's: the malformed event's bytes, or an event of this run (a dead letter
    # left by an earlier run, read only now, is not this run's).
    letters = [
        d
        async for d in _records(k, k.dlq_topic)
        if (d.get("raw") is not None and f"demo run {run}".encode() in base64.b64decode(d["raw"]))
        or str((d.get("event") or {}).get("event_id", "")).startswith(prefix)
    ]
    print(f"\n== result records on {k.results_topic} (one per state change of an action) ==")
    print(f"  {'status':<10} {'kind':<9} {'webhook':<18} {'due at (UTC)':<13} {'sent at':<13} HTTP")
    for r in results:
        detail = r.get("error_class") or r.get("reason") or ""
        http = r.get("http_status") or "-"
        print(
            f"  {r['status']:<10} {r['kind']:<9} {r['webhook']:<18} {_clock(r['due_at']):<13} "
            f"{_clock(r['sent_at']):<13} {http!s:<4} {detail}  event {r['event_id']}"
        )
    print(f"\n== dead letters on {k.dlq_topic} ==")
    for d in letters:
        src = d["source"]
        print(
            f"  {d['error_code']}: {d['message']}  (partition {src['partition']}, "
            f"offset {src['offset']})"
        )
    delivered = sum(1 for r in results if r["status"] == "delivered")
    print(f"\n{delivered} webhooks delivered, {len(letters)} dead letter(s).")
    return 0 if delivered >= 3 and letters else 1


def _clock(rfc3339: str | None) -> str:
    """``2026-11-28T09:00:00.012Z`` → ``09:00:00.012`` (the demo runs within a minute)."""
    return rfc3339[11:23] if rfc3339 else "-"


async def _records(kafka: KafkaSettings, topic: str) -> Any:
    async for rec in read_topic(kafka, topic, idle_timeout_s=1.0):
        if rec.value is not None:
            yield orjson.loads(rec.value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="config/demo.toml")
    parser.add_argument("--wait-s", type=float, default=45.0)
    args = parser.parse_args()
    sys.exit(asyncio.run(demo(load_config(args.config), args.wait_s)))


if __name__ == "__main__":
    main()
