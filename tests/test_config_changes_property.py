"""Config changes interleaved with events, at random (SPEC §5): every action reaches
exactly one final status, and nothing in the processor raises.

The processor's parts with a fake Kafka, a fake transport (some requests fail, so
retries, failures and suspensions happen too), a real SQLite store and a
FakeClock. A run is a random sequence of events (creates, edits, deletes of a few
records), file reloads and organisation documents (add, remove and change
webhooks and rules; documents come and go) and moves of the clock; at its end the
clock runs far ahead, so that every pending action falls due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crmhooks.actions import FINAL_STATUSES
from crmhooks.app import Processor
from crmhooks.clock import FakeClock
from crmhooks.config import Config, config_from_mapping
from crmhooks.delivery import Outcome
from crmhooks.endpoints import Endpoint
from crmhooks.kafka_documents import DocumentRecord
from crmhooks.store import Store
from crmhooks.templates import RenderedRequest
from tests.fakes import NOW_MS, FakeKafka, Rec, fetched
from tests.support import event

ORG = "org-acme"
HOOKS = ("A", "B", "C")
RULES = ("r1", "r2", "r3")
DAY_MS = 86_400_000


class FlakyTransport:
    """Answers 500 to about a third of the attempts (by their id), 200 to the rest, after
    a few turns of the loop: config changes and sweeps happen while requests are out."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.sent = 0

    async def send(self, action_id: str, request: RenderedRequest, endpoint: Endpoint) -> Outcome:
        self.sent += 1
        draw = zlib.crc32(f"{self.seed}:{action_id}:{self.sent}".encode())
        for _ in range(draw % 7):
            await asyncio.sleep(0)
        failed = draw % 3 == 0
        return Outcome(None if not failed else "server_error", 500 if failed else 200,
                       "HTTP 500" if failed else None, 1.0, NOW_MS)  # fmt: skip


@st.composite
def items(draw: st.DrawFn, org: str | None = None) -> dict[str, Any]:
    """Webhooks and rules: any subset, each rule using webhooks of the subset."""
    hooks = sorted(draw(st.sets(st.sampled_from(HOOKS))))
    webhooks = [
        {
            "name": h,
            "url": f"http://receiver.test/{h}{draw(st.sampled_from(['/1', '/2']))}",
            "module": "Potentials",
            "entity_params": {"deal": "${Potentials.Potential Name}"},
        }
        for h in hooks
    ]
    rules = []
    for rule_id in RULES:
        if not hooks or not draw(st.booleans()):
            continue
        instant = draw(st.none() | st.sampled_from(hooks))
        scheduled = draw(st.lists(st.sampled_from(hooks), max_size=2))
        if instant is None and not scheduled:
            continue
        criteria = draw(
            st.sampled_from(
                [
                    {"field": "Stage", "op": "is", "value": "Closed Won"},
                    {"field": "Amount", "op": "gt", "value": 100},
                    {"field": "Potential Name", "op": "is_not_empty"},
                ]
            )
        )
        rules.append(
            {
                "id": rule_id,
                "module": "Potentials",
                "repeat": draw(st.sampled_from(["every", "once"])),
                "criteria": criteria,
                **({"instant": instant} if instant else {}),
                "scheduled": [
                    {
                        "webhook": h,
                        "relative_to": draw(st.sampled_from(["trigger", "Closing Date"])),
                        "offset": draw(st.sampled_from(["1m", "30m", "2h"])),
                    }
                    for h in scheduled
                ],
            }
        )
    if org is not None:
        return {"org": {"id": org, "users": 1000}, "webhooks": webhooks, "rules": rules}
    return {"webhooks": webhooks, "rules": rules}


@st.composite
def steps(draw: st.DrawFn) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(3, 14))):
        kind = draw(
            st.sampled_from(["event", "event", "event", "file", "document", "time", "settle"])
        )
        if kind == "event":
            out.append(
                (
                    "event",
                    {
                        "record": draw(st.sampled_from(["rec-1", "rec-2", "rec-3"])),
                        "operation": draw(st.sampled_from(["create", "edit", "edit", "delete"])),
                        "Stage": draw(st.sampled_from(["Closed Won", "Negotiation"])),
                        "Amount": draw(st.sampled_from([50, 500])),
                        "Closing Date": draw(st.sampled_from(["2025-11-29", "2025-12-01"])),
                    },
                )
            )
        elif kind == "file":
            out.append(("file", draw(items())))
        elif kind == "document":
            out.append(("document", draw(st.none() | items(ORG))))
        elif kind == "time":
            out.append(("time", draw(st.sampled_from([30_000, 600_000, 3_600_000, DAY_MS]))))
        else:
            out.append(("settle", None))
    return out


def file_config(raw_items: dict[str, Any]) -> Config:
    return config_from_mapping(
        {
            "kafka": {"config_topic": "crm.workflow-config"},
            "orgs": [{"id": ORG, "users": 1000}],
            "quota": {"daily_limit": 1_000_000, "per_user": 1_000_000},
            "delivery": {"retry_delays_s": [60], "suspend_after_failed_actions": 2},
            **raw_items,
        },
        {},
    )


@contextlib.asynccontextmanager
async def processor(
    path: Path, first: dict[str, Any], seed: int
) -> AsyncIterator[tuple[Processor, FakeKafka, FakeClock]]:
    kafka = FakeKafka()
    clock = FakeClock(NOW_MS)
    async with Store(path) as store:
        p = Processor(file_config(first), store, FlakyTransport(seed), clock)
        p.attach(kafka, {0})
        assert p.documents is not None
        await p.documents.open()
        loops = [
            asyncio.create_task(p.dispatcher.loop()),
            asyncio.create_task(p.sweeper.loop()),
            asyncio.create_task(p.checkpoint.deadline_loop()),
            asyncio.create_task(p.scheduler.refill_loop(p._partitions)),
        ]
        try:
            yield p, kafka, clock
        finally:
            p.dispatcher.stop()
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await p.dispatcher.drain(5.0)


async def settle(p: Processor) -> None:
    """Until nothing is being fired, reported or swept, and the heap holds what is due
    now (bounded: the store's reads run on a thread of their own)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 20.0
    turns = 0
    while loop.time() < give_up:
        turns += 1
        await asyncio.sleep(0 if turns % 50 else 0.001)
        if (
            p.dispatcher.idle
            and p.reporter.idle
            and p.sweeper._idle.is_set()
            and p.scheduler._loaded_until_ms > p.clock.now_ms()
        ):
            due = p.scheduler.next_due_ms()
            if due is None or due > p.clock.now_ms():
                return
    raise AssertionError(f"never settled: {p!r}")


def rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def run(path: Path, first: dict[str, Any], plan: list[tuple[str, Any]], seed: int) -> None:
    async with processor(path, first, seed) as (p, kafka, clock):
        assert p.documents is not None
        n = offset = 0
        for kind, value in plan:
            if kind == "event":
                n += 1
                fields = {k: value[k] for k in ("Stage", "Amount", "Closing Date")}
                data = event(
                    n,
                    record={**fields, "Potential Name": value["record"]},
                    record_id=value["record"],
                    operation=value["operation"],
                    occurred_at=rfc3339(clock.now_ms()),
                    **({"previous": {"Stage": "x", "Closing Date": "x"}}
                       if value["operation"] == "edit" else {}),
                )  # fmt: skip
                async with p._lock:  # as the consume loop does
                    await p._process_batch(fetched([Rec(0, n, orjson.dumps(data))]))
            elif kind == "file":
                p.config.swap(file_config(value))
                p.config_changed()
            elif kind == "document":
                offset += 1
                body = None if value is None else orjson.dumps(value)
                await p.documents.apply([DocumentRecord(0, offset, ORG.encode(), body)])
            elif kind == "time":
                clock.advance(value)
            if kind == "settle":
                await settle(p)
            else:  # a few turns: the next step comes while requests and sweeps are out
                for _ in range(n % 5):
                    await asyncio.sleep(0)
        for _ in range(12):  # every pending action falls due, retries too
            clock.advance(DAY_MS)
            await settle(p)
        await p.checkpoint.store_unstored()
        assert await p.store.count_pending() == 0
        finals: dict[str, list[str]] = {}
        for r in kafka.results:
            if r.get("status") in FINAL_STATUSES:
                finals.setdefault(r["action_id"], []).append(r["status"])
        created = {r["action_id"] for r in kafka.results if "action_id" in r}
        assert set(finals) == created
        assert {a: s for a, s in finals.items() if len(s) != 1} == {}


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(first=items(), plan=steps(), seed=st.integers(0, 1000))
def test_every_action_ends_once_whatever_the_config_changes(
    tmp_path_factory: pytest.TempPathFactory,
    caplog: pytest.LogCaptureFixture,
    first: dict[str, Any],
    plan: list[tuple[str, Any]],
    seed: int,
) -> None:
    caplog.clear()
    path = tmp_path_factory.mktemp("prop") / "s.db"
    with caplog.at_level(logging.ERROR):
        asyncio.run(run(path, first, plan, seed))
    # Nothing raised: no part logged an error (an unexpected exception while firing,
    # a failed sweep, a document that does not compile are logged as errors).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
