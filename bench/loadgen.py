"""A raw-socket HTTP/1.1 load generator: measures the sink's capacity from its own process.

Each of ``--connections`` keep-alive connections sends one request, waits for
the sink's fixed 38-byte answer, sends the next. Prints ``responses seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import cast

import uvloop

from bench.sink import OK


class LoadProtocol(asyncio.Protocol):
    def __init__(self, request: bytes, deadline: float, done: asyncio.Future[int]) -> None:
        self.request = request
        self.deadline = deadline
        self.done = done
        self.responses = 0
        self.pending = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.pending += data
        got = len(self.pending) // len(OK)
        if not got:
            return
        self.pending = self.pending[got * len(OK) :]
        self.responses += got
        assert self.transport is not None
        if time.monotonic() < self.deadline:
            self.transport.write(self.request * got)
        elif not self.done.done():
            self.done.set_result(self.responses)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.responses)


async def run(port: int, connections: int, seconds: float, body: bytes) -> tuple[int, float]:
    loop = asyncio.get_running_loop()
    request = (
        b"POST /load HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    start = time.monotonic()
    deadline = start + seconds
    futures: list[asyncio.Future[int]] = []
    for _ in range(connections):
        done: asyncio.Future[int] = loop.create_future()
        await loop.create_connection(
            lambda d=done: LoadProtocol(request, deadline, d),  # type: ignore[misc]
            "127.0.0.1",
            port,
        )
        futures.append(done)
    # Bounded: a connection that never answers ends the run, not hangs it.
    counts = await asyncio.wait_for(asyncio.gather(*futures), seconds + 30)
    return sum(counts), time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--body-bytes", type=int, default=200)
    args = parser.parse_args()
    body = b'{"pad":"' + b"x" * max(0, args.body_bytes - 10) + b'"}'
    count, elapsed = uvloop.run(run(args.port, args.connections, args.seconds, body))
    print(count, f"{elapsed:.3f}")


if __name__ == "__main__":
    main()
