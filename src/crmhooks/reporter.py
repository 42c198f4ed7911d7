"""Result records and dead letters: built, produced, and the attempts they report
written in groups.

An attempt's report is its result record (produced, acknowledged) and then the
action's new state (stored): in that order, so that a crash between them repeats
the request after restart (same ``webhook-id``) rather than loses its result.
Attempts answered while the previous group is being written join the next group:
one produce, one store transaction and one changelog record for many answers,
however they trickle in (a slow endpoint). One group is written at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from crmhooks.actions import Action
from crmhooks.checkpoint import Checkpoint, Unstored
from crmhooks.clock import Clock
from crmhooks.config import KafkaSettings
from crmhooks.dead_letters import as_record, produce_refused
from crmhooks.errors import InvalidEvent, RecordsTooLarge
from crmhooks.events import RecordEvent
from crmhooks.kafka_io import BatchRecord, Skipped
from crmhooks.logs import about
from crmhooks.metrics import Metrics
from crmhooks.outcomes import Outcome
from crmhooks.results import DEAD_LETTER_MAX_BYTES, dead_letter, encode, result_record
from crmhooks.store import Store, WriteBatch

log = logging.getLogger(__name__)

# A report group that could not be written is tried again after this long, then
# twice as long each time, up to REPORT_RETRY_MAX_MS: a broker outage of any length
# is waited out with a line in the log every few seconds, not a flood.
REPORT_RETRY_FIRST_MS = 500
REPORT_RETRY_MAX_MS = 5_000

# (topic, key, value) of one record to produce.
Produced = tuple[str, bytes | None, bytes]

# An attempt in a report group: the action, its unstored entry, its retry.
Reported = tuple[Action, Unstored | None, Action | None]
# Ends one attempt once its group is written (error None) or failed to be.
OnReported = Callable[[Action, Unstored | None, Action | None, BaseException | None], None]


class Producer(Protocol):
    """Produces records and waits for every acknowledgement (``KafkaIO.produce_all``)."""

    async def produce_all(self, records: Sequence[Produced]) -> None: ...


@dataclass(slots=True)
class ReportGroup:
    """Attempts reported together, written as one (``Reporter.group``)."""

    reporters: list[Reported] = field(default_factory=list)
    results: list[Produced] = field(default_factory=list)
    batch: WriteBatch = field(default_factory=WriteBatch)
    # Called once the group is written, not if it fails (an alert of a suspension
    # the group stores): rare, so None until one is added (``after_written``).
    written: list[Callable[[], None]] | None = None

    def after_written(self, call: Callable[[], None]) -> None:
        if self.written is None:
            self.written = []
        self.written.append(call)


class Reporter:
    """Owns the open report group and the groups being written."""

    def __init__(
        self,
        store: Store,
        checkpoint: Checkpoint,
        clock: Clock,
        kafka: Callable[[], KafkaSettings],
        metrics: Metrics,
        fatal: Callable[[Exception], bool] = lambda exc: False,
    ) -> None:
        """``fatal`` says which errors no retry can mend (a failed store: the process
        must stop): a group failing with one ends its attempts in error."""
        self._store = store
        self._fatal = fatal
        self._checkpoint = checkpoint
        self._clock = clock
        self._kafka = kafka
        self._metrics = metrics
        self._producer: Producer | None = None
        self._on_reported: OnReported | None = None
        self._open: ReportGroup | None = None  # attempts reported, not written yet
        self._tasks: set[asyncio.Task[None]] = set()
        self._last: asyncio.Task[None] | None = None  # the latest group's write
        self.results = 0
        self.dead_letters = 0
        # The largest dead letter its topic takes (``attach``): larger ones are cut.
        self.dead_letter_max_bytes = DEAD_LETTER_MAX_BYTES

    def __repr__(self) -> str:
        return f"Reporter(groups_writing={len(self._tasks)}, results={self.results})"

    def attach(self, producer: Producer, dead_letter_max_bytes: int | None = None) -> None:
        """``dead_letter_max_bytes``: what the dead-letter topic takes, if known."""
        self._producer = producer
        if dead_letter_max_bytes is not None:
            self.dead_letter_max_bytes = dead_letter_max_bytes

    def attach_ended(self, on_reported: OnReported) -> None:
        """Who ends an attempt once its group is written (the dispatcher)."""
        self._on_reported = on_reported

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            raise RuntimeError("reporter is not attached to a producer")
        return self._producer

    @property
    def idle(self) -> bool:
        """No group being written."""
        return not self._tasks

    async def drain(self) -> None:
        """Until every group handed over is written (or failed to be)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- records of a batch ---------------------------------------------------------

    async def produce(self, records: Sequence[Produced]) -> None:
        """Produce and wait for every acknowledgement.

        Dead letters the broker refuses as too large (their topic takes less than it
        said at start: its max.message.bytes lowered since) are cut to half that size,
        letters from now on too, and produced once more; refused again, they are
        logged with where their events are and skipped. One record never stops its
        partition (SPEC §10)."""
        try:
            await self.producer.produce_all(records)
        except RecordsTooLarge as refused:
            dlq = self._kafka().dlq_topic
            self.dead_letter_max_bytes = await produce_refused(
                self.producer, refused, dlq, self.dead_letter_max_bytes
            )
        self.results += len(records)

    def result(self, action: Action, status: str, *, reason: str | None = None) -> Produced:
        """The result record of an action that changed without being sent."""
        rec = result_record(action, status, reason=reason)
        self._metrics.actions.inc(status)
        return (self._kafka().results_topic, action.org_id.encode(), encode(rec))

    def attempt_result(
        self,
        action: Action,
        status: str,
        attempt: int,
        outcome: Outcome,
        next_attempt_ms: int | None,
        request: Mapping[str, str],
    ) -> Produced:
        """The result record of one attempt (delivered, retrying, failed)."""
        rec = result_record(
            action,
            status,
            attempt=attempt,
            outcome=outcome,
            next_attempt_ms=next_attempt_ms,
            request=request,
        )
        self._metrics.actions.inc(status)
        return (self._kafka().results_topic, action.org_id.encode(), encode(rec))

    def poison(
        self, partition: int, rec: BatchRecord, exc: InvalidEvent, now_ms: int
    ) -> list[Produced]:
        """The dead letter of an event that cannot be processed (none if even cut it
        cannot fit its topic: logged and skipped)."""
        log.warning(
            "dead letter: partition %d offset %d: %s",
            partition,
            rec.offset,
            exc.message,
            extra=_event_ids(exc.parsed, partition, rec.offset),
        )
        kafka = self._kafka()
        letter = dead_letter(
            error_code="internal_process_error",
            message=f"invalid event: {exc.message}",
            failed_at_ms=now_ms,
            topic=kafka.events_topic,
            partition=partition,
            offset=rec.offset,
            key=rec.key,
            event=exc.parsed,
            raw=rec.value,
            max_bytes=self.dead_letter_max_bytes,
        )
        return self._letter(letter, rec.key)

    def skipped(self, skipped: Skipped, now_ms: int) -> Produced:
        """The dead letter of offsets the consumer could not decode (kafka_io logged them)."""
        self.dead_letters += 1
        self._metrics.dead_letters.inc("internal_process_error")
        kafka = self._kafka()
        letter = dead_letter(
            error_code="internal_process_error",
            message=skipped.message,
            failed_at_ms=now_ms,
            topic=kafka.events_topic,
            partition=skipped.partition,
            offset=skipped.first_offset,
            key=None,
            event=None,
            raw=None,
        )
        return (kafka.dlq_topic, None, encode(letter))

    def action_letter(
        self, action: Action, event: RecordEvent | None, code: str, message: str
    ) -> list[Produced]:
        """The dead letter of one action (quota, template failure); none if even cut it
        cannot fit its topic (logged and skipped)."""
        kafka = self._kafka()
        key = action.org_id.encode()
        letter = dead_letter(
            error_code=code,
            message=message,
            failed_at_ms=self._clock.now_ms(),
            topic=kafka.events_topic,
            partition=action.partition,
            offset=action.source_offset,
            key=key,
            # The version of the record rendered, under the id of the event that created
            # the action, so that `replay-dlq` recreates this very action.
            event={**event.data, "event_id": action.event_id} if event is not None else None,
            raw=None,
            action_id=action.action_id,
            rule_id=action.rule_id,
            webhook=action.webhook,
            max_bytes=self.dead_letter_max_bytes,
        )
        return self._letter(letter, key)

    def _letter(self, letter: dict[str, Any], key: bytes | None) -> list[Produced]:
        """A letter as the record to produce, if it fits its topic (``dead_letters``)."""
        record = as_record(self._kafka().dlq_topic, letter, key, self.dead_letter_max_bytes)
        if record is None:
            return []
        self.dead_letters += 1
        self._metrics.dead_letters.inc(letter["error_code"])
        return [record]

    # -- an action ended without a request ------------------------------------------

    async def final(
        self,
        action: Action,
        status: str,
        *,
        reason: str | None = None,
        error_class: str | None = None,
        error: str | None = None,
        extra: Sequence[Produced] = (),
    ) -> None:
        """Report a final status reached without sending (suspended, quota, template
        failure, config removed): result (and dead letters) produced, then stored."""
        rec = result_record(action, status, reason=reason, error_class=error_class, error=error)
        self._metrics.actions.inc(status)
        out: list[Produced] = [(self._kafka().results_topic, action.org_id.encode(), encode(rec))]
        await self.produce([*out, *extra])
        unstored = self._checkpoint.take_unstored(action.action_id)  # stored here now
        ended = (action.action_id, status, self._clock.now_ms())
        batch = (  # stored for the first time, finished (with its event, which
            # `crmhooks redeliver` renders); or ended if still pending
            WriteBatch(
                done=[(action, status, ended[2])],
                action_events=[(action.action_id, action.partition, unstored[2])],
            )
            if unstored is not None
            else WriteBatch(finished=[ended])
        )
        try:
            await self._store.write(batch)
        except BaseException:
            if unstored is not None:
                self._checkpoint.give_back(action.action_id, unstored)
            raise
        if unstored is not None:
            self._checkpoint.settled(action, unstored[0])

    async def internal_error(self, action: Action, event: RecordEvent | None, message: str) -> None:
        """An action that cannot be sent (template failure, a header or URL we could
        not send, its record gone): failed, with a dead letter."""
        log.error("action %s: %s", action.action_id, message, extra=about(action))
        letters = self.action_letter(action, event, "internal_process_error", message)
        await self.final(
            action, "failed", error_class="internal_process_error", error=message, extra=letters
        )

    # -- attempts, reported in groups -----------------------------------------------

    def group(self) -> ReportGroup:
        """The attempts reported since the last group's write began: their results are
        produced, then their changes stored, together (one produce, one store write and
        one wait for them all; -3 µs of CPU an instant delivery). Each attempt adds
        itself to ``reporters``; the ``on_reported`` callback ends it with what either
        raised. Fill it without awaiting in between.

        One group is written at a time: the group is written next turn, or once the
        group before is written. Attempts reported meanwhile join it, so answers that
        arrive one by one (a slow endpoint) are still written many at a time, not in a
        store transaction and changelog record each."""
        group = self._open
        if group is None:
            group = self._open = ReportGroup()
            task = asyncio.create_task(self._write(group, self._last), name="report")
            self._last = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return group

    async def _write(self, group: ReportGroup, before: asyncio.Task[None] | None) -> None:
        """Write a group: its results produced, then its changes stored; then each
        attempt is ended. What fails is tried again, never the requests (SPEC §10:
        a request may repeat only after a crash): the attempts stay in flight, and the
        groups after this one wait, until it is written or the process stops."""
        if before is not None and not before.done():
            await asyncio.wait((before,))  # what it raised is its own reporters' concern
        self._open = None  # reports from now on go to the next group
        error: BaseException | None = None
        produced = False
        pause_ms = REPORT_RETRY_FIRST_MS
        while True:
            try:
                if not produced:
                    await self.produce(group.results)
                    produced = True
                await self._store.write(group.batch)
                break
            except Exception as exc:
                if self._fatal(exc):
                    error = exc
                    break
                log.error(
                    "%d results %s (%s); trying again in %.1f s, their requests are not sent again",
                    len(group.reporters),
                    "not stored" if produced else "not produced",
                    exc,
                    pause_ms / 1000,
                )
                try:
                    await self._clock.sleep_until(self._clock.now_ms() + pause_ms)
                except BaseException as stop:  # a stop: each attempt is ended, then it goes on
                    error = stop
                    break
                pause_ms = min(pause_ms * 2, REPORT_RETRY_MAX_MS)
            except BaseException as exc:  # a stop: each attempt is ended, then it goes on
                error = exc
                break
        if error is None and group.written is not None:
            for call in group.written:
                try:
                    call()
                except Exception:
                    log.exception("after a report group was written")
        on_reported = self._on_reported
        assert on_reported is not None  # attached before any attempt is reported
        for action, unstored, retry in group.reporters:
            try:
                on_reported(action, unstored, retry, error)
            except Exception:
                log.exception(
                    "action %s: ending its attempt failed", action.action_id, extra=about(action)
                )
        if error is not None and not isinstance(error, Exception):
            raise error


def _event_ids(parsed: object, partition: int, offset: int) -> dict[str, object]:
    """The log fields of an invalid event: where it is, and its ids when it has them."""
    ids: dict[str, object] = {"partition": partition, "offset": offset}
    if isinstance(parsed, dict):
        for name in ("org_id", "event_id"):
            value = parsed.get(name)
            if isinstance(value, str):
                ids[name] = value
    return ids
