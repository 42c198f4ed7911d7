"""The bench's two sinks (bench/sink.c, bench/sink.py) answer and count alike.

The bench builds the C sink with cc; these tests build it too (into tmp_path) and
run the same requests against each: pipelined, split across writes, with and
without a latency stamp, and the control requests the bench reads its figures by.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from bench.harness import Sink
from bench.sink import OK


@pytest.fixture(params=["c", "python"])
async def sink(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Sink]:
    async with Sink(tmp_path, request.param) as s:
        yield s


def post(body: bytes, header: bytes = b"Content-Length") -> bytes:
    return (
        b"POST /hook HTTP/1.1\r\nHost: sink\r\nContent-Type: application/json\r\n"
        + header
        + b": "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def connection(sink: Sink) -> AsyncIterator[Stream]:
    reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_counts_and_stamps(sink: Sink) -> None:
    sent_ms = time.time() * 1000 - 5000  # stamped 5 s ago
    async with connection(sink) as (reader, writer):
        # Two requests in one write: one stamped (with a space after the colon),
        # one not; then one split between its head and its body.
        writer.write(
            post(b'{"a":1,"t": ' + f"{sent_ms:.3f}".encode() + b"}")
            + post(b'{"no":"stamp"}', b"content-length")
        )
        split = post(b'{"t":' + f"{sent_ms:.0f}".encode() + b',"z":[1,2]}')
        writer.write(split[:20])
        await writer.drain()
        assert await reader.readexactly(2 * len(OK)) == 2 * OK
        writer.write(split[20:])
        assert await reader.readexactly(len(OK)) == OK
    count, first_ms, last_ms = await sink.stats()
    assert count == 3
    assert 0 < first_ms <= last_ms <= time.time() * 1000
    latencies = await sink.latencies()
    assert len(latencies) == 2
    assert all(4999 <= x < 60_000 for x in latencies), latencies
    await sink.reset()
    assert await sink.stats() == (0, 0.0, 0.0)
    assert await sink.latencies() == []


async def test_many_pipelined_on_many_connections(sink: Sink) -> None:
    await sink.reset()
    per_connection = 500

    async def one() -> None:
        async with connection(sink) as (reader, writer):
            writer.write(post(b"{}") * per_connection)
            assert await reader.readexactly(per_connection * len(OK)) == OK * per_connection

    await asyncio.gather(*(one() for _ in range(8)))
    assert (await sink.stats())[0] == 8 * per_connection
    assert await sink.latencies() == []


async def test_runs_under_the_policy_asked_for(sink: Sink, tmp_path: Path) -> None:
    # The fixture's sink asked for SCHED_BATCH (the default); Linux grants it to anyone.
    assert sink.scheduling == "SCHED_BATCH"
    assert os.sched_getscheduler(sink.pid) == os.SCHED_BATCH
    (tmp_path / "other").mkdir()
    async with Sink(tmp_path / "other", sink.kind, batch=False) as other:
        assert other.scheduling == "default"
        assert os.sched_getscheduler(other.pid) == os.SCHED_OTHER
        await other.reset()
        assert await other.stats() == (0, 0.0, 0.0)


async def test_the_python_sink_counts_connections_that_carried_a_request(tmp_path: Path) -> None:
    from bench.receivers import PythonSink

    async with PythonSink(tmp_path) as sink:
        for _ in range(3):  # three connections, two requests each
            async with connection(sink) as (reader, writer):
                writer.write(post(b"{}") + post(b"{}"))
                assert await reader.readexactly(2 * len(OK)) == 2 * OK
        # The control requests (each on a connection of its own) are not counted.
        assert await sink.connections() == 3
        assert (await sink.stats())[0] == 6
        await sink.reset()
        assert await sink.connections() == 0
