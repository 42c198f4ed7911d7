"""HTTP delivery: the request we send, SSRF guard, signing, outcome classes.

Connections and the wire are ``http1``'s; its exceptions, and the OS's, are
translated here into an ``Outcome`` and never escape ``HttpTransport.send``.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import errno
import functools
import http
import logging
import re
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol
from urllib.parse import unquote, urlsplit

import msgspec

from crmhooks import __version__
from crmhooks.aio import Slots
from crmhooks.clock import Clock
from crmhooks.config import DeliverySettings
from crmhooks.errors import DeliveryRefused
from crmhooks.http1 import (
    BadResponse,
    ConnectFailed,
    ConnectTimeout,
    Http1Pool,
    Origin,
    Response,
    ServerDisconnected,
)
from crmhooks.netguard import Resolver, SystemResolver, check_url
from crmhooks.signing import sign
from crmhooks.templates import RenderedRequest

log = logging.getLogger(__name__)

# Outcome classes (SPEC §5). None means delivered (2xx).
ERROR_CLASSES: frozenset[str] = frozenset(
    {
        "bad_request",  # 400
        "unauthorized",  # 401
        "request_failed",  # 402
        "not_found",  # 404
        "client_error",  # other 4xx
        "server_error",  # 5xx
        "redirect",  # 3xx, never followed
        "timeout",
        "connection_error",
        "ssrf_blocked",
    }
)

# SPEC §6: response bodies are read up to 64 KiB; the rest is never downloaded.
MAX_RESPONSE_BYTES = 64 * 1024
# Enough of a response body to tell an operator what the receiver said.
EXCERPT_CHARS = 200
# UTF-8 needs at most 4 bytes a character: decoding this many bytes yields the excerpt.
EXCERPT_BYTES = EXCERPT_CHARS * 4
# A receiver must not park an action for ever with a huge Retry-After: a day is
# the longest wait that still lands within the next quota day.
MAX_RETRY_AFTER_S = 86_400.0
# RFC 9110 gives Retry-After a meaning on these statuses (SPEC §5 honours both).
RETRY_AFTER_STATUSES = frozenset({429, 503})
STATUS_CLASSES: Mapping[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    402: "request_failed",
    404: "not_found",
}
# Header injection guard: these characters would end a header line.
FORBIDDEN_HEADER_CHARS = frozenset("\r\n\0")


# A msgspec.Struct, as every value made once an attempt or more: built in C (see
# events.RecordEvent). gc=False: it holds scalars only.
class Outcome(msgspec.Struct, frozen=True, gc=False):
    """What one attempt of one action came to."""

    error_class: str | None  # None: delivered (2xx)
    http_status: int | None
    error: str | None  # human-readable, e.g. "HTTP 503 Service Unavailable"
    latency_ms: float
    sent_at_ms: int | None  # None when nothing was sent (ssrf_blocked)
    retry_after_s: float | None = None  # Retry-After of a 429/503, seconds
    response_excerpt: str | None = None  # first bytes of the response body, decoded
    response_bytes: int = 0  # bytes of the response body read (at most 64 KiB)
    response_truncated: bool = False  # reading stopped at the 64 KiB cap

    @property
    def delivered(self) -> bool:
        return self.error_class is None


class Transport(Protocol):
    """Sends one rendered request for one action and classifies the result."""

    async def send(
        self, action_id: str, request: RenderedRequest, secret: str | None
    ) -> Outcome: ...


def classify_status(status: int) -> str | None:
    """The outcome class of an HTTP status (SPEC §5); None for 2xx."""
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return "redirect"
    if status in STATUS_CLASSES:
        return STATUS_CLASSES[status]
    if 400 <= status < 500:
        return "client_error"
    # 5xx, and the odd 1xx/6xx a broken server may send: the receiver's fault.
    return "server_error"


def parse_retry_after(value: str, now_ms: int) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or HTTP-date), capped.

    None if the value is neither form. A date in the past means 0.
    """
    text = value.strip()
    if text.isascii() and text.isdigit():
        return min(float(text), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # HTTP-dates are GMT; a date without a zone is not one
    delay_s = when.timestamp() - now_ms / 1000
    return min(max(delay_s, 0.0), MAX_RETRY_AFTER_S)


def _excerpt(body: bytes) -> str | None:
    if not body:
        return None
    return body[:EXCERPT_BYTES].decode("utf-8", errors="replace")[:EXCERPT_CHARS]


@dataclass(slots=True)
class _HostSlot:
    slots: Slots
    users: int = 0


class HttpTransport:
    """The real transport (``http1.Http1Pool``). Use as ``async with HttpTransport(...) as t``.

    In-flight bounds: a request first takes a slot of its host (scheme, host,
    port; ``max_in_flight_per_host``), then a slot of the process
    (``max_in_flight``). The per-host slot comes first so that requests queued
    behind a hung host wait holding nothing: a dead host can hold at most
    ``max_in_flight_per_host`` process slots, and every other host keeps the
    rest. (Taking the global slot first would let a backlog for one hung host
    fill the whole process.) The order is the same everywhere, so no deadlock.
    So a host never has more connections than its slots. The time a request
    waits for its slots is not counted in ``total_timeout_s``, which starts once
    it holds both.

    With the SSRF guard on (``allow_private_networks = false``) every new
    connection first resolves its host through ``resolver`` (default:
    getaddrinfo), vets every address, and connects only to the vetted ones: no
    second lookup in which a rebinding name could answer 127.0.0.1. A request
    that finds an idle connection to its origin reuses it without a lookup: that
    connection's address was vetted when it was made.
    """

    def __init__(
        self, settings: DeliverySettings, clock: Clock, *, resolver: Resolver | None = None
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._resolver: Resolver = resolver if resolver is not None else SystemResolver()
        self._guarded = not settings.allow_private_networks
        self._pool: Http1Pool | None = None
        self._global = Slots(settings.max_in_flight)
        self._hosts: dict[str, _HostSlot] = {}
        self._user_agent = f"crmhooks/{__version__}"

    def __repr__(self) -> str:
        state = "open" if self._pool is not None else "closed"
        guard = "on" if self._guarded else "off (private networks allowed)"
        return (
            f"HttpTransport({state}, ssrf_guard={guard}, "
            f"max_in_flight={self._settings.max_in_flight}, "
            f"per_host={self._settings.max_in_flight_per_host}, hosts_in_flight={len(self._hosts)})"
        )

    async def __aenter__(self) -> HttpTransport:
        self._pool = Http1Pool(connect_timeout_s=self._settings.connect_timeout_s)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def send(self, action_id: str, request: RenderedRequest, secret: str | None) -> Outcome:
        """One attempt; every failure becomes an Outcome (RuntimeError if not entered).

        It first takes a slot of the request's host, then one of the process (see
        the class), in this coroutine: one level less to make and resume for each
        request than a coroutine of its own for the slots (~0.3 µs).
        """
        pool = self._pool
        if pool is None:
            raise RuntimeError("HttpTransport used outside 'async with'")
        slot: _HostSlot | None = None
        origin_key = ""
        try:
            try:
                origin, target, auth = split_url(request.url)
            except ValueError as exc:
                outcome = _not_sent(
                    "connection_error",
                    f"invalid URL {request.redacted_url}: {exc}",
                    time.perf_counter(),
                )
            else:
                origin_key = origin.key
                slot = self._hosts.get(origin_key)
                if slot is None:
                    slot = self._hosts[origin_key] = _HostSlot(
                        Slots(self._settings.max_in_flight_per_host)
                    )
                slot.users += 1
                # Slots, not asyncio.Semaphore: a free slot is taken without a coroutine
                # (1.2 µs a request for two semaphores with ``async with``, 0.77 with
                # acquire/release, 0.24 with Slots).
                waiter = slot.slots.take()
                if waiter is not None:
                    await slot.slots.wait(waiter)
                try:
                    waiter = self._global.take()
                    if waiter is not None:
                        await self._global.wait(waiter)
                    try:
                        outcome = await self._attempt(
                            pool, origin, target, auth, action_id, request, secret
                        )
                    finally:
                        self._global.give()
                finally:
                    slot.slots.give()
        except Exception as exc:  # the contract: nothing escapes send
            log.exception("delivery action_id=%s unexpected error", action_id)
            outcome = Outcome(
                error_class="connection_error",
                http_status=None,
                error=_scrub(f"unexpected {type(exc).__name__}: {exc}", request),
                latency_ms=0.0,
                sent_at_ms=None,
            )
        finally:
            if slot is not None:
                slot.users -= 1
                if slot.users == 0:
                    # Forget idle hosts, so the table does not grow with every URL ever seen.
                    del self._hosts[origin_key]
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "delivery action_id=%s url=%s class=%s status=%s latency_ms=%.1f",
                action_id,
                request.redacted_url,
                outcome.error_class or "delivered",
                outcome.http_status,
                outcome.latency_ms,
            )
        return outcome

    async def _attempt(
        self,
        pool: Http1Pool,
        origin: Origin,
        target: str,
        auth: str | None,
        action_id: str,
        request: RenderedRequest,
        secret: str | None,
    ) -> Outcome:
        settings = self._settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.total_timeout_s
        started = time.perf_counter()
        conn = pool.take_idle(origin)
        vetted: list[str] | None = None
        if conn is None and self._guarded:
            try:
                async with asyncio.timeout_at(deadline):
                    vetted = await check_url(request.url, self._resolver)
            except DeliveryRefused as exc:
                return _not_sent("ssrf_blocked", str(exc), started)
            except TimeoutError:
                return _not_sent(
                    "timeout",
                    f"DNS lookup timed out after {settings.total_timeout_s} s",
                    started,
                )
            except OSError as exc:
                return _not_sent("connection_error", f"DNS lookup failed: {exc}", started)
        sent_at_ms = self._clock.now_ms()
        try:
            head = self._head(origin, target, auth, action_id, request, secret, sent_at_ms // 1000)
        except ValueError as exc:  # a secret that is not whsec_ base64, a CR in a header
            if conn is not None:
                pool.put_back(conn)
            return _not_sent("connection_error", f"not sent: {exc}", started)
        try:
            response = await pool.request(
                origin,
                (head, request.body) if request.body else (head,),
                deadline=deadline,
                cap=MAX_RESPONSE_BYTES,
                conn=conn,
                addresses=vetted,
            )
        except Exception as exc:
            error_class, message = self._translate(exc, origin)
            return Outcome(
                error_class=error_class,
                http_status=None,
                error=_scrub(message, request),
                latency_ms=_elapsed_ms(started),
                sent_at_ms=sent_at_ms,
            )
        return self._from_response(response, _elapsed_ms(started), sent_at_ms)

    def _head(
        self,
        origin: Origin,
        target: str,
        auth: str | None,
        action_id: str,
        request: RenderedRequest,
        secret: str | None,
        timestamp_s: int,
    ) -> bytes:
        """The request line and headers, encoded; ValueError naming a header we cannot send.

        Ours replace any template header of the same name, and a template's own
        webhook-* headers are dropped: it must not forge an id or a signature. The
        parts that are the same for every request of a webhook are built and checked
        once (``_static_head``); only the id, time stamp, signature and length vary.
        """
        body = request.body
        prefix, suffix = _static_head(
            request.method,
            origin.host_header,
            auth,
            bool(body),
            tuple(request.headers.items()),
            self._user_agent,
        )
        if "\r" in action_id or "\n" in action_id or "\0" in action_id:
            raise ValueError("CR/LF/NUL in header webhook-id")
        signature = (
            f"webhook-signature: {sign(secret, action_id, timestamp_s, body)}\r\n"
            if secret is not None
            else ""
        )
        length = (
            f"Content-Length: {len(body)}\r\n"
            if body or request.method not in _NO_BODY_METHODS
            else ""
        )
        return (
            f"{request.method} {target} HTTP/1.1\r\n{prefix}webhook-id: {action_id}\r\n"
            f"webhook-timestamp: {timestamp_s}\r\n{signature}{suffix}{length}\r\n"
        ).encode()

    def _from_response(self, response: Response, latency_ms: float, sent_at_ms: int) -> Outcome:
        status = response.status
        error_class = classify_status(status)
        error: str | None = None
        retry_after_s: float | None = None
        if error_class is not None:
            reason = response.reason or _phrase(status)
            error = f"HTTP {status} {reason}".rstrip()
            if error_class == "redirect":
                location = response.headers.get("location", "")[:EXCERPT_CHARS]
                error += f" (redirect to {location or 'nowhere'} not followed)"
            retry_after = response.headers.get("retry-after")
            if status in RETRY_AFTER_STATUSES and retry_after is not None:
                retry_after_s = parse_retry_after(retry_after, self._clock.now_ms())
        body = response.body
        return Outcome(
            error_class=error_class,
            http_status=status,
            error=error,
            latency_ms=latency_ms,
            sent_at_ms=sent_at_ms,
            retry_after_s=retry_after_s,
            response_excerpt=_excerpt(body),
            response_bytes=len(body),
            response_truncated=not response.complete and len(body) >= MAX_RESPONSE_BYTES,
        )

    def _translate(self, exc: Exception, origin: Origin) -> tuple[str, str]:
        """An exception of a request (http1's, or the OS's) → (error_class, sentence)."""
        settings = self._settings
        if isinstance(exc, ConnectTimeout):
            return "timeout", f"connect timed out after {settings.connect_timeout_s} s"
        if isinstance(exc, TimeoutError):
            return "timeout", f"timed out after {settings.total_timeout_s} s"
        if isinstance(exc, ConnectFailed):
            os_error = exc.os_error
            if isinstance(os_error, socket.gaierror):
                return "connection_error", f"DNS lookup failed: {os_error}"
            if isinstance(os_error, ssl.SSLCertVerificationError):
                return "connection_error", f"TLS certificate error: {os_error}"
            if isinstance(os_error, ssl.SSLError):
                return "connection_error", f"TLS error: {os_error}"
            refused = (
                os_error.errno == errno.ECONNREFUSED
                or "refused" in str(os_error).lower()
                or "connect call failed" in str(os_error).lower()
            )
            if refused:
                return "connection_error", f"connection refused: {exc.target}"
            return "connection_error", f"cannot connect to {exc.target}: {os_error}"
        if isinstance(exc, ServerDisconnected):
            return "connection_error", "server disconnected before responding"
        if isinstance(exc, ConnectionResetError):
            return "connection_error", f"connection reset: {exc}"
        if isinstance(exc, BadResponse):
            return "connection_error", f"invalid HTTP response: {exc}"
        if isinstance(exc, OSError):
            return "connection_error", f"{type(exc).__name__}: {exc}"
        return "connection_error", f"unexpected {type(exc).__name__}: {exc}"


# Headers the transport writes itself; a template's are dropped.
_OWN_HEADERS = frozenset(
    {
        "host",
        "user-agent",
        "accept-encoding",
        "content-length",
        "transfer-encoding",
        "connection",
    }
)
# Methods whose empty body needs no Content-Length (RFC 9110 §8.6).
_NO_BODY_METHODS = frozenset({"GET", "HEAD"})
# RFC 9110 §5.6.2: a header name is a token.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@functools.lru_cache(maxsize=1024)
def _static_head(
    method: str,
    host_header: str,
    auth: str | None,
    has_body: bool,
    template_headers: tuple[tuple[str, str], ...],
    user_agent: str,
) -> tuple[str, str]:
    """The header lines before ``webhook-id`` (Host, the template's, ours) and those
    after ``webhook-signature`` (Authorization, Accept, Content-Type), checked.

    The same for every request of a webhook to one origin, so remembered; the
    arguments are what they depend on. ValueError names a header we cannot send.
    """
    before: list[tuple[str, str]] = []
    given: set[str] = set()
    for name, value in template_headers:
        lower = name.lower()
        if lower.startswith("webhook-") or lower in _OWN_HEADERS:
            continue
        given.add(lower)
        before.append((name, value))
    before.append(("User-Agent", user_agent))
    before.append(("Accept-Encoding", "identity"))
    after: list[tuple[str, str]] = []
    if auth is not None and "authorization" not in given:
        after.append(("Authorization", auth))
    if "accept" not in given:
        after.append(("Accept", "*/*"))
    if has_body and "content-type" not in given:
        after.append(("Content-Type", "application/octet-stream"))
    return f"Host: {host_header}\r\n{_header_lines(before)}", _header_lines(after)


def _header_lines(headers: list[tuple[str, str]]) -> str:
    lines: list[str] = []
    for name, value in headers:
        if FORBIDDEN_HEADER_CHARS.intersection(name) or FORBIDDEN_HEADER_CHARS.intersection(value):
            raise ValueError(f"CR/LF/NUL in header {name}")
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"invalid header name {name!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


@functools.lru_cache(maxsize=4096)
def split_url(url: str) -> tuple[Origin, str, str | None]:
    """An absolute http(s) URL → its origin, request target and Basic credentials.

    ``url`` is percent-encoded ASCII (``RenderedRequest.url``), so the target is
    sent as it is. ValueError (saying why) if it is not such a URL. Remembered: a
    webhook's URL is mostly the same text on every request (0.66 → ~0.1 µs).
    """
    start = url.find("://")
    if start <= 0:
        raise ValueError("not an absolute URL")
    end = len(url)
    for sep in "/?#":
        found = url.find(sep, start + 3)
        if found != -1 and found < end:
            end = found
    origin, auth = _origin(url[:end])
    target = url[end:].partition("#")[0]
    if not target.startswith("/"):
        target = "/" + target
    return origin, target, auth


@functools.lru_cache(maxsize=1024)
def _origin(scheme_authority: str) -> tuple[Origin, str | None]:
    parts = urlsplit(scheme_authority)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme {scheme!r} is not http or https")
    host = parts.hostname
    if not host:
        raise ValueError("no host")
    port = parts.port  # ValueError when out of range
    if not host.isascii():
        host = host.encode("idna").decode("ascii")
    default = 443 if scheme == "https" else 80
    host_header = f"[{host}]" if ":" in host else host
    if port is not None and port != default:
        host_header += f":{port}"
    auth = None
    if parts.username is not None or parts.password is not None:
        credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(credentials.encode("utf-8")).decode("ascii")
    return Origin(scheme, host, port or default, host_header), auth


def _not_sent(error_class: str, error: str, started: float) -> Outcome:
    return Outcome(
        error_class=error_class,
        http_status=None,
        error=error,
        latency_ms=_elapsed_ms(started),
        sent_at_ms=None,
    )


def _elapsed_ms(started: float) -> float:
    # Not rounded here: the result record rounds it (to 0.1 ms), the log formats it.
    return (time.perf_counter() - started) * 1000


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _scrub(message: str, request: RenderedRequest) -> str:
    """Never let a secret in the URL (api keys in the query) reach an error text."""
    if request.url and request.url != request.redacted_url:
        message = message.replace(request.url, request.redacted_url)
    return message
