"""Test support: the real broker's address, unique topics, a recording HTTP receiver."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web

from crmhooks.config import Config, KafkaSettings
from crmhooks.kafka_io import ensure_topics, produce_records, read_topic
from crmhooks.runner import run_processor
from tests.schemas import validate_dead_letter, validate_result


def bootstrap_servers() -> str:
    """The broker under test: CRMHOOKS_BOOTSTRAP_SERVERS (scripts/test sets it)."""
    value = os.environ.get("CRMHOOKS_BOOTSTRAP_SERVERS")
    if not value:
        raise RuntimeError(
            "CRMHOOKS_BOOTSTRAP_SERVERS is not set: run the tests with `make test`, "
            "or start a broker (scripts/kafka-local start) and export it"
        )
    return value


def unique_kafka(partitions: int = 3) -> KafkaSettings:
    """Topics and a group of their own, so tests never see each other's records."""
    tag = uuid.uuid4().hex[:10]
    return KafkaSettings(
        bootstrap_servers=bootstrap_servers(),
        group_id=f"test-{tag}",
        events_topic=f"test-{tag}.events",
        results_topic=f"test-{tag}.results",
        dlq_topic=f"test-{tag}.dlq",
        partitions=partitions,
    )


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records every request it gets."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    # (path, request number for that path) → HTTP status, or (status, headers)
    status_for: Callable[[str, int], int | tuple[int, dict[str, str]]] = lambda path, n: 200
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    # awaited before answering: a receiver that hangs until the test lets it go
    on_request: Callable[[], Awaitable[None]] | None = None

    def on(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]


@asynccontextmanager
async def receiver(
    status_for: Callable[[str, int], int | tuple[int, dict[str, str]]] | None = None,
) -> AsyncIterator[Receiver]:
    rec = Receiver()
    if status_for is not None:
        rec.status_for = status_for
    counts: dict[str, int] = {}

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        rec.requests.append(
            Received(
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                body,
            )
        )
        counts[request.path] = counts.get(request.path, 0) + 1
        rec.arrived.set()
        if rec.on_request is not None:
            await rec.on_request()
        answer = rec.status_for(request.path, counts[request.path])
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        return web.Response(status=status, headers=headers)

    async with serve(handle) as url:
        rec.url = url
        yield rec


@asynccontextmanager
async def serve(
    handle: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """An aiohttp server on 127.0.0.1 (a free port) answering every path with ``handle``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[asyncio.Task[None]]:
    """The processor running in this event loop until the block ends (graceful stop)."""
    k = config.kafka
    await ensure_topics(k, [k.events_topic, k.results_topic, k.dlq_topic], 3)
    stop = asyncio.Event()
    task = asyncio.create_task(run_processor(config, stop, handle_signals=False))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def event(n: int | str, **overrides: Any) -> dict[str, Any]:
    """A qualifying Potentials event of SPEC §2 (Closed Won, New Business)."""
    record = {
        "Potential Name": f"Deal {n}",
        "Amount": 25000,
        "Stage": "Closed Won",
        "Type": "New Business",
        "Closing Date": "2026-11-30",
        "Potential Owner": "Ana Silva",
        "Payment Due": "2026-12-05 09:30",
    }
    record.update(overrides.pop("record", {}))
    data: dict[str, Any] = {
        "event_id": f"evt-{n}",
        "org_id": "org-acme",
        "module": "Potentials",
        "operation": "create",
        "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "record_id": f"rec-{n}",
        "record": record,
        "related": {"Accounts": {"Account Name": "Acme Corp"}},
        "user": {"Last Name": "Silva", "Mobile": "+351900000000"},
        "organization": {"Company Name": "Acme"},
    }
    data.update(overrides)
    return data


async def produce(
    config: Config, *values: bytes | dict[str, Any], key: bytes = b"org-acme"
) -> None:
    k = config.kafka
    await produce_records(
        k,
        [(k.events_topic, key, v if isinstance(v, bytes) else orjson.dumps(v)) for v in values],
    )


async def read_all(config: Config, topic: str) -> list[dict[str, Any]]:
    """Every record of a topic; results and dead letters are checked against their schemas."""
    validate = {
        config.kafka.results_topic: validate_result,
        config.kafka.dlq_topic: validate_dead_letter,
    }.get(topic)
    out = []
    async for rec in read_topic(config.kafka, topic, idle_timeout_s=1.0):
        if rec.value is not None:
            record = orjson.loads(rec.value)
            if validate is not None:
                validate(record)
            out.append(record)
    return out


async def wait_for_records(
    config: Config,
    topic: str,
    predicate: Callable[[list[dict[str, Any]]], bool],
    timeout_s: float = 30.0,
) -> list[dict[str, Any]]:
    """Read ``topic`` until ``predicate(records)`` holds (bounded; fails with what it saw)."""
    deadline = time.monotonic() + timeout_s
    records: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        records = await read_all(config, topic)
        if predicate(records):
            return records
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s} s waiting on {topic}; saw {records}")


def with_kafka(config: Config, kafka: KafkaSettings) -> Config:
    return replace(config, kafka=kafka)
