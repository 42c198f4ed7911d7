"""Organisations' documents on a real config topic (SPEC §3.2): pushed, changed, refused,
removed; read by every process of a group; read only when new after a restart."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson
import pytest

from crmhooks.config import Config, DeliverySettings, StoreSettings
from crmhooks.config_commands import push, remove
from crmhooks.kafka_documents import partition_of, produce_document
from crmhooks.store import Store
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

# Organisations whose keys are in events partitions 0, 1 and 2 of 3.
ORGS = [next(f"org-{i}" for i in range(200) if partition_of(f"org-{i}", 3) == p) for p in range(3)]


def config_of(tmp_path: Path, name: str = "crmhooks", kafka: Any = None) -> Config:
    kafka = kafka or unique_kafka()
    return Config(
        kafka=replace(kafka, config_topic=f"{kafka.events_topic}.config", session_timeout_ms=6000),
        store=StoreSettings(path=str(tmp_path / f"{name}.db")),
        delivery=DeliverySettings(allow_private_networks=True, shutdown_grace_s=2.0),
    )


def document(org: str, url: str, **webhook: Any) -> dict[str, Any]:
    return {
        "org": {"id": org, "users": 100},
        "webhooks": [
            {"name": "Won", "url": url, "module": "Potentials", **webhook},
        ],
        "rules": [
            {
                "id": "won",
                "module": "Potentials",
                "criteria": {"field": "Stage", "op": "is", "value": "Closed Won"},
                "instant": "Won",
            }
        ],
    }


async def pushed(config: Config, tmp_path: Path, org: str, url: str, **webhook: Any) -> None:
    path = tmp_path / f"{org}.json"
    path.write_bytes(orjson.dumps(document(org, url, **webhook)))
    await push(config, "crmhooks.toml", org, str(path))


async def until_path(rx: Receiver, path: str, count: int = 1, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while len(rx.on(path)) < count:
        assert time.monotonic() < deadline, f"{path}: got {[r.path for r in rx.requests]}"
        await asyncio.sleep(0.05)


async def test_a_pushed_document_drives_its_organisations_events_and_a_change_is_in_force_fast(
    tmp_path: Path,
) -> None:
    config = config_of(tmp_path)
    org = ORGS[0]
    async with receiver() as rx:
        deal = {"deal": "${Potentials.Potential Name}"}
        await pushed(
            config,
            tmp_path,
            org,
            f"{rx.url}/{org}/v1",
            custom_params={"k": "s3cret"},
            entity_params=deal,
        )
        async with running(config):
            await produce(config, event(1, org_id=org), key=org.encode())
            await until_path(rx, f"/{org}/v1")
            assert parse_qs(rx.on(f"/{org}/v1")[0].body.decode()) == {
                "deal": ["Deal 1"],
                "k": ["s3cret"],
            }
            # Another organisation has no document: the file, which has no rule.
            await produce(config, event(2, org_id=ORGS[1]), key=ORGS[1].encode())
            # A changed URL: every event produced 2 s or more after the acknowledgement
            # goes to it (SPEC §3.2).
            await pushed(config, tmp_path, org, f"{rx.url}/{org}/v2", entity_params=deal)
            acked = time.monotonic()
            produced_at: dict[str, float] = {}
            n = 10
            while time.monotonic() - acked < 3.0:
                produced_at[f"Deal {n}"] = time.monotonic() - acked
                await produce(config, event(n, org_id=org), key=org.encode())
                n += 1
                await asyncio.sleep(0.1)
            await until_path(rx, f"/{org}/v2", 1)
            await asyncio.sleep(1.0)  # the last ones delivered

            def when(path: str) -> list[float]:
                deals = [parse_qs(r.body.decode())["deal"][0] for r in rx.on(path)]
                return sorted(produced_at[d] for d in deals if d in produced_at)

            to_v1, new = when(f"/{org}/v1"), when(f"/{org}/v2")
            assert new, to_v1
            assert new[0] < 2.0, new
            assert all(t < 2.0 for t in to_v1), to_v1
            assert len(to_v1) + len(new) == len(produced_at)
        results = await read_all(config, config.kafka.results_topic)
        assert {r["org_id"] for r in results} == {org}


async def test_a_refused_document_is_dead_lettered_and_the_last_valid_one_stays(
    tmp_path: Path,
) -> None:
    config = config_of(tmp_path)
    org = ORGS[1]
    async with receiver() as rx:
        await pushed(config, tmp_path, org, f"{rx.url}/{org}/v1")
        async with running(config):
            await produce(config, event(1, org_id=org), key=org.encode())
            await until_path(rx, f"/{org}/v1")
            bad = document(org, "ftp://nowhere/x", custom_params={"k": "s3cret"})
            bad["rules"][0]["instant"] = "Nope"
            # Another producer, no local check: straight to the topic.
            await produce_document(config.kafka, config.kafka.config_topic, org, orjson.dumps(bad))
            letters = await wait_for_records(
                config, config.kafka.dlq_topic, lambda rs: bool(rs), timeout_s=20
            )
            (letter,) = letters
            assert letter["error_code"] == "invalid_config"
            assert "webhooks[Won].url" in letter["message"]
            assert "rules[won].instant: unknown webhook 'Nope'" in letter["message"]
            assert letter["event"]["webhooks"][0]["custom_params"] == {"k": "***"}
            assert letter["source"]["topic"] == config.kafka.config_topic
            await produce(config, event(2, org_id=org), key=org.encode())
            await until_path(rx, f"/{org}/v1", 2)
            # The tombstone: nothing more for the organisation.
            await remove(config, "crmhooks.toml", org)
            await asyncio.sleep(1.0)
            await produce(config, event(3, org_id=org), key=org.encode())
            await asyncio.sleep(2.0)
            assert len(rx.on(f"/{org}/v1")) == 2
        assert len(await read_all(config, config.kafka.dlq_topic)) == 1


async def test_every_process_of_a_group_applies_every_document(tmp_path: Path) -> None:
    a = config_of(tmp_path, "a")
    b = replace(a, store=StoreSettings(path=str(tmp_path / "b.db")))
    async with receiver() as rx:
        for org in ORGS:
            await pushed(a, tmp_path, org, f"{rx.url}/{org}/v1")
        async with running(a), running(b):
            await asyncio.sleep(8)  # both in the group (a rebalance when the second joins)
            for org in ORGS:
                await pushed(a, tmp_path, org, f"{rx.url}/{org}/v2")
            await asyncio.sleep(2.0)
            for n, org in enumerate(ORGS):
                await produce(a, event(n, org_id=org), key=org.encode())
            for org in ORGS:
                await until_path(rx, f"/{org}/v2")
        assert not any(r.path.endswith("/v1") for r in rx.requests)
        # Each process stored (and so had in force) every organisation's latest document.
        for settings in (a, b):
            async with Store(settings.store.path) as store:
                docs = await store.documents.documents(ORGS)
            assert {org: orjson.loads(d)["webhooks"][0]["url"] for org, d in docs.items()} == {
                org: f"{rx.url}/{org}/v2" for org in ORGS
            }


async def test_a_restart_with_its_store_reads_only_the_new_documents(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_of(tmp_path)
    async with receiver() as rx:
        for org in ORGS:
            await pushed(config, tmp_path, org, f"{rx.url}/{org}/v1")
        with caplog.at_level(logging.INFO, logger="crmhooks.config_topic"):
            async with running(config):
                await asyncio.sleep(0.5)
            assert "3 records new" in caplog.text
            caplog.clear()
            await pushed(config, tmp_path, ORGS[2], f"{rx.url}/{ORGS[2]}/v2")
            async with running(config):
                for n, org in enumerate(ORGS):
                    await produce(config, event(n, org_id=org), key=org.encode())
                await until_path(rx, f"/{ORGS[2]}/v2")
                await until_path(rx, f"/{ORGS[0]}/v1")
            assert "1 records new" in caplog.text
