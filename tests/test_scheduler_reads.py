"""The heap and the store's reads of pending actions that run while actions move:
what is pushed during a read stays, what ended during a read is not pushed again.

Both were found by the property test of config changes (a retry stored while the
next window was being read was left in the store until a restart; an action a
sweep cancelled while a window was read was fired again and cancelled twice)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

from crmhooks.actions import Action
from crmhooks.clock import FakeClock
from crmhooks.scheduler import HORIZON_MS, Scheduler
from crmhooks.store import Store
from tests.fakes import NOW_MS


def action(n: int, due_ms: int) -> Action:
    return Action(
        action_id=f"a{n}",
        event_id=f"e{n}",
        org_id="org-acme",
        module="Leads",
        record_id=f"r{n}",
        rule_id="rule",
        webhook="Hook",
        kind="scheduled",
        slot=1,
        due_ms=due_ms,
        partition=0,
        source_offset=n,
    )


class SlowStore:
    """The store's reads the scheduler makes; ``load_pending`` waits for ``gate``."""

    def __init__(self, pending: Sequence[Action]) -> None:
        self.pending = {a.action_id: a for a in pending}
        self.gate = asyncio.Event()
        self.reading = asyncio.Event()

    async def load_pending(
        self, partitions: Sequence[int], before_ms: int, from_ms: int | None = None
    ) -> list[Action]:
        found = [
            a
            for a in self.pending.values()
            if a.due_ms < before_ms and (from_ms is None or a.due_ms >= from_ms)
        ]
        self.reading.set()
        await self.gate.wait()
        return found

    async def action_statuses(self, ids: Sequence[str]) -> dict[str, str]:
        return {i: "pending" for i in ids}  # as read before the end was written

    async def snapshots(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {}


async def test_an_action_pushed_while_the_next_window_is_read_stays_in_the_heap() -> None:
    clock = FakeClock(NOW_MS)
    store = SlowStore([])
    scheduler = Scheduler(cast(Store, store), clock, lambda p: True)
    scheduler.start(NOW_MS)
    refill = asyncio.create_task(scheduler.refill_loop(lambda: [0]))
    clock.advance(HORIZON_MS // 2)
    await store.reading.wait()
    retry = action(1, NOW_MS + HORIZON_MS + 1_000)  # in the window being read
    scheduler.push(retry)  # (its report written after the read's query)
    store.gate.set()
    await asyncio.sleep(0)
    assert len(scheduler) == 1
    clock.advance(HORIZON_MS)
    assert [a.action_id for a in scheduler.due(clock.now_ms())] == ["a1"]
    refill.cancel()


async def test_an_action_ended_while_it_was_read_is_not_pushed_again() -> None:
    clock = FakeClock(NOW_MS)
    swept = action(2, NOW_MS + 5_000)
    store = SlowStore([swept])
    scheduler = Scheduler(cast(Store, store), clock, lambda p: True)
    scheduler.start(NOW_MS)
    loading = asyncio.create_task(scheduler.load([0]))
    await store.reading.wait()
    (claimed,) = scheduler.claim([swept])  # a sweep cancels it meanwhile
    scheduler.fired(claimed, None)
    store.gate.set()
    assert await loading == 1
    assert len(scheduler) == 0
    clock.advance(10_000)
    assert scheduler.due(clock.now_ms()) == []


async def test_an_action_due_now_is_kept_when_the_window_lags_behind_the_clock() -> None:
    """The refill had not run yet when an instant action (sent before it is stored, so
    in no store a refill could read) was pushed, due now, past the window."""
    clock = FakeClock(NOW_MS)
    scheduler = Scheduler(cast(Store, SlowStore([])), clock, lambda p: True)
    scheduler.start(NOW_MS)
    clock.advance(2 * HORIZON_MS)  # the loop stalled: no refill meanwhile
    instant = action(3, clock.now_ms())
    scheduler.push(instant)
    later = action(4, clock.now_ms() + 1_000)  # beyond the window: the store's, as before
    scheduler.push(later)
    assert [a.action_id for a in scheduler.due(clock.now_ms())] == ["a3"]
    assert len(scheduler) == 1
