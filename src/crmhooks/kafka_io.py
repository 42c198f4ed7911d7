"""Kafka at the edge of the processor: the group consumer of the events topic with
manual commits, and the producer of results, dead letters and the changelog.

aiokafka exceptions are translated to ``KafkaIOError``/``ProduceError`` here (and in
``kafka_clients``/``kafka_producer``) and nowhere else. The group consumer's records
are read as aiokafka's batch reader yields them (``BatchRecord``; importing this
module installs that in aiokafka's fetcher), other consumers' as aiokafka's
``ConsumerRecord``s. Offsets the consumer cannot decode (a batch compressed with a
codec this install lacks, a corrupt batch) are read past and handed over as
``Skipped``, never retried for ever.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.consumer import fetcher as _aiokafka_fetcher
from aiokafka.errors import (
    CorruptRecordException,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    UnsupportedCodecError,
)

from crmhooks.aio import wait_all
from crmhooks.config import KafkaSettings
from crmhooks.errors import KafkaIOError, ProduceError, RecordsTooLarge
from crmhooks.kafka_clients import (
    InRecord,
    client_options,
    compression,
    ensure_topics,
    max_message_bytes,
    produce_records,
    read_topic,
    start_error,
    wait_visible,
)
from crmhooks.kafka_producer import ALONE_BYTES, Producer, keyed_partitioner

__all__ = [
    "ALONE_BYTES",
    "BatchRecord",
    "Fetched",
    "InRecord",
    "KafkaIO",
    "Skipped",
    "as_read",
    "client_options",
    "ensure_topics",
    "keyed_partitioner",
    "produce_records",
    "read_topic",
    "wait_visible",
]

log = logging.getLogger(__name__)

PartitionsCallback = Callable[[set[int]], Awaitable[None]]


class BatchRecord(Protocol):
    """One record of a fetched partition, as aiokafka's batch reader yields it (its
    partition is the one it was fetched from): what ``KafkaIO.fetch`` returns.
    aiokafka's ``ConsumerRecord`` is a BatchRecord too."""

    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


@dataclass(frozen=True, slots=True)
class Skipped:
    """Offsets ``first_offset..last_offset`` of a partition that the consumer could not
    decode (a batch compressed with a codec this install lacks, a corrupt batch):
    read past, never handed over as records. The range may take in offsets of
    transaction markers next to the batch. The processor dead-letters it and
    commits past it (``next_offset``)."""

    partition: int
    first_offset: int
    last_offset: int
    reason: str

    @property
    def next_offset(self) -> int:
        return self.last_offset + 1

    @property
    def message(self) -> str:
        offsets = (
            f"offset {self.first_offset}"
            if self.first_offset == self.last_offset
            else f"offsets {self.first_offset}-{self.last_offset}"
        )
        return f"undecodable record batch at {offsets} of partition {self.partition}: {self.reason}"


# A fetch: each partition with its records in offset order, or a range of offsets
# that could not be read (``Skipped``; a partition's entries come in offset order).
Fetched = list[tuple[int, Sequence[BatchRecord] | Skipped]]

# What aiokafka raises from a fetch when a record batch cannot be decoded: a codec
# it lacks, a CRC mismatch or a malformed batch, a header key that is not UTF-8.
_UNDECODABLE: tuple[type[BaseException], ...] = (
    UnsupportedCodecError,
    CorruptRecordException,
    UnicodeDecodeError,
)
# Reading past an undecodable batch: at most this long per fetch (the rest the next
# fetch), waiting at most PROBE_WAIT_MS for each offset read one at a time.
CAREFUL_BUDGET_S = 2.0
PROBE_WAIT_MS = 1000


def as_read(value: bytes | None) -> bytes | None:
    """The value deserializer that asks for records as aiokafka's batch reader yields
    them (``BatchRecord``s), where ``_BatchPartitionRecords`` is installed; elsewhere
    aiokafka's ``ConsumerRecord``s, their values as read (it returns them unchanged)."""
    return value


def _record_as_read(tp: TopicPartition, record: Any) -> Any:
    return record


class _BatchPartitionRecords(_aiokafka_fetcher.PartitionRecords):  # type: ignore[misc]
    """aiokafka's records of one fetched partition, handed as its batch yields them to
    a consumer whose value deserializer is ``as_read``.

    Only how each record is handed changes: aiokafka still walks the batches, checks
    their CRCs, skips aborted transactions and control batches, and keeps the
    position. It makes no ``ConsumerRecord`` (a dataclass whose ``__init__`` takes 11
    arguments, ~0.35 µs) nor anything else a record: ~0.4 µs of the ~5 an event costs
    the processor to read and drop. Other consumers get aiokafka's own records.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Decided once a fetch, not once a record.
        if self._value_deserializer is as_read and self._key_deserializer is None:
            self._consumer_record = _record_as_read

    def __iter__(self) -> Any:
        # aiokafka returns self, and its __next__ calls the generator: one Python
        # frame a record less. Never iterated once exhausted (aiokafka drops it then).
        return self._records_iterator


def _batch_records_fit(stock: type) -> bool:
    """Whether aiokafka's ``PartitionRecords`` has the internals the subclass relies on
    (as in aiokafka 0.11-0.14): its ``__init__`` sets the generator and deserializer
    attributes, and ``_consumer_record`` takes (tp, record)."""
    init = getattr(getattr(stock, "__init__", None), "__code__", None)
    consumer_record = getattr(stock, "_consumer_record", None)
    return (
        init is not None
        and {"_records_iterator", "_key_deserializer", "_value_deserializer"} <= set(init.co_names)
        and callable(consumer_record)
        and list(inspect.signature(consumer_record).parameters) == ["self", "tp", "record"]
    )


# aiokafka's fetcher builds its PartitionRecords by this module-level name. Another
# aiokafka keeps its own records everywhere (a test checks which records each
# consumer reads, and that they equal aiokafka's own).
if _batch_records_fit(_aiokafka_fetcher.PartitionRecords):
    _aiokafka_fetcher.PartitionRecords = _BatchPartitionRecords


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(
        self, kio: KafkaIO, on_revoked: PartitionsCallback, on_assigned: PartitionsCallback
    ) -> None:
        self._kio = kio
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        partitions = {tp.partition for tp in revoked}
        await self._on_revoked(partitions)
        self._kio.forget_positions(partitions)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        partitions = {tp.partition for tp in assigned}
        self._kio.forget_positions(partitions)
        await self._on_assigned(partitions)


# A record the broker refused as larger than its topic takes: sending it again cannot help.
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)

# The largest request the producer sends: aiokafka refuses a larger record itself.
MAX_REQUEST_BYTES = 4 << 20
# What a batch of one dead letter adds to its value: the batch's header (61 bytes),
# the record's (at most 32), its key (at most results.KEY_MAX_BYTES), and room to
# spare for a codec's frame around an incompressible value.
LETTER_FRAMING_BYTES = 2048
# What a record snapshot's changelog record adds to its event: the batch's and the
# record's headers, and its key (the table letter and the record's key: organisation,
# module and record id, a few dozen bytes; a few KiB at most that is not a bug).
SNAPSHOT_FRAMING_BYTES = 4096


class KafkaIO:
    """The consumer of the events topic and the producer of results, dead letters and
    the changelog.

    ``broken`` resolves with a KafkaIOError once the producer cannot be made again
    (see ``kafka_producer``): the process can no longer write, and must stop.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        on_revoked: PartitionsCallback,
        on_assigned: PartitionsCallback,
        client_id: str = "crmhooks",
    ) -> None:
        self.settings = settings
        self._listener = _Listener(self, on_revoked, on_assigned)
        self._client_id = client_id
        self.retry_pause_s = 0.2  # times the try number, between tries of produce_all
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: Producer | None = None
        # Partition → the offset after the last record (or skipped offset) handed over:
        # where reading goes on after a fetch that failed part-way.
        self._handed: dict[int, int] = {}
        # The largest dead letter the dead-letter topic takes (None: not known).
        self.dead_letter_max_bytes: int | None = None
        # The largest event whose record snapshot the changelog topic takes (None: not
        # known): a larger one is dead-lettered, or storing it would stop its partition.
        self.event_max_bytes: int | None = None

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"KafkaIO({s.bootstrap_servers!r}, {s.security_protocol}, group={s.group_id!r}, "
            f"compression={s.compression_type})"
        )

    async def __aenter__(self) -> KafkaIO:
        s = self.settings
        options = client_options(s)  # KafkaIOError naming the setting
        codec = compression(s)
        await ensure_topics(
            s, [s.events_topic, s.results_topic, s.dlq_topic], s.partitions, changelog=s.changelog
        )
        # One record never stops its partition (SPEC §10): what the dead-letter topic
        # and the changelog take, read once a start.
        limits = await max_message_bytes(s, [s.dlq_topic, s.changelog])
        limit = limits.get(s.dlq_topic)
        if limit is not None:
            self.dead_letter_max_bytes = min(limit, MAX_REQUEST_BYTES) - LETTER_FRAMING_BYTES
            log.info(
                "dead letters up to %d bytes (%s takes %d)",
                self.dead_letter_max_bytes,
                s.dlq_topic,
                limit,
            )
        limit = limits.get(s.changelog)
        if limit is not None:
            self.event_max_bytes = min(limit, MAX_REQUEST_BYTES) - SNAPSHOT_FRAMING_BYTES
            # (Said when max_event_bytes is over what the topic takes at all; the framing
            # below it is no news: Kafka's defaults are 1 MiB for both.)
            if s.max_event_bytes > limit:
                log.warning(
                    "kafka.max_event_bytes is %d, but the changelog topic %s takes %d: events "
                    "over %d bytes are dead-lettered (their record could not be stored); "
                    "raise the topic's max.message.bytes to take larger ones",
                    s.max_event_bytes,
                    s.changelog,
                    limit,
                    self.event_max_bytes,
                )

        def new_producer() -> AIOKafkaProducer:
            return AIOKafkaProducer(
                **options,
                client_id=self._client_id,
                acks="all",
                enable_idempotence=True,
                # None by default: every delivery's result and changelog record is
                # produced on the hot path, and compressing costs CPU there (lz4 cost
                # scale-out in round 11); a topic or broker can compress on its own.
                compression_type=codec,
                # No linger: every store commit and offset commit waits for
                # acknowledgements, so waiting to fill a batch adds to every event's
                # latency (p50 42 -> 16 ms at 1,000 events/s); under load, records queue
                # while a request is in flight and go out together anyway.
                linger_ms=0,
                max_request_size=MAX_REQUEST_BYTES,
                # Records per partition wait for the one batch in flight; with
                # aiokafka's 16 KB (~27 results) a burst waits in wait_drain, costly in
                # CPU. 256 KB: 35 -> 21 µs of CPU per record (bursts of 256), instant
                # bench -5 % CPU. (Below the broker's default message.max.bytes, 1 MB.)
                max_batch_size=256 << 10,
                partitioner=keyed_partitioner,
            )

        self._producer = Producer(new_producer, s.bootstrap_servers)
        self._consumer = AIOKafkaConsumer(
            **options,
            client_id=self._client_id,
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(1000, s.session_timeout_ms // 3),
            max_partition_fetch_bytes=max(1 << 20, s.max_event_bytes + 1024),
            fetch_max_bytes=max(50 << 20, s.max_event_bytes + 1024),
            value_deserializer=as_read,  # BatchRecords: see _BatchPartitionRecords
        )
        try:
            await self._producer.start()
            await self._consumer.start()
        except KafkaError as exc:
            await self.__aexit__(None, None, None)
            raise await start_error(s, exc, "starting the consumer and producer") from exc
        self._consumer.subscribe([s.events_topic], listener=self._listener)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._consumer is not None:
            try:
                await self._consumer.stop()
            except KafkaError as err:
                log.warning("consumer stop failed: %s", err)
            self._consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise KafkaIOError("Kafka is not started")
        return self._consumer

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            raise KafkaIOError("Kafka is not started")
        return self._producer

    @property
    def broken(self) -> asyncio.Future[None]:
        """Resolves with a KafkaIOError when no producer can be made any more."""
        return self.producer.fatal

    def forget_positions(self, partitions: set[int]) -> None:
        """Partitions revoked or assigned: reading them starts again from the group's
        committed offsets."""
        for p in partitions:
            self._handed.pop(p, None)

    async def fetch(self, timeout_ms: int, max_records: int) -> Fetched:
        try:
            batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except _UNDECODABLE as exc:
            return await self._fetch_carefully(max_records, exc)
        except KafkaError as exc:
            raise KafkaIOError(f"fetch failed: {exc}") from exc
        handed = self._handed
        fetched: Fetched = []
        for tp, records in batches.items():
            if records:
                handed[tp.partition] = records[-1].offset + 1
                fetched.append((tp.partition, records))
        return fetched

    async def _fetch_carefully(self, max_records: int, error: BaseException) -> Fetched:
        """A fetch after one that failed to decode a batch: each partition read one
        record at a time from where the processor has it, the undecodable offsets
        skipped (bounded by CAREFUL_BUDGET_S; the next fetch goes on)."""
        consumer = self.consumer
        topic = self.settings.events_topic
        log.warning(
            "a fetch of %s could not decode a batch (%r): reading on with care", topic, error
        )
        tps = sorted(consumer.assignment())
        # aiokafka loses the records of the partitions it drained, in the fetch that
        # failed, before the one it failed on, and their positions moved on past them:
        # each partition goes back to where the processor has it.
        for tp in tps:
            await self._rewind(tp)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CAREFUL_BUDGET_S
        each = max(1, max_records // max(1, len(tps)))
        fetched: Fetched = []
        for tp in tps:
            if loop.time() >= deadline:
                break
            try:
                fetched += await self._read_carefully(tp, each, deadline)
            except IllegalStateError:  # revoked meanwhile: its next owner reads it
                continue
            except KafkaError as exc:
                raise KafkaIOError(f"fetch failed: {exc}") from exc
        for partition, entry in fetched:
            if isinstance(entry, Skipped):
                log.error(
                    "%s: %s: skipped, reported on the dead-letter topic", topic, entry.message
                )
                self._handed[partition] = entry.next_offset
            elif entry:
                self._handed[partition] = entry[-1].offset + 1
        return fetched

    async def _rewind(self, tp: TopicPartition) -> None:
        consumer = self.consumer
        start = self._handed.get(tp.partition)
        if start is None:
            start = await consumer.committed(tp)
        if start is None:
            await consumer.seek_to_beginning(tp)  # auto_offset_reset="earliest"
        else:
            consumer.seek(tp, start)

    async def _read_carefully(self, tp: TopicPartition, limit: int, deadline: float) -> Fetched:
        """Records of ``tp`` one at a time, up to ``limit``, each undecodable offset read
        past: aiokafka raises at the batch it cannot decode with the position right
        before it, and a fetch from the next offset brings the same batch until the
        offset is past its end."""
        consumer = self.consumer
        loop = asyncio.get_running_loop()
        end = (await consumer.end_offsets([tp]))[tp]
        p = tp.partition
        out: Fetched = []
        records: list[BatchRecord] = []
        skipped: Skipped | None = None
        while len(records) < limit and loop.time() < deadline:
            if await consumer.position(tp) >= end:
                break
            try:
                got = (await consumer.getmany(tp, timeout_ms=PROBE_WAIT_MS, max_records=1)).get(tp)
            except _UNDECODABLE as exc:
                bad = await consumer.position(tp)
                if records:
                    out.append((p, records))
                    records = []
                if skipped is None:
                    skipped = Skipped(p, bad, bad, f"{type(exc).__name__}: {exc}")
                else:
                    skipped = Skipped(p, skipped.first_offset, bad, skipped.reason)
                consumer.seek(tp, bad + 1)
                continue
            if not got:
                break  # nothing more within PROBE_WAIT_MS
            if skipped is not None:
                out.append((p, skipped))
                skipped = None
            records.extend(got)
        if records:
            out.append((p, records))
        if skipped is not None:
            out.append((p, skipped))
        return out

    def assigned_partitions(self) -> set[int]:
        return {tp.partition for tp in self.consumer.assignment()}

    def end_offsets_seen(self) -> dict[int, int]:
        """Partition → end offset of each assigned partition of the events topic, as the
        last fetch response said (no request: cheap enough for every scrape). Under
        read_committed that is the last stable offset (records past an open
        transaction cannot be read yet), else the high watermark. Partitions not
        fetched yet are left out."""
        if self._consumer is None:
            return {}
        ends: dict[int, int] = {}
        for tp in self._consumer.assignment():
            if tp.topic != self.settings.events_topic:
                continue
            lso = self._consumer.last_stable_offset(tp)
            end = lso if lso is not None and lso >= 0 else self._consumer.highwater(tp)
            if end is not None:
                ends[tp.partition] = end
        return ends

    async def committed_offsets(self, partitions: Iterable[int]) -> dict[int, int | None]:
        """Partition → the group's committed offset (next to read) of the events topic;
        None where it never committed. A request per partition to the group coordinator
        (at assignment; safe inside the on_assigned callback)."""
        topic = self.settings.events_topic
        out: dict[int, int | None] = {}
        try:
            for p in sorted(partitions):
                out[p] = await self.consumer.committed(TopicPartition(topic, p))
        except KafkaError as exc:
            raise KafkaIOError(f"cannot read committed offsets of {topic}: {exc}") from exc
        return out

    async def produce_all(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        """Produce records and wait until every one is acknowledged (ProduceError if not).

        Records with a key go to the partition Kafka's default partitioner picks
        (murmur2 of the key). A batch the broker refused is tried again a few times:
        the offset behind it is not committed until it succeeded, so giving up here
        means the batch is processed again. (A batch not written for a broker away
        is sent again by the producer itself, once it is back.) A record refused as
        larger than its topic takes is not sent again: once every other record is
        acknowledged, RecordsTooLarge names those.
        """
        producer = self.producer
        known = producer.partitions  # looked up without an await: once per record
        attempts = 0
        remaining = list(records)
        too_large: list[tuple[str, bytes | None, bytes]] = []
        while remaining:
            futures: list[asyncio.Future[int]] = []
            for topic, key, value in remaining:
                partitions = known.get(topic) or await producer.partitions_of(topic)
                partition = keyed_partitioner(key, partitions, partitions)
                futures.append(producer.outbox(topic, partition).add(key, value))
            await wait_all(futures)
            failed = [
                (r, f)
                for r, f in zip(remaining, futures, strict=True)
                if f.cancelled() or f.exception() is not None
            ]
            if not failed:
                break
            # Refused for what it holds (too large): never sent again.
            sized = [r for r, f in failed if not f.cancelled() and _too_large(f.exception())]
            too_large += sized
            failed = [(r, f) for r, f in failed if r not in sized] if sized else failed
            if not failed:
                break
            attempts += 1
            if attempts >= 5 or producer.failed is not None:
                raise ProduceError(
                    f"produce to {failed[0][0][0]} failed: {len(failed)} records not "
                    f"acknowledged after {attempts} tries ({_first_error(futures)})"
                )
            log.warning(
                "retrying %d unacknowledged records: %s", len(failed), _first_error(futures)
            )
            await asyncio.sleep(self.retry_pause_s * attempts)
            remaining = [r for r, _ in failed]
        if too_large:
            raise RecordsTooLarge(
                f"produce to {too_large[0][0]} refused: {len(too_large)} records larger than "
                f"the topic takes (the largest {max(len(v) for *_, v in too_large)} bytes)",
                too_large,
            )

    async def produce_changelog(
        self, records: Sequence[tuple[int, bytes, bytes | None]]
    ) -> Awaitable[dict[int, int]]:
        """Queue store changes for the changelog, in order; returns without waiting for
        the broker an awaitable of partition → next offset (acknowledged)."""
        topic = self.settings.changelog
        producer = self.producer
        batches: dict[asyncio.Future[int], int] = {}
        for p, k, v in records:
            batches[producer.outbox(topic, p).add(k, v)] = p  # one future per batch
        return _changelog_acked(topic, [(p, fut) for fut, p in batches.items()])

    async def read_changelog(
        self, partition: int, from_offset: int
    ) -> AsyncIterator[tuple[int, bytes, bytes | None]]:
        """(offset, key, value) of changelog ``partition`` from ``from_offset`` to its end."""
        tp = TopicPartition(self.settings.changelog, partition)
        consumer = AIOKafkaConsumer(
            **client_options(self.settings),
            enable_auto_commit=False,
            group_id=None,
            auto_offset_reset="earliest",
        )
        try:
            await consumer.start()
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            if from_offset >= end:
                return
            consumer.seek(tp, from_offset)
            while True:
                batch = await consumer.getmany(tp, timeout_ms=500, max_records=5000)
                for m in batch.get(tp, []):
                    if m.key is not None:
                        yield m.offset, m.key, m.value
                    if m.offset + 1 >= end:
                        return
                if await consumer.position(tp) >= end:
                    return
        except KafkaError as exc:
            raise KafkaIOError(f"cannot read changelog partition {partition}: {exc}") from exc
        finally:
            await consumer.stop()

    async def commit(self, next_offsets: dict[int, int]) -> None:
        """Commit ``partition → next offset to read`` for the events topic."""
        if not next_offsets:
            return
        topic = self.settings.events_topic
        try:
            await self.consumer.commit(
                {TopicPartition(topic, p): o for p, o in next_offsets.items()}
            )
        except KafkaError as exc:
            raise KafkaIOError(f"commit failed: {exc}") from exc


def _too_large(error: BaseException | None) -> bool:
    return error is not None and isinstance(error.__cause__, _TOO_LARGE)


def _first_error(futures: Sequence[asyncio.Future[int]]) -> str:
    for f in futures:
        if f.cancelled():
            return "cancelled"
        if f.exception() is not None:
            return str(f.exception()) or type(f.exception()).__name__
    return "no error"


async def _changelog_acked(
    topic: str, batches: Sequence[tuple[int, asyncio.Future[int]]]
) -> dict[int, int]:
    """Partition → next offset, once every batch is acknowledged."""
    await wait_all([fut for _, fut in batches])
    offsets: dict[int, int] = {}
    for partition, fut in batches:
        try:
            next_offset = fut.result()
        except (KafkaError, KafkaIOError) as exc:
            raise ProduceError(f"changelog produce to {topic} failed: {exc}") from exc
        offsets[partition] = max(offsets.get(partition, 0), next_offset)
    return offsets
