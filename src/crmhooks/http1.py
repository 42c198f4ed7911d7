"""A lean HTTP/1.1 client for webhooks: keep-alive connections per origin, one
request at a time on each, responses parsed by httptools (llhttp, as in uvicorn).

Why not aiohttp's client here: a webhook is one small request on a warm
connection, and aiohttp's per-request machinery (request and response objects,
header multidicts, URL objects, stream readers, timer contexts) costs ~100 µs of
CPU under uvloop, where writing the request and parsing the answer take ~7 µs
(measured against the bench's sink, 64 in flight). The processor spends most of
an instant delivery's CPU on its request, so this is the largest single cost of
a delivery. Everything a webhook does not need is left out: no redirects (never
followed anyway), no cookies, no decompression (we ask for identity), no
pipelining, no request streaming.

What it does: connect (to addresses the caller vetted, or by name), TLS with the
host name for SNI and certificate checks (with the caller's ``ssl.SSLContext``
for a client certificate or a private CA), or through an HTTP proxy (a CONNECT
tunnel, or a plain connection for absolute-form requests), write the head and
body in one go, parse the response head and read the body up to a cap, reuse
the connection when the response allows it, and keep idle connections for
``KEEPALIVE_S``. Idle connections are pooled by a key the caller gives (origin,
TLS identity, proxy), so no request ever rides a connection made for another
identity. Bytes after a complete response, before the next request, are a
protocol error: the connection is closed and never reused, and the first
response stands (a receiver cannot answer one request twice). Failures are
raised as the exceptions below; ``delivery.HttpTransport`` turns them into
outcomes.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import unquote, urlsplit

import httptools
import msgspec

# How long an idle connection is kept for the next request to its origin (as
# aiohttp's default keepalive_timeout). A receiver that closes sooner just makes
# the next request connect again.
KEEPALIVE_S = 15.0
# A response head (status line and headers) larger than this is refused: a
# broken or hostile receiver cannot make us buffer without end.
MAX_HEAD_BYTES = 64 * 1024
# A proxy's answer to CONNECT is a status line and a few headers.
MAX_CONNECT_HEAD_BYTES = 16 * 1024


class ConnectFailed(Exception):
    """No connection: the name did not resolve, nothing listened, or TLS failed."""

    def __init__(self, target: str, os_error: OSError) -> None:
        super().__init__(f"cannot connect to {target}: {os_error}")
        self.target = target
        self.os_error = os_error


class ConnectTimeout(TimeoutError):
    """The connection was not established within the connect timeout."""


class ServerDisconnected(ConnectionError):
    """The receiver closed the connection before its response head was complete."""


class BadResponse(Exception):
    """What came back is not an HTTP/1.x response we can read."""


class ProxyRefused(Exception):
    """The proxy answered CONNECT with something else than 2xx (or with no HTTP)."""


class _SecondResponse(Exception):
    """Raised inside the parser: a response began after the complete one."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: scheme, host and port, and the Host header naming them."""

    scheme: str  # http | https
    host: str  # as in the URL, lower case, IPv6 without brackets
    port: int
    host_header: str

    @property
    def key(self) -> str:
        return f"{self.scheme}://{self.host_header}"


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP forward proxy (``[delivery] proxy``), e.g. ``http://proxy.internal:3128``.

    Credentials in the URL (``http://user:pass@proxy:3128``) are sent as
    ``Proxy-Authorization: Basic``.
    """

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)  # to scrub from texts

    @classmethod
    def from_url(cls, url: str) -> Proxy:
        """ValueError saying what is wrong with ``url``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "http":
            raise ValueError(f"proxy {parts.scheme or url!r}: only http:// proxies are supported")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("a proxy URL is http://host:port, without a path")
        if not parts.hostname:
            raise ValueError("the proxy URL has no host")
        port = parts.port or 80  # ValueError when out of range
        authorization = password = None
        if parts.username is not None:
            password = unquote(parts.password or "")
            pair = f"{unquote(parts.username)}:{password}".encode()
            authorization = "Basic " + base64.b64encode(pair).decode("ascii")
        return cls(parts.hostname, port, authorization, password or None)

    @property
    def key(self) -> str:
        return f"proxy {self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Response(msgspec.Struct, frozen=True, gc=False):
    """A response head and the first ``cap`` bytes of its body.

    ``complete`` is False when the body was cut short: at the cap, by the
    deadline, or by the connection breaking after the head.
    """

    status: int
    reason: str
    headers: dict[str, str]  # lower-case name → first value
    body: bytes
    complete: bool


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the parser's callbacks fill the current response.

    Its one timer is for the deadline of the exchange under way, or for the end of
    its keep-alive while idle. It is not set and cancelled per request (two timers
    and a second future a request cost ~2 µs of CPU): it stays armed and, when it
    goes off, does what is due or arms itself again for what is next. Deadlines
    only move later on a busy connection, so it goes off about once per
    ``total_timeout_s`` or ``KEEPALIVE_S``; it is moved earlier only when an
    exchange's deadline or an idle connection's end comes before it.
    """

    def __init__(self, pool: Http1Pool, key: str) -> None:
        self._pool = pool
        self.key = key
        # Through a proxy, for absolute-form requests: the target's host:port to name.
        self.authority = ""
        self.tls = False
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0  # of the exchange under way
        self._idle_until = 0.0  # while idle (parked)
        self._parked = False
        # The exchange under way: its waiter, the response so far. The waiter fails
        # (timeout, a broken connection or response) until the head is in; after
        # that it always ends well, with ``_complete`` False if the body did not.
        self._waiter: asyncio.Future[None] | None = None
        self._got_head = False
        self._status = 0
        self._reason = bytearray()
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._cap = 0
        self._head_bytes = 0
        self._complete = False
        self._cut = False
        self._keep_alive = False

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        self._pool.forget(self)
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if not self._got_head:
            error: Exception
            if isinstance(exc, ConnectionResetError | ssl.SSLError):
                # An SSLError here: the receiver refused us after the handshake
                # (TLS 1.3 checks a client certificate then), say why.
                error = exc
            elif self.tls and self._idle_until == 0.0:  # the first request of a TLS connection
                # TLS 1.3 checks a client certificate after the handshake; most
                # servers then just close (no alert reaches the application).
                error = ServerDisconnected(
                    "server closed the new TLS connection before responding (does it want"
                    " a client certificate, or refuse the one sent?)"
                )
            else:
                error = ServerDisconnected("server disconnected before responding")
            waiter.set_exception(error)
        else:
            # A body without Content-Length or chunks ends where the connection does.
            self._complete = not self._framed()
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for on an idle connection
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("the receiver switched protocols"))
            return
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(str(exc) or type(exc).__name__))
            return
        if not self._got_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(BadResponse(f"response head larger than {MAX_HEAD_BYTES} bytes"))

    # -- httptools callbacks --------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        if self._complete:
            # A second response on the same request: stop the parser before it
            # touches the first one's state (data_received then closes).
            raise _SecondResponse()
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # 100 Continue, 103 Early Hints: the final one follows
            self._reason.clear()
            self._headers = {}
            return
        self._status = status
        self._got_head = True

    def on_body(self, body: bytes) -> None:
        if self._cut:
            return
        room = self._cap - len(self._body)
        if len(body) <= room:
            self._body += body
            return
        self._body += body[:room]
        self._cut = True  # more than the cap: the rest is never read
        self.abort()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def on_message_complete(self) -> None:
        if self._status == 0 or self._cut:  # the end of a 1xx response, or of one cut
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- used by the pool -------------------------------------------------------------

    def _framed(self) -> bool:
        return "content-length" in self._headers or "transfer-encoding" in self._headers

    def _fail(self, error: Exception) -> None:
        """The exchange fails (before its head), or its body ends here (after)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._got_head:
                # The status is in: a body that trickles or breaks off only
                # shortens what we keep of it.
                self._complete = False
                waiter.set_result(None)
            else:
                waiter.set_exception(error)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.abort()

    # -- the timer ----------------------------------------------------------------

    def _arm(self, when: float) -> None:
        """Have the timer go off at ``when`` at the latest."""
        if self._timer is not None:
            if self._timer_at <= when:
                return  # it will arm itself again for ``when``
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        now = self._loop.time()
        if self._waiter is not None and not self._waiter.done():
            if now >= self._deadline:
                self._fail(TimeoutError())
            else:
                self._arm(self._deadline)
        elif self._parked:
            if now >= self._idle_until:
                self.abort()  # connection_lost tells the pool
            else:
                self._arm(self._idle_until)
        # Else between an exchange and the pool: parking or the next exchange arms it.

    def park(self) -> None:
        """Idle in the pool for ``KEEPALIVE_S``, then closed."""
        self._parked = True
        self._idle_until = self._loop.time() + KEEPALIVE_S
        self._arm(self._idle_until)

    def unpark(self) -> None:
        self._parked = False

    async def exchange(self, data: Sequence[bytes], deadline: float, cap: int) -> Response:
        """Send one request, read its response; TimeoutError at ``deadline`` for the head."""
        assert self.transport is not None
        waiter = self._waiter = self._loop.create_future()
        self._got_head = False
        self._status = 0
        self._reason.clear()
        self._headers = {}
        self._body = bytearray()
        self._cap = cap
        self._head_bytes = 0
        self._complete = False
        self._cut = False
        self._keep_alive = False
        self._deadline = deadline
        self._arm(deadline)
        try:
            self.transport.writelines(data)
            await waiter
        finally:
            self._waiter = None
        return Response(
            status=self._status,
            reason=self._reason.decode("latin-1"),
            headers=self._headers,
            body=bytes(self._body),
            complete=self._complete,
        )

    @property
    def reusable(self) -> bool:
        return (
            self._complete
            and self._keep_alive
            and not self.closed
            and self.transport is not None
            and not self.transport.is_closing()
        )


class _ConnectSetup(asyncio.Protocol):
    """A connection to a proxy until its answer to CONNECT: reads that answer's head."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.answer.done():  # the proxy talks before our TLS hello: not a tunnel
            if self.transport is not None:
                self.transport.abort()
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end == -1:
            if len(self._buffer) > MAX_CONNECT_HEAD_BYTES:
                self.answer.set_exception(ProxyRefused("the proxy's answer is too large"))
            return
        if end + 4 != len(self._buffer):
            # Bytes after the head of a 2xx would be the target's, before our TLS
            # hello: a proxy that does not tunnel.
            self.answer.set_exception(ProxyRefused("the proxy sent data after its answer"))
            return
        status_line = self._buffer[: self._buffer.find(b"\r\n")].decode("latin-1")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not (code.isascii() and code.isdigit()):
            self.answer.set_exception(ProxyRefused("the proxy's answer is not HTTP"))
            return
        self.answer.set_result((int(code), reason))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ProxyRefused("the proxy closed the connection"))


class Http1Pool:
    """Keep-alive connections, idle ones by key. ``request`` takes an idle one or connects.

    A connection's key is its origin's (``Origin.key``) unless the caller gives
    another: the transport adds the TLS identity and the proxy, so that requests
    with a client certificate, a private CA or through a proxy never share a
    connection with others. It bounds nothing by itself: the caller limits
    requests in flight per origin (so there are never more idle connections than
    that limit).
    """

    def __init__(self, *, connect_timeout_s: float, ssl_context: ssl.SSLContext | None = None):
        self._connect_timeout_s = connect_timeout_s
        self._ssl = ssl_context
        self._idle: dict[str, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self.connections_opened = 0

    def __repr__(self) -> str:
        idle = sum(len(v) for v in self._idle.values())
        return f"Http1Pool(connections={len(self._all)}, idle={idle})"

    def take_idle(self, key: str) -> _Connection | None:
        """An idle connection of ``key``, now the caller's (for ``request``), or None."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closed
            conn.unpark()
            if conn.reusable:
                return conn
            conn.abort()
        return None

    def put_back(self, conn: _Connection) -> None:
        """An idle connection taken but not used."""
        if conn.reusable:
            self._park(conn)
        else:
            conn.abort()

    async def request(
        self,
        origin: Origin,
        data: Sequence[bytes],
        *,
        deadline: float,
        cap: int,
        conn: _Connection | None = None,
        addresses: Sequence[str] | None = None,
        key: str | None = None,
        tls: ssl.SSLContext | None = None,
        proxy: Proxy | None = None,
    ) -> Response:
        """One request (``data``: head and body) on ``conn`` or a new connection.

        ``conn``: a connection from ``take_idle`` or ``connect``. Without one, a new
        connection is made as ``connect`` says. Raises ConnectFailed,
        ConnectTimeout, ProxyRefused, TimeoutError (``deadline`` passed before the
        response head), ServerDisconnected, ConnectionResetError or BadResponse.
        """
        if conn is None:
            conn = await self.connect(
                origin, deadline, addresses, key=key or origin.key, tls=tls, proxy=proxy
            )
        try:
            response = await conn.exchange(data, deadline, cap)
        except BaseException:
            conn.abort()
            raise
        self.put_back(conn)
        return response

    def _park(self, conn: _Connection) -> None:
        conn.park()
        self._idle.setdefault(conn.key, []).append(conn)

    def forget(self, conn: _Connection) -> None:
        """Called by a connection once closed."""
        conn.unpark()
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.key]

    async def connect(
        self,
        origin: Origin,
        deadline: float,
        addresses: Sequence[str] | None,
        *,
        key: str,
        tls: ssl.SSLContext | None = None,
        proxy: Proxy | None = None,
    ) -> _Connection:
        """A new connection to ``origin``, pooled under ``key`` once used.

        To ``addresses`` only (the SSRF guard's vetted ones, tried in order), or by
        host name when None. https: TLS with ``tls`` (default: the system store),
        SNI and certificate check for the origin's host name. Through ``proxy``:
        https origins through a CONNECT tunnel to the address, then TLS inside it;
        http origins on a plain connection to the proxy, for absolute-form
        requests naming ``conn.authority`` (the first address, or the host name).
        Within the connect timeout (and ``deadline``).
        """
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        connect_bound = self._connect_timeout_s < remaining
        context = None
        if origin.scheme == "https":
            if tls is None:
                if self._ssl is None:
                    self._ssl = ssl.create_default_context()
                tls = self._ssl
            context = tls
        hosts = addresses if addresses is not None else [origin.host]
        try:
            async with asyncio.timeout(min(self._connect_timeout_s, max(remaining, 0.0))):
                if proxy is None:
                    conn = await self._direct(loop, origin, hosts, context, key)
                elif context is None:
                    conn = await self._to_proxy(loop, proxy, key)
                    first = hosts[0]
                    conn.authority = (
                        f"[{first}]:{origin.port}" if ":" in first else f"{first}:{origin.port}"
                    )
                else:
                    conn = await self._tunnel(loop, origin, hosts, context, key, proxy)
        except TimeoutError:
            if connect_bound:
                raise ConnectTimeout() from None
            raise
        conn.tls = context is not None
        self._all.add(conn)
        self.connections_opened += 1
        return conn

    async def _direct(
        self,
        loop: asyncio.AbstractEventLoop,
        origin: Origin,
        hosts: Sequence[str],
        context: ssl.SSLContext | None,
        key: str,
    ) -> _Connection:
        last: OSError | None = None
        for host in hosts:
            try:
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, key),
                    host,
                    origin.port,
                    ssl=context,
                    server_hostname=origin.host if context is not None else None,
                )
            except OSError as exc:
                last = exc
                continue
            return conn
        assert last is not None, "no address to connect to"
        raise ConnectFailed(f"{origin.host}:{origin.port}", last)

    async def _to_proxy(
        self, loop: asyncio.AbstractEventLoop, proxy: Proxy, key: str
    ) -> _Connection:
        # The proxy comes from the config, never from a webhook: resolved by name.
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(self, key), proxy.host, proxy.port
            )
        except OSError as exc:
            raise ConnectFailed(f"proxy {proxy}", exc) from None
        return conn

    async def _tunnel(
        self,
        loop: asyncio.AbstractEventLoop,
        origin: Origin,
        hosts: Sequence[str],
        context: ssl.SSLContext,
        key: str,
        proxy: Proxy,
    ) -> _Connection:
        """CONNECT ``host:port`` through the proxy for each host in turn; TLS inside."""
        last: Exception | None = None
        for host in hosts:
            authority = f"[{host}]:{origin.port}" if ":" in host else f"{host}:{origin.port}"
            try:
                raw, setup = await loop.create_connection(_ConnectSetup, proxy.host, proxy.port)
            except OSError as exc:
                raise ConnectFailed(f"proxy {proxy}", exc) from None
            try:
                auth = (
                    f"Proxy-Authorization: {proxy.authorization}\r\n"
                    if proxy.authorization is not None
                    else ""
                )
                line = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n"
                raw.write(line.encode())
                status, reason = await setup.answer
                if not 200 <= status < 300:
                    refused = f"proxy {proxy} refused CONNECT {authority}: {status} {reason}"
                    raise ProxyRefused(refused)
                conn = _Connection(self, key)
                try:
                    tls_transport = await loop.start_tls(
                        raw, conn, context, server_hostname=origin.host
                    )
                except OSError as exc:
                    where = f"{origin.host}:{origin.port} via proxy {proxy}"
                    raise ConnectFailed(where, exc) from None
                if tls_transport is None:  # the proxy closed the tunnel during the handshake
                    raise ProxyRefused(f"proxy {proxy} closed the tunnel to {authority}")
                conn.connection_made(tls_transport)
                return conn
            except ProxyRefused as exc:
                raw.abort()
                last = exc
            except BaseException:
                raw.abort()
                raise
        assert last is not None, "no address to connect to"
        raise last

    async def close(self) -> None:
        for conn in list(self._all):
            conn.abort()
        self._all.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost
