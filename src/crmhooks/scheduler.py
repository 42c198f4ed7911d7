"""The delay heap in memory: actions due within the horizon, the records they render,
and which are being fired.

The store holds every pending action (SPEC §5: the durable delay heap); memory
holds only those due within HORIZON_MS, loaded when a partition is assigned and
refilled every half horizon. With them, what each renders (SPEC §5, "Which version
of the record"): a scheduled action the latest version of its record seen
(``RecordEvent``, one per record, kept while a scheduled action of the record is in
memory); an instant action, and each retry of it, the event that triggered it
(kept per action id while the action is in memory; stored with the action when it
is stored pending).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from crmhooks.actions import Action
from crmhooks.clock import Clock
from crmhooks.errors import InvalidEvent
from crmhooks.events import RecordEvent, event_from_json
from crmhooks.store import Store
from crmhooks.timers import DelayHeap

log = logging.getLogger(__name__)

# The heap in memory holds only actions due within this horizon; the store holds
# the rest and a refill loads the next window every half horizon. One minute keeps
# memory flat with a million pending timers while a refill query stays cheap.
HORIZON_MS = 60_000


class Scheduler:
    """Owns the heap, the actions in it or being fired, and their records' latest
    versions. ``owns`` says which partitions are this process's."""

    def __init__(self, store: Store, clock: Clock, owns: Callable[[int], bool]) -> None:
        self._store = store
        self._clock = clock
        self._owns = owns
        self._heap = DelayHeap()
        self._actions: dict[str, Action] = {}  # actions in the heap or firing
        self._snapshots: dict[str, RecordEvent] = {}  # record_key → latest event seen
        self._snapshot_refs: dict[str, int] = {}  # record_key → scheduled actions in memory
        self._own: dict[str, RecordEvent] = {}  # instant action id → its triggering event
        self._inflight: set[str] = set()
        self._loaded_until_ms = 0
        # Reads of pending actions under way (a window's refill, an assignment), and
        # the actions ended meanwhile: what such a read saw pending may have ended
        # after the store answered, and is not pushed again (``_schedule_loaded``).
        self._reads = 0
        self._ended_during_reads: set[str] = set()
        self.changed = asyncio.Event()  # set when an action is pushed

    def __repr__(self) -> str:
        return f"Scheduler(heap={len(self._heap)}, in_flight={len(self._inflight)})"

    def __len__(self) -> int:
        """Actions in memory: due within the horizon, or being fired."""
        return len(self._actions)

    def start(self, now_ms: int) -> None:
        """The first window: actions due within the horizon from now."""
        self._loaded_until_ms = now_ms + HORIZON_MS

    # -- the heap -------------------------------------------------------------------

    def push(self, action: Action) -> None:
        """Schedule ``action`` (new, moved, or a retry); beyond the window, the store
        keeps it and the refill loads it when its window comes. One due now is always
        kept, even when the window lags behind the clock (a stalled loop): an instant
        action sent before it is stored is in no store a refill could read."""
        if action.due_ms >= self._loaded_until_ms and action.due_ms > self._clock.now_ms():
            self._forget(action.action_id)
            if action.record_key not in self._snapshot_refs:
                self._snapshots.pop(action.record_key, None)  # nothing due soon needs it
            return
        if action.action_id not in self._actions and action.kind == "scheduled":
            self._snapshot_refs[action.record_key] = (
                self._snapshot_refs.get(action.record_key, 0) + 1
            )
        self._actions[action.action_id] = action
        if action.action_id not in self._inflight:
            self._heap.push(action.action_id, action.due_ms, action.partition)
            self.changed.set()

    def drop(self, action_ids: set[str]) -> None:
        """Actions ended by an event (cancelled, superseded): out of the heap, and out
        of memory unless being fired (the fire ends them)."""
        for aid in action_ids:
            self._heap.remove(aid)
            if aid not in self._inflight:
                self._forget(aid)
                self._own.pop(aid, None)  # kept for it, though it was never pushed
                self._ended(aid)

    def _ended(self, action_id: str) -> None:
        if self._reads:
            self._ended_during_reads.add(action_id)

    def _forget(self, action_id: str) -> None:
        action = self._actions.pop(action_id, None)
        if action is None:
            return
        if action.kind == "instant":
            self._own.pop(action_id, None)
            return
        refs = self._snapshot_refs.get(action.record_key, 0) - 1
        if refs <= 0:
            self._snapshot_refs.pop(action.record_key, None)
            self._snapshots.pop(action.record_key, None)
        else:
            self._snapshot_refs[action.record_key] = refs

    def due(self, now_ms: int) -> list[Action]:
        """The actions due now, taken out of the heap and marked as being fired."""
        out: list[Action] = []
        for action_id, _due_ms, _partition in self._heap.pop_due(now_ms):
            action = self._actions.get(action_id)
            if action is None or not self._owns(action.partition):
                continue
            self._inflight.add(action_id)
            out.append(action)
        return out

    def claim(self, actions: Sequence[Action]) -> list[Action]:
        """Actions to end without a fire (a config change cancels them): those not being
        fired, taken out of the heap and marked as being ended, so that neither a fire
        nor a refill takes them meanwhile. ``fired(action, None)`` ends each. Read them
        from the store under ``reading()``: one a fire ended meanwhile is left out."""
        claimed: list[Action] = []
        for action in actions:
            aid = action.action_id
            if (
                aid in self._inflight
                or aid in self._ended_during_reads  # (claimed under ``reading``)
                or not self._owns(action.partition)
            ):
                continue
            if aid in self._actions:
                self._heap.remove(aid)
            else:  # (as ``push`` counts it: ``fired`` forgets it as it forgets those)
                self._actions[aid] = action
                if action.kind == "scheduled":
                    self._snapshot_refs[action.record_key] = (
                        self._snapshot_refs.get(action.record_key, 0) + 1
                    )
            self._inflight.add(aid)
            claimed.append(action)
        return claimed

    def ends_elsewhere(self, action_id: str) -> bool:
        """Whether the action is being fired or ended by a sweep (its fire or the sweep
        ends it), or ended during the current reads (``reading``): an event must not
        end it too."""
        return action_id in self._inflight or action_id in self._ended_during_reads

    def next_due_ms(self) -> int | None:
        return self._heap.next_due_ms()

    def fired(self, action: Action, retry: Action | None, *, keep: bool = True) -> None:
        """An attempt is over: the action is no longer in flight; ``retry`` is pushed
        (if ``keep``: not stopping, partition still owned), else the action is
        forgotten unless it is pending in the heap again."""
        self._inflight.discard(action.action_id)
        if retry is not None and keep and self._owns(action.partition):
            self.push(retry)
        elif action.action_id not in self._heap:
            self._forget(action.action_id)
            if retry is None:
                self._ended(action.action_id)

    # -- records --------------------------------------------------------------------

    def saw(self, record_key: str, event: RecordEvent) -> None:
        """A newer version of a record: kept if an action in memory renders it."""
        if record_key in self._snapshots:
            self._snapshots[record_key] = event

    def keep(self, action: Action, event: RecordEvent) -> None:
        """The version an action about to be pushed renders: for an instant action its
        own event, for a scheduled one its record's latest."""
        if action.kind == "instant":
            self._own[action.action_id] = event
        else:
            self._snapshots[action.record_key] = event

    async def record_of(self, action: Action) -> RecordEvent | None:
        """What ``action`` renders (SPEC §5): an instant action its triggering event,
        a scheduled one the latest version of its record; from memory, else the store.

        An instant action stored before crmhooks kept events per action renders its
        record's stored snapshot, the best version there is."""
        if action.kind == "instant":
            own = self._own.get(action.action_id)
            if own is not None:
                return own
            data = (await self._store.action_events([action.action_id])).get(action.action_id)
            own = event_or_none(data)
            if own is not None:
                return own
        event = self._snapshots.get(action.record_key)
        if event is None:
            data = (await self._store.snapshots([action.record_key])).get(action.record_key)
            event = event_or_none(data)
        return event

    # -- partitions and windows ------------------------------------------------------

    async def load(self, partitions: Sequence[int]) -> int:
        """A partition is assigned: its actions due within the window; how many."""
        with self.reading():
            loaded = await self._store.load_pending(sorted(partitions), self._loaded_until_ms)
            await self._schedule_loaded(loaded)
        return len(loaded)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Around a read of pending actions from the store and what is done with them:
        the actions that end meanwhile are known (``_ended_during_reads``)."""
        self._reads += 1
        try:
            yield
        finally:
            self._reads -= 1
            if not self._reads:
                self._ended_during_reads.clear()

    def drop_partitions(self, partitions: set[int]) -> None:
        """Revoked: their actions leave memory (but those being fired, which end)."""
        for p in partitions:
            self._heap.drop_partition(p)
        for aid in [a for a, act in self._actions.items() if act.partition in partitions]:
            if aid not in self._inflight:
                self._forget(aid)

    async def _schedule_loaded(self, loaded: Sequence[Action]) -> None:
        """Put actions read from the store into the heap, unless memory knows better.

        Fires run meanwhile: an action may have finished, or moved for a retry, since
        the rows were read. So the statuses are read again last, and from then on
        nothing awaits until every action is pushed or dropped; one that ended after
        the store answered (its end written, then the attempt's report, or a sweep,
        forgot it) is known from ``_ended_during_reads``.
        """
        mine = [a for a in loaded if self._owns(a.partition)]
        if not mine:
            return
        own: dict[str, RecordEvent] = {}  # instant action id → its triggering event
        instant = [
            a.action_id for a in mine if a.kind == "instant" and a.action_id not in self._own
        ]
        if instant:
            for action_id, data in (await self._store.action_events(instant)).items():
                found = event_or_none(data)
                if found is not None:
                    own[action_id] = found
        # Scheduled actions render their record's latest version, and so do instant
        # ones stored before events were kept per action (the best version there is).
        older = [
            a
            for a in mine
            if a.kind == "instant" and a.action_id in instant and a.action_id not in own
        ]
        missing = [
            a.record_key
            for a in mine
            if a.kind == "scheduled" and a.record_key not in self._snapshots
        ]
        keys = list(dict.fromkeys(missing + [a.record_key for a in older]))
        if keys:
            stored = {k: event_or_none(d) for k, d in (await self._store.snapshots(keys)).items()}
            for record_key in missing:
                found = stored.get(record_key)
                if found is not None:
                    self._snapshots[record_key] = found
            for action in older:
                found = stored.get(action.record_key)
                if found is not None:
                    own[action.action_id] = found
        statuses = await self._store.action_statuses([a.action_id for a in mine])
        for action in mine:
            if (
                statuses.get(action.action_id) == "pending"
                and action.action_id not in self._actions  # in the heap, queued or firing
                and action.action_id not in self._ended_during_reads
                and self._owns(action.partition)
            ):
                found = own.get(action.action_id)
                if found is not None:
                    self._own[action.action_id] = found
                self.push(action)

    async def refill_loop(self, partitions: Callable[[], list[int]]) -> None:
        """Every half horizon, the actions of the next window of ``partitions()``."""
        while True:
            await self._clock.sleep_until(self._loaded_until_ms - HORIZON_MS // 2)
            start = self._loaded_until_ms
            until = self._clock.now_ms() + HORIZON_MS
            # The new window is memory's before the read: an action pushed while it
            # runs (a retry whose report was written meanwhile) stays in the heap, where
            # the read may not see it; one it sees as well is not pushed twice.
            self._loaded_until_ms = until
            with self.reading():
                loaded = await self._store.load_pending(partitions(), until, from_ms=start)
                await self._schedule_loaded(loaded)


def event_or_none(data: dict[str, Any] | None) -> RecordEvent | None:
    """A stored snapshot as an event; None when absent or (from an old file) invalid."""
    if data is None:
        return None
    try:
        return event_from_json(data)
    except InvalidEvent:
        return None
