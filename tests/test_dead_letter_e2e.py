"""One large bad record never stops its partition (issue 26.3, SPEC §10), on the real
broker: its dead letter is cut to fit the dead-letter topic, and the events after it
in the same partition are delivered by the same, still running, processor."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from crmhooks.config import KafkaSettings
from crmhooks.kafka_clients import read_topic
from crmhooks.results import DEAD_LETTER_MAX_BYTES
from tests.support import event, produce, receiver, running, wait_for_records
from tests.test_e2e import commission_config, delivered

pytestmark = pytest.mark.kafka

# A broker's default message.max.bytes (1 MiB + 12): what the dead-letter topic takes.
BROKER_DEFAULT_MAX_BYTES = 1_048_588


async def dead_letters_as_written(kafka: KafkaSettings) -> list[bytes]:
    return [
        rec.value
        async for rec in read_topic(kafka, kafka.dlq_topic, idle_timeout_s=1.0)
        if rec.value is not None
    ]


def assert_cut_letter(letter: dict[str, Any], value: bytes, offset: int) -> None:
    assert letter["error_code"] == "internal_process_error"
    assert letter["source"]["offset"] == offset
    assert letter["source"]["key"] == "org-acme"
    assert letter["truncated"] is True
    assert letter["event"] is None
    assert letter["original_bytes"] == len(value)
    assert letter["sha256"] == hashlib.sha256(value).hexdigest()
    start = base64.b64decode(letter["raw"], validate=True)
    assert len(start) > 300_000
    assert value.startswith(start)


async def test_a_900_kb_invalid_event_is_a_cut_dead_letter_and_its_partition_flows(
    tmp_path: Path,
) -> None:
    """Default settings everywhere: base64 of 900 KB (1.2 MB) is more than the broker
    takes; before the fix, producing it failed, the processor exited, the restart too."""
    bad = os.urandom(900 * 1024)  # not even UTF-8
    async with receiver() as rx:
        config = commission_config(rx, tmp_path)
        k = config.kafka
        async with running(config) as task:
            await produce(config, event("before"), bad, event("after"))
            await wait_for_records(config, k.results_topic, delivered("evt-after"))
            (letter,) = await wait_for_records(config, k.dlq_topic, lambda ds: len(ds) >= 1)
            assert not task.done(), "the processor stopped"
        (written,) = await dead_letters_as_written(k)
    assert_cut_letter(letter, bad, offset=1)
    assert letter["message"] == "invalid event: not valid UTF-8"
    assert len(written) <= DEAD_LETTER_MAX_BYTES < BROKER_DEFAULT_MAX_BYTES
    assert sorted(r.headers["webhook-id"] for r in rx.requests) == [
        "evt-after:commission-on-close:CreatorCommission",
        "evt-before:commission-on-close:CreatorCommission",
    ]


async def test_a_5_mb_event_is_a_cut_dead_letter_and_its_partition_flows(tmp_path: Path) -> None:
    """An events topic that takes 8 MB records (raised for this producer): a 5 MB event
    is over ``max_event_bytes`` (1 MiB), and its letter (6.7 MB in base64) over what
    the dead-letter topic and crmhooks' producer take."""
    big = orjson.dumps(event("big", record={"Notes": os.urandom(2_500_000).hex()}))
    assert len(big) > 5_000_000
    async with receiver() as rx:
        config = commission_config(rx, tmp_path)
        k = config.kafka
        admin = AIOKafkaAdminClient(bootstrap_servers=k.bootstrap_servers)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(k.events_topic, 3, 1, topic_configs={"max.message.bytes": "8388608"})]
            )
        finally:
            await admin.close()
        producer = AIOKafkaProducer(
            bootstrap_servers=k.bootstrap_servers, acks="all", max_request_size=8 << 20
        )
        async with running(config) as task:
            await produce(config, event("before"))
            await producer.start()
            try:
                await producer.send_and_wait(k.events_topic, big, key=b"org-acme")
            finally:
                await producer.stop()
            await produce(config, event("after"))
            await wait_for_records(config, k.results_topic, delivered("evt-after"), 60)
            (letter,) = await wait_for_records(config, k.dlq_topic, lambda ds: len(ds) >= 1)
            await asyncio.sleep(0)
            assert not task.done(), "the processor stopped"
        (written,) = await dead_letters_as_written(k)
    assert_cut_letter(letter, big, offset=1)
    assert letter["message"] == (
        f"invalid event: event of {len(big)} bytes exceeds the limit of 1048576 bytes"
    )
    assert len(written) <= DEAD_LETTER_MAX_BYTES
    assert len(rx.requests) == 2
