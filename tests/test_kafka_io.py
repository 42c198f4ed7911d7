"""KafkaIO.produce_all against a fake producer: unacknowledged records are sent again;
the producer's partitioner."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, NotLeaderForPartitionError
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from crmhooks.config import KafkaSettings
from crmhooks.errors import ProduceError
from crmhooks.kafka_io import KafkaIO, keyed_partitioner


class FlakyProducer:
    """Acknowledges a record only after it failed ``failures[value]`` times."""

    def __init__(self, failures: dict[bytes, int], raise_on_send: bool = False) -> None:
        self.failures = dict(failures)
        self.raise_on_send = raise_on_send
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> asyncio.Future[Any]:
        if self.raise_on_send:
            raise KafkaTimeoutError()
        self.sent.append((topic, key, value))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.failures.get(value, 0) > 0:
            self.failures[value] -= 1
            fut.set_exception(NotLeaderForPartitionError())
        else:
            fut.set_result(None)
        return fut


def kafka_io(producer: FlakyProducer) -> KafkaIO:
    async def nothing(partitions: set[int]) -> None:
        return None

    kio = KafkaIO(KafkaSettings(), nothing, nothing)
    kio._producer = producer
    kio.retry_pause_s = 0.0
    return kio


RECORDS = [("crm.webhook-dlq", b"org", b"letter-1"), ("crm.webhook-results", b"org", b"r-2")]


async def test_a_dead_letter_not_acknowledged_is_sent_again_until_it_is() -> None:
    producer = FlakyProducer({b"letter-1": 2})
    await kafka_io(producer).produce_all(RECORDS)
    assert [v for _, _, v in producer.sent] == [b"letter-1", b"r-2", b"letter-1", b"letter-1"]


async def test_giving_up_after_five_tries_raises_so_nothing_is_committed() -> None:
    producer = FlakyProducer({b"letter-1": 99})
    with pytest.raises(ProduceError, match="1 records not acknowledged after 5 tries"):
        await kafka_io(producer).produce_all(RECORDS)
    assert [v for _, _, v in producer.sent].count(b"letter-1") == 5


async def test_a_producer_that_cannot_queue_raises_produce_error() -> None:
    with pytest.raises(ProduceError, match=r"produce to crm\.webhook-dlq failed"):
        await kafka_io(FlakyProducer({}, raise_on_send=True)).produce_all(RECORDS)


async def test_one_record_not_acknowledged_is_sent_again_until_it_is() -> None:
    producer = FlakyProducer({b"r-1": 2})
    await kafka_io(producer).produce_all([("crm.webhook-results", b"org", b"r-1")])
    assert [v for _, _, v in producer.sent] == [b"r-1"] * 3


async def test_one_record_never_acknowledged_gives_up_after_five_tries() -> None:
    producer = FlakyProducer({b"r-1": 99})
    with pytest.raises(ProduceError, match="1 records not acknowledged after 5 tries"):
        await kafka_io(producer).produce_all([("crm.webhook-results", b"org", b"r-1")])
    assert len(producer.sent) == 5


@given(key=st.binary(max_size=64), count=st.integers(min_value=1, max_value=64))
def test_keyed_partitioner_places_every_key_as_kafkas_default_does(key: bytes, count: int) -> None:
    partitions = list(range(count))
    expected = DefaultPartitioner()(key, partitions, partitions)
    assert keyed_partitioner(key, partitions, partitions) == expected
    assert keyed_partitioner(key, partitions, partitions) == expected  # remembered: the same


def test_keyed_partitioner_spreads_records_without_key_over_available_partitions() -> None:
    chosen = {keyed_partitioner(None, [0, 1, 2, 3], [1, 3]) for _ in range(200)}
    assert chosen == {1, 3}
