"""aio.Slots: asyncio.Semaphore's contract (bound, first come first served,
cancellation) with a free slot taken by a plain call; aio.wait_all."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crmhooks.aio import Slots, wait_all


async def hold(slots: Slots, name: str, log: list[str], release: asyncio.Event) -> None:
    waiter = slots.take()
    if waiter is not None:
        await slots.wait(waiter)
    try:
        log.append(name)
        await release.wait()
    finally:
        slots.give()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_free_slots_are_taken_without_waiting_then_callers_queue() -> None:
    slots = Slots(2)
    assert slots.take() is None
    assert slots.take() is None
    assert slots.free == 0
    waiter = slots.take()
    assert waiter is not None
    assert not waiter.done()
    slots.give()  # handed to the waiter, not freed
    assert waiter.done()
    assert slots.free == 0
    slots.give()
    slots.give()
    assert slots.free == 2


async def test_waiters_are_served_in_order_and_a_free_slot_does_not_jump_the_queue() -> None:
    slots = Slots(1)
    log: list[str] = []
    gates = {name: asyncio.Event() for name in "abcd"}
    tasks = [asyncio.create_task(hold(slots, n, log, gates[n])) for n in "abc"]
    await settle()
    assert log == ["a"]
    gates["a"].set()
    await settle()
    assert log == ["a", "b"]
    # c waits: a new caller queues behind it even at the moment b gives its slot back.
    gates["b"].set()
    late = asyncio.create_task(hold(slots, "d", log, gates["d"]))
    await settle()
    assert log == ["a", "b", "c"]
    gates["c"].set()
    gates["d"].set()
    await asyncio.wait_for(asyncio.gather(*tasks, late), 5)
    assert log == ["a", "b", "c", "d"]
    assert slots.free == 1
    assert repr(slots) == "Slots(free=1, waiting=0)"


async def test_a_cancelled_waiter_holds_no_slot() -> None:
    slots = Slots(1)
    log: list[str] = []
    gate = asyncio.Event()
    first = asyncio.create_task(hold(slots, "a", log, gate))
    gone = asyncio.create_task(hold(slots, "b", log, gate))
    last = asyncio.create_task(hold(slots, "c", log, gate))
    await settle()
    gone.cancel()
    await settle()
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, last), 5)
    assert gone.cancelled()
    assert log == ["a", "c"]
    assert slots.free == 1


async def test_a_slot_handed_to_a_waiter_cancelled_at_that_moment_goes_on() -> None:
    slots = Slots(1)
    assert slots.take() is None
    waiter = slots.take()
    assert waiter is not None
    task = asyncio.create_task(slots.wait(waiter))
    await settle()
    nxt = slots.take()
    assert nxt is not None
    slots.give()  # handed to ``waiter`` ...
    task.cancel()  # ... whose task is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await task
    assert nxt.done()
    assert not nxt.cancelled()
    slots.give()
    assert slots.free == 1


@pytest.mark.parametrize("n", [0, -1])
def test_slots_need_at_least_one(n: int) -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        Slots(n)


@settings(deadline=None, max_examples=30)
@given(n=st.integers(1, 4), holders=st.integers(1, 12), cancel=st.sets(st.integers(0, 11)))
def test_never_more_holders_than_slots(n: int, holders: int, cancel: set[int]) -> None:
    async def scenario() -> tuple[int, int]:
        slots = Slots(n)
        inside = most = 0

        async def work() -> None:
            nonlocal inside, most
            waiter = slots.take()
            if waiter is not None:
                await slots.wait(waiter)
            inside += 1
            most = max(most, inside)
            try:
                await asyncio.sleep(0)
            finally:
                inside -= 1
                slots.give()

        tasks = [asyncio.create_task(work()) for _ in range(holders)]
        await asyncio.sleep(0)
        for i in cancel:
            if i < holders:
                tasks[i].cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        return most, slots.free

    most, free = asyncio.run(scenario())
    assert most <= n
    assert free == n


async def test_wait_all_waits_for_every_future_and_leaves_them_when_cancelled() -> None:
    loop = asyncio.get_running_loop()
    a: asyncio.Future[int] = loop.create_future()
    b: asyncio.Future[int] = loop.create_future()
    waiting = asyncio.create_task(wait_all([a, b, a]))
    await settle()
    a.set_result(1)
    await settle()
    assert not waiting.done()
    b.set_exception(RuntimeError("x"))
    await asyncio.wait_for(waiting, 5)
    assert b.exception() is not None
    c: asyncio.Future[int] = loop.create_future()
    cancelled = asyncio.create_task(wait_all([c]))
    await settle()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert not c.cancelled()  # shared by others: not cancelled for them
