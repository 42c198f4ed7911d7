"""Pending actions whose rule or webhook is gone: cancelled when the configuration changes.

SPEC §5, "Config changes": at start (each partition as it is assigned), on a reload
of the file and on every config-topic document, a pending action of a partition of
this process whose rule, or whose webhook in that rule, no longer exists is
cancelled: result ``cancelled``, reason ``config_removed``, through the reporter,
then stored finished (the order of ``reporter.Reporter.final``: a crash between the
two cancels it again at the next start, never loses the result). A webhook that
changed is not a removal: its pending actions fire as it is then (the dispatcher
looks it up at fire time); a schedule that changed does not move actions already
pending, they keep the due time they were given.

The sweep never reads every pending action: the store gives the distinct
(organisation, rule, webhook) of the pending ones (one walk of an index, of one
organisation for a document), and only the combinations that are gone are read, in
chunks. An action being fired is left to its fire, which looks the configuration up
again (the dispatcher cancels it the same way if it is gone).

Sweeps run one at a time in a task of their own (``loop``), each chunk while no
batch of events is being planned (the processor's lock): a rebalance or a document
never waits for one. Requests made meanwhile are merged: a sweep of every
organisation covers any one organisation's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from crmhooks.actions import Action
from crmhooks.clock import Clock
from crmhooks.reporter import Reporter
from crmhooks.scheduler import Scheduler
from crmhooks.snapshot import LiveConfig
from crmhooks.store import Store, WriteBatch

log = logging.getLogger(__name__)

# Actions cancelled per round (one read, one produce, one store transaction): bounds
# memory and how long a batch of events waits for the lock.
SWEEP_CHUNK = 1000

# A request: None for every organisation, else one organisation's id.
Request = str | None


class Sweeper:
    """Owns the sweeps requested and not yet run."""

    def __init__(
        self,
        config: LiveConfig,
        store: Store,
        scheduler: Scheduler,
        reporter: Reporter,
        clock: Clock,
        partitions: Callable[[], list[int]],
        lock: asyncio.Lock,
    ) -> None:
        self._config = config
        self._store = store
        self._scheduler = scheduler
        self._reporter = reporter
        self._clock = clock
        self._partitions = partitions
        self._lock = lock
        self._all = False  # a sweep of every organisation requested
        self._orgs: set[str] = set()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.cancelled = 0  # actions cancelled (tests, the stop line)

    def __repr__(self) -> str:
        waiting = "all" if self._all else len(self._orgs)
        return f"Sweeper(waiting={waiting}, cancelled={self.cancelled})"

    def request(self, org_id: Request = None) -> None:
        """Sweep ``org_id``'s pending actions (None: every organisation's) soon."""
        if org_id is None:
            self._all = True
            self._orgs.clear()
        elif not self._all:
            self._orgs.add(org_id)
        self._idle.clear()
        self._wakeup.set()

    async def until_idle(self) -> None:
        """Until every sweep requested so far has run (tests, the demo)."""
        await self._idle.wait()

    async def loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._all or self._orgs:
                if self._all:
                    self._all = False
                    request: Request = None
                else:
                    request = self._orgs.pop()
                try:
                    await self.sweep(request)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # Left for the next change or start; each action is checked again
                    # when it fires all the same.
                    log.exception("sweep of removed rules and webhooks failed")
            if not self._wakeup.is_set():
                self._idle.set()

    async def sweep(self, org_id: Request = None) -> int:
        """Cancel the pending actions (of ``org_id``, or all) of this process's partitions
        whose rule or webhook is gone; how many."""
        partitions = self._partitions()
        combos = await self._store.actions.pending_combinations(partitions, org_id)
        snapshot = self._config.current
        gone = [c for c in combos if snapshot.gone(*c)]
        cancelled = 0
        for combo in gone:
            for partition in partitions:
                after = 0
                while True:
                    # Under ``reading``: an action a fire ends after this read is not
                    # cancelled a second time.
                    with self._scheduler.reading():
                        rows = await self._store.actions.pending_of(
                            combo, partition, after, SWEEP_CHUNK
                        )
                        if not rows:
                            break
                        after = rows[-1][0]
                        async with self._lock:
                            cancelled += await self._cancel([a for _, a in rows])
                    if len(rows) < SWEEP_CHUNK:
                        break
        if cancelled:
            self.cancelled += cancelled
            log.info(
                "config change: %d pending actions cancelled (config_removed): %s",
                cancelled,
                ", ".join(f"{o}/{r}/{w}" for o, r, w in gone[:10])
                + ("…" if len(gone) > 10 else ""),
            )
        return cancelled

    async def _cancel(self, actions: Sequence[Action]) -> int:
        """End ``actions`` still pending, gone under the configuration now, not being fired."""
        statuses = await self._store.action_statuses([a.action_id for a in actions])
        snapshot = self._config.current  # a change since the read may have brought it back
        candidates = [
            a for a in actions if statuses.get(a.action_id) == "pending" and snapshot.removed(a)
        ]
        # No await from the statuses read to the claim: what they say still holds.
        claimed = self._scheduler.claim(candidates)
        if not claimed:
            return 0
        stored = False
        try:
            results = [
                self._reporter.result(a, "cancelled", reason="config_removed") for a in claimed
            ]
            await self._reporter.produce(results)
            now_ms = self._clock.now_ms()
            await self._store.write(
                WriteBatch(finished=[(a.action_id, "cancelled", now_ms) for a in claimed])
            )
            stored = True
        finally:
            for action in claimed:
                # Not stored: pending still, back in the heap (if due soon), where its
                # fire finds it gone and cancels it.
                with contextlib.suppress(Exception):
                    self._scheduler.fired(action, None if stored else action)
        return len(claimed)
