"""The process's one idempotent producer: records in per-partition outboxes, and a
new producer when the old one's sequence state broke (a long broker outage).

aiokafka gives an idempotent producer's batch its sequence number when the batch
is taken for a request. A batch that then fails without being written (it waited
longer than ``request_timeout_ms`` for a partition leader: a broker down for ~40 s
or more) leaves a gap in that partition's sequence, and aiokafka does not reset
it: every later batch of the partition fails with ``OutOfOrderSequenceNumber``,
for ever. So the first failed batch stops all sending; once every batch handed to
the old producer has settled (written, or failed: nothing of a partition is
written after its first failure, the broker refuses the gap), a new producer (a
new producer id, sequences from 0) re-sends the failed batches in their order,
then what came meanwhile. Records of one partition reach the broker in the order
they were added, also across the change: the changelog's last record of a key
stays its latest version. Callers just wait; they see an error only for a batch
the broker refused for what it holds (too large, not authorised), or when no new
producer can be made (``fatal``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)
from aiokafka.partitioner import DefaultPartitioner, murmur2

from crmhooks.errors import KafkaIOError, ProduceError

log = logging.getLogger(__name__)

# A record this large gets a batch of its own: should the broker refuse it
# (message.max.bytes), no other record fails with it.
ALONE_BYTES = 64 << 10

# Errors of a batch that was not written and may be on a new producer: the
# transient ones (aiokafka's ``retriable``, an expired batch's NotLeaderForPartition
# among them) and those of a broken sequence state.
_SEND_AGAIN: tuple[type[BaseException], ...] = (
    KafkaTimeoutError,
    KafkaConnectionError,
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    ProducerFenced,
)

# Between tries to start a new producer while the broker is away; a warning is
# logged every WARN_EVERY_S meanwhile, so an operator sees why nothing is written.
RESTART_PAUSE_S = 1.0
# A batch that failed this many times is failed to its callers (who may try again):
# each failure is a broker away for request_timeout_ms (40 s) or a refusal, so this
# is minutes of a broker coming and going, never a tight loop.
SEND_TRIES = 10
# How long a graceful stop waits for the producer to flush (within SPEC §10's
# graceful stop; past it the records' offsets are not committed anyway).
STOP_TIMEOUT_S = 15.0
WARN_EVERY_S = 15.0


def send_again(error: BaseException) -> bool:
    """Whether a batch failed with ``error`` was not written and may be sent again."""
    return isinstance(error, _SEND_AGAIN) or bool(getattr(error, "retriable", False))


@functools.lru_cache(maxsize=1 << 16)
def _key_hash(key: bytes) -> int:
    return int(murmur2(key)) & 0x7FFFFFFF


_default_partitioner = DefaultPartitioner()


def keyed_partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's default partitioner (Kafka's murmur2 of the key), with the hash of
    each key remembered: murmur2 is pure Python in aiokafka (~2 µs a record), and
    our keys (organisation ids, store row keys) repeat."""
    if key is None:
        return int(_default_partitioner(key, all_partitions, available))
    return all_partitions[_key_hash(key) % len(all_partitions)]


class _Pending:
    """One batch being filled: aiokafka's builder, the records in it (to build it again
    for a new producer), and the future of its acknowledgement (the partition's next
    offset after it)."""

    __slots__ = ("acked", "builder", "records", "tries")

    def __init__(self, builder: Any, acked: asyncio.Future[int], tries: int = 0) -> None:
        self.builder = builder
        self.records: list[tuple[bytes | None, bytes | None]] = []
        self.acked = acked
        self.tries = tries  # sendings that failed so far


class _Outbox:
    """The records of one topic partition, in batches: those not yet handed to
    aiokafka (``_queue``), those handed and not yet settled (``_sent``), and those
    to send again once a new producer is there (``_again``), each in order.

    ``AIOKafkaProducer.send`` costs ~5 µs of CPU a record: a coroutine, a future
    and a metadata object each. Here records go into a batch (aiokafka's
    ``BatchBuilder``, in C) and each batch is handed over whole with ``send_batch``
    and one future. aiokafka holds one batch of a partition at a time (the next
    waits until the one before is taken for a request), so records that come
    meanwhile fill the next: under load a request carries many, in their order.
    """

    __slots__ = ("_again", "_flusher", "_owner", "_queue", "_sent", "partition", "topic")

    def __init__(self, owner: Producer, topic: str, partition: int) -> None:
        self._owner = owner
        self.topic = topic
        self.partition = partition
        self._queue: deque[_Pending] = deque()  # full batches first, the open one last
        self._sent: deque[_Pending] = deque()
        self._again: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None

    def add(self, key: bytes | None, value: bytes | None) -> asyncio.Future[int]:
        """Queue a record; the future resolves once it is acknowledged."""
        pending = self._queue[-1] if self._queue else None
        alone = value is not None and len(value) >= ALONE_BYTES
        if pending is None or pending.builder.closed() or (alone and pending.records):
            pending = self._open()
        if pending.builder.append(timestamp=None, key=key, value=value) is None:  # full
            pending = self._open()
            pending.builder.append(timestamp=None, key=key, value=value)  # the first fits
        pending.records.append((key, value))
        if alone:
            pending.builder.close()
        self._flush_soon()
        return pending.acked

    def _open(self) -> _Pending:
        acked: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        pending = _Pending(self._owner.producer.create_batch(), acked)
        self._queue.append(pending)
        return pending

    def _flush_soon(self) -> None:
        if self._flusher is None and self._queue:
            self._flusher = asyncio.create_task(self._flush(), name=f"outbox {self.topic}")

    async def _flush(self) -> None:
        owner = self._owner
        try:
            while self._queue:
                if not owner.usable.is_set():
                    await owner.usable.wait()
                    continue  # a new producer may have put batches to send again first
                pending = self._queue[0]
                pending.builder.close()  # handed over: nothing more goes in
                producer = owner.producer
                owner.unsettled += 1
                try:
                    fut = await producer.send_batch(
                        pending.builder, self.topic, partition=self.partition
                    )
                except KafkaTimeoutError:
                    # Not taken: the one before still waits for a leader (the broker
                    # away). No sequence number was given to it: the same batch again.
                    owner.settled_one()
                    continue
                except Exception as exc:  # KafkaError; an unknown partition: AssertionError
                    owner.settled_one()
                    self._queue.popleft()
                    _fail(pending, _produce_error(self.topic, exc))
                    continue
                self._queue.popleft()
                self._sent.append(pending)
                fut.add_done_callback(functools.partial(self._settled, pending))
        finally:
            self._flusher = None
            if owner.failed is not None:
                self.fail_all(owner.failed)

    def _settled(self, pending: _Pending, fut: asyncio.Future[Any]) -> None:
        owner = self._owner
        with contextlib.suppress(ValueError):  # not there: failed already (fail_all)
            self._sent.remove(pending)
        error = ProduceError("produce cancelled") if fut.cancelled() else fut.exception()
        if error is None:
            if not pending.acked.done():
                pending.acked.set_result(fut.result().offset + len(pending.records))
        elif send_again(error) and owner.failed is None and pending.tries + 1 < SEND_TRIES:
            pending.tries += 1
            self._again.append(pending)
            owner.restart(error)
        else:
            _fail(pending, _produce_error(self.topic, error))
            # Its sequence number was given and not written: the partition's next
            # batch would fail with OutOfOrderSequenceNumber. A new producer, at once.
            owner.restart(error)
        owner.settled_one()

    def send_again_on(self, producer: AIOKafkaProducer) -> None:
        """Put the batches that failed back in front, built anew for ``producer``."""
        again, self._again = self._again, []
        rebuilt: list[_Pending] = []
        for old in again:
            pending = _Pending(producer.create_batch(), old.acked, old.tries)
            for key, value in old.records:
                if pending.builder.append(timestamp=None, key=key, value=value) is None:
                    # Never: the same records fitted a batch of the same size before.
                    _fail(old, ProduceError(f"produce to {self.topic}: batch does not fit"))
                    break
                pending.records.append((key, value))
            else:
                rebuilt.append(pending)
        self._queue.extendleft(reversed(rebuilt))
        self._flush_soon()

    def close(self) -> None:
        """Stop handing batches over; what was not handed over fails its callers."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self.fail_all(ProduceError(f"produce to {self.topic} stopped"))

    def fail_all(self, error: BaseException) -> None:
        for pending in [*self._again, *self._sent, *self._queue]:
            _fail(pending, error)
        self._again.clear()
        self._sent.clear()
        self._queue.clear()

    async def drained(self) -> None:
        """Once every record queued so far is handed to aiokafka."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)


def _produce_error(topic: str, error: BaseException) -> ProduceError:
    """What a batch's callers get when it failed for good; the error behind it is its
    cause (``kafka_io`` tells a refusal for size from the others by it)."""
    failed = ProduceError(f"produce to {topic} failed: {error!r}")
    failed.__cause__ = error
    return failed


def _fail(pending: _Pending, error: BaseException) -> None:
    if not pending.acked.done():
        pending.acked.set_exception(error)
        pending.acked.exception()  # retrieved: the callers see it when they await


class Producer:
    """The idempotent producer of results, dead letters and the changelog, behind
    outboxes; replaced by a new one when a batch fails (see the module docstring)."""

    def __init__(self, make: Callable[[], AIOKafkaProducer], describe: str) -> None:
        self._make = make
        self._describe = describe  # where it writes, for messages
        self._producer: AIOKafkaProducer | None = None
        self._outboxes: dict[tuple[str, int], _Outbox] = {}
        self.partitions: dict[str, list[int]] = {}  # of the topics produced to
        self.usable = asyncio.Event()  # clear while a new producer is being made
        self.unsettled = 0  # batches being handed to the current producer or in it
        self._all_settled = asyncio.Event()
        self._restarting: asyncio.Task[None] | None = None
        self.restarts = 0
        self.failed: KafkaIOError | None = None
        # Resolved with the error when no new producer can be made: the process
        # cannot write, and must stop (the processor waits on it).
        self.fatal: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        return f"Producer({self._describe}, restarts={self.restarts})"

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise KafkaIOError("Kafka is not started")
        return self._producer

    async def start(self) -> None:
        producer = self._make()
        await producer.start()  # KafkaError: the caller translates
        self._producer = producer
        self.usable.set()

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        if self._restarting is not None:
            self._restarting.cancel()
        if self._producer is None:
            return
        try:
            # Records still in outboxes first, then the producer flushes them.
            await asyncio.wait_for(
                asyncio.gather(*(o.drained() for o in self._outboxes.values())),
                timeout=drain_timeout_s if self.usable.is_set() else 0.1,
            )
        except (TimeoutError, ProduceError) as err:
            log.warning("records not handed to the producer before stop: %s", err)
        for outbox in self._outboxes.values():
            outbox.close()
        self._outboxes.clear()
        try:
            # Flushes what is still buffered; bounded, as batches wait for ever for a
            # broker that is away.
            await asyncio.wait_for(self._producer.stop(), timeout=STOP_TIMEOUT_S)
        except (KafkaError, TimeoutError) as err:
            log.warning("producer stop failed: %r", err)
        self._producer = None

    async def partitions_of(self, topic: str) -> list[int]:
        found = self.partitions.get(topic)
        if found is None:
            try:
                found = sorted(await self.producer.partitions_for(topic))
            except KafkaError as exc:
                raise ProduceError(f"produce to {topic} failed: {exc!r}") from exc
            self.partitions[topic] = found
        return found

    def outbox(self, topic: str, partition: int) -> _Outbox:
        outbox = self._outboxes.get((topic, partition))
        if outbox is None:
            if self.failed is not None:
                raise self.failed
            outbox = self._outboxes[(topic, partition)] = _Outbox(self, topic, partition)
        return outbox

    def settled_one(self) -> None:
        self.unsettled -= 1
        if self.unsettled <= 0:
            self._all_settled.set()

    def restart(self, error: BaseException) -> None:
        """Stop sending and make a new producer once every batch handed over settled."""
        self.usable.clear()
        if self._restarting is None or self._restarting.done():
            log.warning(
                "a batch to %s failed (%r): sending stops until a new producer is made",
                self._describe,
                error,
            )
            self._restarting = asyncio.create_task(self._restart(), name="producer-restart")

    async def _restart(self) -> None:
        loop = asyncio.get_running_loop()
        while self.unsettled > 0:
            self._all_settled.clear()
            await self._all_settled.wait()
        # The old one stays ``producer`` until the new one is there: batches being
        # filled meanwhile come from its create_batch (a builder holds no state of
        # the producer's, only its settings).
        old = self._producer
        if old is not None:
            try:
                await asyncio.wait_for(old.stop(), timeout=10.0)
            except (KafkaError, TimeoutError) as exc:
                log.warning("the old producer did not stop cleanly: %r", exc)
        started = loop.time()
        warned = started
        while True:
            producer = self._make()
            try:
                await producer.start()
                break
            except KafkaConnectionError as exc:  # the broker still away
                await _quietly_stop(producer)
                if loop.time() - warned >= WARN_EVERY_S:
                    warned = loop.time()
                    log.warning(
                        "no new producer for %s after %.0f s: %s",
                        self._describe,
                        warned - started,
                        exc,
                    )
                await asyncio.sleep(RESTART_PAUSE_S)
            except Exception as exc:  # authentication, TLS: waiting will not help
                await _quietly_stop(producer)
                self._give_up(
                    KafkaIOError(f"cannot make a new producer for {self._describe}: {exc}")
                )
                return
        self._producer = producer
        self.restarts += 1
        again = sum(len(o._again) for o in self._outboxes.values())
        log.warning(
            "new producer for %s (restart %d): sending again %d batches that failed",
            self._describe,
            self.restarts,
            again,
        )
        for outbox in self._outboxes.values():
            outbox.send_again_on(producer)  # in front of what came meanwhile
        self.usable.set()

    def _give_up(self, error: KafkaIOError) -> None:
        log.error("%s", error)
        self.failed = error
        for outbox in self._outboxes.values():
            outbox.fail_all(error)
        if not self.fatal.done():
            self.fatal.set_exception(error)
        self.usable.set()  # the flushers wake up and fail what comes


async def _quietly_stop(producer: AIOKafkaProducer) -> None:
    try:
        await producer.stop()
    except Exception as exc:  # it never started: nothing to lose
        log.debug("stopping a producer that did not start: %r", exc)
