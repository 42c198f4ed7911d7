"""Firing under a configuration that changed since an action was planned (SPEC §5).

Every lookup of a rule or webhook at fire time goes through the configuration in
force: an action whose rule or webhook is gone is cancelled (``config_removed``)
without a request; one whose webhook changed is sent as the webhook is now.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from crmhooks.app import Processor
from crmhooks.clock import FakeClock
from crmhooks.config import Config, config_from_mapping
from crmhooks.store import Store
from tests.fakes import NOW_MS, FakeKafka, GatedTransport, fetched, rec, until

LATER_MS = 10_000  # within the heap's horizon: the action waits in memory


def raw_config() -> dict[str, Any]:
    return {
        "orgs": [{"id": "org-acme", "users": 100}],
        "webhooks": [
            {"name": "Hook", "url": "http://receiver.test/hook", "module": "Potentials"},
            {"name": "Later", "url": "http://receiver.test/later", "module": "Potentials"},
        ],
        "rules": [
            {
                "id": "won",
                "module": "Potentials",
                "criteria": {"all": [{"field": "Stage", "op": "is", "value": "Closed Won"}]},
                "scheduled": [{"webhook": "Later", "offset": f"{LATER_MS // 1000}s"}],
            }
        ],
    }


@contextlib.asynccontextmanager
async def processor(
    tmp_path: Path, transport: GatedTransport
) -> AsyncIterator[tuple[Processor, FakeKafka, FakeClock]]:
    kafka = FakeKafka()
    clock = FakeClock(NOW_MS)
    async with Store(tmp_path / "s.db") as store:
        p = Processor(config_from_mapping(raw_config(), {}), store, transport, clock)
        p.attach(kafka, {0})
        loop = asyncio.create_task(p.dispatcher.loop())
        try:
            yield p, kafka, clock
        finally:
            p.dispatcher.stop()
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
            await p.dispatcher.drain(5.0)


async def scheduled_then_changed(p: Processor, kafka: FakeKafka, config: Config) -> None:
    """Event 1 schedules a "Later" action; then ``config`` is put in force."""
    await p._process_batch(fetched([rec(1, 10, occurred_at="2025-11-28T09:00:00Z")]))  # NOW_MS
    assert [r["status"] for r in kafka.results] == ["scheduled"]
    p.config.swap(config)


async def test_an_action_whose_webhook_is_gone_is_cancelled_without_a_request(
    tmp_path: Path,
) -> None:
    raw = raw_config()
    raw["webhooks"] = raw["webhooks"][:1]  # "Later" removed, and the rule's use of it
    raw["rules"][0] = {**raw["rules"][0], "scheduled": [], "instant": "Hook"}
    transport = GatedTransport()
    async with processor(tmp_path, transport) as (p, kafka, clock):
        await scheduled_then_changed(p, kafka, config_from_mapping(raw, {}))
        clock.advance(LATER_MS)
        await until(lambda: len(kafka.results) == 2, "the action ends")
        ended = kafka.results[-1]
        assert (ended["status"], ended["reason"]) == ("cancelled", "config_removed")
        assert ended["action_id"] == "evt-1:won:Later"
        assert transport.sent == []
        await until(lambda: p.dispatcher.idle and p.reporter.idle, "the fire is over")
        assert await p.store.action_statuses(["evt-1:won:Later"]) == {
            "evt-1:won:Later": "cancelled"
        }


async def test_an_action_whose_rule_is_gone_is_cancelled_without_a_request(
    tmp_path: Path,
) -> None:
    raw = raw_config()
    raw["rules"] = []
    transport = GatedTransport()
    async with processor(tmp_path, transport) as (p, kafka, clock):
        await scheduled_then_changed(p, kafka, config_from_mapping(raw, {}))
        clock.advance(LATER_MS)
        await until(lambda: len(kafka.results) == 2, "the action ends")
        assert (kafka.results[-1]["status"], kafka.results[-1]["reason"]) == (
            "cancelled",
            "config_removed",
        )
        assert transport.sent == []


async def test_an_action_whose_webhook_changed_is_sent_as_the_webhook_is_now(
    tmp_path: Path,
) -> None:
    transport = GatedTransport()
    async with processor(tmp_path, transport) as (p, kafka, clock):
        config = p.config.current.config
        moved = replace(config.webhooks["Later"], url="http://elsewhere.test/moved")
        changed = replace(config, webhooks={**config.webhooks, "Later": moved})
        await scheduled_then_changed(p, kafka, changed)
        clock.advance(LATER_MS)
        await until(lambda: len(kafka.results) == 2, "the action is delivered")
        assert kafka.results[-1]["status"] == "delivered"
        assert [r.url for r in transport.requests] == ["http://elsewhere.test/moved"]
