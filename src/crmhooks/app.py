"""The processor: wires the parts, runs their loops, and orders their effects.

The parts, each owning one kind of state (docs/architecture.md draws them):

- ``intake.Intake``: decodes and plans a fetched batch (no state between batches);
- ``checkpoint.Checkpoint``: batches not yet committed, offsets, unstored instant actions;
- ``scheduler.Scheduler``: the delay heap in memory and the records it renders;
- ``dispatch.Dispatcher``: per-host queues and the tasks firing actions;
- ``quota.QuotaLedger``, ``suspensions.Suspensions``: the organisations' counts;
- ``reporter.Reporter``: result and dead-letter records, attempts' report groups;
- ``alerts.Alerter``: administrator alerts waiting to be sent (off the delivery path);
- ``snapshot.LiveConfig``: the configuration in force;
- ``config_topic.ConfigTopic`` (with ``[kafka] config_topic``): organisations'
  documents read and put in force, refused ones dead-lettered;
- ``sweep.Sweeper``: pending actions of removed rules and webhooks cancelled after
  a config change (an assignment, a reload, a document);
- and here, which partitions are this process's.

Order of effects for a batch of events (``_process_batch``), and why:

1. **store** — new, moved and cancelled actions, record snapshots and rule state
   are committed to SQLite in one transaction, and its rows sent to the changelog
   topic and acknowledged. From here on, nothing the batch created can be lost,
   whatever happens next, on this machine or the next owner of the partition.
2. **produce** — result records (``scheduled``, ``cancelled``, ``skipped``,
   ``suspended``) and dead letters are sent to Kafka.
3. **flush** — we wait until the broker acknowledged every one of them.
4. **commit** — only then the offsets after the batch are committed, in the
   background and in reading order (``checkpoint``). A failed commit (a rebalance
   under way) is logged and retried with the next: events after the last commit
   are only processed again.

A crash before 4 replays the batch: actions have deterministic ids and are
inserted with ``INSERT OR IGNORE``, so replaying creates nothing twice; a result
record may repeat, never go missing.

New instant actions skip step 1: they are sent at once, and stored when finished,
with their final status. Step 4 then waits until every instant action of the batch
is stored, finished or, after ``checkpoint.INSTANT_COMMIT_WAIT_MS``, as pending. A
crash before that reads the event again: a finished action is known by its id and
not sent again; one in flight is sent again (at least once, same ``webhook-id``).
Reading pauses while ``checkpoint.UNSTORED_BUDGET`` such actions are unsettled.

One attempt of one action has its own order (``dispatch``): quota count stored →
request sent → result produced and acknowledged → action's new state stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterable, Sequence
from typing import Any, Protocol

from crmhooks.admin import Liveness, Readiness
from crmhooks.alerts import ALERT_DRAIN_S, Alerter
from crmhooks.checkpoint import Checkpoint, Committer
from crmhooks.clock import Clock
from crmhooks.config import Config
from crmhooks.config_topic import ConfigTopic
from crmhooks.delivery import Outcome, Transport
from crmhooks.dispatch import Dispatcher
from crmhooks.errors import KafkaIOError
from crmhooks.intake import REPLAY_HEADER, Intake
from crmhooks.kafka_io import Fetched
from crmhooks.metrics import Metrics
from crmhooks.quota import QuotaLedger
from crmhooks.reporter import Producer, Reporter
from crmhooks.scheduler import Scheduler
from crmhooks.snapshot import LiveConfig
from crmhooks.store import ChangelogRecord, Store
from crmhooks.suspensions import Suspensions
from crmhooks.sweep import Sweeper

log = logging.getLogger(__name__)

# Events read per fetch: large enough to amortise one store commit and one
# producer flush over many events, small enough that planning them (~15 µs an
# instant one, on the loop, without a pause) does not hold up the answers of the
# requests in flight: with 2,000 the receivers sat idle while a batch was planned,
# the processor's core was 82-89 % busy; with 500, 95-99 % (instant bench, 3 A/B
# pairs: 8,434-9,321 -> 9,473-10,128 deliveries/s; filtering unchanged).
FETCH_MAX_RECORDS = 500
# Events read per fetch while the events read are ignored (the last batch planned
# none) and no action is being fired: no answer waits on the loop, and a batch
# costs a commit, a store and a producer call whatever it holds, ~45 µs that 500
# ignored events share at ~0.09 µs each (zstd filtering, 2 × 3 runs of the
# processor with decoding off: 0.79 -> 0.70 µs an event). Not for events that
# plan actions: a batch of 2,000 of them takes the process's memory to a peak it
# keeps (1,000,000 scheduled actions: RSS 83 MB; 100 MB with the first fetch of
# 2,000, 127 MB with all of them), for no gain. So the first fetch reads 500 too.
FETCH_MAX_RECORDS_IGNORING = 2000
FETCH_TIMEOUT_MS = 200
# How often finished actions past their retention are forgotten.
PURGE_EVERY_MS = 3_600_000
# How often the pending actions gauge is counted again (Prometheus scrapes every
# 15 s by default: one count a scrape, at most).
GAUGE_EVERY_MS = 15_000


class Kafka(Committer, Producer, Protocol):
    """What the processor needs of ``kafka_io.KafkaIO``."""

    async def fetch(self, timeout_ms: int, max_records: int) -> Fetched: ...

    @property
    def broken(self) -> asyncio.Future[None]:
        """Resolves with a KafkaIOError once nothing can be written any more."""

    @property
    def dead_letter_max_bytes(self) -> int | None:
        """The largest dead letter the dead-letter topic takes (None: not known)."""

    @property
    def event_max_bytes(self) -> int | None:
        """The largest event whose snapshot the changelog takes (None: not known)."""

    async def committed_offsets(self, partitions: Iterable[int]) -> dict[int, int | None]: ...

    def end_offsets_seen(self) -> dict[int, int]: ...

    async def produce_changelog(
        self, records: Sequence[ChangelogRecord]
    ) -> Awaitable[dict[int, int]]: ...

    def read_changelog(
        self, partition: int, from_offset: int
    ) -> AsyncIterator[tuple[int, bytes, bytes | None]]: ...


class Processor:
    """Wires the parts and orders their effects; owns which partitions are here."""

    def __init__(
        self,
        config: Config | LiveConfig,
        store: Store,
        transport: Transport,
        clock: Clock,
        *,
        metrics: Metrics | None = None,
        readiness: Readiness | None = None,
        liveness: Liveness | None = None,
    ) -> None:
        self.config = config if isinstance(config, LiveConfig) else LiveConfig.of(config)
        self.store = store
        self.clock = clock
        self.metrics = metrics if metrics is not None else Metrics(process_metrics=False)
        self.readiness = readiness if readiness is not None else Readiness()
        self.liveness = liveness if liveness is not None else Liveness(self.readiness)
        metrics = self.metrics
        self._owned: set[int] = set()
        owns = self._owned.__contains__
        self._lock = asyncio.Lock()  # one batch at a time; rebalances wait for it
        self._kafka: Kafka | None = None
        live = self.config
        self.checkpoint = Checkpoint(store, clock, owns, metrics)
        self.scheduler = Scheduler(store, clock, owns)
        self.quota = QuotaLedger(
            store, lambda: live.current.config.quota, lambda org_id: live.current.org(org_id)
        )
        self.suspensions = Suspensions(store, lambda: live.current, owns)
        self.reporter = Reporter(
            store,
            self.checkpoint,
            clock,
            lambda: live.current.config.kafka,
            metrics,
            fatal=lambda exc: store.failed is not None,
        )
        self.alerts = Alerter(live, transport, clock, metrics)
        self.dispatcher = Dispatcher(
            live,
            self.scheduler,
            self.quota,
            self.suspensions,
            self.reporter,
            self.checkpoint,
            transport,
            clock,
            owns,
            metrics,
            self.alerts,
        )
        self.intake = Intake(live, store, self.scheduler, self.suspensions, self.reporter, owns)
        self.sweeper = Sweeper(
            live, store, self.scheduler, self.reporter, clock, self._partitions, self._lock
        )
        # With [kafka] config_topic: opened and caught up by the runner before ``run``.
        self.documents: ConfigTopic | None = None
        if live.current.config.kafka.config_topic:
            self.documents = ConfigTopic(
                live,
                store,
                self.reporter,
                clock,
                metrics,
                changed=self.config_changed,
                owns=owns,
                lock=self._lock,
            )
        self.events = 0
        self.batches = 0
        self._ignoring = False  # the last batch planned no event (FETCH_MAX_RECORDS_IGNORING)
        self._pending_actions = 0  # stored and not finished: refreshed by _gauge_loop
        metrics.watch(
            pending_actions=lambda: self._pending_actions,
            suspended_webhooks=self.suspensions.suspended_count,
            requests_in_flight=self.dispatcher.requests_in_flight,
            store_commits=lambda: store.commits,
        )

    def __repr__(self) -> str:
        return f"Processor(partitions={sorted(self._owned)}, {self.scheduler!r})"

    @property
    def stats(self) -> dict[str, int]:
        return {
            "events": self.events,
            "batches": self.batches,
            "results": self.reporter.results,
            "dead_letters": self.reporter.dead_letters,
            "commit_failures": self.checkpoint.commit_failures,
        }

    @property
    def kafka(self) -> Kafka:
        if self._kafka is None:
            raise RuntimeError("processor is not running")
        return self._kafka

    def attach(self, kafka: Kafka, partitions: set[int] | None = None) -> None:
        """Connect the parts to Kafka (``run`` does; tests with a fake Kafka too).
        ``partitions``: owned from the start (tests; the group assigns them in ``run``)."""
        self._kafka = kafka
        self.store.changelog = kafka.produce_changelog
        self.checkpoint.attach(kafka)
        self.reporter.attach(kafka, kafka.dead_letter_max_bytes)
        self.intake.event_max_bytes = kafka.event_max_bytes
        self.metrics.lag.ends = kafka.end_offsets_seen
        self.scheduler.start(self.clock.now_ms())
        if partitions:
            self._owned |= partitions

    def config_changed(self, org_id: str | None = None) -> None:
        """The configuration in force changed (of one organisation: its document; None:
        the file): suspensions of changed rules and webhooks are lifted, and pending
        actions of removed ones cancelled (in the background, ``sweep``)."""
        self.suspensions.config_changed(org_id)
        self.sweeper.request(org_id)

    # -- life cycle -----------------------------------------------------------

    async def run(
        self,
        kafka: Kafka,
        stop: asyncio.Event,
        also: Sequence[Coroutine[Any, Any, None]] = (),
    ) -> None:
        """Run until ``stop`` is set, then stop gracefully (SPEC §10). ``also``: loops
        of the runner's (reload, the config topic) run and stopped with the parts'."""
        self.attach(kafka)
        self.readiness.set_waiting()
        await self.suspensions.load()
        consume = asyncio.create_task(self._consume_loop(stop), name="consume")
        self.liveness.watch(consume)
        helpers = [
            asyncio.create_task(self.dispatcher.loop(), name="fire"),
            asyncio.create_task(self.scheduler.refill_loop(self._partitions), name="refill"),
            asyncio.create_task(self.suspensions.poll_loop(), name="resume-poll"),
            asyncio.create_task(self.checkpoint.deadline_loop(), name="unstored-deadline"),
            asyncio.create_task(self._purge_loop(), name="purge"),
            asyncio.create_task(self._gauge_loop(), name="gauges"),
            asyncio.create_task(self.sweeper.loop(), name="sweep"),
            *(asyncio.create_task(loop) for loop in also),
            # A failed store (full or read-only disk, I/O error) raises here: the
            # process stops taking work at once and exits non-zero with the real error,
            # for a supervisor to restart it once the disk is fixed (SPEC §10).
            asyncio.create_task(self.store.until_failed(), name="store-failed"),
        ]
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            # kafka.broken: Kafka can no longer be written to (no producer can be made).
            waited: list[asyncio.Future[Any]] = [consume, stopper, kafka.broken, *helpers]
            done, _ = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            log.info("stopping: no more fetching, finishing in-flight requests")
            self.readiness.set_stopping()
            self.dispatcher.stop()
            stop.set()
            self.checkpoint.release_reader()  # a consume loop waiting for the budget sees it
            await consume
        finally:
            self.readiness.set_stopping()
            self.dispatcher.stop()
            if not consume.done():  # a part failed: reading stops now, mid-batch or not
                consume.cancel()
            for task in [consume, *helpers]:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task  # (what a failed task raised is raised above)
            stopper.cancel()
            # With a failed store no result of a request in flight can be stored:
            # waiting for them only delays the exit (they are sent again after restart).
            grace_s = 0.0 if self.store.failed is not None else None
            await self.stop_parts(grace_s)

    async def stop_parts(self, grace_s: float | None = None) -> None:
        """In-flight requests finish within the grace (``[delivery] shutdown_grace_s``
        by default); what was not finished in time is stored, then every offset
        committed; unused quota units given back; alerts still queued sent."""
        if grace_s is None:
            grace_s = self.config.current.config.delivery.shutdown_grace_s
        await self.dispatcher.drain(grace_s)
        try:
            await self.checkpoint.store_unstored()
            await self.checkpoint.committed()
        except Exception:
            log.exception("unfinished instant actions not stored: their events run again")
        await self.checkpoint.finish_commit()
        try:
            await self.quota.release()
        except Exception as exc:  # stopping anyway: they stay counted, never overshoot
            log.warning("unused quota units not given back: %s", exc)
        # Last, so that a dead alert receiver delays no commit: a suspension of the
        # last moment is still told, within ALERT_DRAIN_S (none with a failed store:
        # the process exits at once).
        await self.alerts.drain(min(grace_s, ALERT_DRAIN_S))

    def _partitions(self) -> list[int]:
        return sorted(self._owned)

    # -- partitions -----------------------------------------------------------

    async def on_revoked(self, partitions: set[int]) -> None:
        self.readiness.set_rebalancing()
        async with self._lock:  # never in the middle of a batch
            # Every batch's actions stored, so every offset can be committed: what
            # was processed is not processed again by the next owner.
            await self.checkpoint.store_unstored()
            await self.checkpoint.committed()
            self.checkpoint.forget_partitions(partitions)
            self._owned -= partitions
            await self.quota.release(partitions)
            self.scheduler.drop_partitions(partitions)
            self.metrics.lag.revoked(partitions)
            log.info("partitions revoked: %s", sorted(partitions))

    async def on_assigned(self, partitions: set[int]) -> None:
        # aiokafka may hand out records of these partitions before this callback
        # returns: the lock keeps every batch waiting until their state is here.
        async with self._lock:
            new = partitions - self._owned
            if not new:
                self.readiness.set_ready(self._owned)
                return
            self.readiness.set_restoring(new)
            # Another process, maybe on another machine, may have owned these partitions
            # meanwhile: their rows come from the changelog first, and counters and
            # suspensions are read again rather than trusted from memory.
            restored = await self.store.restore(sorted(new), self.kafka.read_changelog)
            if restored:
                log.info(
                    "restored %d rows of partitions %s from the changelog", restored, sorted(new)
                )
            await self.quota.reload()
            await self.suspensions.load()
            self._owned |= new
            loaded = await self.scheduler.load(sorted(new))
            if self.documents is not None:
                await self.documents.on_assigned(new)
            # Actions pending under another config (a restart with another file, a
            # reload or document seen while another process owned them): those whose
            # rule or webhook is gone are cancelled, in the background.
            self.sweeper.request()
            try:
                self.metrics.lag.assigned(await self.kafka.committed_offsets(new))
            except KafkaIOError as exc:  # only the lag gauge misses them until a commit
                log.warning("committed offsets of %s not read: %s", sorted(new), exc)
            log.info("partitions assigned: %s (%d actions due soon)", sorted(new), loaded)
            self.readiness.set_ready(self._owned)

    # -- consuming ------------------------------------------------------------

    async def _consume_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.liveness.beat()
            self.checkpoint.raise_if_commit_failed()
            if not self.checkpoint.may_read():  # over the budget of unstored actions
                await self.checkpoint.until_may_read()
                continue
            ignoring = self._ignoring and self.dispatcher.idle
            most = FETCH_MAX_RECORDS_IGNORING if ignoring else FETCH_MAX_RECORDS
            records = await self.kafka.fetch(FETCH_TIMEOUT_MS, most)
            if not records:
                continue
            async with self._lock:
                await self._process_batch(records)
            # One turn of the event loop a batch: with records buffered by aiokafka,
            # the fetch, an empty store write and an empty produce all return without
            # suspending, and nothing else would run (offset commits, firing, reports,
            # the admin endpoint) until the backlog was drained. ~10 µs a batch.
            await asyncio.sleep(0)
        async with self._lock:
            await self.checkpoint.committed()

    async def _process_batch(self, fetched: Fetched) -> None:
        now_ms = self.clock.now_ms()
        plan = await self.intake.plan(fetched, now_ms)
        self.events += plan.read
        events = self.metrics.events
        events.inc("planned", plan.planned)
        events.inc("dead_lettered", plan.dead_lettered)
        events.inc("ignored", plan.read - plan.planned - plan.dead_lettered)
        # The actions the batch ends are held from here until they are stored ended:
        # neither a fire nor a refill takes one meanwhile (one final status each).
        ending = self.scheduler.claim(plan.ended)
        try:
            # 1. store, 2. produce, 3. flush (see the module docstring for why).
            await self.store.write(plan.batch)
            await self.reporter.produce(plan.out)
        finally:
            for action in ending:
                self.scheduler.fired(action, None)
        # 4. commit, once the instant actions sent unstored are finished or stored.
        unstored = [(a, raw) for a, raw in plan.unstored if a.action_id not in plan.heap_gone]
        self.checkpoint.add_batch(plan.next_offsets, now_ms, unstored)
        for action in plan.heap_new:  # in plan order: a later move replaces an earlier push
            if action.action_id not in plan.heap_gone:
                self.scheduler.push(action)
        self.batches += 1
        self._ignoring = not plan.planned

    async def _gauge_loop(self) -> None:
        """The pending actions gauge, read from the store every GAUGE_EVERY_MS (a count
        over the pending index, on aiosqlite's thread: too dear for every scrape)."""
        while True:
            self._pending_actions = await self.store.count_pending()
            await self.clock.sleep_until(self.clock.now_ms() + GAUGE_EVERY_MS)

    async def _purge_loop(self) -> None:
        """Finished actions past their retention are forgotten, every PURGE_EVERY_MS."""
        while True:
            await self.clock.sleep_until(self.clock.now_ms() + PURGE_EVERY_MS)
            retention_ms = int(self.config.current.config.store.finished_retention_s * 1000)
            await self.store.purge_finished(self._partitions(), self.clock.now_ms() - retention_ms)


__all__ = ["REPLAY_HEADER", "Outcome", "Processor"]
