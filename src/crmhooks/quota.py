"""The daily quota (SPEC §9): requests counted per organisation and local day, durably,
a block of units at a time.

``limit = min(daily_limit, per_user × users)`` per organisation and calendar day in
its time zone. Every request sent counts one. Counts are stored ahead of use, a
block at a time (``take``), so that most requests find their unit already durable
and a crash never lets an organisation overshoot: units stored and not used are
given back on stop and rebalance (``release``), and stay counted after a crash.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from crmhooks.config import OrgSettings, QuotaSettings
from crmhooks.store import Store, WriteBatch

# Quota units stored per write: one commit (and changelog round trip) per block of
# requests of an organisation instead of one each. The next block is written once
# half of the current one is used, so requests seldom wait for a write; at most
# two blocks stay counted unused after a crash, none after a stop. A block is a
# hundredth of the daily limit, between QUOTA_BLOCK and QUOTA_BLOCK_MAX units: a
# crash costs an organisation at most 2 % of its day (or 32 requests), and one with
# a large limit, sending thousands a second, does not wait for a write every 16.
QUOTA_BLOCK = 16
QUOTA_BLOCK_MAX = 1024

# (org id, local day yyyy-MM-dd)
QuotaKey = tuple[str, str]


@dataclass(slots=True)
class _Reservation:
    remaining: int  # units stored but not yet used
    stored: asyncio.Future[None]  # done when the block is durable
    next: _Reservation | None = None  # the block written ahead, used after this one


class QuotaLedger:
    """Owns the counts in use today, the blocks stored ahead, and who was warned.

    ``settings`` gives the quota settings and an organisation's settings as they are
    now (the configuration in force)."""

    def __init__(
        self,
        store: Store,
        settings: Callable[[], QuotaSettings],
        org: Callable[[str], OrgSettings],
    ) -> None:
        self._store = store
        self._settings = settings
        self._org = org
        self._used: dict[QuotaKey, int] = {}
        # org id -> (epoch second, its quota day there, the daily limit): ``today``.
        self._days: dict[str, tuple[int, str, int]] = {}
        self._over: set[QuotaKey] = set()  # organisations told of today's limit
        # (org, day, partition) → units counted in the store ahead of use (QUOTA_BLOCK)
        self._reserved: dict[tuple[str, str, int], _Reservation] = {}
        self._writes: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"QuotaLedger(days={len(self._used)}, reserved={len(self._reserved)})"

    def today(self, org_id: str, now_ms: int) -> tuple[str, int]:
        """The organisation's calendar day at ``now_ms`` and its daily limit (SPEC §9).

        Remembered for the second (zones change offsets on whole seconds), as most
        requests of a busy organisation fall in the same second as the one before.
        """
        second = now_ms // 1000
        found = self._days.get(org_id)
        if found is not None and found[0] == second:
            return found[1], found[2]
        org = self._org(org_id)
        day = datetime.fromtimestamp(second, ZoneInfo(org.time_zone)).date().isoformat()
        quota = self._settings()
        limit = min(quota.daily_limit, quota.per_user * org.users)
        self._days[org_id] = (second, day, limit)
        return day, limit

    def used(self, org_id: str, day: str) -> int | None:
        """Requests counted for the day; None until ``load`` read it from the store."""
        return self._used.get((org_id, day))

    async def load(self, org_id: str, day: str) -> int:
        used = await self._store.quota_used(org_id, day)
        return self._used.setdefault((org_id, day), used)

    def first_over(self, org_id: str, day: str) -> bool:
        """True the first time an organisation is found over its limit on a day (its
        warning and alert); False after."""
        key = (org_id, day)
        if key in self._over:
            return False
        self._over.add(key)
        return True

    def take(
        self, org_id: str, day: str, partition: int, limit: int
    ) -> asyncio.Future[None] | None:
        """Count one request (``used`` was loaded); what to await before it is sent
        (its unit being stored), or None when the unit is stored already (most
        requests: no coroutine for them).

        Counts are stored a block at a time (never more than the units of the limit
        not yet taken), so most requests find theirs already stored. Once half a
        block is used the next one is written in the background; a request taking a
        unit of a block still being written waits for that write. Unused units go
        back to the store on stop and on rebalance; after a crash they stay counted
        (never an overshoot).
        """
        qkey = (org_id, day)
        used = self._used[qkey] + 1
        self._used[qkey] = used
        left = limit - used
        key = (org_id, day, partition)
        block = max(QUOTA_BLOCK, min(QUOTA_BLOCK_MAX, limit // 100))
        held = self._reserved.get(key)
        if held is not None and held.remaining == 0 and held.next is not None:
            held = self._reserved[key] = held.next
        if held is None or held.remaining == 0:
            held = self._reserved[key] = self._reserve_block(key, 1 + min(block - 1, left))
        held.remaining -= 1
        ahead = held.remaining  # units stored (or being stored) and not yet taken
        if held.next is None and ahead <= block // 2 and left > ahead:
            held.next = self._reserve_block(key, min(block, left - ahead))
        if held.stored.done():  # most requests: their unit is stored already
            held.stored.result()  # raises the store's error, if it failed
            return None
        return held.stored

    async def give_back(self, org_id: str, day: str, partition: int) -> None:
        """A request counted but refused before it was sent: not counted after all."""
        qkey = (org_id, day)
        if qkey in self._used:  # (cleared meanwhile by a rebalance: the store counts)
            self._used[qkey] -= 1
        await self._store.write(WriteBatch(quota=[(org_id, day, partition, -1)]))

    def _reserve_block(self, key: tuple[str, str, int], units: int) -> _Reservation:
        """Count ``units`` in the store, in the background; the reservation's ``stored``
        is done once they are durable."""
        held = _Reservation(units, asyncio.get_running_loop().create_future())

        async def store_block() -> None:
            try:
                await self._store.write(WriteBatch(quota=[(*key, units)]))
            except BaseException as exc:
                held.remaining = 0
                held.stored.set_exception(exc)
                held.stored.exception()  # retrieved: the waiters see it too
                if not isinstance(exc, Exception):
                    raise
                return
            held.stored.set_result(None)

        task = asyncio.create_task(store_block(), name=f"quota {key}")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return held

    async def release(self, partitions: set[int] | None = None) -> None:
        """Give back counted but unused units (of ``partitions``, or all)."""
        if self._writes:  # blocks being written: their units are known once stored
            await asyncio.gather(*self._writes, return_exceptions=True)
        give_back = WriteBatch()
        for key, held in list(self._reserved.items()):
            if partitions is not None and key[2] not in partitions:
                continue
            writing = False
            for block in (held, held.next):
                if block is None:
                    continue
                if not block.stored.done():
                    writing = True  # given back at the next release, once stored
                elif block.stored.exception() is None and block.remaining:
                    give_back.quota.append((*key, -block.remaining))
                    block.remaining = 0
            if not writing:
                del self._reserved[key]
        await self._store.write(give_back)

    async def reload(self) -> None:
        """Partitions were assigned: their counts may have moved here from another
        process, so every count is read from the store again when next needed."""
        await self.release()
        self._used.clear()
