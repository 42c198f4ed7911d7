"""What is done and when it is committed: batches in reading order, their offsets, and
the instant actions sent before they were stored.

A batch's offsets may be committed once everything it created is durable (SPEC
§10). Most of a batch is stored before its results are produced (see
``app.Processor``), but new instant actions are sent first and stored when they
finish, with their final status: one row instead of three. So each batch gets a
``Ticket`` listing its instant actions not stored yet; when the last one is
stored (finished, or as pending once INSTANT_COMMIT_WAIT_MS passed) the batch is
settled, and batches hand their offsets over in the order they were read.

Offsets are committed in the background, one commit at a time, each with every
offset handed over since the one before, so the next batch never waits for the
broker's answer; a rebalance and a stop wait for it (``committed``). A failed
commit is logged and its offsets go with the next: events after the last commit
are only processed again, and actions keep their ids.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from crmhooks.actions import Action
from crmhooks.clock import Clock
from crmhooks.errors import KafkaIOError
from crmhooks.metrics import Metrics
from crmhooks.store import Store, WriteBatch

log = logging.getLogger(__name__)

# Instant actions are sent before they are stored: their event's offset is
# committed once they are finished and stored. One still unfinished this long
# after its event was read is stored as pending, so that a slow or hung endpoint
# holds commits back by at most this much.
INSTANT_COMMIT_WAIT_MS = 2_000
# Past that deadline, a batch whose last actions are being finished (result being
# produced, row being stored) is looked at again after this long, or at any change.
SETTLING_RECHECK_MS = 100
# Reading pauses while this many instant actions are unfinished and unstored, and
# resumes below half of it: memory stays bounded while a backlog is drained, and
# actions are sent soon after they are read (well within INSTANT_COMMIT_WAIT_MS).
UNSTORED_BUDGET = 2048


class Committer(Protocol):
    """Commits consumed offsets (``KafkaIO.commit``): partition → next offset."""

    async def commit(self, next_offsets: dict[int, int]) -> None: ...


@dataclass(slots=True)
class Ticket:
    """A batch read, until its instant actions are settled (finished or stored)."""

    offsets: dict[int, int]  # partition → next offset, committed once settled
    deadline_ms: int  # its unsettled instant actions are stored as pending then
    waiting: set[str] = field(default_factory=set)  # ids of those not stored yet


# An instant action sent (or about to be) before being stored: its batch's ticket,
# the action, and its event's bytes (stored with it unless it is delivered at once).
Unstored = tuple[Ticket, Action, bytes]


class Checkpoint:
    """Owns the batches not yet committed, the offsets to commit and the unstored
    instant actions; ``owns`` says which partitions are still this process's."""

    def __init__(
        self, store: Store, clock: Clock, owns: Callable[[int], bool], metrics: Metrics
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._owns = owns
        self._committer: Committer | None = None
        self._committing: asyncio.Task[None] | None = None  # the running offset commit
        self._to_commit: dict[int, int] = {}  # partition → next offset, not yet committed
        # Batches in the order they were read, each until its instant actions are
        # finished or stored; then their offsets go to commit_soon, in that order.
        self._tickets: deque[Ticket] = deque()
        self._tickets_changed = asyncio.Event()
        # Instant actions sent (or about to be) before being stored, by action id.
        self._unstored: dict[str, Unstored] = {}
        # Set while the instant actions read and not settled are under the budget:
        # the consume loop fetches only then (``reading``).
        self._reading = asyncio.Event()
        self._reading.set()
        self.commit_failures = 0

    def __repr__(self) -> str:
        return (
            f"Checkpoint(batches={len(self._tickets)}, unstored={len(self._unstored)}, "
            f"to_commit={self._to_commit})"
        )

    def attach(self, committer: Committer) -> None:
        self._committer = committer

    # -- batches -------------------------------------------------------------------

    def add_batch(
        self, next_offsets: dict[int, int], now_ms: int, unstored: Sequence[tuple[Action, bytes]]
    ) -> Ticket:
        """A batch is stored and produced, but for ``unstored`` (sent first): its offsets
        are committed once those are settled, after every batch read before it."""
        ticket = Ticket(next_offsets, now_ms + INSTANT_COMMIT_WAIT_MS)
        for action, raw in unstored:
            if action.action_id not in self._unstored:
                ticket.waiting.add(action.action_id)
                self._unstored[action.action_id] = (ticket, action, raw)
        self._tickets.append(ticket)
        if len(self._tickets) == 1:
            self._tickets_changed.set()  # the oldest now: the ticket loop waits for it
        self._advance()
        if len(self._unstored) >= UNSTORED_BUDGET and self._reading.is_set():
            # The consume loop just stops fetching; aiokafka keeps what it has
            # prefetched (at most a fetch per partition), ready when reading goes on.
            # Kafka's own pause dropped that, and the first fetch after resuming took
            # ~200 ms (aiokafka's fetcher notices a resumed partition late): the
            # processor ran dry for most of it, every time the budget was reached.
            self._reading.clear()
        return ticket

    def take_unstored(self, action_id: str) -> Unstored | None:
        """The action is being stored by the caller (finished, or for its retry): it is
        no longer this checkpoint's to store. The caller ``settled`` it once stored, or
        ``give_back`` if that failed."""
        return self._unstored.pop(action_id, None)

    def give_back(self, action_id: str, entry: Unstored) -> None:
        """Storing it failed: it stays to store (deadline, stop) as pending."""
        self._unstored.setdefault(action_id, entry)
        self._tickets_changed.set()

    def is_unstored(self, action_id: str) -> bool:
        return action_id in self._unstored

    def unstored_ids(self) -> list[str]:
        """The instant actions sent (or being sent) and not stored yet."""
        return list(self._unstored)

    def settled(self, action: Action, ticket: Ticket) -> None:
        """An instant action is stored (finished or pending): its batch may commit."""
        ticket.waiting.discard(action.action_id)
        if not self._reading.is_set() and len(self._unstored) < UNSTORED_BUDGET // 2:
            self._reading.set()
        self._advance()

    def _advance(self) -> None:
        """Hand over the offsets of the batches, oldest first, whose actions are settled.

        The ticket loop hears of it only when the oldest batch is another one: it
        waits for that batch's deadline, which the others' settling does not move.
        """
        offsets: dict[int, int] = {}
        popped = False
        while self._tickets and not self._tickets[0].waiting:
            popped = True
            for p, o in self._tickets.popleft().offsets.items():
                offsets[p] = max(o, offsets.get(p, 0))
        if offsets:
            self.commit_soon(offsets)
        if popped:
            self._tickets_changed.set()

    # -- reading budget -------------------------------------------------------------

    def may_read(self) -> bool:
        return self._reading.is_set()

    async def until_may_read(self) -> None:
        await self._reading.wait()

    def release_reader(self) -> None:
        """Let a consume loop waiting for the budget see a stop."""
        self._reading.set()

    # -- storing what was sent unstored ----------------------------------------------

    async def store_unstored(self, before_ms: int | None = None) -> None:
        """Store as pending the instant actions not stored yet (read before ``before_ms``)."""
        batch = WriteBatch()
        taken: list[Unstored] = []
        for action_id, (ticket, action, raw) in list(self._unstored.items()):
            if before_ms is not None and ticket.deadline_ms > before_ms:
                continue
            del self._unstored[action_id]
            taken.append((ticket, action, raw))
            batch.new_actions.append(action)
            # Its own event, not the record's snapshot: it renders (now, on each retry,
            # after a restart) the record as it was in this event (SPEC §5), and a
            # later edit's snapshot, which scheduled actions render, stays in place.
            batch.action_events.append((action.action_id, action.partition, raw))
        if not taken:
            return
        try:
            await self._store.write(batch)
        except BaseException:
            for entry in taken:  # still unstored: tried again
                self._unstored.setdefault(entry[1].action_id, entry)
            raise
        log.info("%d instant actions not finished in time: stored as pending", len(taken))
        for ticket, action, _ in taken:
            self.settled(action, ticket)

    async def deadline_loop(self) -> None:
        """Store the instant actions still unfinished INSTANT_COMMIT_WAIT_MS after their
        batch was read, so that no endpoint holds commits back for longer."""
        while True:
            self._tickets_changed.clear()
            if not self._tickets:
                await self._tickets_changed.wait()
                continue
            now_ms = self._clock.now_ms()
            head = self._tickets[0]
            wake_ms = head.deadline_ms
            if now_ms >= head.deadline_ms:
                try:
                    await self.store_unstored(before_ms=now_ms)
                except Exception:
                    log.exception("storing unfinished instant actions failed; trying again")
                    await asyncio.sleep(1.0)
                    continue
                if not self._tickets or self._tickets[0] is not head or not head.waiting:
                    continue
                # The head still waits for actions being finished right now (their
                # report or final result stores them): wait for that, not spin.
                wake_ms = now_ms + SETTLING_RECHECK_MS
            sleeper = asyncio.create_task(self._clock.sleep_until(wake_ms))
            changed = asyncio.create_task(self._tickets_changed.wait())
            try:
                await asyncio.wait([sleeper, changed], return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                changed.cancel()

    # -- committing offsets --------------------------------------------------------------

    def commit_soon(self, next_offsets: dict[int, int]) -> None:
        """Commit in the background: one commit at a time, each with every offset
        handed over since the one before."""
        for p, o in next_offsets.items():
            self._to_commit[p] = max(o, self._to_commit.get(p, 0))
        if self._committing is None or self._committing.done():
            self._committing = asyncio.create_task(self._commit_pending(), name="commit")

    async def _commit_pending(self) -> None:
        """Commit what the batches handed over, until nothing is left.

        A failed commit (the group rebalancing, the coordinator moving) is logged
        and its offsets go with the next commit: not a loss, since events after the
        last commit are processed again after a crash or by the next owner, and
        actions keep their ids, so nothing is created or sent twice.
        """
        if self._committer is None:
            raise RuntimeError("checkpoint has nothing to commit with (attach a committer)")
        while self._to_commit:
            # Only partitions still owned: a revoked one's next owner commits its own.
            offsets = {p: o for p, o in self._to_commit.items() if self._owns(p)}
            self._to_commit = {}
            try:
                await self._committer.commit(offsets)
            except KafkaIOError as exc:
                for p, o in offsets.items():
                    self._to_commit[p] = max(o, self._to_commit.get(p, 0))
                self.commit_failures += 1
                self._metrics.commit_failures += 1
                log.warning("offsets %s not committed, tried again with the next: %s", offsets, exc)
                return
            self._metrics.lag.committed_now(offsets)

    def raise_if_commit_failed(self) -> None:
        """A commit task that ended with an exception: only a bug raises there."""
        if self._committing is not None and self._committing.done():
            self._committing.result()

    async def committed(self) -> None:
        """Until the offsets handed over are committed (or failed to, logged)."""
        if self._committing is not None:
            await self._committing
        if self._to_commit:  # a commit failed: one more try now
            self._committing = asyncio.create_task(self._commit_pending(), name="commit")
            await self._committing

    async def finish_commit(self) -> None:
        """At a stop: the commit still running, if consuming failed and left it."""
        if self._committing is not None and not self._committing.done():
            try:
                await self._committing
            except Exception:
                log.exception("offsets not committed")

    def forget_partitions(self, partitions: set[int]) -> None:
        """Revoked: their offsets are not committed here, the next owner reprocesses."""
        for p in partitions:
            self._to_commit.pop(p, None)
