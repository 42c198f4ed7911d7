"""One large bad record never stops its partition (issue 26.3, SPEC §10), on the real
broker: its dead letter is cut to fit the dead-letter topic, and the events after it
in the same partition are delivered by the same, still running, processor."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from crmhooks.config import KafkaSettings
from crmhooks.kafka_clients import max_message_bytes, read_topic
from crmhooks.kafka_io import LETTER_FRAMING_BYTES, SNAPSHOT_FRAMING_BYTES
from crmhooks.tools import replay_dlq
from tests.support import event, produce, receiver, running, unique_kafka, wait_for_records
from tests.test_e2e import commission_config, delivered
from tests.test_operations_e2e import config_for

pytestmark = pytest.mark.kafka

# A broker's default message.max.bytes (1 MiB + 12): what the dead-letter topic takes
# unless told otherwise; crmhooks reads it at start, and leaves room for the framing.
BROKER_DEFAULT_MAX_BYTES = 1_048_588
LETTER_MAX_BYTES = BROKER_DEFAULT_MAX_BYTES - LETTER_FRAMING_BYTES


async def create_topic(
    kafka: KafkaSettings, name: str, max_message_bytes: int, *, compact: bool = False
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        configs = {"max.message.bytes": str(max_message_bytes)}
        if compact:
            configs["cleanup.policy"] = "compact"
        await admin.create_topics([NewTopic(name, 3, 1, topic_configs=configs)])
    finally:
        await admin.close()


async def dead_letters_as_written(kafka: KafkaSettings) -> list[bytes]:
    return [
        rec.value
        async for rec in read_topic(kafka, kafka.dlq_topic, idle_timeout_s=1.0)
        if rec.value is not None
    ]


def assert_cut_letter(
    letter: dict[str, Any], value: bytes, offset: int, at_least: int = 700_000
) -> None:
    assert letter["error_code"] == "internal_process_error"
    assert letter["source"]["offset"] == offset
    assert letter["source"]["key"] == "org-acme"
    assert letter["truncated"] is True
    assert letter["event"] is None
    assert letter["original_bytes"] == len(value)
    assert letter["sha256"] == hashlib.sha256(value).hexdigest()
    start = base64.b64decode(letter["raw"], validate=True)
    assert len(start) > at_least
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
        skipped: list[str] = []
        assert await replay_dlq(config, None, idle_timeout_s=1.0, on_skipped=skipped.append) == 0
    assert_cut_letter(letter, bad, offset=1)
    assert letter["message"] == "invalid event: not valid UTF-8"
    assert skipped == [  # replay-dlq does not replay a cut letter, and says where it is
        f"not replayed: the internal_process_error dead letter of {k.events_topic} partition "
        f"{letter['source']['partition']} offset 1 holds only the start of its event "
        f"({len(bad):,} bytes, sha256 {hashlib.sha256(bad).hexdigest()}); the whole event is "
        "there while that topic keeps it"
    ]
    assert LETTER_MAX_BYTES - 4 < len(written) <= LETTER_MAX_BYTES  # as much as fits
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
        await create_topic(k, k.events_topic, 8 << 20)
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
        f"invalid event: event of {len(big)} bytes exceeds the limit of "
        f"{BROKER_DEFAULT_MAX_BYTES - SNAPSHOT_FRAMING_BYTES} bytes"  # what the changelog takes
    )
    assert LETTER_MAX_BYTES - 4 < len(written) <= LETTER_MAX_BYTES
    assert len(rx.requests) == 2


async def test_an_invalid_event_that_fits_is_dead_lettered_whole(tmp_path: Path) -> None:
    """700 KB of valid JSON without a record_id: under what the topic takes, the
    letter carries the event itself (and the payload cut only when it must)."""
    whole = event("large", record={"Notes": "n" * 700_000})
    del whole["record_id"]
    async with receiver() as rx:
        config = commission_config(rx, tmp_path)
        k = config.kafka
        async with running(config):
            await produce(config, whole, event("after"))
            await wait_for_records(config, k.results_topic, delivered("evt-after"))
            (letter,) = await wait_for_records(config, k.dlq_topic, lambda ds: len(ds) >= 1)
    assert letter["event"] == whole
    assert (letter["truncated"], letter["original_bytes"], letter["sha256"]) == (False, None, None)


async def test_a_dead_letter_topic_that_takes_less_gets_letters_cut_to_it(tmp_path: Path) -> None:
    """The dead-letter topic's own max.message.bytes (200 KB here) is read at start."""
    bad = os.urandom(300_000)
    async with receiver() as rx:
        config = commission_config(rx, tmp_path)
        k = config.kafka
        await create_topic(k, k.dlq_topic, 200_000)
        async with running(config) as task:
            await produce(config, bad, event("after"))
            await wait_for_records(config, k.results_topic, delivered("evt-after"))
            (letter,) = await wait_for_records(config, k.dlq_topic, lambda ds: len(ds) >= 1)
            assert not task.done(), "the processor stopped"
        (written,) = await dead_letters_as_written(k)
    assert_cut_letter(letter, bad, offset=0, at_least=140_000)
    assert 200_000 - LETTER_FRAMING_BYTES - 4 < len(written) <= 200_000 - LETTER_FRAMING_BYTES


@pytest.mark.parametrize(("lowered_to", "written"), [(120_000, True), (60_000, False)])
async def test_a_dead_letter_topic_lowered_while_running_never_stops_the_partition(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, lowered_to: int, written: bool
) -> None:
    """The topic's max.message.bytes lowered after the start (200 KB to 120 or 60 KB):
    the letter cut to what it took at start is refused; it is cut to half its size and
    written, or, refused again, logged and skipped. The partition flows either way."""
    bad = os.urandom(300_000)
    async with receiver() as rx:
        config = commission_config(rx, tmp_path)
        k = config.kafka
        await create_topic(k, k.dlq_topic, 200_000)
        async with running(config) as task:
            await produce(config, event("warm"))
            await wait_for_records(config, k.results_topic, delivered("evt-warm"))
            admin = AIOKafkaAdminClient(bootstrap_servers=k.bootstrap_servers)
            await admin.start()
            try:
                configs = {"max.message.bytes": str(lowered_to)}
                await admin.alter_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, k.dlq_topic, configs=configs)]
                )
            finally:
                await admin.close()
            for _ in range(100):  # until the broker says it applies the change
                if (await max_message_bytes(k, [k.dlq_topic])).get(k.dlq_topic) == lowered_to:
                    break
                await asyncio.sleep(0.1)
            with caplog.at_level(logging.ERROR, logger="crmhooks"):
                await produce(config, bad, event("after"))
                await wait_for_records(config, k.results_topic, delivered("evt-after"))
                if written:
                    (letter,) = await wait_for_records(config, k.dlq_topic, lambda ds: bool(ds))
            assert not task.done(), "the processor stopped"
        letters = await dead_letters_as_written(k)
    refused = [m for m in caplog.messages if " refused 1 dead letters of " in m]
    assert len(refused) == 1, caplog.messages
    if written:
        (value,) = letters
        assert len(value) <= lowered_to - LETTER_FRAMING_BYTES
        assert_cut_letter(letter, bad, offset=1, at_least=60_000)
    else:
        assert letters == []
        (skipped,) = [m for m in caplog.messages if m.endswith(" bytes; skipped")]
        assert skipped.startswith("dead letter of partition ")
        assert " offset 1 (internal_process_error) not written: " in skipped
    assert len(rx.requests) == 2


async def test_an_event_the_changelog_cannot_take_is_dead_lettered_and_its_partition_flows(
    tmp_path: Path,
) -> None:
    """A rule with a scheduled action stores its event's record (the snapshot it renders
    from) and sends it to the changelog topic. One larger than that topic takes was
    refused there: the store write failed, the process exited, and the restart met the
    same event. The changelog's max.message.bytes (100 KB here) is read at start, and
    larger events are dead-lettered as too large."""
    big = event("big", record={"Notes": "n" * 150_000})
    async with receiver() as rx:
        config = config_for(rx, tmp_path, limit=1000, scheduled=True)
        k = config.kafka
        await create_topic(k, k.changelog, 100_000, compact=True)
        async with running(config) as task:
            await produce(config, big, event("after"))
            await wait_for_records(config, k.results_topic, delivered("evt-after"))
            (letter,) = await wait_for_records(config, k.dlq_topic, lambda ds: len(ds) >= 1)
            assert not task.done(), "the processor stopped"
    limit = 100_000 - SNAPSHOT_FRAMING_BYTES
    assert letter["message"] == (
        f"invalid event: event of {len(orjson.dumps(big))} bytes exceeds the limit of {limit} bytes"
    )
    assert letter["source"]["offset"] == 0
    assert "evt-after:r1:Hook" in {r.headers["webhook-id"] for r in rx.requests}
    assert all(r.headers["webhook-id"].startswith("evt-after:") for r in rx.requests)


async def test_what_each_topic_takes_is_read_and_a_topic_not_told_is_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    k = unique_kafka()
    await create_topic(k, k.dlq_topic, 200_000)
    with caplog.at_level(logging.WARNING, logger="crmhooks.kafka_clients"):
        found = await max_message_bytes(k, [k.dlq_topic, k.results_topic])
    assert found == {k.dlq_topic: 200_000}
    assert caplog.messages == [
        f"max.message.bytes of {k.results_topic} not read: UnknownTopicOrPartitionError"
    ]
