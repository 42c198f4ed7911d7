"""Events written by clients nobody here wrote, with every codec Kafka has, and by
transactional producers; a batch the consumer cannot decode.

librdkafka (confluent-kafka's wheels bundle it with every codec) and Kafka's own
Java console producer (scripts/kafka-local produce, the broker's jars) compress
each batch with gzip, snappy, lz4 or zstd: every event is delivered, and the
processor keeps running. A transaction aborted by librdkafka's transactional
producer is never acted on, a committed one is (`read_committed`). A batch the
consumer cannot decode (a processor without the compression library) is a dead
letter naming its offsets, and the events after it are delivered.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from confluent_kafka import Producer as LibrdkafkaProducer

from crmhooks.config import Config
from crmhooks.kafka_io import ensure_topics
from tests.crash_support import crash_config_toml
from tests.support import (
    event,
    produce,
    read_all,
    receiver,
    running,
    unique_kafka,
    wait_for_records,
)
from tests.test_kafka_security import instant_config

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parent.parent
CODECS = ("gzip", "snappy", "lz4", "zstd")


def delivered_ids(records: list[dict[str, Any]]) -> set[str]:
    return {r["event_id"] for r in records if r["status"] == "delivered"}


def librdkafka_produce(config: Config, values: list[bytes], **settings: Any) -> None:
    producer = LibrdkafkaProducer(
        {"bootstrap.servers": config.kafka.bootstrap_servers, "linger.ms": 20, **settings}
    )
    for value in values:
        producer.produce(config.kafka.events_topic, value=value, key=b"org-acme")
    assert producer.flush(15) == 0, "every record acknowledged"


async def java_produce(config: Config, values: list[bytes], codec: str) -> None:
    """Kafka's console producer (Java): key and value on a line, split by a tab."""
    proc = await asyncio.create_subprocess_exec(
        str(REPO / "scripts" / "kafka-local"),
        "produce",
        config.kafka.events_topic,
        "--compression",
        codec,
        "--key-separator",
        "\t",
        "--bootstrap-server",
        config.kafka.bootstrap_servers,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    lines = b"".join(b"org-acme\t" + v + b"\n" for v in values)
    out, _ = await asyncio.wait_for(proc.communicate(lines), 60)
    assert proc.returncode == 0, out.decode(errors="replace")


async def test_events_of_librdkafka_and_java_with_every_codec_are_all_delivered(
    tmp_path: Path,
) -> None:
    async with receiver() as rx:
        config = instant_config(unique_kafka(), rx.url, tmp_path)
        async with running(config) as task:
            expected: set[str] = set()
            for codec in CODECS:
                rd = [event(f"rd-{codec}-{n}") for n in range(5)]
                librdkafka_produce(
                    config, [orjson.dumps(e) for e in rd], **{"compression.type": codec}
                )
                java = [event(f"java-{codec}-{n}") for n in range(5)]
                await java_produce(config, [orjson.dumps(e) for e in java], codec)
                expected |= {e["event_id"] for e in rd + java}
            results = await wait_for_records(
                config,
                config.kafka.results_topic,
                lambda rs: delivered_ids(rs) >= expected,
                timeout_s=60,
            )
            assert delivered_ids(results) == expected
            assert not task.done(), "the processor is still running"
        assert len(rx.on("/hook")) == len(expected)
        assert await read_all(config, config.kafka.dlq_topic) == []


async def test_an_aborted_transaction_is_never_acted_on_a_committed_one_is(
    tmp_path: Path,
) -> None:
    async with receiver() as rx:
        config = instant_config(unique_kafka(), rx.url, tmp_path)
        async with running(config):
            producer = LibrdkafkaProducer(
                {
                    "bootstrap.servers": config.kafka.bootstrap_servers,
                    "transactional.id": f"test-{uuid.uuid4().hex[:8]}",
                    "compression.type": "zstd",
                }
            )
            producer.init_transactions(15)
            topic = config.kafka.events_topic
            producer.begin_transaction()
            for n in range(3):
                producer.produce(topic, orjson.dumps(event(f"aborted-{n}")), b"org-acme")
            producer.flush(15)  # written to the log, then aborted
            producer.abort_transaction(15)
            producer.begin_transaction()
            for n in range(3):
                producer.produce(topic, orjson.dumps(event(f"committed-{n}")), b"org-acme")
            producer.commit_transaction(15)
            await produce(config, event("after"))  # plain, after both
            results = await wait_for_records(
                config,
                config.kafka.results_topic,
                lambda rs: "evt-after" in delivered_ids(rs),
            )
        committed = {f"evt-committed-{n}" for n in range(3)}
        assert delivered_ids(results) == committed | {"evt-after"}
        assert not [r for r in results if r["event_id"].startswith("evt-aborted")]
        sent_for = {r.headers["webhook-id"].split(":")[0] for r in rx.on("/hook")}
        assert sent_for == committed | {"evt-after"}


async def test_a_batch_the_consumer_cannot_decode_is_a_dead_letter_and_reading_goes_on(
    tmp_path: Path,
) -> None:
    """The processor runs without the compression library (tests.no_codecs): a zstd
    batch between two plain events is skipped with a dead letter naming its offsets."""
    kafka = unique_kafka(partitions=1)
    await ensure_topics(kafka, [kafka.events_topic, kafka.results_topic, kafka.dlq_topic], 1)
    async with receiver() as rx:
        config = instant_config(kafka, rx.url, tmp_path)
        await produce(config, event("before"))
        zstd = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, compression_type="zstd")
        await zstd.start()
        try:
            batch = zstd.create_batch()
            for n in range(3):
                batch.append(key=b"org-acme", value=orjson.dumps(event(f"z{n}")), timestamp=None)
            batch.close()
            await (await zstd.send_batch(batch, kafka.events_topic, partition=0))
        finally:
            await zstd.stop()
        await produce(config, event("after"))

        config_path = tmp_path / "crmhooks.toml"
        config_path.write_text(
            crash_config_toml(
                kafka,
                tmp_path / "crmhooks.db",
                rx.url,
                ["org-acme"],
                offset="1h",
                retry_delay_s=1.0,
            )
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.no_codecs",
            "run",
            "--config",
            str(config_path),
            cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=os.environ.copy(),
        )
        try:
            letters = await wait_for_records(config, kafka.dlq_topic, lambda ds: len(ds) >= 1)
            results = await wait_for_records(
                config,
                kafka.results_topic,
                lambda rs: {"evt-before", "evt-after"} <= delivered_ids(rs),
            )
            still_running = proc.returncode is None
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        log = err.decode(errors="replace")
        assert still_running, log
        assert await proc.wait() == 0, log
    (letter,) = letters
    assert letter["error_code"] == "internal_process_error"
    assert letter["message"].startswith("undecodable record batch at offsets 1-3 of partition 0")
    assert "UnsupportedCodecError" in letter["message"]
    assert letter["source"] == {
        "topic": kafka.events_topic,
        "partition": 0,
        "offset": 1,
        "key": None,
    }
    assert delivered_ids(results) == {"evt-before", "evt-after"}, "no event of the batch"
    assert "offsets 1-3 of partition 0" in log, "logged as an error too"
