"""The processor: consume events, plan actions, keep the delay heap, fire and report.

Order of effects for a batch of events (``_process_batch``), and why:

1. **store** — new, moved and cancelled actions, record snapshots and rule state
   are committed to SQLite in one transaction, and its rows sent to the changelog
   topic and acknowledged. From here on, nothing the batch created can be lost,
   whatever happens next, on this machine or the next owner of the partition.
2. **produce** — result records (``scheduled``, ``cancelled``, ``skipped``,
   ``suspended``) and dead letters are sent to Kafka.
3. **flush** — we wait until the broker acknowledged every one of them.
4. **commit** — only then the offsets after the batch are committed. The commit
   goes out in the background (``_commit_soon``), one commit at a time, so the
   next batch need not wait for the broker's answer; a rebalance and a stop wait
   for it. A failed commit (a rebalance under way) is logged and retried with the
   next: events after the last commit are only processed again.

A crash before 4 replays the batch: actions have deterministic ids and are
inserted with ``INSERT OR IGNORE``, so replaying creates nothing twice; a result
record may repeat, never go missing.

New instant actions skip step 1: they are sent at once, and stored when finished,
with their final status (one row instead of three; in the changelog, a share of
one record holding a transaction's such rows, instead of three records). Step 4
then waits until every instant action of the batch is stored, finished or, after
INSTANT_COMMIT_WAIT_MS, as pending (``_Ticket``); batches commit in the order they
were read. A crash before that reads the event again:
a finished action is known by its id and not sent again; one in flight is sent
again (at least once, same ``webhook-id``). Reading pauses while
UNSTORED_BUDGET such actions are unsettled.

For one attempt of one action (``_fire``) the order is: quota count stored (a
block of units at a time, the next block written while the current one is used) →
request sent → result produced and acknowledged → action's new state stored
(finished, or moved for a retry). A crash between the last two sends the request
again after restart, with the same ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import orjson
from msgspec.structs import replace

from crmhooks.actions import Action
from crmhooks.clock import Clock
from crmhooks.config import Config
from crmhooks.delivery import Outcome, Transport
from crmhooks.errors import InvalidEvent, KafkaIOError, TemplateError
from crmhooks.events import RecordEvent, decode_wanted_event, event_from_json
from crmhooks.kafka_io import BatchRecord, Fetched, KafkaIO, Skipped
from crmhooks.modules import UNSUPPORTED_MODULES, ModuleCatalog
from crmhooks.results import dead_letter, encode, result_record
from crmhooks.rules import RuleIndex
from crmhooks.store import Store, WriteBatch
from crmhooks.templates import CompiledWebhook, RenderContext, RenderedRequest
from crmhooks.timers import DelayHeap
from crmhooks.workflow import EventPlan, RecordState, once_key, plan_event

log = logging.getLogger(__name__)

# The heap in memory holds only actions due within this horizon; the store holds
# the rest and a refill loads the next window every half horizon. One minute keeps
# memory flat with a million pending timers while a refill query stays cheap.
HORIZON_MS = 60_000
# Events read per fetch: large enough to amortise one store commit and one
# producer flush over many events, small enough that planning them (~15 µs an
# instant one, on the loop, without a pause) does not hold up the answers of the
# requests in flight: with 2,000 the receivers sat idle while a batch was planned,
# the processor's core was 82-89 % busy; with 500, 95-99 % (instant bench, 3 A/B
# pairs: 8,434-9,321 -> 9,473-10,128 deliveries/s; filtering unchanged).
FETCH_MAX_RECORDS = 500
FETCH_TIMEOUT_MS = 200
# Quota units stored per write: one commit (and changelog round trip) per block of
# requests of an organisation instead of one each. The next block is written once
# half of the current one is used, so requests seldom wait for a write; at most
# two blocks stay counted unused after a crash, none after a stop. A block is a
# hundredth of the daily limit, between QUOTA_BLOCK and QUOTA_BLOCK_MAX units: a
# crash costs an organisation at most 2 % of its day (or 32 requests), and one with
# a large limit, sending thousands a second, does not wait for a write every 16.
QUOTA_BLOCK = 16
QUOTA_BLOCK_MAX = 1024
# Instant actions are sent before they are stored (see _plan_batch): their event's
# offset is committed once they are finished and stored. One still unfinished this
# long after its event was read is stored as pending, so that a slow or hung
# endpoint holds commits back by at most this much.
INSTANT_COMMIT_WAIT_MS = 2_000
# Past that deadline, a batch whose last actions are being finished (result being
# produced, row being stored) is looked at again after this long, or at any change.
SETTLING_RECHECK_MS = 100
# Reading pauses while this many instant actions are unfinished and unstored, and
# resumes below half of it: memory stays bounded while a backlog is drained, and
# actions are sent soon after they are read (well within INSTANT_COMMIT_WAIT_MS).
UNSTORED_BUDGET = 2048
# An unexpected error while firing (a store or Kafka hiccup): the action is tried
# again this much later instead of waiting for a restart.
FIRE_ERROR_RETRY_MS = 5_000
# How often finished actions past their retention are forgotten.
PURGE_EVERY_MS = 3_600_000
# How often a running processor looks for `crmhooks resume` written by another process.
RESUME_POLL_S = 1.0

Produced = tuple[str, bytes | None, bytes]
# An event some rule must plan for: its partition, record, event and canonical module.
ToPlan = tuple[int, BatchRecord, RecordEvent, str]

# Kafka header `crmhooks replay-dlq` puts on the events it re-publishes: their
# actions that ended without being delivered (quota, template error) may run again.
REPLAY_HEADER = "crmhooks-replay"


class Processor:
    """Owns the delay heap, the quota counters and the suspensions of its partitions."""

    def __init__(self, config: Config, store: Store, transport: Transport, clock: Clock) -> None:
        self.config = config
        self.store = store
        self.transport = transport
        self.clock = clock
        self.catalog = ModuleCatalog(config.custom_modules)
        self.index = RuleIndex(config.rules, self.catalog)
        self.rules = {r.id: r for r in config.rules}
        self.webhooks = {
            name: CompiledWebhook(w, self.catalog) for name, w in config.webhooks.items()
        }
        self.heap = DelayHeap()
        self._actions: dict[str, Action] = {}  # actions in the heap or firing
        self._snapshots: dict[str, RecordEvent] = {}  # record_key → latest event seen
        self._snapshot_refs: dict[str, int] = {}
        self._inflight: set[str] = set()
        self._fire_tasks: set[asyncio.Task[None]] = set()
        self._reporting: _ReportGroup | None = None  # attempts reported, not written yet
        self._report_tasks: set[asyncio.Task[None]] = set()
        self._report_last: asyncio.Task[None] | None = None  # the latest group's write
        self._owned: set[int] = set()
        self._loaded_until_ms = 0
        self._quota: dict[tuple[str, str], int] = {}
        # org id -> (epoch second, its quota day there, the daily limit): _quota_day.
        self._quota_days: dict[str, tuple[int, str, int]] = {}
        self._quota_warned: set[tuple[str, str]] = set()
        # (org, day, partition) → units counted in the store ahead of use (QUOTA_BLOCK)
        self._reserved: dict[tuple[str, str, int], _Reservation] = {}
        self._suspensions: dict[tuple[str, str, str], tuple[int, bool]] = {}
        self._fingerprints: dict[tuple[str, str], str] = {}
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()  # one batch at a time; rebalances wait for it
        self._committing: asyncio.Task[None] | None = None  # the running offset commit
        self._to_commit: dict[int, int] = {}  # partition → next offset, not yet committed
        self._quota_writes: set[asyncio.Task[None]] = set()
        # Batches in the order they were read, each until its instant actions are
        # finished or stored; then their offsets go to _commit_soon, in that order.
        self._tickets: deque[_Ticket] = deque()
        self._tickets_changed = asyncio.Event()
        # Instant actions sent (or about to be) before being stored: action_id →
        # (its batch's ticket, the action, the event's bytes for its snapshot).
        self._unstored: dict[str, tuple[_Ticket, Action, bytes]] = {}
        # Set while the instant actions read and not settled are under the budget:
        # the consume loop fetches only then (``_pause_busy``, ``_settled``).
        self._reading = asyncio.Event()
        self._reading.set()
        self._stopping = False
        self._kio: KafkaIO | None = None
        # Endpoint isolation: at most max_in_flight_per_host actions of one host fire at
        # once; the others wait in that host's queue, so a hung host can take neither
        # tasks nor request slots from the healthy ones.
        self._host_of = {name: _host_key(w.url) for name, w in config.webhooks.items()}
        self._host_active: dict[str, int] = {}
        self._host_waiting: dict[str, deque[Action]] = {}
        self.stats = {
            "events": 0,
            "dead_letters": 0,
            "results": 0,
            "batches": 0,
            "commit_failures": 0,
        }

    def __repr__(self) -> str:
        return (
            f"Processor(partitions={sorted(self._owned)}, heap={len(self.heap)}, "
            f"in_flight={len(self._inflight)})"
        )

    @property
    def kio(self) -> KafkaIO:
        if self._kio is None:
            raise RuntimeError("processor is not running")
        return self._kio

    # -- life cycle -----------------------------------------------------------

    async def run(self, kio: KafkaIO, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then stop gracefully (SPEC §10)."""
        self._kio = kio
        self.store.changelog = kio.produce_changelog
        await self._load_suspensions()
        self._loaded_until_ms = self.clock.now_ms() + HORIZON_MS
        consume = asyncio.create_task(self._consume_loop(stop), name="consume")
        helpers = [
            asyncio.create_task(self._fire_loop(), name="fire"),
            asyncio.create_task(self._refill_loop(), name="refill"),
            asyncio.create_task(self._resume_poll_loop(), name="resume-poll"),
            asyncio.create_task(self._ticket_loop(), name="unstored-deadline"),
        ]
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            # kio.broken: Kafka can no longer be written to (no producer can be made).
            waited: list[asyncio.Future[Any]] = [consume, stopper, kio.broken, *helpers]
            done, _ = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            log.info("stopping: no more fetching, finishing in-flight requests")
            self._stopping = True
            stop.set()
            self._reading.set()  # (a consume loop waiting for the budget sees the stop)
            await consume
        finally:
            self._stopping = True
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            stopper.cancel()
            await self._drain_fires(self.config.delivery.shutdown_grace_s)
            try:  # what was not finished in time is stored, then every offset committed
                await self._store_unstored()
                await self._committed()
            except Exception:
                log.exception("unfinished instant actions not stored: their events run again")
            if self._committing is not None and not self._committing.done():
                try:  # left behind only when consuming failed
                    await self._committing
                except Exception:
                    log.exception("offsets not committed")
            try:
                await self._release_quota()
            except Exception as exc:  # stopping anyway: they stay counted, never overshoot
                log.warning("unused quota units not given back: %s", exc)

    async def _drain_fires(self, grace_s: float) -> None:
        pending: set[asyncio.Task[None]] = set()
        if self._fire_tasks:
            _, pending = await asyncio.wait(self._fire_tasks, timeout=grace_s)
        if pending:
            log.warning(
                "%d requests still in flight after %.1f s: left for restart", len(pending), grace_s
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._report_tasks:  # reports of cancelled ones: finished, not cut off
            await asyncio.gather(*self._report_tasks, return_exceptions=True)

    # -- partitions -----------------------------------------------------------

    async def on_revoked(self, partitions: set[int]) -> None:
        async with self._lock:  # never in the middle of a batch
            # Every batch's actions stored, so every offset can be committed: what
            # was processed is not processed again by the next owner.
            await self._store_unstored()
            await self._committed()
            for p in partitions:
                self._to_commit.pop(p, None)  # not committed: the next owner reprocesses
            self._owned -= partitions
            await self._release_quota(partitions)
            for p in partitions:
                self.heap.drop_partition(p)
            for aid in [a for a, act in self._actions.items() if act.partition in partitions]:
                if aid not in self._inflight:
                    self._forget(aid)
            log.info("partitions revoked: %s", sorted(partitions))

    async def on_assigned(self, partitions: set[int]) -> None:
        # aiokafka may hand out records of these partitions before this callback
        # returns: the lock keeps every batch waiting until their state is here.
        async with self._lock:
            new = partitions - self._owned
            if not new:
                return
            # Another process, maybe on another machine, may have owned these partitions
            # meanwhile: their rows come from the changelog first, and counters and
            # suspensions are read again rather than trusted from memory.
            restored = await self.store.restore(sorted(new), self.kio.read_changelog)
            if restored:
                log.info(
                    "restored %d rows of partitions %s from the changelog", restored, sorted(new)
                )
            await self._release_quota()
            self._quota.clear()
            await self._load_suspensions()
            self._owned |= new
            loaded = await self.store.load_pending(sorted(new), self._loaded_until_ms)
            await self._schedule_loaded(loaded)
            log.info("partitions assigned: %s (%d actions due soon)", sorted(new), len(loaded))

    # -- consuming ------------------------------------------------------------

    async def _consume_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self._committing is not None and self._committing.done():
                self._committing.result()  # only a bug raises here (see _commit_pending)
            if not self._reading.is_set():  # over the budget (_pause_busy)
                await self._reading.wait()
                continue
            records = await self.kio.fetch(FETCH_TIMEOUT_MS, FETCH_MAX_RECORDS)
            if not records:
                continue
            async with self._lock:
                await self._process_batch(records)
        async with self._lock:
            await self._committed()

    def _commit_soon(self, next_offsets: dict[int, int]) -> None:
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
        while self._to_commit:
            # Only partitions still owned: a revoked one's next owner commits its own.
            offsets = {p: o for p, o in self._to_commit.items() if p in self._owned}
            self._to_commit = {}
            try:
                await self.kio.commit(offsets)
            except KafkaIOError as exc:
                for p, o in offsets.items():
                    self._to_commit[p] = max(o, self._to_commit.get(p, 0))
                self.stats["commit_failures"] += 1
                log.warning("offsets %s not committed, tried again with the next: %s", offsets, exc)
                return

    async def _committed(self) -> None:
        """Until the offsets handed over are committed (or failed to, logged)."""
        if self._committing is not None:
            await self._committing
        if self._to_commit:  # a commit failed: one more try now
            self._committing = asyncio.create_task(self._commit_pending(), name="commit")
            await self._committing

    # -- instant actions sent before they are stored -----------------------------

    def _advance_tickets(self) -> None:
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
            self._commit_soon(offsets)
        if popped:
            self._tickets_changed.set()

    def _settled(self, action: Action, ticket: _Ticket) -> None:
        """An instant action is stored (finished or pending): its batch may commit."""
        ticket.waiting.discard(action.action_id)
        if not self._reading.is_set() and len(self._unstored) < UNSTORED_BUDGET // 2:
            self._reading.set()
        self._advance_tickets()

    def _pause_busy(self) -> None:
        """Stop reading while the instant actions read and not settled exceed the budget.

        The consume loop just stops fetching; aiokafka keeps what it has prefetched
        (at most a fetch per partition), ready when reading goes on. Kafka's own
        pause dropped that, and the first fetch after resuming took ~200 ms (aiokafka's
        fetcher notices a resumed partition late): the processor ran dry for most of
        it, every time the budget was reached, ~10 % of the bench's instant run."""
        if len(self._unstored) >= UNSTORED_BUDGET and self._reading.is_set():
            self._reading.clear()

    async def _store_unstored(self, before_ms: int | None = None) -> None:
        """Store as pending the instant actions not stored yet (read before ``before_ms``)."""
        batch = WriteBatch()
        taken: list[tuple[_Ticket, Action, bytes]] = []
        for action_id, (ticket, action, raw) in list(self._unstored.items()):
            if before_ms is not None and ticket.deadline_ms > before_ms:
                continue
            del self._unstored[action_id]
            taken.append((ticket, action, raw))
            batch.new_actions.append(action)
            batch.snapshots.append((action.record_key, action.partition, raw))
        if not taken:
            return
        try:
            await self.store.write(batch)
        except BaseException:
            for entry in taken:  # still unstored: tried again
                self._unstored.setdefault(entry[1].action_id, entry)
            raise
        log.info("%d instant actions not finished in time: stored as pending", len(taken))
        for ticket, action, _ in taken:
            self._settled(action, ticket)

    async def _ticket_loop(self) -> None:
        """Store the instant actions still unfinished INSTANT_COMMIT_WAIT_MS after their
        batch was read, so that no endpoint holds commits back for longer."""
        while True:
            self._tickets_changed.clear()
            if not self._tickets:
                await self._tickets_changed.wait()
                continue
            now_ms = self.clock.now_ms()
            head = self._tickets[0]
            wake_ms = head.deadline_ms
            if now_ms >= head.deadline_ms:
                try:
                    await self._store_unstored(before_ms=now_ms)
                except Exception:
                    log.exception("storing unfinished instant actions failed; trying again")
                    await asyncio.sleep(1.0)
                    continue
                if not self._tickets or self._tickets[0] is not head or not head.waiting:
                    continue
                # The head still waits for actions being finished right now (their
                # _settle or _final stores them): wait for that, not spin.
                wake_ms = now_ms + SETTLING_RECHECK_MS
            sleeper = asyncio.create_task(self.clock.sleep_until(wake_ms))
            changed = asyncio.create_task(self._tickets_changed.wait())
            try:
                await asyncio.wait([sleeper, changed], return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                changed.cancel()

    async def _process_batch(self, fetched: Fetched) -> None:
        now_ms = self.clock.now_ms()
        out: list[Produced] = []
        todo: list[ToPlan] = []
        next_offsets: dict[int, int] = {}
        # Looked up once a batch: the loop below runs for every event read.
        owned = self._owned
        max_bytes = self.config.kafka.max_event_bytes
        canonical = self.catalog.canonical
        needs_planning = self.index.needs_planning
        read = 0
        for partition, records in fetched:
            if partition not in owned:
                continue  # revoked since the fetch: the new owner reads it again
            if isinstance(records, Skipped):  # offsets the consumer could not decode
                out.append(self._skipped(records, now_ms))
                next_offsets[partition] = records.next_offset
                continue
            read += len(records)
            next_offsets[partition] = records[-1].offset + 1
            for rec in records:
                # Only events some rule must plan: rules with scheduled actions or
                # repeat="once" keep per-record state that a non-matching event may
                # change; instant-only rules can skip the store. The rest are
                # consumed, ignored, and not checked for repeated keys.
                try:
                    event = decode_wanted_event(rec.value, needs_planning, max_bytes)
                except InvalidEvent as exc:
                    out.append(self._poison(partition, rec, exc, now_ms))
                    continue
                if event is not None:
                    module = canonical(event.module)
                    # Calls, Notes and modules no rule can name: consumed, ignored.
                    if module is not None and event.module not in UNSUPPORTED_MODULES:
                        todo.append((partition, rec, event, module))
        self.stats["events"] += read
        batch = WriteBatch()
        heap_new: list[Action] = []
        heap_gone: list[str] = []
        unstored: list[tuple[Action, bytes]] = []
        if todo:
            await self._plan_batch(todo, now_ms, batch, out, heap_new, heap_gone, unstored)
        # 1. store, 2. produce, 3. flush (see the module docstring for why).
        await self.store.write(batch)
        await self.kio.produce_all(out)
        self.stats["results"] += len(out)
        gone = set(heap_gone)
        for aid in gone:
            self.heap.remove(aid)
            if aid not in self._inflight:
                self._forget(aid)
        # 4. commit, once the instant actions sent unstored are finished or stored.
        ticket = _Ticket(next_offsets, now_ms + INSTANT_COMMIT_WAIT_MS)
        for action, raw in unstored:
            if action.action_id not in self._unstored and action.action_id not in gone:
                ticket.waiting.add(action.action_id)
                self._unstored[action.action_id] = (ticket, action, raw)
        for action in heap_new:  # in plan order: a later move replaces an earlier push
            if action.action_id not in gone:
                self._push(action)
        self._tickets.append(ticket)
        if len(self._tickets) == 1:
            self._tickets_changed.set()  # the oldest now: the ticket loop waits for it
        self._advance_tickets()
        self._pause_busy()
        self.stats["batches"] += 1

    async def _plan_batch(
        self,
        todo: list[ToPlan],
        now_ms: int,
        batch: WriteBatch,
        out: list[Produced],
        heap_new: list[Action],
        heap_gone: list[str],
        unstored: list[tuple[Action, bytes]],
    ) -> None:
        """Plan the events of a batch into ``batch`` (to store), ``out`` (to produce),
        ``heap_new``/``heap_gone`` and ``unstored``.

        A new instant action is not stored here: it is sent first, and stored once,
        finished, with its final status (``_settle``), or as pending if it takes longer
        than INSTANT_COMMIT_WAIT_MS (``_store_unstored``). Its event's offset is
        committed after either, so a crash before sends it again (at least once, the
        same webhook-id), never loses it; and most instant actions cost one row and one
        changelog record instead of three of each.
        """
        record_keys = [ev.record_key for _, _, ev, _ in todo]  # a property: made once here
        states = {record_key: RecordState() for record_key in record_keys}
        rules = [self.index.candidates(ev.org_id, module) for _, _, ev, module in todo]
        # Pending actions matter to rules with scheduled actions only (~0.7 µs an
        # event to read): the records of events that only instant rules see go without.
        keys = list(
            dict.fromkeys(
                record_key
                for record_key, candidates in zip(record_keys, rules, strict=True)
                if any(r.scheduled for r in candidates)
            )
        )
        if keys:
            for action in await self.store.pending_for_records(keys):
                states[action.record_key].pending[action.action_id] = action
        once_keys = [
            once_key(r.id, record_key)
            for record_key, candidates in zip(record_keys, rules, strict=True)
            for r in candidates
            if r.repeat == "once"
        ]
        if once_keys:
            flags = await self.store.once_states(once_keys)
            for k, matched in flags.items():
                rule_id, record_key = k.split("\x1f", 1)
                states[record_key].once[rule_id] = matched
        plans: list[tuple[int, BatchRecord, RecordEvent, str, EventPlan]] = []
        for (partition, rec, event, module), record_key, candidates in zip(
            todo, record_keys, rules, strict=True
        ):
            plan = plan_event(
                event,
                module,
                candidates,
                states[record_key],
                config=self.config,
                partition=partition,
                offset=rec.offset,
                now_ms=now_ms,
                is_suspended=self._is_suspended,
            )
            plans.append((partition, rec, event, record_key, plan))
        created = [a.action_id for *_, p in plans for a in p.new_actions]
        known = await self.store.action_statuses(created) if created else {}
        results_topic = self.config.kafka.results_topic
        for partition, rec, event, record_key, plan in plans:
            key = event.org_id.encode()
            # The bytes as received: no re-encoding (rec.value is not None once decoded).
            raw = rec.value or orjson.dumps(event.data)
            if record_key in self._snapshots:
                self._snapshots[record_key] = event  # the latest, for those due soon
            snapshot_stored = plan.touched
            if plan.touched:
                batch.snapshots.append((record_key, partition, raw))
            for rule_id, matched in plan.once_updates:
                batch.once_state.append((once_key(rule_id, record_key), partition, matched))
            replayed = bool(rec.headers) and any(name == REPLAY_HEADER for name, _ in rec.headers)
            for action in plan.new_actions:
                status = known.get(action.action_id)
                if status is not None and status != "pending":
                    if status == "delivered" or not replayed:
                        continue  # finished before: a reprocessed event never sends again
                    batch.rearmed.append(action)  # replayed after its cause was fixed
                heap_new.append(action)
                self._snapshots[action.record_key] = event
                if action.kind == "instant" and status is None:
                    unstored.append((action, raw))  # sent first, stored when finished
                    continue
                batch.new_actions.append(action)
                if not snapshot_stored:  # an instant action stored: renders after a restart
                    snapshot_stored = True
                    batch.snapshots.append((record_key, partition, raw))
                if action.kind == "scheduled":
                    out.append((results_topic, key, encode(result_record(action, "scheduled"))))
            for action in plan.moved:
                batch.moved.append((action.action_id, action.due_ms, action.attempt))
                heap_new.append(action)
                out.append(
                    (
                        results_topic,
                        key,
                        encode(result_record(action, "scheduled", reason="rescheduled")),
                    )
                )
            for fin in plan.finished:
                a = fin.action
                if known.get(a.action_id, "pending") != "pending":
                    continue
                batch.new_actions.append(a)  # no-op when stored already; a tombstone if not
                batch.finished.append((a.action_id, fin.status, now_ms))
                heap_gone.append(a.action_id)
                out.append(
                    (results_topic, key, encode(result_record(a, fin.status, reason=fin.reason)))
                )

    def _skipped(self, skipped: Skipped, now_ms: int) -> Produced:
        self.stats["dead_letters"] += 1
        letter = dead_letter(
            error_code="internal_process_error",
            message=skipped.message,
            failed_at_ms=now_ms,
            topic=self.config.kafka.events_topic,
            partition=skipped.partition,
            offset=skipped.first_offset,
            key=None,
            event=None,
            raw=None,
        )
        return (self.config.kafka.dlq_topic, None, encode(letter))

    def _poison(self, partition: int, rec: BatchRecord, exc: InvalidEvent, now_ms: int) -> Produced:
        self.stats["dead_letters"] += 1
        log.warning("dead letter: partition %d offset %d: %s", partition, rec.offset, exc.message)
        letter = dead_letter(
            error_code="internal_process_error",
            message=f"invalid event: {exc.message}",
            failed_at_ms=now_ms,
            topic=self.config.kafka.events_topic,
            partition=partition,
            offset=rec.offset,
            key=rec.key,
            event=exc.parsed,
            raw=rec.value,
        )
        return (self.config.kafka.dlq_topic, rec.key, encode(letter))

    # -- the delay heap ---------------------------------------------------------

    def _push(self, action: Action) -> None:
        if action.due_ms >= self._loaded_until_ms:
            self._forget(action.action_id)  # the refill loads it when its window comes
            if action.record_key not in self._snapshot_refs:
                self._snapshots.pop(action.record_key, None)  # nothing due soon needs it
            return
        if action.action_id not in self._actions:
            self._snapshot_refs[action.record_key] = (
                self._snapshot_refs.get(action.record_key, 0) + 1
            )
        self._actions[action.action_id] = action
        if action.action_id not in self._inflight:
            self.heap.push(action.action_id, action.due_ms, action.partition)
            self._changed.set()

    def _forget(self, action_id: str) -> None:
        action = self._actions.pop(action_id, None)
        if action is None:
            return
        refs = self._snapshot_refs.get(action.record_key, 0) - 1
        if refs <= 0:
            self._snapshot_refs.pop(action.record_key, None)
            self._snapshots.pop(action.record_key, None)
        else:
            self._snapshot_refs[action.record_key] = refs

    async def _schedule_loaded(self, loaded: Sequence[Action]) -> None:
        """Put actions read from the store into the heap, unless memory knows better.

        Fires run meanwhile: an action may have finished, or moved for a retry, since
        the rows were read. So the statuses are read again last, and from then on
        nothing awaits until every action is pushed or dropped.
        """
        mine = [a for a in loaded if a.partition in self._owned]
        if not mine:
            return
        missing = [a.record_key for a in mine if a.record_key not in self._snapshots]
        if missing:
            stored = await self.store.snapshots(list(dict.fromkeys(missing)))
            for record_key, data in stored.items():
                found = _event_or_none(data)
                if found is not None:
                    self._snapshots[record_key] = found
        statuses = await self.store.action_statuses([a.action_id for a in mine])
        for action in mine:
            if (
                statuses.get(action.action_id) == "pending"
                and action.action_id not in self._actions  # in the heap, queued or firing
                and action.partition in self._owned
            ):
                self._push(action)

    async def _refill_loop(self) -> None:
        next_purge_ms = self.clock.now_ms() + PURGE_EVERY_MS
        while True:
            if self.clock.now_ms() >= next_purge_ms:
                next_purge_ms = self.clock.now_ms() + PURGE_EVERY_MS
                retention_ms = int(self.config.store.finished_retention_s * 1000)
                await self.store.purge_finished(
                    sorted(self._owned), self.clock.now_ms() - retention_ms
                )
            await self.clock.sleep_until(self._loaded_until_ms - HORIZON_MS // 2)
            start = self._loaded_until_ms
            until = self.clock.now_ms() + HORIZON_MS
            loaded = await self.store.load_pending(sorted(self._owned), until, from_ms=start)
            self._loaded_until_ms = until
            await self._schedule_loaded(loaded)

    async def _resume_poll_loop(self) -> None:
        version = await self.store.data_version()
        while True:
            await asyncio.sleep(RESUME_POLL_S)
            now_version = await self.store.data_version()
            if now_version != version:
                version = now_version
                await self._load_suspensions()

    async def _fire_loop(self) -> None:
        while not self._stopping:
            for action_id, _due_ms, _partition in self.heap.pop_due(self.clock.now_ms()):
                action = self._actions.get(action_id)
                if action is None or action.partition not in self._owned:
                    continue
                self._inflight.add(action_id)
                host = self._host_of[action.webhook]
                free = self._host_active.get(host, 0) < self.config.delivery.max_in_flight_per_host
                if free and not self._host_waiting.get(host):
                    self._start_fire(host, action)
                else:  # a task of the host takes it when a slot is free
                    self._host_waiting.setdefault(host, deque()).append(action)
            next_due = self.heap.next_due_ms()
            waits: list[asyncio.Task[Any]] = [asyncio.create_task(self._changed.wait())]
            if next_due is not None:
                waits.append(asyncio.create_task(self.clock.sleep_until(next_due)))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            self._changed.clear()

    def _start_fire(self, host: str, action: Action) -> None:
        self._host_active[host] = self._host_active.get(host, 0) + 1
        task = asyncio.create_task(self._fire_host(host, action), name=f"fire {host}")
        self._fire_tasks.add(task)
        task.add_done_callback(self._fire_tasks.discard)

    # -- firing -----------------------------------------------------------------

    async def _fire_host(self, host: str, action: Action) -> None:
        """Fire ``action`` (it holds a slot of its host), then the host's waiting actions
        while a slot is free: a busy host's queue is served by as many tasks as it has
        slots, not by a task an action (~2 µs each). An attempt's report is written
        after it (``_settle``), so the next request goes as soon as an answer is in."""
        limit = self.config.delivery.max_in_flight_per_host
        while True:
            await self._fire_guarded(host, action)
            waiting = self._host_waiting.get(host)
            if not waiting or self._stopping or self._host_active[host] >= limit:
                break
            self._host_active[host] += 1
            action = waiting.popleft()
        if waiting is not None and not waiting:
            del self._host_waiting[host]

    async def _fire_guarded(self, host: str, action: Action) -> None:
        released = False

        def release_host() -> None:
            """The host's slot is free once its answer is in: reporting needs no slot."""
            nonlocal released
            if not released:
                released = True
                self._host_active[host] -= 1

        retry: Action | None = None
        settled = False
        try:
            settled = await self._fire(action, release_host)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Still pending in the store: try again shortly rather than wait for a restart.
            log.exception(
                "action %s: unexpected error while firing; again in %d ms",
                action.action_id,
                FIRE_ERROR_RETRY_MS,
            )
            retry = replace(action, due_ms=self.clock.now_ms() + FIRE_ERROR_RETRY_MS)
        finally:
            if not settled:  # else once reported (_reported)
                self._fire_over(action, retry)
            release_host()

    def _fire_over(self, action: Action, retry: Action | None) -> None:
        """An attempt is over (and reported, if it was sent): the action is no longer
        in flight; ``retry`` is pushed, else the action is forgotten unless pending."""
        self._inflight.discard(action.action_id)
        if retry is not None and not self._stopping and action.partition in self._owned:
            self._push(retry)
        elif action.action_id not in self.heap:
            self._forget(action.action_id)

    async def _load_suspensions(self) -> None:
        """Read suspensions; one recorded under another config of its rule or webhook is lifted.

        Only webhooks with failures counted (or suspended) are kept in memory: a reset
        one is absent, so while every webhook delivers the table is empty and the
        look-ups of each delivery (``_is_suspended``, ``_count_success``) are skipped."""
        table: dict[tuple[str, str, str], tuple[int, bool]] = {}
        for skey, (failed, suspended, fingerprint) in (await self.store.suspension_table()).items():
            if fingerprint == self._fingerprint(skey[1], skey[2]):
                if failed or suspended:
                    table[skey] = (failed, suspended)
            elif suspended:
                log.info("suspension of %s lifted: its rule or webhook config changed", skey)
        self._suspensions = table

    def _fingerprint(self, rule_id: str, webhook: str) -> str:
        """Changes whenever the rule's or the webhook's config changes (SPEC §5)."""
        found = self._fingerprints.get((rule_id, webhook))
        if found is None:
            text = repr((self.rules.get(rule_id), self.config.webhooks.get(webhook)))
            found = hashlib.sha256(text.encode()).hexdigest()[:16]
            self._fingerprints[(rule_id, webhook)] = found
        return found

    def _is_suspended(self, org_id: str, rule_id: str, webhook: str) -> bool:
        if not self._suspensions:  # no failure counted anywhere (see _load_suspensions)
            return False
        entry = self._suspensions.get((org_id, rule_id, webhook))
        return entry is not None and entry[1]

    def _count_quota(
        self, org_id: str, day: str, partition: int, left: int, limit: int
    ) -> asyncio.Future[None] | None:
        """Count one request; what to await before it is sent (its unit being stored),
        or None when the unit is stored already (most requests: no coroutine for them).

        Counts are stored a block at a time (never more than ``left``, the units of
        the limit not yet taken, beyond this one), so most requests find theirs
        already stored. Once half a block is used the next one is written in the
        background; a request taking a unit of a block still being written waits
        for that write. Unused units go back to the store on stop and on rebalance;
        after a crash they stay counted (never an overshoot).
        """
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

    def _reserve_block(self, key: tuple[str, str, int], units: int) -> _Reservation:
        """Count ``units`` in the store, in the background; the reservation's ``stored``
        is done once they are durable."""
        held = _Reservation(units, asyncio.get_running_loop().create_future())

        async def store_block() -> None:
            try:
                await self.store.write(WriteBatch(quota=[(*key, units)]))
            except BaseException as exc:
                held.remaining = 0
                held.stored.set_exception(exc)
                held.stored.exception()  # retrieved: the waiters see it too
                if not isinstance(exc, Exception):
                    raise
                return
            held.stored.set_result(None)

        task = asyncio.create_task(store_block(), name=f"quota {key}")
        self._quota_writes.add(task)
        task.add_done_callback(self._quota_writes.discard)
        return held

    async def _release_quota(self, partitions: set[int] | None = None) -> None:
        """Give back counted but unused units (of ``partitions``, or all)."""
        if self._quota_writes:  # blocks being written: their units are known once stored
            await asyncio.gather(*self._quota_writes, return_exceptions=True)
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
        await self.store.write(give_back)

    def _quota_day(self, org_id: str, now_ms: int) -> tuple[str, int]:
        """The organisation's calendar day at ``now_ms`` and its daily limit (SPEC §9).

        Remembered for the second (zones change offsets on whole seconds), as most
        requests of a busy organisation fall in the same second as the one before.
        """
        second = now_ms // 1000
        found = self._quota_days.get(org_id)
        if found is not None and found[0] == second:
            return found[1], found[2]
        org = self.config.org(org_id)
        day = datetime.fromtimestamp(second, ZoneInfo(org.time_zone)).date().isoformat()
        quota = self.config.quota
        limit = min(quota.daily_limit, quota.per_user * org.users)
        self._quota_days[org_id] = (second, day, limit)
        return day, limit

    async def _fire(self, action: Action, release_host: Callable[[], None]) -> bool:
        """One attempt of ``action``; True when it was handed to ``_settle`` (whose
        report ends it), False when it ended here."""
        cfg = self.config
        if action.partition not in self._owned:
            return False  # revoked while it waited for its host: the new owner fires it
        event = self._snapshots.get(action.record_key)
        if event is None:
            data = (await self.store.snapshots([action.record_key])).get(action.record_key)
            event = _event_or_none(data)
        if self._is_suspended(action.org_id, action.rule_id, action.webhook):
            await self._final(action, "suspended", reason="webhook_suspended")
            return False
        if event is None:
            await self._internal_error(action, None, "no stored snapshot of the record")
            return False
        now_ms = self.clock.now_ms()
        day, limit = self._quota_day(action.org_id, now_ms)
        qkey = (action.org_id, day)
        if qkey not in self._quota:
            used = await self.store.quota_used(action.org_id, day)
            self._quota.setdefault(qkey, used)
        if self._quota[qkey] >= limit:
            await self._over_quota(action, event, day, limit)
            return False
        try:
            request = self._render(action, event)
        except TemplateError as exc:
            await self._internal_error(action, event, f"template failed: {exc}")
            return False
        self._quota[qkey] += 1
        left = limit - self._quota[qkey]
        storing = self._count_quota(action.org_id, day, action.partition, left, limit)
        if storing is not None:
            await asyncio.shield(storing)
        webhook = cfg.webhooks[action.webhook]
        outcome = await self.transport.send(action.action_id, request, webhook.secret)
        release_host()
        if outcome.sent_at_ms is None:  # refused before sending: not counted, not retried
            if qkey in self._quota:  # (cleared meanwhile by a rebalance: the store counts)
                self._quota[qkey] -= 1
            await self.store.write(WriteBatch(quota=[(action.org_id, day, action.partition, -1)]))
            if outcome.error_class != "ssrf_blocked":  # a header or URL we could not send
                await self._internal_error(action, event, f"request not sent: {outcome.error}")
                return False
        self._settle(action, request, outcome)
        return True

    def _settle(self, action: Action, request: RenderedRequest, outcome: Outcome) -> None:
        """Report an attempt's outcome, then store what follows: done, or a retry.

        Both go into the open report group; ``_reported`` ends the attempt once
        the group is written. Nothing here awaits: the task that fired the action
        goes on with the next one of its host meanwhile."""
        attempt = action.attempt + 1
        shown = {"method": request.method, "url": request.redacted_url}
        delays = self.config.delivery.retry_delays_s
        # Written straight into the changes of this turn's reports: a WriteBatch of
        # its own and its merge cost ~2 µs a delivery.
        group = self._report_group()
        batch = group.batch
        retry: Action | None = None
        if outcome.delivered:
            status = "delivered"
            # DEBUG: one line per delivery costs ~5% CPU; results carry every delivery.
            log.debug("action %s delivered (HTTP %s)", action.action_id, outcome.http_status)
            self._count_success(action, batch)
        elif action.attempt < len(delays) and outcome.sent_at_ms is not None:
            status = "retrying"
            delay_s = delays[action.attempt]
            if outcome.retry_after_s is not None and outcome.http_status in (429, 503):
                delay_s = max(delay_s, outcome.retry_after_s)
            retry = action.retried(self.clock.now_ms() + int(delay_s * 1000))
            log.info(
                "action %s attempt %d failed (%s), retry at %d",
                action.action_id,
                attempt,
                outcome.error_class,
                retry.due_ms,
            )
        else:
            status = "failed"
            log.warning(
                "action %s failed on attempt %d: %s", action.action_id, attempt, outcome.error
            )
            self._count_failure(action, batch)
        unstored = self._unstored.pop(action.action_id, None)  # the caller now stores it
        if retry is not None and unstored is not None:
            batch.new_actions.append(retry)  # stored for the first time, for its retry
            batch.snapshots.append((action.record_key, action.partition, unstored[2]))
        elif retry is not None:
            batch.moved.append((action.action_id, retry.due_ms, retry.attempt))
        elif unstored is not None:  # stored for the first time, finished
            batch.done.append((action, status, self.clock.now_ms()))
        else:
            batch.finished.append((action.action_id, status, self.clock.now_ms()))
        rec = result_record(
            action,
            status,
            attempt=attempt,
            outcome=outcome,
            next_attempt_ms=retry.due_ms if retry else None,
            request=shown,
        )
        group.results.append((self.config.kafka.results_topic, action.org_id.encode(), encode(rec)))
        group.reporters.append((action, unstored, retry))

    def _reported(
        self,
        action: Action,
        unstored: tuple[_Ticket, Action, bytes] | None,
        retry: Action | None,
        error: BaseException | None,
    ) -> None:
        """An attempt's report is written (``error`` None), or failed to be: its end."""
        if error is None:
            if unstored is not None:
                self._settled(action, unstored[0])
            if retry is not None:
                self._inflight.discard(action.action_id)
                self._push(retry)
            self._fire_over(action, None)
            return
        if unstored is not None:  # stored later (deadline, stop) as pending
            self._unstored.setdefault(action.action_id, unstored)
            self._tickets_changed.set()
        again: Action | None = None
        if isinstance(error, Exception):  # not a stop: fired again shortly
            log.error(
                "action %s: its result was not reported (%s); again in %d ms",
                action.action_id,
                error,
                FIRE_ERROR_RETRY_MS,
            )
            again = replace(action, due_ms=self.clock.now_ms() + FIRE_ERROR_RETRY_MS)
        self._fire_over(action, again)

    def _report_group(self) -> _ReportGroup:
        """The attempts reported since the last group's write began: their results are
        produced, then their changes stored, together (one produce, one store write and
        one wait for them all; -3 µs of CPU an instant delivery). Each attempt adds
        itself to ``reporters``; ``_reported`` ends it with what either raised. Fill
        it without awaiting in between.

        One group is written at a time: the group is written next turn, or once the
        group before is written. Attempts reported meanwhile join it, so answers that
        arrive one by one (a slow endpoint) are still written many at a time, not in a
        store transaction and changelog record each."""
        group = self._reporting
        if group is None:
            group = self._reporting = _ReportGroup()
            task = asyncio.create_task(self._write_reports(group, self._report_last), name="report")
            self._report_last = task
            self._report_tasks.add(task)
            task.add_done_callback(self._report_tasks.discard)
        return group

    async def _write_reports(self, group: _ReportGroup, before: asyncio.Task[None] | None) -> None:
        if before is not None and not before.done():
            await asyncio.wait((before,))  # what it raised is its own reporters' concern
        self._reporting = None  # reports from now on go to the next group
        error: BaseException | None = None
        try:
            await self.kio.produce_all(group.results)
            self.stats["results"] += len(group.results)
            await self.store.write(group.batch)
        except BaseException as exc:  # a stop too: each attempt is ended, then it goes on
            error = exc
        for action, unstored, retry in group.reporters:
            try:
                self._reported(action, unstored, retry, error)
            except Exception:
                log.exception("action %s: ending its attempt failed", action.action_id)
        if error is not None and not isinstance(error, Exception):
            raise error

    def _render(self, action: Action, event: RecordEvent) -> RenderedRequest:
        tz = ZoneInfo(self.config.org(action.org_id).time_zone)
        ctx = RenderContext(
            module=action.module,
            record=event.record,
            related=event.related,
            user=event.user,
            organization=event.organization,
            time_zone=tz,
        )
        return self.webhooks[action.webhook].render(ctx)

    def _count_success(self, action: Action, batch: WriteBatch) -> None:
        if not self._suspensions:  # no failure counted anywhere (see _load_suspensions)
            return
        skey = (action.org_id, action.rule_id, action.webhook)
        if self._suspensions.get(skey, (0, False))[0]:
            del self._suspensions[skey]  # reset: stored as (0, False), absent in memory
            batch.suspensions.append(
                (
                    *skey,
                    action.partition,
                    0,
                    False,
                    self._fingerprint(action.rule_id, action.webhook),
                )
            )

    def _count_failure(self, action: Action, batch: WriteBatch) -> None:
        skey = (action.org_id, action.rule_id, action.webhook)
        failed = self._suspensions.get(skey, (0, False))[0] + 1
        threshold = self.config.delivery.suspend_after_failed_actions
        suspended = threshold > 0 and failed >= threshold
        if suspended:
            log.warning(
                "webhook %s of rule %s suspended for %s",
                action.webhook,
                action.rule_id,
                action.org_id,
            )
        self._suspensions[skey] = (failed, suspended)
        batch.suspensions.append(
            (
                *skey,
                action.partition,
                failed,
                suspended,
                self._fingerprint(action.rule_id, action.webhook),
            )
        )

    async def _final(
        self,
        action: Action,
        status: str,
        *,
        reason: str | None = None,
        error_class: str | None = None,
        error: str | None = None,
        extra: Sequence[Produced] = (),
    ) -> None:
        rec = result_record(action, status, reason=reason, error_class=error_class, error=error)
        out: list[Produced] = [
            (self.config.kafka.results_topic, action.org_id.encode(), encode(rec))
        ]
        await self.kio.produce_all([*out, *extra])
        unstored = self._unstored.pop(action.action_id, None)  # the caller now stores it
        ended = (action.action_id, status, self.clock.now_ms())
        batch = (  # stored for the first time, finished; or ended if still pending
            WriteBatch(done=[(action, status, ended[2])])
            if unstored is not None
            else WriteBatch(finished=[ended])
        )
        try:
            await self.store.write(batch)
        except BaseException:
            if unstored is not None:
                self._unstored.setdefault(action.action_id, unstored)
                self._tickets_changed.set()
            raise
        if unstored is not None:
            self._settled(action, unstored[0])

    async def _over_quota(self, action: Action, event: RecordEvent, day: str, limit: int) -> None:
        qkey = (action.org_id, day)
        message = f"{action.org_id} used {self._quota[qkey]} of {limit} notifications on {day}"
        if qkey not in self._quota_warned:
            self._quota_warned.add(qkey)
            log.warning("daily limit reached: %s", message)
        letter = self._action_letter(action, event, "daily_limit_reached", message)
        await self._final(action, "quota_exceeded", reason="daily_limit_reached", extra=[letter])

    async def _internal_error(
        self, action: Action, event: RecordEvent | None, message: str
    ) -> None:
        log.error("action %s: %s", action.action_id, message)
        letter = self._action_letter(action, event, "internal_process_error", message)
        await self._final(
            action, "failed", error_class="internal_process_error", error=message, extra=[letter]
        )

    def _action_letter(
        self, action: Action, event: RecordEvent | None, code: str, message: str
    ) -> Produced:
        letter = dead_letter(
            error_code=code,
            message=message,
            failed_at_ms=self.clock.now_ms(),
            topic=self.config.kafka.events_topic,
            partition=action.partition,
            offset=action.source_offset,
            key=action.org_id.encode(),
            # The latest version of the record, under the id of the event that created
            # the action, so that `replay-dlq` recreates this very action.
            event={**event.data, "event_id": action.event_id} if event is not None else None,
            raw=None,
            action_id=action.action_id,
            rule_id=action.rule_id,
            webhook=action.webhook,
        )
        return (self.config.kafka.dlq_topic, action.org_id.encode(), encode(letter))


@dataclass(slots=True)
class _Ticket:
    """A batch read, until its instant actions are settled (finished or stored)."""

    offsets: dict[int, int]  # partition → next offset, committed once settled
    deadline_ms: int  # its unsettled instant actions are stored as pending then
    waiting: set[str] = field(default_factory=set)  # ids of those not stored yet


@dataclass(slots=True)
class _ReportGroup:
    """Attempts reported together, written as one (``Processor._report_group``)."""

    # (action, its unstored entry, its retry) of each attempt: ``_reported`` ends
    # each once their results are acknowledged and their changes stored.
    reporters: list[tuple[Action, tuple[_Ticket, Action, bytes] | None, Action | None]] = field(
        default_factory=list
    )
    results: list[Produced] = field(default_factory=list)
    batch: WriteBatch = field(default_factory=WriteBatch)


@dataclass(slots=True)
class _Reservation:
    remaining: int  # units stored but not yet used
    stored: asyncio.Future[None]  # done when the block is durable
    next: _Reservation | None = None  # the block written ahead, used after this one


def _host_key(url: str) -> str:
    """The endpoint a webhook's requests share (URL hosts never hold placeholders)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"


def _event_or_none(data: dict[str, Any] | None) -> RecordEvent | None:
    if data is None:
        return None
    try:
        return event_from_json(data)
    except InvalidEvent:
        return None


__all__ = ["Outcome", "Processor"]
