"""Pending actions of removed rules and webhooks are cancelled when the config changes
(SPEC §5), without waiting for them to fall due, and nothing else is touched.

The processor's parts against a real SQLite store, a fake Kafka and transport, and
a FakeClock: actions are scheduled a day ahead (out of the heap's window) or a few
seconds ahead (in it), then another config is put in force and the sweep runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from crmhooks.app import Processor
from crmhooks.clock import FakeClock
from crmhooks.config import config_from_mapping
from crmhooks.store import Store
from tests.fakes import NOW_MS, FakeKafka, GatedTransport, fetched, rec, until

DAY_S = 86_400


def raw_config(offset_s: int = DAY_S) -> dict[str, Any]:
    return {
        "orgs": [{"id": "org-acme", "users": 100}],
        "webhooks": [
            {"name": "Hook", "url": "http://receiver.test/hook", "module": "Potentials"},
            {"name": "Later", "url": "http://receiver.test/later", "module": "Potentials"},
            {"name": "Other", "url": "http://receiver.test/other", "module": "Potentials"},
        ],
        "rules": [
            {
                "id": "won",
                "module": "Potentials",
                "criteria": {"all": [{"field": "Stage", "op": "is", "value": "Closed Won"}]},
                "scheduled": [
                    {"webhook": "Later", "offset": f"{offset_s}s"},
                    {"webhook": "Other", "offset": f"{offset_s}s"},
                ],
            },
            {
                "id": "big",
                "module": "Potentials",
                "criteria": {"all": [{"field": "Amount", "op": "gt", "value": 1000}]},
                "scheduled": [{"webhook": "Hook", "offset": f"{offset_s}s"}],
            },
        ],
    }


@contextlib.asynccontextmanager
async def processor(
    tmp_path: Path, offset_s: int = DAY_S
) -> AsyncIterator[tuple[Processor, FakeKafka, FakeClock, GatedTransport]]:
    kafka = FakeKafka()
    clock = FakeClock(NOW_MS)
    transport = GatedTransport()
    async with Store(tmp_path / "s.db") as store:
        p = Processor(config_from_mapping(raw_config(offset_s), {}), store, transport, clock)
        p.attach(kafka, {0})
        loops = [asyncio.create_task(p.dispatcher.loop()), asyncio.create_task(p.sweeper.loop())]
        try:
            yield p, kafka, clock, transport
        finally:
            p.dispatcher.stop()
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await p.dispatcher.drain(5.0)


async def schedule(p: Processor, kafka: FakeKafka, events: int = 3) -> None:
    batch = [rec(n, 10 + n, occurred_at="2025-11-28T09:00:00Z") for n in range(events)]
    await p._process_batch(fetched(batch))
    assert [r["status"] for r in kafka.results] == ["scheduled"] * 3 * events


def ended(kafka: FakeKafka) -> dict[str, tuple[str, str | None]]:
    return {
        r["action_id"]: (r["status"], r["reason"])
        for r in kafka.results
        if r["status"] != "scheduled"
    }


async def test_a_removed_webhook_cancels_its_pending_actions_at_once(tmp_path: Path) -> None:
    raw = raw_config()
    raw["webhooks"] = [w for w in raw["webhooks"] if w["name"] != "Other"]
    raw["rules"][0]["scheduled"] = raw["rules"][0]["scheduled"][:1]
    async with processor(tmp_path) as (p, kafka, _clock, transport):
        await schedule(p, kafka)
        p.config.swap(config_from_mapping(raw, {}))
        p.config_changed()
        await p.sweeper.until_idle()
        assert ended(kafka) == {
            f"evt-{n}:won:Other": ("cancelled", "config_removed") for n in range(3)
        }
        statuses = await p.store.action_statuses(
            [
                f"evt-{n}:{rule}:{hook}"
                for n in range(3)
                for rule, hook in [("won", "Later"), ("won", "Other"), ("big", "Hook")]
            ]
        )
        assert sorted(statuses.values()) == ["cancelled"] * 3 + ["pending"] * 6
        assert transport.sent == []
        assert p.sweeper.cancelled == 3


async def test_a_removed_rule_cancels_its_pending_actions_and_no_other(tmp_path: Path) -> None:
    raw = raw_config()
    raw["rules"] = raw["rules"][1:]
    async with processor(tmp_path) as (p, kafka, _clock, _transport):
        await schedule(p, kafka)
        p.config.swap(config_from_mapping(raw, {}))
        p.config_changed()
        await p.sweeper.until_idle()
        assert set(ended(kafka)) == {
            f"evt-{n}:won:{hook}" for n in range(3) for hook in ("Later", "Other")
        }
        assert {v for v in ended(kafka).values()} == {("cancelled", "config_removed")}
        # A second sweep finds nothing more: the cancelled ones are finished.
        assert await p.sweeper.sweep() == 0


async def test_a_changed_webhook_or_schedule_cancels_nothing(tmp_path: Path) -> None:
    raw = raw_config()
    raw["webhooks"][1]["url"] = "http://elsewhere.test/later"
    raw["rules"][0]["scheduled"][0]["offset"] = "2d"  # pending ones keep their due time
    async with processor(tmp_path) as (p, kafka, _clock, _transport):
        await schedule(p, kafka)
        due_before = {a.action_id: a.due_ms for a in await p.store.load_pending([0], 1 << 62)}
        p.config.swap(config_from_mapping(raw, {}))
        p.config_changed()
        await p.sweeper.until_idle()
        assert ended(kafka) == {}
        due_after = {a.action_id: a.due_ms for a in await p.store.load_pending([0], 1 << 62)}
        assert due_after == due_before


async def test_an_action_being_fired_is_left_to_its_fire(tmp_path: Path) -> None:
    """One result per action: the one being sent ends by its attempt (with the webhook
    it started with); the one due later is cancelled by the sweep."""
    raw = raw_config()
    raw["webhooks"] = [w for w in raw["webhooks"] if w["name"] != "Other"]
    raw["rules"][0]["scheduled"] = raw["rules"][0]["scheduled"][:1]
    async with processor(tmp_path, offset_s=5) as (p, kafka, clock, transport):
        transport.gate.clear()  # requests hang until the test lets them go
        await p._process_batch(fetched([rec(0, 10, occurred_at="2025-11-28T09:00:00Z")]))
        clock.advance(5_000)
        await until(lambda: len(transport.sent) == 3, "the three actions are being sent")
        await p._process_batch(fetched([rec(1, 11, occurred_at="2025-11-28T09:00:05Z")]))
        p.config.swap(config_from_mapping(raw, {}))
        p.config_changed()
        await p.sweeper.until_idle()
        assert ended(kafka) == {"evt-1:won:Other": ("cancelled", "config_removed")}
        transport.gate.set()
        await until(lambda: len(ended(kafka)) == 4, "the three in flight end")
        assert ended(kafka)["evt-0:won:Other"] == ("delivered", None)
        assert len([r for r in kafka.results if r["action_id"] == "evt-1:won:Other"]) == 2


async def test_a_sweep_at_assignment_cancels_what_another_config_left(tmp_path: Path) -> None:
    """A restart with a file that lost a webhook: the partition's assignment sweeps."""
    raw = raw_config()
    raw["webhooks"] = [w for w in raw["webhooks"] if w["name"] != "Hook"]
    raw["rules"] = raw["rules"][:1]
    async with processor(tmp_path) as (p, kafka, _clock, _transport):
        await schedule(p, kafka)
        p.config.swap(config_from_mapping(raw, {}))  # (no config_changed: "a restart")
        p._owned.clear()
        await p.on_assigned({0})
        await p.sweeper.until_idle()
        assert ended(kafka) == {
            f"evt-{n}:big:Hook": ("cancelled", "config_removed") for n in range(3)
        }
