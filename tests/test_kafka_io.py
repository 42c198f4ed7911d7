"""The producer's partitioner; waiting for new topics to be seen in the metadata; the
records read, against a real broker (tests/test_kafka_producer.py: producing)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.consumer import fetcher as _aiokafka_fetcher
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from crmhooks.config import KafkaSettings
from crmhooks.errors import KafkaIOError
from crmhooks.kafka_io import (
    _batch_records_fit,
    _BatchPartitionRecords,
    as_read,
    ensure_topics,
    keyed_partitioner,
    wait_visible,
)
from tests.support import bootstrap_servers


@given(key=st.binary(max_size=64), count=st.integers(min_value=1, max_value=64))
def test_keyed_partitioner_places_every_key_as_kafkas_default_does(key: bytes, count: int) -> None:
    partitions = list(range(count))
    expected = DefaultPartitioner()(key, partitions, partitions)
    assert keyed_partitioner(key, partitions, partitions) == expected
    assert keyed_partitioner(key, partitions, partitions) == expected  # remembered: the same


def test_keyed_partitioner_spreads_records_without_key_over_available_partitions() -> None:
    chosen = {keyed_partitioner(None, [0, 1, 2, 3], [1, 3]) for _ in range(200)}
    assert chosen == {1, 3}


class SlowMetadata:
    """An admin client whose metadata shows a topic only from its ``seen_from``-th
    description on (a topic just created, a broker just started)."""

    def __init__(self, seen_from: dict[str, int]) -> None:
        self.seen_from = seen_from
        self.asked: list[list[str]] = []

    async def describe_topics(self, topics: list[str] | None = None) -> list[Any]:
        assert topics is not None
        self.asked.append(list(topics))
        n = len(self.asked)
        described = []
        for name in topics:
            if n < self.seen_from[name]:
                described.append({"topic": name, "error_code": 3, "partitions": []})
            else:
                leader = -1 if n == self.seen_from[name] else 1  # no leader yet, then one
                partitions = [{"partition": 0, "error_code": 0, "leader": leader}]
                described.append({"topic": name, "error_code": 0, "partitions": partitions})
        return described


async def test_topics_are_waited_for_until_each_has_a_leader_for_every_partition() -> None:
    admin = SlowMetadata({"events": 1, "results": 3})
    await wait_visible(admin, ["events", "results"], tries=10, pause_s=0)
    # events: seen at once, its leader on the second look; results: on the fourth.
    assert admin.asked == [["events", "results"], ["events", "results"], ["results"], ["results"]]


async def test_topics_never_seen_are_named_in_the_error() -> None:
    admin = SlowMetadata({"events": 1, "results": 99})
    with pytest.raises(KafkaIOError, match=r"\['results'\] are not in the cluster's metadata"):
        await wait_visible(admin, ["events", "results"], tries=5, pause_s=0)
    assert len(admin.asked) == 5


# --- records read: the group consumer's as the batch yields them, equal to aiokafka's own

_RECORD_FIELDS = (
    "topic",
    "partition",
    "offset",
    "timestamp",
    "timestamp_type",
    "key",
    "value",
    "checksum",
    "serialized_key_size",
    "serialized_value_size",
    "headers",
)


# What a BatchRecord has: aiokafka's batch records, as the group consumer reads them.
_BATCH_FIELDS = ("offset", "timestamp", "timestamp_type", "key", "value", "headers")


async def _read_fields(
    topic: str, isolation_level: str, fields: tuple[str, ...] = _RECORD_FIELDS, **options: Any
) -> list[tuple[Any, ...]]:
    """Every record of ``topic`` (one partition) as its type's name and ``fields``
    (ConsumerRecord's attributes), read a few records a fetch (bounded: 10 s at most)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers(),
        enable_auto_commit=False,
        isolation_level=isolation_level,
        **options,
    )
    await consumer.start()
    rows: list[tuple[Any, ...]] = []
    kinds: set[str] = set()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        deadline = asyncio.get_running_loop().time() + 10.0
        while await consumer.position(tp) < end:
            assert asyncio.get_running_loop().time() < deadline, f"read {rows}"
            for rec in (await consumer.getmany(tp, timeout_ms=200, max_records=3)).get(tp, []):
                kinds.add(type(rec).__name__)
                rows.append(tuple(_plain(getattr(rec, name)) for name in fields))
    finally:
        await consumer.stop()
    assert len(kinds) == 1, kinds
    name = kinds.pop()
    return [(name, *row) for row in rows]


async def test_the_group_consumer_reads_batch_records_equal_to_aiokafkas_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With transactions committed and aborted (control batches, aborted batches
    skipped), keys and values missing, headers: the same records, a few a fetch."""
    topic = f"test-batch-{uuid.uuid4().hex[:10]}"
    await ensure_topics(KafkaSettings(bootstrap_servers=bootstrap_servers()), [topic], 1)
    plain = AIOKafkaProducer(bootstrap_servers=bootstrap_servers())
    txn = AIOKafkaProducer(bootstrap_servers=bootstrap_servers(), transactional_id=topic)
    await plain.start()
    await txn.start()
    try:
        await plain.send_and_wait(topic, b"v1", key=b"k1", headers=[("h", b"x"), ("h2", b"")])
        await plain.send_and_wait(topic, None, key=b"gone")  # a tombstone
        async with txn.transaction():
            for n in range(4):
                await txn.send(topic, f"committed-{n}".encode(), key=b"t")
        await txn.begin_transaction()
        for n in range(3):
            await txn.send(topic, f"aborted-{n}".encode())
        await txn.abort_transaction()
        await plain.send_and_wait(topic, b"no key")
    finally:
        await txn.stop()
        await plain.stop()

    stock_class = _BatchPartitionRecords.__base__
    committed = [b"v1", None] + [f"committed-{n}".encode() for n in range(4)] + [b"no key"]
    aborted = [f"aborted-{n}".encode() for n in range(3)]
    for isolation in ("read_committed", "read_uncommitted"):
        # The group consumer's value deserializer: the records as the batch yields them.
        as_batch = await _read_fields(topic, isolation, _BATCH_FIELDS, value_deserializer=as_read)
        # Any other consumer: aiokafka's own records.
        others = await _read_fields(topic, isolation)
        with monkeypatch.context() as patch:
            patch.setattr(_aiokafka_fetcher, "PartitionRecords", stock_class)
            stock = await _read_fields(topic, isolation)
            stock_as_read = await _read_fields(
                topic, isolation, _BATCH_FIELDS, value_deserializer=as_read
            )
        assert {row[0] for row in as_batch} == {"DefaultRecord"}  # aiokafka's, no copy
        assert {row[0] for row in stock_as_read} == {"ConsumerRecord"}  # where not installed
        assert [row[1:] for row in as_batch] == [row[1:] for row in stock_as_read]
        assert {row[0] for row in others} == {row[0] for row in stock} == {"ConsumerRecord"}
        assert others == stock
        values = [row[5] for row in as_batch]
        if isolation == "read_committed":
            assert values == committed
        else:
            assert values == committed[:6] + aborted + committed[6:]
        assert as_batch[0][-1] == (("h", b"x"), ("h2", b""))
    # A consumer with another deserializer gets aiokafka's own records, deserialized.
    upper = await _read_fields(topic, "read_committed", value_deserializer=_upper)
    assert {row[0] for row in upper} == {"ConsumerRecord"}
    assert [row[7] for row in upper][:3] == [b"V1", None, b"COMMITTED-0"]


def _plain(value: Any) -> Any:
    """Headers as a tuple: a list in aiokafka's batch records, a tuple in its own."""
    return tuple(value) if isinstance(value, list) else value


def _upper(value: bytes | None) -> bytes | None:
    return None if value is None else value.upper()


def test_batch_records_are_installed_only_over_the_internals_they_rely_on() -> None:
    stock = _BatchPartitionRecords.__base__
    assert _batch_records_fit(stock)
    assert _aiokafka_fetcher.PartitionRecords is _BatchPartitionRecords

    class Renamed(stock):  # type: ignore[misc,valid-type]
        def _consumer_record(self, tp: Any, record: Any, extra: Any = None) -> Any:
            return None

    assert not _batch_records_fit(Renamed)
    assert not _batch_records_fit(type("Bare", (), {}))
