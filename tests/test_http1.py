"""http1.Http1Pool against a raw socket server on 127.0.0.1 answering with exact bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import uvloop

from crmhooks import http1_connection
from crmhooks.delivery import split_url
from crmhooks.http1 import (
    MAX_HEAD_BYTES,
    BadResponse,
    ConnectFailed,
    Http1Pool,
    Origin,
    Response,
    ServerDisconnected,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CAP = 1000
IDNA = "xn--bcher-kva.test"


@dataclass
class RawServer:
    """Reads requests (head and Content-Length body); answers what ``replies`` says."""

    replies: dict[str, bytes | Callable[[asyncio.StreamWriter], object]] = field(
        default_factory=dict
    )
    heads: list[str] = field(default_factory=list)  # request heads, in order
    connections: int = 0
    closed: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                except asyncio.IncompleteReadError:
                    return
                self.heads.append(head)
                length = 0
                for line in head.split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                await reader.readexactly(length)
                path = head.split(" ", 2)[1]
                reply = self.replies.get(path, OK)
                if callable(reply):
                    result = reply(writer)
                    if asyncio.iscoroutine(result):
                        await result
                    continue
                writer.write(reply)
                await writer.drain()
                if b"Connection: close" in reply:
                    return
        except ConnectionError:
            return
        finally:
            self.closed += 1
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[RawServer]:
    raw = RawServer()
    srv = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    raw.port = srv.sockets[0].getsockname()[1]
    try:
        yield raw
    finally:
        srv.close()


def origin(port: int) -> Origin:
    return Origin("http", "127.0.0.1", port, f"127.0.0.1:{port}")


def get(path: str, port: int) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


async def fetch(
    pool: Http1Pool, server: RawServer, path: str, *, timeout_s: float = 2.0
) -> Response:
    loop = asyncio.get_running_loop()
    target = origin(server.port)
    return await pool.request(
        target,
        [get(path, server.port)],
        deadline=loop.time() + timeout_s,
        cap=CAP,
        conn=pool.take_idle(target.key),
    )


def test_works_on_uvloop() -> None:
    """``crmhooks run`` uses uvloop, whose transports are not asyncio's classes."""

    async def scenario() -> tuple[int, list[bytes]]:
        raw = RawServer()
        srv = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        raw.port = srv.sockets[0].getsockname()[1]
        pool = Http1Pool(connect_timeout_s=1.0)
        bodies = [(await fetch(pool, raw, "/a")).body for _ in range(2)]
        await pool.close()
        srv.close()
        return raw.connections, bodies

    assert uvloop.run(scenario()) == (1, [b"ok", b"ok"])


async def test_keep_alive_reuses_the_connection(server: RawServer) -> None:
    pool = Http1Pool(connect_timeout_s=1.0)
    for _ in range(3):
        response = await fetch(pool, server, "/a")
        assert (response.status, response.reason, response.body) == (200, "OK", b"ok")
        assert response.complete
    await pool.close()
    assert server.connections == 1
    assert len(server.heads) == 3


async def test_chunked_body_is_decoded_and_the_connection_kept(server: RawServer) -> None:
    server.replies["/chunked"] = (
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nx-a: 2\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    pool = Http1Pool(connect_timeout_s=1.0)
    response = await fetch(pool, server, "/chunked")
    assert (response.status, response.body, response.complete) == (201, b"abcde", True)
    assert response.headers["x-a"] == "1"  # names lower-cased, the first value kept
    assert (await fetch(pool, server, "/a")).body == b"ok"
    await pool.close()
    assert server.connections == 1


async def test_body_until_close(server: RawServer) -> None:
    server.replies["/eof"] = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
    pool = Http1Pool(connect_timeout_s=1.0)
    response = await fetch(pool, server, "/eof")
    assert (response.body, response.complete) == (b"all of it", True)
    assert (await fetch(pool, server, "/a")).body == b"ok"
    await pool.close()
    assert server.connections == 2  # "Connection: close": never reused


async def test_interim_responses_are_skipped(server: RawServer) -> None:
    server.replies["/continue"] = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope"
    )
    pool = Http1Pool(connect_timeout_s=1.0)
    response = await fetch(pool, server, "/continue")
    assert (response.status, response.reason, response.body) == (404, "Not Found", b"nope")
    assert "link" not in response.headers
    await pool.close()


async def test_body_past_the_cap_is_cut_and_the_connection_dropped(server: RawServer) -> None:
    big = b"x" * (CAP * 5)
    server.replies["/big"] = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)
    pool = Http1Pool(connect_timeout_s=1.0)
    response = await fetch(pool, server, "/big")
    assert (response.status, len(response.body), response.complete) == (200, CAP, False)
    assert (await fetch(pool, server, "/a")).body == b"ok"
    await pool.close()
    assert server.connections == 2


async def test_idle_connection_closed_by_the_receiver_is_not_used(server: RawServer) -> None:
    async def close_after(writer: asyncio.StreamWriter) -> None:
        writer.write(OK)
        await writer.drain()
        writer.close()  # a keep-alive response, then the receiver closes anyway

    server.replies["/then-close"] = close_after
    pool = Http1Pool(connect_timeout_s=1.0)
    assert (await fetch(pool, server, "/then-close")).complete
    for _ in range(100):  # bounded: until the close reached us
        if pool.take_idle(origin(server.port).key) is None:
            break
        await asyncio.sleep(0.01)
    assert pool.take_idle(origin(server.port).key) is None
    assert (await fetch(pool, server, "/a")).body == b"ok"
    await pool.close()
    assert server.connections == 2


async def test_idle_connections_expire(server: RawServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1_connection, "KEEPALIVE_S", 0.0)
    pool = Http1Pool(connect_timeout_s=1.0)
    await fetch(pool, server, "/a")
    assert "idle=1" in repr(pool)
    for _ in range(10):  # a timer due now runs within a few loop turns
        await asyncio.sleep(0)
    assert repr(pool) == "Http1Pool(connections=0, idle=0)"
    await pool.close()


async def test_one_timer_serves_all_requests_of_a_connection(server: RawServer) -> None:
    """Armed by the first request; later deadlines and keep-alives do not move it."""
    pool = Http1Pool(connect_timeout_s=1.0)
    await fetch(pool, server, "/a")
    (conn,) = pool._all
    timer = conn._timer
    assert timer is not None
    for _ in range(5):
        await fetch(pool, server, "/a")
    assert pool._all == {conn}
    assert conn._timer is timer
    assert server.connections == 1
    await pool.close()


async def wait_heads(server: RawServer, count: int) -> None:
    for _ in range(200):
        if len(server.heads) >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{len(server.heads)} requests arrived, not {count}")


async def test_a_timer_going_off_before_the_deadline_arms_itself_for_it(server: RawServer) -> None:
    gate = asyncio.Event()

    async def held(writer: asyncio.StreamWriter) -> None:
        await gate.wait()
        writer.write(OK)

    server.replies["/held"] = held
    pool = Http1Pool(connect_timeout_s=1.0)
    await fetch(pool, server, "/a")
    (conn,) = pool._all
    first = asyncio.create_task(fetch(pool, server, "/held", timeout_s=30))
    await wait_heads(server, 2)
    conn._on_timer()  # as when armed for the deadline of the first request
    assert not first.done()
    assert not conn.closed
    assert conn._timer is not None
    assert conn._timer_at == conn._deadline
    gate.set()
    assert (await first).body == b"ok"
    gate.clear()
    second = asyncio.create_task(fetch(pool, server, "/held", timeout_s=30))
    await wait_heads(server, 3)
    conn._deadline = asyncio.get_running_loop().time()  # its deadline now passed
    conn._on_timer()
    with pytest.raises(TimeoutError):
        await second
    gate.set()
    await pool.close()


async def test_an_idle_connection_is_kept_until_its_keepalive_ends(server: RawServer) -> None:
    pool = Http1Pool(connect_timeout_s=1.0)
    await fetch(pool, server, "/a")
    (conn,) = pool._all
    conn._on_timer()  # armed for an earlier deadline: the keep-alive is not over
    kept = not conn.closed  # (a local: mypy would keep conn.closed narrowed to False)
    assert kept
    assert conn._timer_at == conn._idle_until
    conn._idle_until = asyncio.get_running_loop().time()
    conn._on_timer()
    assert conn.closed
    for _ in range(10):  # connection_lost runs within a few loop turns
        await asyncio.sleep(0)
    assert repr(pool) == "Http1Pool(connections=0, idle=0)"


@pytest.mark.parametrize(
    ("reply", "error", "message"),
    [
        (b"", ServerDisconnected, "server disconnected before responding"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", ServerDisconnected, "before responding"),
        (b"SMTP ready\r\n\r\n", BadResponse, "."),
        (b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * MAX_HEAD_BYTES, BadResponse, "larger"),
    ],
)
async def test_broken_responses(
    server: RawServer, reply: bytes, error: type[Exception], message: str
) -> None:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(reply)
        await writer.drain()
        writer.close()

    server.replies["/broken"] = answer
    pool = Http1Pool(connect_timeout_s=1.0)
    with pytest.raises(error, match=message):
        await fetch(pool, server, "/broken")
    await pool.close()


async def test_silence_times_out_and_a_trickle_keeps_its_status(server: RawServer) -> None:
    async def silent(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async def trickle(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\nab")
        await writer.drain()
        await asyncio.sleep(5)

    server.replies["/silent"] = silent
    server.replies["/trickle"] = trickle
    pool = Http1Pool(connect_timeout_s=1.0)
    with pytest.raises(TimeoutError):
        await fetch(pool, server, "/silent", timeout_s=0.2)
    response = await fetch(pool, server, "/trickle", timeout_s=0.2)
    assert (response.status, response.reason, response.body) == (500, "Oops", b"ab")
    assert not response.complete
    await pool.close()


async def test_connect_failures_name_the_target() -> None:
    pool = Http1Pool(connect_timeout_s=1.0)
    loop = asyncio.get_running_loop()
    with pytest.raises(ConnectFailed) as info:
        await pool.request(
            origin(1), [get("/", 1)], deadline=loop.time() + 2, cap=CAP, addresses=["127.0.0.1"]
        )
    assert info.value.target == "127.0.0.1:1"
    assert isinstance(info.value.os_error, ConnectionRefusedError)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h.test/a?b=1", (("http", "h.test", 80, "h.test"), "/a?b=1", None)),
        ("HTTPS://H.Test:443", (("https", "h.test", 443, "h.test"), "/", None)),
        ("https://h.test:8443?q", (("https", "h.test", 8443, "h.test:8443"), "/?q", None)),
        ("http://[::1]:81/x#frag", (("http", "::1", 81, "[::1]:81"), "/x", None)),
        (
            "http://bücher.test/",
            (("http", "xn--bcher-kva.test", 80, "xn--bcher-kva.test"), "/", None),
        ),
        (
            "http://us%40er:p%3Aw@h.test/",
            (("http", "h.test", 80, "h.test"), "/", "Basic dXNAZXI6cDp3"),
        ),
    ],
)
def test_split_url(url: str, expected: tuple[tuple[str, str, int, str], str, str | None]) -> None:
    where, target, auth = split_url(url)
    assert ((where.scheme, where.host, where.port, where.host_header), target, auth) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("h.test/x", "not an absolute URL"),
        ("ftp://h.test/", "scheme 'ftp'"),
        ("http:///x", "no host"),
        ("http://h.test:99999/", "out of range"),
    ],
)
def test_split_url_refuses(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_url(url)


async def test_two_responses_in_one_packet_the_first_decides(server: RawServer) -> None:
    """SPEC §6 (issue 26): a second response to one request is a protocol error."""
    server.replies["/twice"] = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 500 Internal Server Error\r\nX-Second: 1\r\nContent-Length: 4\r\n\r\nfail"
    )
    server.replies["/twice-bad-first"] = (
        b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    pool = Http1Pool(connect_timeout_s=1.0)
    first = await fetch(pool, server, "/twice")
    assert (first.status, first.reason, first.body, first.complete) == (200, "OK", b"ok", True)
    assert "x-second" not in first.headers
    assert pool.take_idle(origin(server.port).key) is None  # closed, never reused
    second = await fetch(pool, server, "/twice-bad-first")
    assert (second.status, second.reason, second.body) == (503, "Busy", b"busy")
    assert (await fetch(pool, server, "/a")).body == b"ok"
    await pool.close()
    assert server.connections == 3


async def test_bytes_after_the_response_before_the_next_request_close_it(
    server: RawServer,
) -> None:
    gate = asyncio.Event()

    async def late_second(writer: asyncio.StreamWriter) -> None:
        writer.write(OK)
        await writer.drain()
        await gate.wait()
        writer.write(b"HTTP/1.1 500 Late\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    server.replies["/late"] = late_second
    pool = Http1Pool(connect_timeout_s=1.0)
    response = await fetch(pool, server, "/late")
    assert (response.status, response.body) == (200, b"ok")
    assert "idle=1" in repr(pool)
    gate.set()
    for _ in range(100):  # bounded: until the stray bytes reached us
        if "idle=0" in repr(pool):
            break
        await asyncio.sleep(0.01)
    assert repr(pool) == "Http1Pool(connections=0, idle=0)"
    assert (await fetch(pool, server, "/a")).body == b"ok"
    await pool.close()
    assert server.connections == 2
