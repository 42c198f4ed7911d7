"""Waiting on futures shared by many callers (``wait_all``); slots taken in turn (``Slots``)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any


async def wait_all(futures: Sequence[asyncio.Future[Any]]) -> None:
    """Until every future is done, successfully or not (read their outcomes after).

    Each future is shared by several callers (the records of one produced batch):
    awaiting it directly would cancel it for all of them when this caller is
    cancelled. ``asyncio.wait``, which does not, cost ~3 % of the CPU of an
    instant delivery; one waiter of our own and a callback per future cost less.
    """
    pending = [f for f in dict.fromkeys(futures) if not f.done()]
    if not pending:
        return
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    left = len(pending)

    def one_done(_: object) -> None:
        nonlocal left
        left -= 1
        if left == 0 and not waiter.done():
            waiter.set_result(None)

    for fut in pending:
        fut.add_done_callback(one_done)
    try:
        await waiter
    finally:
        if left:  # cancelled: the callbacks are not needed any more
            for fut in pending:
                fut.remove_done_callback(one_done)


class Slots:
    """At most ``n`` holders at a time, served first come, first served: the contract
    of ``asyncio.Semaphore``, but taking a free slot is a plain call, where
    ``Semaphore.acquire`` is a coroutine to make and await even when one is free
    (two a webhook request, ~0.5 µs). Use::

        waiter = slots.take()
        if waiter is not None:  # none free: wait for one to be handed over
            await slots.wait(waiter)
        try:
            ...
        finally:
            slots.give()
    """

    __slots__ = ("_free", "_waiters")

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"Slots needs at least one slot, got {n}")
        self._free = n
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take(self) -> asyncio.Future[None] | None:
        """A slot now (None), or a future for ``wait``: done once one is handed over.
        (While anyone waits no slot is free: ``give`` hands slots to waiters first.)"""
        if self._free:
            self._free -= 1
            return None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    async def wait(self, waiter: asyncio.Future[None]) -> None:
        """Until ``waiter`` (from ``take``) holds a slot. Cancelled, it holds none: a
        slot handed over at that very moment goes to the next waiter."""
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give()
            raise

    def give(self) -> None:
        """Give a slot back: to the longest waiter still waiting, else to the free ones."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # (a cancelled waiter is done)
                waiter.set_result(None)
                return
        self._free += 1

    @property
    def free(self) -> int:
        return self._free

    def __repr__(self) -> str:
        return f"Slots(free={self._free}, waiting={len(self._waiters)})"
