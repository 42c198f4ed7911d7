"""Which version of the record an action renders (SPEC §5), through the processor's
parts: a real SQLite store, a fake Kafka and transport, a FakeClock.

An instant action, and every retry of it, renders the event that triggered it; a
scheduled action renders the latest version of its record seen when it fires.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from crmhooks.app import Processor
from crmhooks.clock import FakeClock
from crmhooks.config import Config, config_from_mapping
from crmhooks.delivery import Outcome
from crmhooks.endpoints import Endpoint
from crmhooks.store import Store
from crmhooks.templates import RenderedRequest
from tests.fakes import NOW_MS, FakeKafka, Rec, fetched, until
from tests.support import event

RETRY_S = 900  # the seed's: beyond the heap's horizon, so a retry comes from the store


def config(rules: list[dict[str, Any]]) -> Config:
    return config_from_mapping(
        {
            "delivery": {"retry_delays_s": [RETRY_S], "suspend_after_failed_actions": 0},
            "orgs": [{"id": "org-acme", "users": 100}],
            "webhooks": [
                {
                    "name": "Hook",
                    "url": "http://receiver.test/hook",
                    "module": "Potentials",
                    "body": {
                        "format": "json",
                        "template": '{"e": "${Potentials.Potential Name}",'
                        ' "amount": ${Potentials.Amount}}',
                    },
                }
            ],
            "rules": rules,
        },
        {},
    )


INSTANT = {
    "id": "won",
    "module": "Potentials",
    "criteria": {"all": [{"field": "Stage", "op": "is", "value": "Closed Won"}]},
    "instant": "Hook",
}
SCHEDULED = {
    "id": "remind",
    "module": "Potentials",
    "trigger": "create",
    "criteria": {"all": [{"field": "Stage", "op": "is", "value": "Closed Won"}]},
    "scheduled": [{"webhook": "Hook", "relative_to": "trigger", "offset": "30m"}],
}


class Answers:
    """A transport answering each request as ``status_of(action_id, nth)`` says."""

    def __init__(self, failing: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.failing = set(failing)  # action ids whose first attempt gets a 503
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def send(self, action_id: str, request: RenderedRequest, endpoint: Endpoint) -> Outcome:
        first = all(aid != action_id for aid, _ in self.sent)
        self.sent.append((action_id, orjson.loads(request.body)))
        if first and action_id in self.failing:
            return Outcome("server_error", 503, "HTTP 503 Service Unavailable", 1.0, NOW_MS)
        return Outcome(None, 200, None, 1.0, NOW_MS)


def version(n: int, amount: int, *, operation: str = "edit") -> Rec:
    """Event ``n`` of record rec-1, its amount ``amount`` (partition 0, offset 10 + n)."""
    data = event(
        n,
        record_id="rec-1",
        operation=operation,
        record={"Potential Name": f"v{n}", "Amount": amount},
    )
    # occurred_at: the clock's now, so that scheduled due times are in its future.
    data["occurred_at"] = "2025-11-28T09:00:00Z"
    return Rec(0, 10 + n, orjson.dumps(data))


@contextlib.asynccontextmanager
async def processor(
    tmp_path: Path, transport: Answers, rules: list[dict[str, Any]]
) -> AsyncIterator[tuple[Processor, FakeKafka, FakeClock]]:
    kafka = FakeKafka()
    clock = FakeClock(NOW_MS)
    async with Store(tmp_path / "s.db") as store:
        p = Processor(config(rules), store, transport, clock)
        p.attach(kafka, {0})
        loops = [
            asyncio.create_task(p.dispatcher.loop()),
            asyncio.create_task(p.checkpoint.deadline_loop()),
            asyncio.create_task(p.scheduler.refill_loop(lambda: [0])),
        ]
        try:
            yield p, kafka, clock
        finally:
            p.dispatcher.stop()
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await p.dispatcher.drain(5.0)


def statuses(kafka: FakeKafka) -> list[tuple[str, str]]:
    return [(r["action_id"], r["status"]) for r in kafka.results if "status" in r]


async def test_a_create_and_four_edits_in_one_batch_send_each_its_own_version(
    tmp_path: Path,
) -> None:
    transport = Answers()
    async with processor(tmp_path, transport, [INSTANT]) as (p, kafka, _):
        batch = [version(1, 100, operation="create")] + [version(n, 100 * n) for n in range(2, 6)]
        await p._process_batch(fetched(batch))
        await until(lambda: kafka.committed == {0: 16}, "all delivered and committed")
    sent = {aid: body for aid, body in transport.sent}
    assert sent == {f"evt-{n}:won:Hook": {"e": f"v{n}", "amount": 100 * n} for n in range(1, 6)}


async def test_a_retry_stored_pending_renders_its_own_event_after_an_edit(
    tmp_path: Path,
) -> None:
    """The create's request fails (503): its retry is stored, due in 15 minutes, out of
    memory. An edit comes meanwhile, whose snapshot a scheduled rule keeps as the
    record's latest. The retry still carries the create's data."""
    transport = Answers(failing={"evt-1:won:Hook"})
    async with processor(tmp_path, transport, [INSTANT, SCHEDULED]) as (p, kafka, clock):
        await p._process_batch(fetched([version(1, 100, operation="create")]))
        await until(
            lambda: ("evt-1:won:Hook", "retrying") in statuses(kafka), "the first attempt fails"
        )
        await until(lambda: kafka.committed == {0: 12}, "the retry is stored")
        assert len(p.scheduler) == 0  # the retry is due beyond the heap's window
        await p._process_batch(fetched([version(2, 200)]))
        await until(lambda: ("evt-2:won:Hook", "delivered") in statuses(kafka), "the edit's")
        snapshot = (await p.store.snapshots(["org-acme/Potentials/rec-1"]))[
            "org-acme/Potentials/rec-1"
        ]
        assert snapshot["record"]["Amount"] == 200  # the record's latest: the edit
        clock.advance(RETRY_S * 1000)
        await until(lambda: ("evt-1:won:Hook", "delivered") in statuses(kafka), "the retry")
        # The scheduled reminder (created by the create, due in 30 minutes) fires later,
        # with the latest data.
        clock.advance(30 * 60 * 1000)
        await until(
            lambda: ("evt-1:remind:Hook", "delivered") in statuses(kafka), "the reminder fires"
        )
    assert transport.sent == [
        ("evt-1:won:Hook", {"e": "v1", "amount": 100}),
        ("evt-2:won:Hook", {"e": "v2", "amount": 200}),
        ("evt-1:won:Hook", {"e": "v1", "amount": 100}),  # the retry: the create's data
        ("evt-1:remind:Hook", {"e": "v2", "amount": 200}),  # the scheduled one: the latest
    ]


async def test_after_a_restart_a_pending_instant_action_renders_its_own_event(
    tmp_path: Path,
) -> None:
    transport = Answers(failing={"evt-1:won:Hook"})
    async with processor(tmp_path, transport, [INSTANT, SCHEDULED]) as (p, kafka, _):
        await p._process_batch(fetched([version(1, 100, operation="create")]))
        await until(lambda: kafka.committed == {0: 12}, "the retry is stored")
        await p._process_batch(fetched([version(2, 200)]))
        await until(lambda: ("evt-2:won:Hook", "delivered") in statuses(kafka), "the edit's")
    # A new process over the same file, the retry due: loaded from the store.
    again = Answers()
    kafka = FakeKafka()
    clock = FakeClock(NOW_MS + RETRY_S * 1000)
    async with Store(tmp_path / "s.db") as store:
        p = Processor(config([INSTANT, SCHEDULED]), store, again, clock)
        p.attach(kafka, {0})
        fire = asyncio.create_task(p.dispatcher.loop())
        try:
            assert await p.scheduler.load([0]) == 1
            await until(lambda: again.sent, "the retry is sent")
        finally:
            p.dispatcher.stop()
            fire.cancel()
            await asyncio.gather(fire, return_exceptions=True)
            await p.dispatcher.drain(5.0)
    assert again.sent == [("evt-1:won:Hook", {"e": "v1", "amount": 100})]
