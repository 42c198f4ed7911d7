"""HTTP delivery: the transport, one attempt of an action's request within its slots.

An attempt: the SSRF guard, the route (the endpoint's TLS identity, the proxy),
the head (``request_head``), auth (Basic, Bearer, OAuth2: ``oauth2``), the
exchange on a connection of ``http1``'s pool. Connections and the wire are
``http1``'s; its exceptions, and the OS's, are translated into an ``Outcome``
(``outcomes``) and never escape ``HttpTransport.send``. Every text an Outcome
carries is scrubbed of the endpoint's secrets and has the receiver's control
characters escaped.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from crmhooks.aio import Slots
from crmhooks.auth import OAuth2ClientCredentials
from crmhooks.clock import Clock
from crmhooks.config import DeliverySettings
from crmhooks.endpoints import ClientTls, Endpoint, scrub, scrub_list
from crmhooks.errors import DeliveryRefused
from crmhooks.http1 import Http1Pool, Origin, Proxy
from crmhooks.netguard import AllowedNetworks, Resolver, SystemResolver, check_url
from crmhooks.oauth2 import OAuth2Exchange
from crmhooks.outcomes import (
    ERROR_CLASSES,
    MAX_RESPONSE_BYTES,
    MAX_RETRY_AFTER_S,
    Outcome,
    classify_status,
    clean,
    elapsed_ms,
    failed,
    from_response,
    not_sent,
    parse_retry_after,
    with_token,
    with_url,
)
from crmhooks.request_head import request_head, split_url
from crmhooks.templates import RenderedRequest

# Names importers found here before outcomes.py and request_head.py.
__all__ = [
    "ERROR_CLASSES",
    "MAX_RESPONSE_BYTES",
    "MAX_RETRY_AFTER_S",
    "HttpTransport",
    "Outcome",
    "Transport",
    "classify_status",
    "parse_retry_after",
    "split_url",
]

log = logging.getLogger(__name__)


class Transport(Protocol):
    """Sends one rendered request for one action and classifies the result."""

    async def send(self, action_id: str, request: RenderedRequest, endpoint: Endpoint) -> Outcome:
        """``endpoint``: the webhook's signing secret, auth, TLS and secrets to scrub."""
        ...


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
        self._oauth2 = OAuth2Exchange(
            settings,
            clock,
            lambda: self._pool,
            resolver=self._resolver,
            allowed=self._allowed,
            proxy=self._proxy,
        )

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
        return self._oauth2.fetches

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
                outcome = not_sent(
                    "connection_error",
                    clean(f"invalid URL {request.redacted_url}: {exc}", request, secrets),
                    time.perf_counter(),
                )
            else:
                if auth is not None or self._own_secrets:
                    # The URL's password, the proxy's: out of texts as the endpoint's are.
                    secrets = with_url(secrets, request.url, self._own_secrets)
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
                            # coroutine, timer or clock read more); see OAuth2Exchange.
                            cached = self._oauth2.tokens.cached(grant)
                            first: Outcome | None = None
                            if cached is not None:
                                first = await self._attempt(
                                    pool, origin, route, target, cached[1], action_id, request,
                                    endpoint, with_token(secrets, cached[0]), strong=True,
                                )  # fmt: skip
                            if first is not None and first.http_status != 401:
                                outcome = first
                            else:
                                # A partial, not a lambda: a lambda would make these
                                # locals cells on every request (+3 % instructions).
                                exchange = functools.partial(
                                    self._attempt, pool, origin, route, target,
                                    action_id=action_id, request=request, endpoint=endpoint,
                                    strong=True,
                                )  # fmt: skip
                                outcome = await self._oauth2.attempt(
                                    grant, endpoint, request, secrets, cached, first, exchange
                                )
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
                error=clean(f"unexpected {type(exc).__name__}: {exc}", request, secrets),
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
                return not_sent("ssrf_blocked", clean(str(exc), request, secrets), started)
            except TimeoutError:
                return not_sent(
                    "timeout",
                    f"DNS lookup timed out after {settings.total_timeout_s} s",
                    started,
                )
            except OSError as exc:
                message = clean(f"DNS lookup failed: {exc}", request, secrets)
                return not_sent("connection_error", message, started)
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
            head = request_head(
                origin, target, auth, strong, proxy_auth, action_id, request, endpoint.secret,
                sent_at_ms // 1000,
            )  # fmt: skip
        except ValueError as exc:  # a secret that is not whsec_ base64, a CR in a header
            if conn is not None:
                pool.put_back(conn)
            message = clean(f"not sent: {exc}", request, secrets)
            return not_sent("connection_error", message, started)
        except Exception as exc:  # connecting to the proxy
            return failed(exc, request, secrets, started, sent_at_ms, settings)
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
            return failed(exc, request, secrets, started, sent_at_ms, settings)
        return from_response(response, elapsed_ms(started), sent_at_ms, secrets, self._clock)
