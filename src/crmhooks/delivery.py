"""HTTP delivery: the request we send, SSRF guard, auth, signing, outcome classes.

Connections and the wire are ``http1``'s; its exceptions, and the OS's, are
translated here into an ``Outcome`` and never escape ``HttpTransport.send``.
Every text an Outcome carries is scrubbed of the endpoint's secrets and has the
receiver's control characters escaped.
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
from crmhooks.auth import OAuth2ClientCredentials, OAuth2Tokens, Token, parse_token_response
from crmhooks.clock import Clock
from crmhooks.config import DeliverySettings
from crmhooks.endpoints import (
    ClientTls,
    Endpoint,
    escape_controls,
    scrub,
    scrub_list,
    token_endpoint_context,
)
from crmhooks.errors import AuthFailed, DeliveryRefused
from crmhooks.http1 import (
    BadResponse,
    ConnectFailed,
    ConnectTimeout,
    Http1Pool,
    Origin,
    Proxy,
    ProxyRefused,
    Response,
    ServerDisconnected,
)
from crmhooks.netguard import AllowedNetworks, Resolver, SystemResolver, check_url
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
        "connection_error",  # also TLS failures: certificate, handshake, a client cert refused
        "ssrf_blocked",  # also a token endpoint the guard refuses
        "auth_error",  # the OAuth2 token endpoint gave no token
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
    # None when nothing was sent (ssrf_blocked, a request that cannot be sent);
    # auth_error: when the token request was made (the attempt counts).
    sent_at_ms: int | None
    retry_after_s: float | None = None  # Retry-After of a 429/503, seconds
    response_excerpt: str | None = None  # first bytes of the response body, decoded
    response_bytes: int = 0  # bytes of the response body read (at most 64 KiB)
    response_truncated: bool = False  # reading stopped at the 64 KiB cap

    @property
    def delivered(self) -> bool:
        return self.error_class is None


class Transport(Protocol):
    """Sends one rendered request for one action and classifies the result."""

    async def send(self, action_id: str, request: RenderedRequest, endpoint: Endpoint) -> Outcome:
        """``endpoint``: the webhook's signing secret, auth, TLS and secrets to scrub."""
        ...


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
    getaddrinfo), vets every address (``allowed_networks`` pass), and connects
    only to the vetted ones: no second lookup in which a rebinding name could
    answer 127.0.0.1. A request that finds an idle connection to its origin
    reuses it without a lookup: that connection's address was vetted when it was
    made. Idle connections are keyed by origin, the endpoint's TLS identity
    (client certificate, CA) and the proxy.

    ``proxy`` (``[delivery] proxy``, "http://host:port"; never the environment's
    HTTP_PROXY): https requests go through a CONNECT tunnel to the vetted
    address (the proxy never resolves the name; SNI and the certificate check
    use it), http requests in absolute form naming the vetted address (the Host
    header names the host). OAuth2 token requests take the same way.
    """

    def __init__(
        self,
        settings: DeliverySettings,
        clock: Clock,
        *,
        resolver: Resolver | None = None,
        proxy: str | Proxy | None = None,
        allowed_networks: AllowedNetworks = (),
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._resolver: Resolver = resolver if resolver is not None else SystemResolver()
        self._guarded = not settings.allow_private_networks
        self._allowed = tuple(allowed_networks)
        self._proxy = Proxy.from_url(proxy) if isinstance(proxy, str) and proxy else proxy or None
        # The proxy's credentials: kept out of every text, like an endpoint's secrets.
        self._own_secrets: tuple[str, ...] = ()
        if self._proxy is not None and self._proxy.authorization is not None:
            secret = {self._proxy.authorization, self._proxy.authorization.split(" ", 1)[1]}
            if self._proxy.password:
                secret.add(self._proxy.password)
            self._own_secrets = scrub_list(secret)
        self._pool: Http1Pool | None = None
        self._global = Slots(settings.max_in_flight)
        self._hosts: dict[str, _HostSlot] = {}
        self._user_agent = f"crmhooks/{__version__}"
        self._tokens: OAuth2Tokens[ClientTls | None] = OAuth2Tokens(clock, self._fetch_token)

    def __repr__(self) -> str:
        state = "open" if self._pool is not None else "closed"
        guard = "on" if self._guarded else "off (private networks allowed)"
        if self._guarded and self._allowed:
            guard += f", {len(self._allowed)} allowed networks"
        proxy = f", proxy={self._proxy}" if self._proxy is not None else ""
        return (
            f"HttpTransport({state}, ssrf_guard={guard}{proxy}, "
            f"max_in_flight={self._settings.max_in_flight}, "
            f"per_host={self._settings.max_in_flight_per_host}, hosts_in_flight={len(self._hosts)})"
        )

    @property
    def connections_opened(self) -> int:
        """Connections made since the start (to receivers, token endpoints, proxies)."""
        return self._pool.connections_opened if self._pool is not None else 0

    @property
    def token_requests(self) -> int:
        """OAuth2 token requests started since the start."""
        return self._tokens.fetches

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

    async def send(self, action_id: str, request: RenderedRequest, endpoint: Endpoint) -> Outcome:
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
        secrets = endpoint.secrets
        try:
            try:
                origin, target, auth = split_url(request.url)
            except ValueError as exc:
                outcome = _not_sent(
                    "connection_error",
                    self._clean(f"invalid URL {request.redacted_url}: {exc}", request, secrets),
                    time.perf_counter(),
                )
            else:
                if auth is not None or self._own_secrets:
                    # The URL's password, the proxy's: out of texts as the endpoint's are.
                    secrets = _with_url(secrets, request.url, self._own_secrets)
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
                        route = origin_key
                        if endpoint.tls is not None or self._proxy is not None:
                            route = self._route(origin_key, endpoint.tls)
                        grant = endpoint.auth
                        if grant is None:
                            outcome = await self._attempt(
                                pool, origin, route, target, auth, action_id, request, endpoint,
                                secrets,
                            )  # fmt: skip
                        elif isinstance(grant, OAuth2ClientCredentials):
                            # A good cached token: one exchange, as without auth (no
                            # coroutine, timer or clock read more); see _attempt_oauth2.
                            cached = self._tokens.cached(grant)
                            first: Outcome | None = None
                            if cached is not None:
                                first = await self._attempt(
                                    pool, origin, route, target, cached[1], action_id, request,
                                    endpoint, _with_token(secrets, cached[0]), strong=True,
                                )  # fmt: skip
                            if first is not None and first.http_status != 401:
                                outcome = first
                            else:
                                outcome = await self._attempt_oauth2(
                                    pool, origin, route, target, grant, action_id, request,
                                    endpoint, secrets, cached, first,
                                )  # fmt: skip
                        else:
                            outcome = await self._attempt(
                                pool, origin, route, target, grant.header, action_id, request,
                                endpoint, secrets, strong=True,
                            )  # fmt: skip
                    finally:
                        self._global.give()
                finally:
                    slot.slots.give()
        except Exception as exc:  # the contract: nothing escapes send
            log.exception(
                "delivery action_id=%s unexpected error", action_id, extra={"action_id": action_id}
            )
            outcome = Outcome(
                error_class="connection_error",
                http_status=None,
                error=self._clean(f"unexpected {type(exc).__name__}: {exc}", request, secrets),
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
                scrub(request.redacted_url, secrets),
                outcome.error_class or "delivered",
                outcome.http_status,
                outcome.latency_ms,
            )
        return outcome

    def _route(self, origin_key: str, tls: ClientTls | None) -> str:
        """The pool key of an origin's connections with this TLS identity and proxy."""
        route = origin_key if tls is None else f"{origin_key} {tls.identity}"
        return route if self._proxy is None else f"{route} via {self._proxy}"

    async def _attempt(
        self,
        pool: Http1Pool,
        origin: Origin,
        route: str,
        target: str,
        auth: str | None,
        action_id: str,
        request: RenderedRequest,
        endpoint: Endpoint,
        secrets: tuple[str, ...],
        *,
        strong: bool = False,
        deadline: float | None = None,
    ) -> Outcome:
        """One exchange; ``auth``: the Authorization value (``strong``: it replaces a
        template's Authorization header; the URL's user:pass does not). ``deadline``:
        the attempt's (loop time), when it began before this exchange."""
        settings = self._settings
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + settings.total_timeout_s
        started = time.perf_counter()
        conn = pool.take_idle(route)
        vetted: list[str] | None = None
        if conn is None and self._guarded:
            try:
                async with asyncio.timeout_at(deadline):
                    vetted = await check_url(request.url, self._resolver, self._allowed)
            except DeliveryRefused as exc:
                return _not_sent("ssrf_blocked", self._clean(str(exc), request, secrets), started)
            except TimeoutError:
                return _not_sent(
                    "timeout",
                    f"DNS lookup timed out after {settings.total_timeout_s} s",
                    started,
                )
            except OSError as exc:
                message = self._clean(f"DNS lookup failed: {exc}", request, secrets)
                return _not_sent("connection_error", message, started)
        sent_at_ms = self._clock.now_ms()
        proxy = self._proxy
        proxy_auth: str | None = None
        try:
            if proxy is not None and origin.scheme == "http":
                # Absolute form, naming the address the guard vetted (when it did):
                # the proxy resolves nothing a rebinding name could answer.
                if conn is None:
                    conn = await pool.connect(origin, deadline, vetted, key=route, proxy=proxy)
                target = f"http://{conn.authority}{target}"
                proxy_auth = proxy.authorization
            head = self._head(
                origin, target, auth, strong, proxy_auth, action_id, request, endpoint.secret,
                sent_at_ms // 1000,
            )  # fmt: skip
        except ValueError as exc:  # a secret that is not whsec_ base64, a CR in a header
            if conn is not None:
                pool.put_back(conn)
            message = self._clean(f"not sent: {exc}", request, secrets)
            return _not_sent("connection_error", message, started)
        except Exception as exc:  # connecting to the proxy
            return self._failed(exc, request, secrets, started, sent_at_ms)
        try:
            if conn is None:
                tls = endpoint.tls
                conn = await pool.connect(
                    origin,
                    deadline,
                    vetted,
                    key=route,
                    tls=tls.context if tls is not None else None,
                    proxy=proxy,
                )
            response = await pool.request(
                origin,
                (head, request.body) if request.body else (head,),
                deadline=deadline,
                cap=MAX_RESPONSE_BYTES,
                conn=conn,
            )
        except Exception as exc:
            return self._failed(exc, request, secrets, started, sent_at_ms)
        return self._from_response(response, _elapsed_ms(started), sent_at_ms, secrets)

    def _failed(
        self,
        exc: Exception,
        request: RenderedRequest,
        secrets: tuple[str, ...],
        started: float,
        sent_at_ms: int,
    ) -> Outcome:
        error_class, message = self._translate(exc)
        return Outcome(
            error_class=error_class,
            http_status=None,
            error=self._clean(message, request, secrets),
            latency_ms=_elapsed_ms(started),
            sent_at_ms=sent_at_ms,
        )

    async def _attempt_oauth2(
        self,
        pool: Http1Pool,
        origin: Origin,
        route: str,
        target: str,
        grant: OAuth2ClientCredentials,
        action_id: str,
        request: RenderedRequest,
        endpoint: Endpoint,
        secrets: tuple[str, ...],
        cached: tuple[str, str] | None,
        refused: Outcome | None,
    ) -> Outcome:
        """The attempt with a new token (SPEC §6): none was cached, or the receiver
        answered ``refused`` (401) to the ``cached`` one. A 401 to a new token gets
        one more token and one more try; all within the attempt's ``total_timeout_s``.
        """
        tries = 2
        started = time.perf_counter()
        if cached is not None and refused is not None:
            self._tokens.refused(grant, cached[0])
            tries = 1
            started -= refused.latency_ms / 1000
        deadline = asyncio.get_running_loop().time() + self._settings.total_timeout_s
        deadline -= time.perf_counter() - started
        outcome: Outcome | None = None
        for _ in range(tries):
            fetched = await self._token(grant, endpoint, request, secrets, started, deadline)
            if isinstance(fetched, Outcome):
                return fetched
            token, header = fetched
            outcome = await self._attempt(
                pool, origin, route, target, header, action_id, request, endpoint,
                _with_token(secrets, token), strong=True, deadline=deadline,
            )  # fmt: skip
            if outcome.http_status != 401:
                break
            self._tokens.refused(grant, token)
        assert outcome is not None
        return msgspec.structs.replace(outcome, latency_ms=_elapsed_ms(started))

    async def _token(
        self,
        grant: OAuth2ClientCredentials,
        endpoint: Endpoint,
        request: RenderedRequest,
        secrets: tuple[str, ...],
        started: float,
        deadline: float,
    ) -> tuple[str, str] | Outcome:
        """(token, Authorization value), or the attempt's Outcome when there is none."""
        timeout_s = self._settings.total_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                return await self._tokens.header(grant, endpoint.tls)
        except DeliveryRefused as exc:
            message = f"token endpoint {grant.token_url}: {exc}"
            return _not_sent("ssrf_blocked", self._clean(message, request, secrets), started)
        except AuthFailed as exc:
            message = str(exc)
        except TimeoutError:
            message = f"no answer within {timeout_s} s"
        except Exception as exc:
            message = self._translate(exc)[1]
        # sent_at: the token request went out; the attempt counts (and is retried).
        return Outcome(
            error_class="auth_error",
            http_status=None,
            error=self._clean(f"token endpoint {grant.token_url}: {message}", request, secrets),
            latency_ms=_elapsed_ms(started),
            sent_at_ms=self._clock.now_ms(),
        )

    async def _fetch_token(self, grant: OAuth2ClientCredentials, tls: ClientTls | None) -> Token:
        """POST the grant to its token endpoint, as a webhook request goes: guard, proxy.

        AuthFailed for an answer without a token; DeliveryRefused, TimeoutError and
        http1's exceptions as they come.
        """
        pool = self._pool
        if pool is None:
            raise RuntimeError("HttpTransport used outside 'async with'")
        deadline = asyncio.get_running_loop().time() + self._settings.total_timeout_s
        try:
            origin, target, _ = split_url(grant.token_url)
            context = token_endpoint_context(tls)
        except ValueError as exc:
            raise AuthFailed(f"cannot be used: {exc}") from None
        route = origin.key if context is None else f"{origin.key} token{id(context)}"
        if self._proxy is not None:
            route = f"{route} via {self._proxy}"
        conn = pool.take_idle(route)
        vetted: list[str] | None = None
        if conn is None and self._guarded:
            async with asyncio.timeout_at(deadline):
                vetted = await check_url(grant.token_url, self._resolver, self._allowed)
        headers, body = grant.token_request()
        lines = [f"Host: {origin.host_header}", f"User-Agent: {self._user_agent}"]
        lines += ["Accept-Encoding: identity", *(f"{k}: {v}" for k, v in headers.items())]
        proxy = self._proxy
        if proxy is not None and origin.scheme == "http":
            if conn is None:
                conn = await pool.connect(origin, deadline, vetted, key=route, proxy=proxy)
            target = f"http://{conn.authority}{target}"
            if proxy.authorization is not None:
                lines.append(f"Proxy-Authorization: {proxy.authorization}")
        lines.append(f"Content-Length: {len(body)}")
        head = f"POST {target} HTTP/1.1\r\n" + "\r\n".join(lines) + "\r\n\r\n"
        response = await pool.request(
            origin,
            (head.encode(), body),
            deadline=deadline,
            cap=MAX_RESPONSE_BYTES,
            conn=conn,
            addresses=vetted,
            key=route,
            tls=context,
            proxy=proxy,
        )
        if not response.complete:
            raise AuthFailed(f"the token endpoint's answer (HTTP {response.status}) was cut short")
        return parse_token_response(response.status, response.body)

    def _clean(self, message: str, request: RenderedRequest, secrets: tuple[str, ...]) -> str:
        """An outcome's error text: no secret in it, no control character from a receiver."""
        return escape_controls(scrub(_scrub(message, request), secrets))

    def _head(
        self,
        origin: Origin,
        target: str,
        auth: str | None,
        strong: bool,
        proxy_auth: str | None,
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
            strong,
            proxy_auth,
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

    def _from_response(
        self, response: Response, latency_ms: float, sent_at_ms: int, secrets: tuple[str, ...]
    ) -> Outcome:
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
            # What the receiver wrote: no secret it echoes, no control character.
            error = escape_controls(scrub(error, secrets))
            retry_after = response.headers.get("retry-after")
            if status in RETRY_AFTER_STATUSES and retry_after is not None:
                retry_after_s = parse_retry_after(retry_after, self._clock.now_ms())
        body = response.body
        excerpt = _excerpt(body)
        if secrets and excerpt is not None:
            excerpt = scrub(excerpt, secrets)
        return Outcome(
            error_class=error_class,
            http_status=status,
            error=error,
            latency_ms=latency_ms,
            sent_at_ms=sent_at_ms,
            retry_after_s=retry_after_s,
            response_excerpt=excerpt,
            response_bytes=len(body),
            response_truncated=not response.complete and len(body) >= MAX_RESPONSE_BYTES,
        )

    def _translate(self, exc: Exception) -> tuple[str, str]:
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
        if isinstance(exc, ProxyRefused):
            return "connection_error", str(exc)
        if isinstance(exc, ServerDisconnected):
            return "connection_error", str(exc)
        if isinstance(exc, ConnectionResetError):
            if isinstance(exc.__context__, ssl.SSLError):
                return "connection_error", f"TLS error: {exc.__context__}"
            return "connection_error", f"connection reset: {exc}"
        if isinstance(exc, ssl.SSLError):
            return "connection_error", f"TLS error: {exc}"
        if isinstance(exc, BadResponse):
            return "connection_error", f"invalid HTTP response: {exc}"
        if isinstance(exc, OSError):
            return "connection_error", f"{type(exc).__name__}: {exc}"
        return "connection_error", f"unexpected {type(exc).__name__}: {exc}"


# Headers the transport writes itself; a template's are dropped (the config
# refuses them; a User-Agent of the template replaces ours instead).
_OWN_HEADERS = frozenset(
    {
        "host",
        "accept-encoding",
        "content-length",
        "transfer-encoding",
        "connection",
        "proxy-authorization",
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
    strong: bool,
    proxy_auth: str | None,
    has_body: bool,
    template_headers: tuple[tuple[str, str], ...],
    user_agent: str,
) -> tuple[str, str]:
    """The header lines before ``webhook-id`` (Host, the template's, ours) and those
    after ``webhook-signature`` (Authorization, Accept, Content-Type), checked. A
    template's User-Agent, Accept and Content-Type replace ours.

    ``auth``: the Authorization value; with ``strong`` (the webhook's auth) it
    replaces a template's Authorization header, else (the URL's user:pass) a
    template's wins. ``proxy_auth``: Proxy-Authorization, for absolute-form
    requests through a proxy. The same for every request of a webhook to one
    origin, so remembered; the arguments are what they depend on. ValueError
    names a header we cannot send.
    """
    before: list[tuple[str, str]] = []
    given: set[str] = set()
    for name, value in template_headers:
        lower = name.lower()
        if lower.startswith("webhook-") or lower in _OWN_HEADERS:
            continue
        if strong and lower == "authorization":
            continue
        given.add(lower)
        before.append((name, value))
    if "user-agent" not in given:
        before.append(("User-Agent", user_agent))
    before.append(("Accept-Encoding", "identity"))
    after: list[tuple[str, str]] = []
    if auth is not None and "authorization" not in given:
        after.append(("Authorization", auth))
    if proxy_auth is not None:
        after.append(("Proxy-Authorization", proxy_auth))
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


@functools.lru_cache(maxsize=256)
def _with_token(secrets: tuple[str, ...], token: str) -> tuple[str, ...]:
    """An endpoint's texts to scrub and an OAuth2 access token's, made once per token."""
    return scrub_list({*secrets, token})


@functools.lru_cache(maxsize=1024)
def _with_url(secrets: tuple[str, ...], url: str, own: tuple[str, ...]) -> tuple[str, ...]:
    """An endpoint's texts to scrub, its URL's password and the proxy's, made once."""
    return scrub_list({*secrets, *_url_secrets(url), *own})


@functools.lru_cache(maxsize=256)
def _url_secrets(url: str) -> tuple[str, ...]:
    """The password of a URL's user:pass (as written and decoded) and its Basic value."""
    try:
        _, _, auth = split_url(url)
        password = urlsplit(url).password
    except ValueError:
        return ()
    if not password:
        return () if auth is None else (auth, auth.removeprefix("Basic "))
    return (password, unquote(password), *(() if auth is None else (auth, auth[6:])))
