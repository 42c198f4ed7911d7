"""Kafka at the edge: topics, the group consumer with manual commits, and the producer.

aiokafka exceptions are translated to ``KafkaIOError``/``ProduceError`` here and
nowhere else. The group consumer's records are read as aiokafka's batch reader
yields them (``BatchRecord``; importing this module installs that in aiokafka's
fetcher), other consumers' as aiokafka's ``ConsumerRecord``s.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.consumer import fetcher as _aiokafka_fetcher
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner, murmur2

from crmhooks.aio import wait_all
from crmhooks.config import KafkaSettings
from crmhooks.errors import KafkaIOError, ProduceError

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


class InRecord(BatchRecord, Protocol):
    """One record read from a topic with its partition: aiokafka's ``ConsumerRecord``."""

    @property
    def partition(self) -> int: ...


# A fetch: each partition with records, and its records in offset order.
Fetched = list[tuple[int, Sequence[BatchRecord]]]


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


async def ensure_topics(
    bootstrap_servers: str,
    names: Iterable[str],
    partitions: int,
    *,
    changelog: str | None = None,
) -> None:
    """Create the topics that do not exist yet (replication factor up to 3).

    ``changelog`` (compacted) gets as many partitions as ``names[0]``, the events
    topic: changelog partition p holds the state of events partition p.
    """
    names = list(dict.fromkeys(names))
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        factor = min(3, len(admin._client.cluster.brokers()) or 1)
        missing = [n for n in names if n not in existing]
        if missing:
            await admin.create_topics(
                [NewTopic(n, num_partitions=partitions, replication_factor=factor) for n in missing]
            )
            log.info("created topics %s with %d partitions", missing, partitions)
        if changelog is not None and changelog not in existing:
            (described,) = await admin.describe_topics([names[0]])
            count = len(described.get("partitions") or []) or partitions
            await admin.create_topics(
                [
                    NewTopic(
                        changelog,
                        num_partitions=count,
                        replication_factor=factor,
                        topic_configs={"cleanup.policy": "compact"},
                    )
                ]
            )
            log.info("created changelog topic %s with %d partitions", changelog, count)
        await wait_visible(admin, names + ([changelog] if changelog is not None else []))
    except KafkaError as exc:
        raise KafkaIOError(f"cannot create topics on {bootstrap_servers}: {exc}") from exc
    finally:
        await admin.close()


class DescribesTopics(Protocol):
    """What ``wait_visible`` needs of aiokafka's admin client."""

    async def describe_topics(self, topics: list[str] | None = None) -> list[Any]: ...


async def wait_visible(
    admin: DescribesTopics, names: list[str], tries: int = 600, pause_s: float = 0.05
) -> None:
    """Until the cluster's metadata shows every topic of ``names`` with a leader for
    each partition (KafkaIOError naming those still missing after ``tries``).

    A topic just created is not in every broker's metadata at once (a broker just
    started applies it later still). A consumer that subscribes before it is seen
    gets no partitions, and aiokafka looks again only after ``metadata_max_age_ms``
    (5 minutes): the processor would sit idle.
    """
    missing = list(names)
    for attempt in range(tries):
        if attempt:
            await asyncio.sleep(pause_s)
        described = await admin.describe_topics(missing)
        visible = {
            t["topic"]
            for t in described
            if not t["error_code"]
            and t["partitions"]
            and all(not p["error_code"] and p["leader"] >= 0 for p in t["partitions"])
        }
        missing = [n for n in missing if n not in visible]
        if not missing:
            return
    raise KafkaIOError(
        f"topics {missing} are not in the cluster's metadata with a leader for every "
        f"partition after {tries * pause_s:.0f} s"
    )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_revoked: PartitionsCallback, on_assigned: PartitionsCallback) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self._on_revoked({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self._on_assigned({tp.partition for tp in assigned})


@functools.lru_cache(maxsize=1 << 16)
def _key_hash(key: bytes) -> int:
    return int(murmur2(key)) & 0x7FFFFFFF


_default_partitioner = DefaultPartitioner()

# A record this large gets a batch of its own: should the broker refuse it
# (message.max.bytes), no other record fails with it.
ALONE_BYTES = 64 << 10


class _Pending:
    """One batch being filled, and the future of its acknowledgement (the
    partition's next offset after it)."""

    __slots__ = ("acked", "builder", "count")

    def __init__(self, builder: Any, acked: asyncio.Future[int]) -> None:
        self.builder = builder
        self.count = 0
        self.acked = acked


class _Outbox:
    """The records of one topic partition not yet handed to aiokafka, in batches.

    ``AIOKafkaProducer.send`` costs ~5 µs of CPU a record: a coroutine, a future
    and a metadata object each. Here records go into a batch (aiokafka's
    ``BatchBuilder``, in C) and each batch is handed over whole with ``send_batch``
    and one future. aiokafka holds one batch of a partition at a time (the next
    waits until the one before is taken for a request), so records that come
    meanwhile fill the next: under load a request carries many, in their order.
    """

    __slots__ = ("_flusher", "_producer", "_queue", "partition", "topic")

    def __init__(self, producer: AIOKafkaProducer, topic: str, partition: int) -> None:
        self._producer = producer
        self.topic = topic
        self.partition = partition
        self._queue: deque[_Pending] = deque()  # full batches first, the open one last
        self._flusher: asyncio.Task[None] | None = None

    def add(self, key: bytes | None, value: bytes | None) -> asyncio.Future[int]:
        """Queue a record; the future resolves once it is acknowledged."""
        pending = self._queue[-1] if self._queue else None
        alone = value is not None and len(value) >= ALONE_BYTES
        if pending is None or pending.builder.closed() or (alone and pending.count):
            pending = self._open()
        if pending.builder.append(timestamp=None, key=key, value=value) is None:  # full
            pending = self._open()
            pending.builder.append(timestamp=None, key=key, value=value)  # the first fits
        pending.count += 1
        if alone:
            pending.builder.close()
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name=f"outbox {self.topic}")
        return pending.acked

    def _open(self) -> _Pending:
        acked: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        pending = _Pending(self._producer.create_batch(), acked)
        self._queue.append(pending)
        return pending

    async def _flush(self) -> None:
        pending: _Pending | None = None
        try:
            while self._queue:
                pending = self._queue.popleft()
                pending.builder.close()  # handed over: nothing more goes in
                try:
                    fut = await self._producer.send_batch(
                        pending.builder, self.topic, partition=self.partition
                    )
                except Exception as exc:  # KafkaError; an unknown partition: AssertionError
                    _settle_batch(pending, None, exc)
                else:
                    fut.add_done_callback(functools.partial(_settle_batch, pending))
                pending = None
        finally:
            self._flusher = None
            stopped = ProduceError(f"produce to {self.topic} stopped")
            for left in ([pending] if pending is not None else []) + list(self._queue):
                _settle_batch(left, None, stopped)
            self._queue.clear()

    async def drained(self) -> None:
        """Once every record queued so far is handed to aiokafka."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)


def _settle_batch(
    pending: _Pending, fut: asyncio.Future[Any] | None, error: BaseException | None = None
) -> None:
    acked = pending.acked
    if acked.done():
        return
    if fut is not None:
        error = ProduceError("produce cancelled") if fut.cancelled() else fut.exception()
    if error is None and fut is not None:
        acked.set_result(fut.result().offset + pending.count)
        return
    acked.set_exception(error if error is not None else ProduceError("produce failed"))
    acked.exception()  # retrieved: the callers see it when they await


def keyed_partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's default partitioner (Kafka's murmur2 of the key), with the hash of
    each key remembered: murmur2 is pure Python in aiokafka (~2 µs a record), and
    our keys (organisation ids, store row keys) repeat."""
    if key is None:
        return int(_default_partitioner(key, all_partitions, available))
    return all_partitions[_key_hash(key) % len(all_partitions)]


class KafkaIO:
    """The consumer of the events topic and the producer of results and dead letters."""

    def __init__(
        self,
        settings: KafkaSettings,
        on_revoked: PartitionsCallback,
        on_assigned: PartitionsCallback,
        client_id: str = "crmhooks",
    ) -> None:
        self.settings = settings
        self._listener = _Listener(on_revoked, on_assigned)
        self._client_id = client_id
        self.retry_pause_s = 0.2  # times the try number, between tries of produce_all
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._outboxes: dict[tuple[str, int], _Outbox] = {}
        self._partitions: dict[str, list[int]] = {}  # of the topics produced to
        # The largest dead letter the dead-letter topic takes (None: not known).
        self.dead_letter_max_bytes: int | None = None

    def __repr__(self) -> str:
        return f"KafkaIO({self.settings.bootstrap_servers!r}, group={self.settings.group_id!r})"

    async def __aenter__(self) -> KafkaIO:
        s = self.settings
        await ensure_topics(
            s.bootstrap_servers,
            [s.events_topic, s.results_topic, s.dlq_topic],
            s.partitions,
            changelog=s.changelog,
        )
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.bootstrap_servers,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=True,
            # No linger: every store commit and offset commit waits for acknowledgements,
            # so waiting to fill a batch adds to every event's latency (p50 42 -> 16 ms
            # at 1,000 events/s); under load, records queue while a request is in
            # flight and go out together anyway.
            linger_ms=0,
            max_request_size=4 << 20,
            # Records per partition wait for the one batch in flight; with aiokafka's
            # 16 KB (~27 results) a burst waits in wait_drain, costly in CPU. 256 KB:
            # 35 -> 21 µs of CPU per record (bursts of 256), instant bench -5 % CPU.
            # (Below the broker's default message.max.bytes, 1 MB.)
            max_batch_size=256 << 10,
            partitioner=keyed_partitioner,
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
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
            raise KafkaIOError(f"cannot connect to Kafka at {s.bootstrap_servers}: {exc}") from exc
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
            try:
                # Records still in outboxes first, then the producer flushes them.
                await asyncio.wait_for(
                    asyncio.gather(*(o.drained() for o in self._outboxes.values())),
                    timeout=10.0,
                )
            except (TimeoutError, ProduceError) as err:
                log.warning("records not handed to the producer before stop: %s", err)
            self._outboxes.clear()
            try:
                await self._producer.stop()  # flushes what is still buffered
            except KafkaError as err:
                log.warning("producer stop failed: %s", err)
            self._producer = None

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise KafkaIOError("Kafka is not started")
        return self._consumer

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise KafkaIOError("Kafka is not started")
        return self._producer

    async def fetch(self, timeout_ms: int, max_records: int) -> Fetched:
        try:
            batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as exc:
            raise KafkaIOError(f"fetch failed: {exc}") from exc
        return [(tp.partition, records) for tp, records in batches.items() if records]

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

    async def _partitions_of(self, topic: str) -> list[int]:
        found = self._partitions.get(topic)
        if found is None:
            try:
                found = sorted(await self.producer.partitions_for(topic))
            except KafkaError as exc:
                raise ProduceError(f"produce to {topic} failed: {exc}") from exc
            self._partitions[topic] = found
        return found

    def _outbox(self, topic: str, partition: int) -> _Outbox:
        outbox = self._outboxes.get((topic, partition))
        if outbox is None:
            outbox = self._outboxes[(topic, partition)] = _Outbox(self.producer, topic, partition)
        return outbox

    async def produce_all(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        """Produce records and wait until every one is acknowledged (ProduceError if not).

        Records with a key go to the partition Kafka's default partitioner picks
        (murmur2 of the key). A failed send is retried a few times: the offset behind
        it is not committed until it succeeded, so giving up here means the batch is
        processed again.
        """
        attempts = 0
        remaining = list(records)
        while remaining:
            futures: list[asyncio.Future[int]] = []
            for topic, key, value in remaining:
                partitions = self._partitions.get(topic) or await self._partitions_of(topic)
                partition = keyed_partitioner(key, partitions, partitions)
                futures.append(self._outbox(topic, partition).add(key, value))
            await wait_all(futures)
            failed = [
                r
                for r, f in zip(remaining, futures, strict=True)
                if f.cancelled() or f.exception() is not None
            ]
            if not failed:
                return
            attempts += 1
            if attempts >= 5:
                raise ProduceError(
                    f"produce to {failed[0][0]} failed: {len(failed)} records not acknowledged "
                    f"after {attempts} tries ({_first_error(futures)})"
                )
            error = _first_error(futures)
            log.warning("retrying %d unacknowledged records: %s", len(failed), error)
            await asyncio.sleep(self.retry_pause_s * attempts)
            remaining = failed

    async def produce_changelog(
        self, records: Sequence[tuple[int, bytes, bytes | None]]
    ) -> Awaitable[dict[int, int]]:
        """Queue store changes for the changelog, in order; returns without waiting for
        the broker an awaitable of partition → next offset (acknowledged)."""
        topic = self.settings.changelog
        batches: dict[asyncio.Future[int], int] = {}
        for p, k, v in records:
            batches[self._outbox(topic, p).add(k, v)] = p  # one future per batch
        return _changelog_acked(topic, [(p, fut) for fut, p in batches.items()])

    async def read_changelog(
        self, partition: int, from_offset: int
    ) -> AsyncIterator[tuple[int, bytes, bytes | None]]:
        """(offset, key, value) of changelog ``partition`` from ``from_offset`` to its end."""
        tp = TopicPartition(self.settings.changelog, partition)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
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


async def read_topic(
    bootstrap_servers: str, topic: str, *, follow: bool = False, idle_timeout_s: float = 2.0
) -> AsyncIterator[InRecord]:
    """Every record of ``topic`` from the beginning (no consumer group, nothing committed).

    Without ``follow`` it stops at the end offsets seen when it started, or after
    ``idle_timeout_s`` with nothing new.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
    )
    try:
        await consumer.start()
        if topic not in await consumer.topics():
            return
        consumer.subscribe([topic])  # without a group: every partition, from the earliest
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 10.0
        while not consumer.assignment():
            if loop.time() > give_up:
                raise KafkaIOError(f"no partitions of {topic} assigned after 10 s")
            await asyncio.sleep(0.05)
        tps = sorted(consumer.assignment())
        ends = await consumer.end_offsets(tps)
        idle_since = asyncio.get_running_loop().time()
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=1000)
            for messages in batches.values():
                for m in messages:
                    yield m
            now = asyncio.get_running_loop().time()
            if batches:
                idle_since = now
            if follow:
                continue
            positions = {tp: await consumer.position(tp) for tp in tps}
            if all(positions[tp] >= ends[tp] for tp in tps) or now - idle_since > idle_timeout_s:
                return
    except KafkaError as exc:
        raise KafkaIOError(f"cannot read {topic} from {bootstrap_servers}: {exc}") from exc
    finally:
        await consumer.stop()


async def produce_records(
    bootstrap_servers: str,
    records: Sequence[tuple[str, bytes | None, bytes]],
    headers: Sequence[tuple[str, bytes]] | None = None,
) -> None:
    """Produce records with a short-lived producer and wait for every acknowledgement."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", linger_ms=5)
    try:
        await producer.start()
        extra = list(headers) if headers else None
        futures = [await producer.send(t, value=v, key=k, headers=extra) for t, k, v in records]
        await asyncio.gather(*futures)
    except KafkaError as exc:
        raise ProduceError(f"produce to {bootstrap_servers} failed: {exc}") from exc
    finally:
        await producer.stop()


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
        except KafkaError as exc:
            raise ProduceError(f"changelog produce to {topic} failed: {exc}") from exc
        offsets[partition] = max(offsets.get(partition, 0), next_offset)
    return offsets
