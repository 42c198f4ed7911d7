"""The admin endpoint of a running processor, on the real broker (SPEC §12): /metrics
counts what the results and dead-letter topics hold, the consumer lag goes to 0 once
caught up, /readyz says why it is not ready while partitions are restored."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crmhooks.config import (
    AdminSettings,
    AllOf,
    Condition,
    Config,
    DeliverySettings,
    OrgSettings,
    Rule,
    StoreSettings,
    Webhook,
)
from crmhooks.kafka_io import KafkaIO
from tests.support import (
    Receiver,
    event,
    produce,
    read_all,
    receiver,
    running,
    unique_kafka,
    wait_for_records,
)

pytestmark = pytest.mark.kafka

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def config(rx: Receiver, tmp_path: Path, port: int) -> Config:
    hooks = {
        name: Webhook(name=name, url=f"{rx.url}/{name.lower()}", module="Potentials")
        for name in ("Ok", "Bad")
    }
    rules = tuple(
        Rule(
            id=f"on-{stage.lower().replace(' ', '-')}",
            module="Potentials",
            criteria=AllOf((Condition("Stage", "is", stage),)),
            instant=hook,
        )
        for stage, hook in (("Closed Won", "Ok"), ("Closed Lost", "Bad"))
    )
    return Config(
        kafka=unique_kafka(),
        store=StoreSettings(path=str(tmp_path / "store.db")),
        delivery=DeliverySettings(
            allow_private_networks=True, retry_delays_s=(), suspend_after_failed_actions=0
        ),
        orgs={"org-acme": OrgSettings(id="org-acme", users=100)},
        webhooks=hooks,
        rules=rules,
        admin=AdminSettings(listen=f"127.0.0.1:{port}"),
    )


async def get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.text()


async def scrape(port: int) -> Samples:
    status, text = await get(port, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


async def until_scraped(
    port: int, check: Callable[[Samples], bool], what: str, timeout_s: float = 30.0
) -> Samples:
    deadline = time.monotonic() + timeout_s
    samples: Samples = {}
    while time.monotonic() < deadline:
        samples = await scrape(port)
        if check(samples):
            return samples
        await asyncio.sleep(0.2)
    raise AssertionError(f"never scraped: {what}; last: {samples}")


async def test_metrics_count_what_the_topics_hold_and_the_lag_goes_to_zero(
    tmp_path: Path,
) -> None:
    port = free_port()
    async with receiver(lambda path, n: 500 if path == "/bad" else 200) as rx:
        cfg = config(rx, tmp_path, port)
        async with running(cfg):
            won = [event(n) for n in range(8)]
            lost = [event(f"l{n}", record={"Stage": "Closed Lost"}) for n in range(3)]
            ignored = [event(f"i{n}", record={"Stage": "Negotiation"}) for n in range(4)]
            await produce(cfg, *won, *lost, *ignored, b"not json", b'{"event_id": 1}')
            results = await wait_for_records(cfg, cfg.kafka.results_topic, lambda rs: len(rs) >= 11)
            samples = await until_scraped(
                port,
                lambda s: (
                    total(s, "crmhooks_consumer_lag") == 0
                    and total(s, "crmhooks_events_total") == 17
                ),
                "every event read and committed",
            )
            dead = await read_all(cfg, cfg.kafka.dlq_topic)
            status, _ = await get(port, "/healthz")
            assert status == 200
            status, reason = await get(port, "/readyz")
            assert (status, reason.split(":")[0]) == (200, "ready")
    statuses = [r["status"] for r in results]
    assert statuses.count("delivered") == 8
    assert statuses.count("failed") == 3
    for status_label in ("delivered", "failed"):
        assert total(samples, "crmhooks_actions_total", status=status_label) == statuses.count(
            status_label
        )
    assert total(samples, "crmhooks_events_total", outcome="planned") == 11
    assert total(samples, "crmhooks_events_total", outcome="ignored") == 4
    assert total(samples, "crmhooks_events_total", outcome="dead_lettered") == 2
    assert len(dead) == 2
    assert total(
        samples, "crmhooks_dead_letters_total", error_code="internal_process_error"
    ) == len(dead)
    assert total(samples, "crmhooks_delivery_seconds_count", error_class="none") == 8
    assert total(samples, "crmhooks_delivery_seconds_count", error_class="server_error") == 3
    partitions = {ls for (n, ls), _ in samples.items() if n == "crmhooks_consumer_lag"}
    assert len(partitions) == 3  # a sample per partition owned, each 0
    assert total(samples, "crmhooks_requests_in_flight") == 0


async def test_readyz_is_503_while_partitions_are_restored_and_200_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restore from the changelog is held (a gate in front of the changelog
    reader) until /readyz has been seen saying so."""
    port = free_port()
    gate = asyncio.Event()
    read_changelog = KafkaIO.read_changelog

    async def held(self: KafkaIO, partition: int, from_offset: int) -> AsyncIterator[Any]:
        await gate.wait()
        async for record in read_changelog(self, partition, from_offset):
            yield record

    monkeypatch.setattr(KafkaIO, "read_changelog", held)
    async with receiver() as rx:
        cfg = replace(config(rx, tmp_path, port), rules=())
        async with running(cfg):
            deadline = time.monotonic() + 30
            reason = ""
            while time.monotonic() < deadline and "restoring" not in reason:
                try:
                    status, reason = await get(port, "/readyz")
                except aiohttp.ClientConnectionError:
                    status, reason = 0, "not listening yet"
                assert status != 200, reason
                await asyncio.sleep(0.1)
            assert status == 503
            assert reason.startswith("restoring partitions [0, 1, 2] from the changelog"), reason
            alive, _ = await get(port, "/healthz")
            assert alive == 200  # alive while it restores
            gate.set()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and status != 200:
                status, reason = await get(port, "/readyz")
                await asyncio.sleep(0.1)
            assert (status, reason.strip()) == (200, "ready: partitions [0, 1, 2]")
