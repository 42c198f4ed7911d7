"""HTTP delivery: one shared aiohttp session, SSRF guard, signing, outcome classes.

This is the one module that talks to aiohttp: its exceptions are translated
here into an ``Outcome`` and never escape ``HttpTransport.send``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import http
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from crmhooks import __version__
from crmhooks.clock import Clock
from crmhooks.config import DeliverySettings
from crmhooks.errors import DeliveryRefused
from crmhooks.netguard import PinnedResolver, Resolver, SystemResolver, check_url
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


@dataclass(frozen=True, slots=True)
class Outcome:
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
    semaphore: asyncio.Semaphore
    users: int = 0


class HttpTransport:
    """The real transport (aiohttp). Use as ``async with HttpTransport(...) as t``.

    In-flight bounds: a request first takes a slot of its host (scheme, host,
    port; ``max_in_flight_per_host``), then a slot of the process
    (``max_in_flight``). The per-host slot comes first so that requests queued
    behind a hung host wait holding nothing: a dead host can hold at most
    ``max_in_flight_per_host`` process slots, and every other host keeps the
    rest. (Taking the global slot first would let a backlog for one hung host
    fill the whole process.) The order is the same everywhere, so no deadlock.
    The connector's ``limit``/``limit_per_host`` equal the semaphores and are
    never the binding limit; the time a request waits for its slots is not
    counted in ``total_timeout_s``, which starts once it holds both.

    With the SSRF guard on (``allow_private_networks = false``) every request
    resolves its host through ``resolver`` (default: getaddrinfo), vets every
    address, and pins the vetted ones in the connector's resolver.
    """

    def __init__(
        self, settings: DeliverySettings, clock: Clock, *, resolver: Resolver | None = None
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._resolver: Resolver = resolver if resolver is not None else SystemResolver()
        self._guarded = not settings.allow_private_networks
        self._pinned = PinnedResolver()
        self._session: aiohttp.ClientSession | None = None
        self._global = asyncio.Semaphore(settings.max_in_flight)
        self._hosts: dict[str, _HostSlot] = {}
        self._user_agent = f"crmhooks/{__version__}"

    def __repr__(self) -> str:
        state = "open" if self._session is not None else "closed"
        guard = "on" if self._guarded else "off (private networks allowed)"
        return (
            f"HttpTransport({state}, ssrf_guard={guard}, "
            f"max_in_flight={self._settings.max_in_flight}, "
            f"per_host={self._settings.max_in_flight_per_host}, hosts_in_flight={len(self._hosts)})"
        )

    async def __aenter__(self) -> HttpTransport:
        settings = self._settings
        connector = aiohttp.TCPConnector(
            limit=settings.max_in_flight,
            limit_per_host=settings.max_in_flight_per_host,
            # Guarded: every connection must ask the pinned resolver, never a cache
            # filled by an earlier request.
            resolver=self._pinned if self._guarded else None,
            use_dns_cache=not self._guarded,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=settings.total_timeout_s, sock_connect=settings.connect_timeout_s
            ),
            # No HTTP(S)_PROXY/NO_PROXY/.netrc from the environment: a proxy would
            # connect on our behalf to addresses the guard never saw.
            trust_env=False,
            # One session serves every organisation: a cookie set by one receiver
            # must never travel with another organisation's webhook.
            cookie_jar=aiohttp.DummyCookieJar(),
            # We ask for identity encoding and read raw bytes, so a compressed
            # response cannot expand past the 64 KiB cap in memory.
            auto_decompress=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self._pinned.close()

    async def send(self, action_id: str, request: RenderedRequest, secret: str | None) -> Outcome:
        """One attempt; every failure becomes an Outcome (RuntimeError if not entered)."""
        session = self._session
        if session is None:
            raise RuntimeError("HttpTransport used outside 'async with'")
        try:
            outcome = await self._send(session, action_id, request, secret)
        except Exception as exc:  # the contract: nothing escapes send
            log.exception("delivery action_id=%s unexpected error", action_id)
            outcome = Outcome(
                error_class="connection_error",
                http_status=None,
                error=_scrub(f"unexpected {type(exc).__name__}: {exc}", request),
                latency_ms=0.0,
                sent_at_ms=None,
            )
        log.debug(
            "delivery action_id=%s url=%s class=%s status=%s latency_ms=%.1f",
            action_id,
            request.redacted_url,
            outcome.error_class or "delivered",
            outcome.http_status,
            outcome.latency_ms,
        )
        return outcome

    @contextlib.asynccontextmanager
    async def _host_slot(self, key: str) -> AsyncIterator[None]:
        slot = self._hosts.get(key)
        if slot is None:
            slot = self._hosts[key] = _HostSlot(
                asyncio.Semaphore(self._settings.max_in_flight_per_host)
            )
        slot.users += 1
        try:
            async with slot.semaphore:
                yield
        finally:
            slot.users -= 1
            if slot.users == 0:
                # Forget idle hosts, so the table does not grow with every URL ever seen.
                del self._hosts[key]

    def _headers(
        self, action_id: str, request: RenderedRequest, secret: str | None, timestamp_s: int
    ) -> CIMultiDict[str]:
        # Ours replace any template header of the same name, and a template's own
        # webhook-* headers are dropped: it must not forge an id or a signature.
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in request.headers.items() if not k.lower().startswith("webhook-")
        )
        headers["User-Agent"] = self._user_agent
        headers["Accept-Encoding"] = "identity"
        headers["webhook-id"] = action_id
        headers["webhook-timestamp"] = str(timestamp_s)
        if secret is not None:
            headers["webhook-signature"] = sign(secret, action_id, timestamp_s, request.body)
        return headers

    async def _send(
        self,
        session: aiohttp.ClientSession,
        action_id: str,
        request: RenderedRequest,
        secret: str | None,
    ) -> Outcome:
        settings = self._settings
        try:
            url = URL(request.url)
        except ValueError as exc:
            return _not_sent(
                "connection_error",
                f"invalid URL {request.redacted_url}: {exc}",
                time.perf_counter(),
            )
        raw_host = url.raw_host or ""
        async with self._host_slot(f"{url.scheme}://{raw_host}:{url.port}"), self._global:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + settings.total_timeout_s
            started = time.perf_counter()
            if self._guarded:
                try:
                    async with asyncio.timeout_at(deadline):
                        vetted = await check_url(url, self._resolver)
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
                headers = self._headers(action_id, request, secret, sent_at_ms // 1000)
            except ValueError as exc:  # a secret that is not whsec_ base64
                return _not_sent("connection_error", f"not sent: {exc}", started)
            bad = [k for k, v in headers.items() if FORBIDDEN_HEADER_CHARS.intersection(k + v)]
            if bad:
                return _not_sent(
                    "connection_error", f"not sent: CR/LF/NUL in header {bad[0]}", started
                )
            if self._guarded:
                self._pinned.pin(raw_host, vetted)
            try:
                async with asyncio.timeout_at(deadline):
                    response = await session.request(
                        request.method,
                        url,
                        headers=headers,
                        data=request.body or None,
                        allow_redirects=False,
                    )
            except Exception as exc:
                error_class, message = self._translate(exc)
                return Outcome(
                    error_class=error_class,
                    http_status=None,
                    error=_scrub(message, request),
                    latency_ms=_elapsed_ms(started),
                    sent_at_ms=sent_at_ms,
                )
            finally:
                if self._guarded:
                    self._pinned.unpin(raw_host)
            body = bytearray()
            complete = False
            try:
                async with asyncio.timeout_at(deadline):
                    complete = await _read_capped(response, body)
            except (TimeoutError, aiohttp.ClientError, OSError):
                # The status line already tells the outcome; a body that trickles
                # or breaks off only shortens the excerpt.
                pass
            finally:
                if complete:
                    response.release()  # fully read: the connection can be reused
                else:
                    response.close()  # unread bytes remain: drop the connection
            latency_ms = _elapsed_ms(started)
            return self._from_response(response, bytes(body), not complete, latency_ms, sent_at_ms)

    def _from_response(
        self,
        response: aiohttp.ClientResponse,
        body: bytes,
        truncated: bool,
        latency_ms: float,
        sent_at_ms: int,
    ) -> Outcome:
        status = response.status
        error_class = classify_status(status)
        error: str | None = None
        retry_after_s: float | None = None
        if error_class is not None:
            reason = response.reason or _phrase(status)
            error = f"HTTP {status} {reason}".rstrip()
            if error_class == "redirect":
                location = response.headers.get("Location", "")[:EXCERPT_CHARS]
                error += f" (redirect to {location or 'nowhere'} not followed)"
            retry_after = response.headers.get("Retry-After")
            if status in RETRY_AFTER_STATUSES and retry_after is not None:
                retry_after_s = parse_retry_after(retry_after, self._clock.now_ms())
        return Outcome(
            error_class=error_class,
            http_status=status,
            error=error,
            latency_ms=latency_ms,
            sent_at_ms=sent_at_ms,
            retry_after_s=retry_after_s,
            response_excerpt=_excerpt(body),
            response_bytes=len(body),
            response_truncated=truncated and len(body) >= MAX_RESPONSE_BYTES,
        )

    def _translate(self, exc: Exception) -> tuple[str, str]:
        """aiohttp/OS exception of a request → (error_class, sentence)."""
        settings = self._settings
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return "timeout", f"connect timed out after {settings.connect_timeout_s} s"
        if isinstance(exc, TimeoutError):  # asyncio's and aiohttp's ServerTimeoutError
            return "timeout", f"timed out after {settings.total_timeout_s} s"
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return "connection_error", f"DNS lookup failed: {exc.os_error}"
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            return "connection_error", f"TLS certificate error: {exc.certificate_error}"
        if isinstance(exc, aiohttp.ClientSSLError):
            return "connection_error", f"TLS error: {exc.os_error}"
        if isinstance(exc, aiohttp.ClientConnectorError):
            target = f"{exc.host}:{exc.port}"
            refused = (
                exc.os_error.errno == errno.ECONNREFUSED
                or "refused" in str(exc.os_error).lower()
                or "connect call failed" in str(exc.os_error).lower()
            )
            if refused:
                return "connection_error", f"connection refused: {target}"
            return "connection_error", f"cannot connect to {target}: {exc.os_error}"
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return "connection_error", "server disconnected before responding"
        if isinstance(exc, ConnectionResetError):
            return "connection_error", f"connection reset: {exc}"
        if isinstance(exc, aiohttp.InvalidURL):
            return "connection_error", f"invalid URL: {exc}"
        if isinstance(exc, aiohttp.ClientResponseError):
            return "connection_error", f"invalid HTTP response: {exc.message}"
        if isinstance(exc, aiohttp.ClientError | OSError):
            return "connection_error", f"{type(exc).__name__}: {exc}"
        return "connection_error", f"unexpected {type(exc).__name__}: {exc}"


async def _read_capped(response: aiohttp.ClientResponse, into: bytearray) -> bool:
    """Read the body into ``into`` up to the cap; True if the whole body was read."""
    while len(into) < MAX_RESPONSE_BYTES:
        chunk = await response.content.read(MAX_RESPONSE_BYTES - len(into))
        if not chunk:
            return True
        into += chunk
    return response.content.at_eof()


def _not_sent(error_class: str, error: str, started: float) -> Outcome:
    return Outcome(
        error_class=error_class,
        http_status=None,
        error=error,
        latency_ms=_elapsed_ms(started),
        sent_at_ms=None,
    )


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _scrub(message: str, request: RenderedRequest) -> str:
    """Never let a secret in the URL (api keys in the query) reach an error text."""
    if request.url and request.url != request.redacted_url:
        message = message.replace(request.url, request.redacted_url)
        message = message.replace(str(URL(request.url)), request.redacted_url)
    return message
