"""The config topic at the edge (SPEC §3.2): created compacted, read whole by every
process from where its store says it stopped, and written by ``crmhooks config``.

Every client connects as ``kafka_clients.client_options`` says (security settings),
and one that cannot start is explained by ``kafka_clients.start_error``. aiokafka's
errors are translated to ``KafkaIOError``/``ProduceError`` here, as in ``kafka_io``
for the other topics.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from types import TracebackType
from typing import NamedTuple, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from crmhooks.config import KafkaSettings
from crmhooks.errors import KafkaIOError, ProduceError
from crmhooks.kafka_clients import client_options, compression, start_error, wait_visible
from crmhooks.kafka_producer import keyed_partitioner

log = logging.getLogger(__name__)

# Partitions of the config topic when crmhooks creates it. One: every process reads
# every partition anyway (there is no group to share them), so more would add no
# parallelism; in one, documents keep the order they were written in across
# organisations, and 100,000 documents of ~3.5 KB read from one partition in a few
# seconds. A topic made by someone else may have any count.
CONFIG_TOPIC_PARTITIONS = 1
# What `crmhooks config` waits for a broker that does not answer (SPEC §11: an error
# within 10 s).
COMMAND_TIMEOUT_S = 9.0

T = TypeVar("T")


class DocumentRecord(NamedTuple):
    """One record of the config topic: a document (value) or a tombstone (None)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


async def _within(what: str, settings: KafkaSettings, awaitable: Awaitable[T]) -> T:
    try:
        return await asyncio.wait_for(awaitable, COMMAND_TIMEOUT_S)
    except TimeoutError:
        raise KafkaIOError(
            f"{what}: no answer from Kafka at {settings.bootstrap_servers} "
            f"within {COMMAND_TIMEOUT_S:.0f} s"
        ) from None
    except KafkaError as exc:
        raise await start_error(settings, exc, what) from exc


async def ensure_config_topic(settings: KafkaSettings, topic: str) -> None:
    """Create the config topic, compacted, when it does not exist."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        await _within(f"creating topic {topic}", settings, admin.start())
        existing = set(await _within("listing topics", settings, admin.list_topics()))
        if topic not in existing:
            factor = min(3, len(admin._client.cluster.brokers()) or 1)
            await _within(
                f"creating topic {topic}",
                settings,
                admin.create_topics(
                    [
                        NewTopic(
                            topic,
                            num_partitions=CONFIG_TOPIC_PARTITIONS,
                            replication_factor=factor,
                            topic_configs={"cleanup.policy": "compact"},
                        )
                    ]
                ),
            )
            log.info("created config topic %s (compacted)", topic)
        await wait_visible(admin, [topic])
    except KafkaError as exc:
        raise KafkaIOError(f"cannot create topic {topic}: {exc}") from exc
    finally:
        await admin.close()


async def produce_document(
    settings: KafkaSettings, topic: str, org_id: str, value: bytes | None
) -> tuple[int, int]:
    """Write one organisation's document (None: its tombstone); returns (partition,
    offset) once every in-sync replica has it."""
    producer = AIOKafkaProducer(
        **client_options(settings),
        compression_type=compression(settings),
        acks="all",
        enable_idempotence=True,
        max_request_size=4 << 20,
        partitioner=keyed_partitioner,
    )
    try:
        await _within("connecting", settings, producer.start())
        sent = await _within(
            f"writing {org_id}'s document to {topic}",
            settings,
            producer.send_and_wait(topic, value=value, key=org_id.encode()),
        )
        return int(sent.partition), int(sent.offset)
    except KafkaError as exc:
        raise ProduceError(f"writing {org_id}'s document to {topic} failed: {exc}") from exc
    finally:
        await producer.stop()


class ConfigTopicReader:
    """Every partition of the config topic, read from given positions, no group."""

    def __init__(self, settings: KafkaSettings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[int] = []

    def __repr__(self) -> str:
        return f"ConfigTopicReader({self.topic!r}, partitions={self._partitions})"

    async def __aenter__(self) -> ConfigTopicReader:
        self._consumer = AIOKafkaConsumer(
            **client_options(self.settings),
            enable_auto_commit=False,
            group_id=None,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_partition_fetch_bytes=4 << 20,
        )
        try:
            await self._consumer.start()
        except KafkaError as exc:
            await self.__aexit__(None, None, None)
            raise await start_error(
                self.settings, exc, f"reading config topic {self.topic}"
            ) from exc
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
                log.warning("config topic consumer stop failed: %s", err)
            self._consumer = None

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise KafkaIOError("the config topic reader is not started")
        return self._consumer

    async def start(self, positions: Mapping[int, int]) -> dict[int, int]:
        """Read every partition from ``positions`` (the start of those not in it);
        returns each partition's end offset now: where reading has caught up."""
        try:
            found = await self._topic_partitions(self.topic)
            if not found:
                raise KafkaIOError(f"config topic {self.topic} has no partitions")
            await self._assign(found, positions)
            tps = [TopicPartition(self.topic, p) for p in self._partitions]
            ends = await self.consumer.end_offsets(tps)
        except KafkaError as exc:
            raise KafkaIOError(f"cannot read config topic {self.topic}: {exc}") from exc
        return {tp.partition: int(offset) for tp, offset in ends.items()}

    async def _assign(self, partitions: list[int], positions: Mapping[int, int]) -> None:
        consumer = self.consumer
        self._partitions = sorted(partitions)
        tps = [TopicPartition(self.topic, p) for p in self._partitions]
        consumer.assign(tps)
        fresh = [tp for tp in tps if not positions.get(tp.partition)]
        for tp in tps:
            start = positions.get(tp.partition)
            if start:
                consumer.seek(tp, start)
        if fresh:
            await consumer.seek_to_beginning(*fresh)

    async def more_partitions(self, positions: Mapping[int, int]) -> bool:
        """Whether the topic has partitions not read yet (then read from now on, from
        their start): a topic may be given more partitions while running."""
        try:
            found = await self._topic_partitions(self.topic)
        except KafkaError as exc:
            raise KafkaIOError(f"cannot read config topic {self.topic}: {exc}") from exc
        if not found or set(found) <= set(self._partitions):
            return False
        here = dict(positions)
        for tp in self.consumer.assignment():
            here.setdefault(tp.partition, await self.consumer.position(tp))
        await self._assign(found, here)
        return True

    async def fetch(self, timeout_ms: int, max_records: int) -> list[DocumentRecord]:
        """The records read next, in each partition's order."""
        try:
            batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as exc:
            raise KafkaIOError(f"cannot read config topic {self.topic}: {exc}") from exc
        return [
            DocumentRecord(tp.partition, m.offset, m.key, m.value)
            for tp, records in batches.items()
            for m in records
        ]

    async def positions(self) -> dict[int, int]:
        """Each partition's next offset to read."""
        out: dict[int, int] = {}
        try:
            for tp in self.consumer.assignment():
                out[tp.partition] = int(await self.consumer.position(tp))
        except KafkaError as exc:
            raise KafkaIOError(f"cannot read config topic {self.topic}: {exc}") from exc
        return out

    async def partition_count(self, topic: str) -> int | None:
        """How many partitions ``topic`` has (the events topic: which partition an
        organisation's events are in); None when it is unknown."""
        try:
            found = await self._topic_partitions(topic)
        except KafkaError as exc:
            log.warning("partitions of %s not known: %s", topic, exc)
            return None
        return len(found) or None

    async def _topic_partitions(self, topic: str) -> list[int]:
        # The cluster's metadata as it is now (aiokafka has no public way to ask about a
        # topic this consumer does not read; ``topics()`` does the same request).
        cluster = await self.consumer._client.fetch_all_metadata()
        return sorted(cluster.partitions_for_topic(topic) or ())


def partition_of(org_id: str, partitions: int) -> int:
    """The events partition of an organisation's key, as the Kafka default partitioner
    (and crmhooks' producers) pick it: murmur2 of the key."""
    every = list(range(partitions))
    return keyed_partitioner(org_id.encode(), every, every)


__all__ = [
    "CONFIG_TOPIC_PARTITIONS",
    "ConfigTopicReader",
    "DocumentRecord",
    "ProduceError",
    "ensure_config_topic",
    "partition_of",
    "produce_document",
]
