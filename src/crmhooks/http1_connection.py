"""One keep-alive HTTP/1.1 connection: its request written, its response parsed, its timer.

The response is parsed by httptools (llhttp) through the connection's own
callbacks; the one timer serves the deadline of an exchange and the end of an
idle connection's keep-alive.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Protocol, cast

import httptools
import msgspec

# How long an idle connection is kept for the next request to its origin (as
# aiohttp's default keepalive_timeout). A receiver that closes sooner just makes
# the next request connect again.
KEEPALIVE_S = 15.0
# A response head (status line and headers) larger than this is refused: a
# broken or hostile receiver cannot make us buffer without end.
MAX_HEAD_BYTES = 64 * 1024


class ServerDisconnected(ConnectionError):
    """The receiver closed the connection before its response head was complete."""


class BadResponse(Exception):
    """What came back is not an HTTP/1.x response we can read."""


class _SecondResponse(Exception):
    """Raised inside the parser: a response began after the complete one."""


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


class Owner(Protocol):
    """Who keeps the connection (``http1.Http1Pool``): told once it is closed."""

    def forget(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """One keep-alive connection; the parser's callbacks fill the current response.

    Its one timer is for the deadline of the exchange under way, or for the end of
    its keep-alive while idle. It is not set and cancelled per request (two timers
    and a second future a request cost ~2 µs of CPU): it stays armed and, when it
    goes off, does what is due or arms itself again for what is next. Deadlines
    only move later on a busy connection, so it goes off about once per
    ``total_timeout_s`` or ``KEEPALIVE_S``; it is moved earlier only when an
    exchange's deadline or an idle connection's end comes before it.
    """

    def __init__(self, pool: Owner, key: str) -> None:
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
