"""Time as an injected dependency: epoch milliseconds and waiting for a moment."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Wall-clock time in epoch ms, and a way to wait until a given moment."""

    def now_ms(self) -> int: ...

    async def sleep_until(self, when_ms: int) -> None:
        """Return when ``now_ms() >= when_ms`` (or soon after); cancellable."""
        ...


class SystemClock:
    """The real clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    async def sleep_until(self, when_ms: int) -> None:
        delay_s = (when_ms - self.now_ms()) / 1000
        if delay_s > 0:
            await asyncio.sleep(delay_s)

    def __repr__(self) -> str:
        return "SystemClock()"


class FakeClock:
    """A clock for tests: time moves only when ``advance``/``set`` is called."""

    def __init__(self, now_ms: int = 0) -> None:
        self._now_ms = now_ms
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def now_ms(self) -> int:
        return self._now_ms

    async def sleep_until(self, when_ms: int) -> None:
        if when_ms <= self._now_ms:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((when_ms, fut))
        try:
            await fut
        finally:
            self._waiters = [(w, f) for (w, f) in self._waiters if f is not fut]

    def set(self, now_ms: int) -> None:
        self._now_ms = now_ms
        for when_ms, fut in list(self._waiters):
            if when_ms <= now_ms and not fut.done():
                fut.set_result(None)

    def advance(self, delta_ms: int) -> None:
        self.set(self._now_ms + delta_ms)

    def __repr__(self) -> str:
        return f"FakeClock(now_ms={self._now_ms})"
