"""One final status per action when an event meets a fire (SPEC §7): an event never ends
an action being sent, and an action a batch ends is never sent while the batch is
being stored. The parts with a fake Kafka and transport and a FakeClock."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from crmhooks.app import Processor
from crmhooks.clock import FakeClock
from crmhooks.config import config_from_mapping
from crmhooks.store import Store, WriteBatch
from tests.fakes import NOW_MS, FakeKafka, GatedTransport, fetched, rec, until

LATER_MS = 10_000  # in the heap's window


@contextlib.asynccontextmanager
async def processor(
    tmp_path: Path, transport: GatedTransport
) -> AsyncIterator[tuple[Processor, FakeKafka, FakeClock]]:
    raw = {
        "orgs": [{"id": "org-acme", "users": 100}],
        "webhooks": [
            {"name": "Later", "url": "http://receiver.test/later", "module": "Potentials"}
        ],
        "rules": [
            {
                "id": "won",
                "module": "Potentials",
                "criteria": {"field": "Stage", "op": "is", "value": "Closed Won"},
                "scheduled": [{"webhook": "Later", "offset": f"{LATER_MS // 1000}s"}],
            }
        ],
    }
    kafka = FakeKafka()
    clock = FakeClock(NOW_MS)
    async with Store(tmp_path / "s.db") as store:
        p = Processor(config_from_mapping(raw, {}), store, transport, clock)
        p.attach(kafka, {0})
        loop = asyncio.create_task(p.dispatcher.loop())
        try:
            yield p, kafka, clock
        finally:
            p.dispatcher.stop()
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
            await p.dispatcher.drain(5.0)


def finals(kafka: FakeKafka, action_id: str) -> list[tuple[str, str | None]]:
    return [
        (r["status"], r["reason"])
        for r in kafka.results
        if r["action_id"] == action_id and r["status"] != "scheduled"
    ]


async def test_an_event_does_not_end_an_action_being_sent(tmp_path: Path) -> None:
    transport = GatedTransport(open_now=False)
    async with processor(tmp_path, transport) as (p, kafka, clock):
        await p._process_batch(fetched([rec(1, 10, occurred_at="2025-11-28T09:00:00Z")]))
        clock.advance(LATER_MS)
        await until(lambda: transport.sent == ["evt-1:won:Later"], "it is being sent")
        # The record no longer meets the criteria: its pending action would be cancelled,
        # but this one is out already; its attempt ends it.
        lost = rec(2, 11, occurred_at="2025-11-28T09:00:10Z", record={"Stage": "Lost"},
                   record_id="rec-1", operation="edit")  # fmt: skip
        await p._process_batch(fetched([lost]))
        assert finals(kafka, "evt-1:won:Later") == []
        transport.gate.set()
        await until(lambda: bool(finals(kafka, "evt-1:won:Later")), "its attempt ends it")
        await until(lambda: p.dispatcher.idle and p.reporter.idle, "all is written")
        assert finals(kafka, "evt-1:won:Later") == [("delivered", None)]


async def test_an_action_a_batch_ends_is_not_sent_while_the_batch_is_stored(
    tmp_path: Path,
) -> None:
    transport = GatedTransport()
    async with processor(tmp_path, transport) as (p, kafka, clock):
        await p._process_batch(fetched([rec(1, 10, occurred_at="2025-11-28T09:00:00Z")]))
        gate = asyncio.Event()
        write = p.store.write

        async def slow_write(batch: WriteBatch) -> None:
            await gate.wait()
            await write(batch)

        p.store.write = slow_write
        lost = rec(2, 11, occurred_at="2025-11-28T09:00:00Z", record={"Stage": "Lost"},
                   record_id="rec-1", operation="edit")  # fmt: skip
        batch = asyncio.create_task(p._process_batch(fetched([lost])))
        await asyncio.sleep(0.05)  # planned: the action is cancelled, being stored
        clock.advance(LATER_MS)  # ... when it falls due
        await asyncio.sleep(0.05)
        gate.set()
        await batch
        await asyncio.sleep(0.05)
        assert transport.sent == []
        assert finals(kafka, "evt-1:won:Later") == [("cancelled", "criteria_not_met")]
