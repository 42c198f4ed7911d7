"""A lean HTTP/1.1 client for webhooks: its pool of keep-alive connections, by origin.

One request at a time on each connection, responses parsed by httptools (llhttp,
as in uvicorn).

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
``http1_connection.KEEPALIVE_S``. Idle connections are pooled by a key the
caller gives (origin, TLS identity, proxy), so no request ever rides a
connection made for another identity. Bytes after a complete response, before
the next request, are a protocol error: the connection is closed and never
reused, and the first response stands (a receiver cannot answer one request
twice). Failures are raised as the exceptions this module exports
(``ConnectFailed``, ``ConnectTimeout``, ``ServerDisconnected``, ``BadResponse``,
``ProxyRefused``); ``outcomes.translate`` turns them into outcomes.

Its parts: this module makes connections (directly, to a proxy, or through a
CONNECT tunnel) and keeps the idle ones (``Http1Pool``); ``http1_connection`` is
one connection (its request written, its response parsed, its timer);
``http1_proxy`` the proxy's URL and its answer to CONNECT. Importers use this
module, which exports the names of the other two.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from crmhooks.http1_connection import (
    MAX_HEAD_BYTES,
    BadResponse,
    Connection,
    Response,
    ServerDisconnected,
)
from crmhooks.http1_proxy import ConnectSetup, Proxy, ProxyRefused

__all__ = [
    "MAX_HEAD_BYTES",
    "BadResponse",
    "ConnectFailed",
    "ConnectTimeout",
    "Http1Pool",
    "Origin",
    "Proxy",
    "ProxyRefused",
    "Response",
    "ServerDisconnected",
]


class ConnectFailed(Exception):
    """No connection: the name did not resolve, nothing listened, or TLS failed."""

    def __init__(self, target: str, os_error: OSError) -> None:
        super().__init__(f"cannot connect to {target}: {os_error}")
        self.target = target
        self.os_error = os_error


class ConnectTimeout(TimeoutError):
    """The connection was not established within the connect timeout."""


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
        self._idle: dict[str, list[Connection]] = {}
        self._all: set[Connection] = set()
        self.connections_opened = 0

    def __repr__(self) -> str:
        idle = sum(len(v) for v in self._idle.values())
        return f"Http1Pool(connections={len(self._all)}, idle={idle})"

    def take_idle(self, key: str) -> Connection | None:
        """An idle connection of ``key``, now the caller's (for ``request``), or None."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closed
            conn.unpark()
            if conn.reusable:
                return conn
            conn.abort()
        return None

    def put_back(self, conn: Connection) -> None:
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
        conn: Connection | None = None,
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

    def _park(self, conn: Connection) -> None:
        conn.park()
        self._idle.setdefault(conn.key, []).append(conn)

    def forget(self, conn: Connection) -> None:
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
    ) -> Connection:
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
    ) -> Connection:
        last: OSError | None = None
        for host in hosts:
            try:
                _, conn = await loop.create_connection(
                    lambda: Connection(self, key),
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
    ) -> Connection:
        # The proxy comes from the config, never from a webhook: resolved by name.
        try:
            _, conn = await loop.create_connection(
                lambda: Connection(self, key), proxy.host, proxy.port
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
    ) -> Connection:
        """CONNECT ``host:port`` through the proxy for each host in turn; TLS inside."""
        last: Exception | None = None
        for host in hosts:
            authority = f"[{host}]:{origin.port}" if ":" in host else f"{host}:{origin.port}"
            try:
                raw, setup = await loop.create_connection(ConnectSetup, proxy.host, proxy.port)
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
                conn = Connection(self, key)
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
