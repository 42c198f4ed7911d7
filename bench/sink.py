"""A lean HTTP/1.1 keep-alive sink: counts requests, records receive times and latencies.

Run as its own process (``python -m bench.sink --port-file F``) so that its CPU is
not the processor's or the bench driver's. Every request is answered
``200 OK`` with an empty body. Requests whose body holds ``"t":<epoch ms>`` add
``receive ms - t`` to the latency samples. Control requests (GET):

- ``/_stats`` → ``count first_ms last_ms`` (receive times in epoch ms, 0 before any)
- ``/_lat``   → the latency samples as a JSON array of ms
- ``/_reset`` → forget counts and samples
- ``/_conns`` → the connections that carried a request (not a control one) since
  the last reset: connections opened per request (this sink only, not sink.c)

The bench runs bench/sink.c, the same server in C, unless given ``--sink python``
(tests/test_bench_sink.py holds both to the same behaviour). Only this one speaks
TLS (``--tls-cert``/``--tls-key``) and listens on several addresses at once
(``--listen HOST:PORT``, repeated), for ``bench.transport_scenarios``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import socket
import ssl
import time
from pathlib import Path
from typing import cast

import uvloop

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_CONTENT_LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
# The latency stamp the bench's webhook templates render into the body.
_STAMP_RE = re.compile(rb'"t":\s*(-?\d+(?:\.\d+)?)')
_HEAD_END = b"\r\n\r\n"


class Stats:
    """What the sink saw since the last reset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.first_ms = 0.0
        self.last_ms = 0.0
        self.latencies_ms: list[float] = []
        self.connections = 0

    def control(self, path: bytes) -> bytes:
        if path.startswith(b"/_stats"):
            body = f"{self.count} {self.first_ms:.3f} {self.last_ms:.3f}".encode()
        elif path.startswith(b"/_lat"):
            body = ("[" + ",".join(f"{x:.3f}" for x in self.latencies_ms) + "]").encode()
        elif path.startswith(b"/_conns"):
            body = str(self.connections).encode()
        elif path.startswith(b"/_reset"):
            self.reset()
            body = b"ok"
        else:
            return b""
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class SinkProtocol(asyncio.Protocol):
    """One connection: parses pipelined requests, answers each with 200."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.counted = False  # among Stats.connections (once it carried a request)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out: list[bytes] = []
        while True:
            end = buf.find(_HEAD_END)
            if end < 0:
                break
            m = _CONTENT_LENGTH_RE.search(buf, 0, end + 2)
            length = int(m.group(1)) if m else 0
            total = end + 4 + length
            if len(buf) < total:
                break
            now_ms = time.time() * 1000.0
            if buf.startswith(b"GET /_"):
                path = buf[4 : buf.find(b" ", 4)]
                answer = self.stats.control(path)
                if answer:
                    out.append(answer)
                    buf = buf[total:]
                    continue
            st = self.stats
            st.count += 1
            if not self.counted:
                self.counted = True
                st.connections += 1
            if not st.first_ms:
                st.first_ms = now_ms
            st.last_ms = now_ms
            if length:
                stamp = _STAMP_RE.search(buf, end + 4, total)
                if stamp is not None:
                    st.latencies_ms.append(now_ms - float(stamp.group(1)))
            out.append(OK)
            buf = buf[total:]
        self.buf = buf
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def serve(
    port: int,
    port_file: Path | None,
    listen: list[str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> None:
    stats = Stats()
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    first_port = 0
    for where in listen or [f"127.0.0.1:{port}"]:
        host, _, at = where.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(at)))
        # A deep accept queue: the capacity test opens many connections at once.
        sock.listen(1024)
        first_port = first_port or sock.getsockname()[1]
        servers.append(await loop.create_server(lambda: SinkProtocol(stats), sock=sock, ssl=tls))
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(first_port))
        os.replace(tmp, port_file)
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path)
    parser.add_argument("--listen", action="append", help="HOST:PORT, repeatable")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve https")
    parser.add_argument("--tls-key", type=Path)
    args = parser.parse_args()
    tls = None
    if args.tls_cert is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    with contextlib.suppress(KeyboardInterrupt):
        # uvloop: the sink takes as little of the shared cores as it can.
        uvloop.run(serve(args.port, args.port_file, args.listen, tls))


if __name__ == "__main__":
    main()
