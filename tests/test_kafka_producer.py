"""The producer behind KafkaIO.produce_all/produce_changelog, against fake aiokafka
producers: batches per partition in order, a batch not written sent again on a new
producer (before what came after it), refusals failed to the callers, no new
producer for refused credentials."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    LeaderNotAvailableError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumber,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
)
from hypothesis import given
from hypothesis import strategies as st

from crmhooks import kafka_producer
from crmhooks.config import KafkaSettings
from crmhooks.errors import KafkaIOError, ProduceError, RecordsTooLarge
from crmhooks.kafka_io import ALONE_BYTES, KafkaIO, ensure_topics, keyed_partitioner, read_topic
from crmhooks.kafka_producer import Producer, send_again
from tests.support import unique_kafka

# The fake broker answers a request this much later: batches are in flight meanwhile.
ACK_S = 0.005


class FakeBatch:
    """aiokafka's BatchBuilder, as the outboxes use it."""

    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes]] = []
        self._closed = False

    def append(self, *, timestamp: int | None, key: bytes | None, value: bytes) -> object | None:
        if self._closed:
            return None
        self.records.append((key, value))
        return object()

    def close(self) -> None:
        self._closed = True

    def closed(self) -> bool:
        return self._closed


class FakeBroker:
    """What the fake producers' batches meet. ``failures[value]``: the errors the batches
    holding ``value`` fail with, one a sending. As with a real idempotent producer, once
    a batch of a partition failed, that producer's later batches of the partition fail
    with OutOfOrderSequenceNumber (the broker refuses the gap in the sequence)."""

    def __init__(self, failures: dict[bytes, list[BaseException]] | None = None) -> None:
        self.failures = {v: list(errors) for v, errors in (failures or {}).items()}
        self.start_errors: list[BaseException] = []
        self.send_errors: list[BaseException] = []  # raised by send_batch itself
        self.sent: list[tuple[int, str, int, list[bytes]]] = []  # producer, topic, partition
        self.written: dict[tuple[str, int], list[bytes]] = {}
        self.broken: set[tuple[int, str, int]] = set()
        self.made = 0

    def producer(self) -> FakeProducer:
        self.made += 1
        return FakeProducer(self, self.made - 1)


class FakeProducer:
    def __init__(self, broker: FakeBroker, number: int) -> None:
        self.broker = broker
        self.number = number

    async def start(self) -> None:
        if self.broker.start_errors:
            raise self.broker.start_errors.pop(0)

    async def stop(self) -> None:
        return None

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> Any:
        broker = self.broker
        if broker.send_errors:
            raise broker.send_errors.pop(0)
        assert batch.closed(), "a batch is handed over closed"
        values = [v for _, v in batch.records]
        broker.sent.append((self.number, topic, partition, values))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        errors = [broker.failures[v].pop(0) for v in values if broker.failures.get(v)]
        if (self.number, topic, partition) in broker.broken:
            loop.call_later(ACK_S, fut.set_exception, OutOfOrderSequenceNumber())
        elif errors:
            broker.broken.add((self.number, topic, partition))
            loop.call_later(ACK_S, fut.set_exception, errors[0])
        else:
            log = broker.written.setdefault((topic, partition), [])
            loop.call_later(ACK_S, fut.set_result, SimpleNamespace(offset=len(log)))
            log.extend(values)
        return fut


async def handed(broker: FakeBroker, count: int) -> None:
    """Until ``count`` batches were handed to the fake producers (bounded)."""
    for _ in range(10_000):
        if len(broker.sent) >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{len(broker.sent)} batches handed over, not {count}")


async def nothing(partitions: set[int]) -> None:
    return None


async def started(broker: FakeBroker, monkeypatch: pytest.MonkeyPatch) -> KafkaIO:
    monkeypatch.setattr(kafka_producer, "RESTART_PAUSE_S", 0.0)
    kio = KafkaIO(KafkaSettings(), nothing, nothing)
    kio._producer = Producer(broker.producer, "test")
    await kio.producer.start()
    kio.retry_pause_s = 0.0
    return kio


RESULTS = "crm.webhook-results"


async def test_a_batch_not_written_is_sent_again_on_a_new_producer_before_later_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # r-1 waited longer than request_timeout_ms for a leader (a broker away): failed,
    # and its partition's sequence has a gap; r-2, handed over after it, is refused.
    broker = FakeBroker({b"r-1": [NotLeaderForPartitionError()]})
    kio = await started(broker, monkeypatch)
    first = asyncio.create_task(kio.produce_all([(RESULTS, b"org", b"r-1")]))
    await handed(broker, 1)  # (its answer comes ACK_S later)
    await kio.produce_all([(RESULTS, b"org", b"r-2")])
    await first
    partition = keyed_partitioner(b"org", [0, 1, 2], [0, 1, 2])
    # r-2 was handed to the first producer too and refused there (unless r-1's
    # failure came first: then it waited), and the new one sent r-1 first.
    assert broker.sent[0] == (0, RESULTS, partition, [b"r-1"])
    again = [values for number, _, _, values in broker.sent if number == 1]
    assert again in ([[b"r-1"], [b"r-2"]], [[b"r-1", b"r-2"]])
    assert broker.written == {(RESULTS, partition): [b"r-1", b"r-2"]}, "in their order"
    assert kio.producer.restarts == 1
    assert not kio.broken.done()


async def test_changelog_records_keep_their_order_across_a_new_producer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = FakeBroker({b"v1": [OutOfOrderSequenceNumber()]})
    kio = await started(broker, monkeypatch)
    first = await kio.produce_changelog([(0, b"k", b"v1")])
    await handed(broker, 1)
    second = await kio.produce_changelog([(0, b"k", b"v2")])
    assert await first == {0: 1}
    assert await second == {0: 2}
    assert broker.written[("crmhooks.changelog", 0)] == [b"v1", b"v2"], "the latest last"


async def test_while_the_broker_is_away_a_new_producer_is_tried_until_it_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = FakeBroker({b"r-1": [NotLeaderForPartitionError()]})
    kio = await started(broker, monkeypatch)
    broker.start_errors = [KafkaConnectionError("Unable to bootstrap")] * 3
    await kio.produce_all([(RESULTS, b"org", b"r-1")])
    assert broker.made == 5  # the first, three that could not start, the one that did
    assert [values for *_, values in broker.sent] == [[b"r-1"], [b"r-1"]]


async def test_no_new_producer_for_refused_credentials_breaks_kafka_io(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = FakeBroker({b"r-1": [NotLeaderForPartitionError()]})
    kio = await started(broker, monkeypatch)
    broker.start_errors = [SaslAuthenticationFailed("Authentication failed")]
    with pytest.raises(ProduceError, match="records not acknowledged"):
        await kio.produce_all([(RESULTS, b"org", b"r-1")])
    with pytest.raises(KafkaIOError, match="cannot make a new producer"):
        await kio.broken


async def test_a_batch_refused_for_what_it_holds_fails_after_five_tries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = FakeBroker({b"letter": [TopicAuthorizationFailedError()] * 99})
    kio = await started(broker, monkeypatch)
    with pytest.raises(ProduceError, match="1 records not acknowledged after 5 tries"):
        await kio.produce_all([("crm.webhook-dlq", b"org", b"letter")])
    assert [values for *_, values in broker.sent] == [[b"letter"]] * 5
    # Each refusal used a sequence number the broker never wrote: a new producer each.
    assert broker.made >= 5  # (the last one may still be starting)


async def test_a_record_refused_as_too_large_is_not_sent_again_and_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sending it again cannot help (SPEC §10: one record never stops its partition):
    the others are written, and RecordsTooLarge names it for the caller to mend."""
    broker = FakeBroker({b"big": [MessageSizeTooLargeError()] * 99})
    kio = await started(broker, monkeypatch)
    records = [("crm.webhook-dlq", b"org", b"big"), (RESULTS, b"org", b"r-1")]
    with pytest.raises(RecordsTooLarge) as refused:
        await kio.produce_all(records)
    assert refused.value.records == records[:1]
    assert not refused.value.retriable
    assert [values for *_, values in broker.sent].count([b"big"]) == 1
    assert [b"r-1"] in [values for *_, values in broker.sent]


async def test_a_batch_failing_again_and_again_is_failed_to_its_callers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = FakeBroker({b"r-1": [NotLeaderForPartitionError()] * 999})
    kio = await started(broker, monkeypatch)
    with pytest.raises(ProduceError, match="after 5 tries"):
        await kio.produce_all([(RESULTS, b"org", b"r-1")])
    assert len(broker.sent) == 5 * kafka_producer.SEND_TRIES


async def test_a_producer_that_cannot_queue_raises_produce_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = FakeBroker()
    kio = await started(broker, monkeypatch)
    broker.send_errors = [AssertionError("Unrecognized partition")] * 5
    with pytest.raises(ProduceError, match=r"produce to crm\.webhook-dlq failed"):
        await kio.produce_all([("crm.webhook-dlq", b"org", b"letter")])


async def test_a_batch_not_taken_in_time_is_handed_over_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # send_batch waited request_timeout_ms for the batch before it: no sequence number
    # was given to this one, so the same batch goes again, with no new producer.
    from aiokafka.errors import KafkaTimeoutError

    broker = FakeBroker()
    kio = await started(broker, monkeypatch)
    broker.send_errors = [KafkaTimeoutError()] * 2
    await kio.produce_all([(RESULTS, b"org", b"r-1")])
    assert [values for *_, values in broker.sent] == [[b"r-1"]]
    assert broker.made == 1


async def test_concurrent_records_go_out_as_one_batch_per_partition_in_their_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = FakeBroker()
    kio = await started(broker, monkeypatch)
    keys = [f"org-{n % 7}".encode() for n in range(60)]
    await asyncio.gather(
        *(kio.produce_all([(RESULTS, key, b"%d" % n)]) for n, key in enumerate(keys))
    )
    assert len(broker.sent) <= 2 * 3, "records of a tick share their partition's batch"
    for _, topic, partition, values in broker.sent:
        assert topic == RESULTS
        assert values == sorted(values, key=int), "in the order given"
        for value in values:
            assert keyed_partitioner(keys[int(value)], [0, 1, 2], [0, 1, 2]) == partition
    assert sorted(int(v) for *_, vs in broker.sent for v in vs) == list(range(60))


async def test_changelog_acknowledgement_gives_each_partitions_next_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kio = await started(FakeBroker(), monkeypatch)
    records = [(n % 2, b"k%d" % n, b"v%d" % n) for n in range(5)]
    assert await (await kio.produce_changelog(records)) == {0: 3, 1: 2}
    assert await (await kio.produce_changelog(records[:1])) == {0: 4}


async def test_a_changelog_batch_refused_fails_the_store_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kio = await started(FakeBroker({b"v1": [MessageSizeTooLargeError()]}), monkeypatch)
    acked = await kio.produce_changelog([(0, b"k0", b"v0"), (1, b"k1", b"v1")])
    with pytest.raises(ProduceError, match=r"changelog produce to .* failed"):
        await acked


async def test_a_large_record_goes_alone_so_its_refusal_fails_no_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = b"x" * ALONE_BYTES
    broker = FakeBroker({big: [MessageSizeTooLargeError()] * 99})
    kio = await started(broker, monkeypatch)
    small = [("crm.webhook-dlq", b"org", b"s%d" % n) for n in range(3)]
    results = await asyncio.gather(
        kio.produce_all(small[:2]),
        kio.produce_all([("crm.webhook-dlq", b"org", big)]),
        kio.produce_all(small[2:]),
        return_exceptions=True,
    )
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], ProduceError)
    assert [vs for *_, vs in broker.sent][:3] == [[b"s0", b"s1"], [big], [b"s2"]]
    written = broker.written[("crm.webhook-dlq", keyed_partitioner(b"org", [0, 1, 2], [0, 1, 2]))]
    assert written == [b"s0", b"s1", b"s2"]


@given(
    error=st.sampled_from(
        [NotLeaderForPartitionError(), OutOfOrderSequenceNumber(), KafkaConnectionError()]
    )
)
def test_batches_not_written_are_sent_again_refused_ones_are_not(error: BaseException) -> None:
    assert send_again(error)
    assert not send_again(MessageSizeTooLargeError())


# --- against the real broker: the failure this guards against, and the recovery ------


def _idempotent(bootstrap: str) -> AIOKafkaProducer:
    # A batch expires after request_timeout_ms without a partition leader: 1 s here.
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", request_timeout_ms=1000
    )


def _no_leader_for(producer: AIOKafkaProducer, tp: TopicPartition) -> Callable[[], None]:
    """Fault injection: the producer sees no leader for ``tp`` (as while a broker
    restarts), until the returned function is called."""
    cluster = producer.client.cluster
    real = cluster.leader_for_partition

    def leader(partition: TopicPartition) -> int | None:
        return -1 if partition == tp else real(partition)

    cluster.leader_for_partition = leader
    return lambda: setattr(cluster, "leader_for_partition", real)


async def _topic() -> tuple[KafkaSettings, str]:
    kafka = unique_kafka(partitions=1)
    await ensure_topics(kafka, [kafka.results_topic], 1)
    return kafka, kafka.results_topic


@pytest.mark.kafka
async def test_aiokafka_alone_refuses_every_batch_after_one_expired() -> None:
    """What the Producer exists for: aiokafka gave the expired batch a sequence number
    the broker never saw, and the partition's next batch is refused for ever."""
    kafka, topic = await _topic()
    producer = _idempotent(kafka.bootstrap_servers)
    await producer.start()
    try:
        await (await producer.send(topic, b"r-0", partition=0))  # the broker knows its sequence
        heal = _no_leader_for(producer, TopicPartition(topic, 0))
        with pytest.raises(LeaderNotAvailableError):  # expired, never written
            await (await producer.send(topic, b"r-1", partition=0))
        heal()
        for _ in range(2):
            with pytest.raises(OutOfOrderSequenceNumber):
                await (await producer.send(topic, b"r-2", partition=0))
    finally:
        await producer.stop()


@pytest.mark.kafka
async def test_after_an_expired_batch_a_new_producer_writes_everything_in_order() -> None:
    kafka, topic = await _topic()
    made: list[AIOKafkaProducer] = []

    def make() -> AIOKafkaProducer:
        made.append(_idempotent(kafka.bootstrap_servers))
        return made[-1]

    producer = Producer(make, "test")
    await producer.start()
    try:
        await producer.outbox(topic, 0).add(b"k", b"r-0")
        _no_leader_for(made[0], TopicPartition(topic, 0))  # for good: that producer is left
        first = producer.outbox(topic, 0).add(b"k", b"r-1")
        second = producer.outbox(topic, 0).add(b"k", b"r-2")
        await asyncio.wait_for(asyncio.gather(first, second), 30)
        assert producer.restarts == 1
        assert len(made) == 2
    finally:
        await producer.stop()
    values = [rec.value async for rec in read_topic(kafka, topic)]
    assert values == [b"r-0", b"r-1", b"r-2"]
