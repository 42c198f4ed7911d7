"""OAuth2 client credentials in an attempt: a token fetched, cached, and replaced once if refused.

The grant, the token request and answer, and the cache are ``auth``'s; this module
makes the token request the way a webhook request goes (SSRF guard, proxy, the
transport's pool), and makes the attempts that need a new token (SPEC §6).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec

from crmhooks.auth import OAuth2ClientCredentials, OAuth2Tokens, Token, parse_token_response
from crmhooks.clock import Clock
from crmhooks.config import DeliverySettings
from crmhooks.endpoints import ClientTls, Endpoint, token_endpoint_context
from crmhooks.errors import AuthFailed, DeliveryRefused
from crmhooks.http1 import Http1Pool, Proxy
from crmhooks.netguard import AllowedNetworks, Resolver, check_url
from crmhooks.outcomes import (
    MAX_RESPONSE_BYTES,
    Outcome,
    clean,
    elapsed_ms,
    not_sent,
    translate,
    with_token,
)
from crmhooks.request_head import USER_AGENT, split_url
from crmhooks.templates import RenderedRequest


class Exchange(Protocol):
    """One exchange of the attempt, made by the transport."""

    def __call__(
        self, *, auth: str, secrets: tuple[str, ...], deadline: float
    ) -> Awaitable[Outcome]:
        """``auth``: the Authorization value; ``secrets``: the texts to scrub;
        ``deadline``: the attempt's (loop time)."""
        ...


class OAuth2Exchange:
    """The tokens of ``HttpTransport``'s OAuth2 webhooks, and the attempts needing a new one.

    ``tokens`` is the cache: the transport tries a good cached token itself
    (``tokens.cached``), as one exchange without auth (no coroutine, timer or clock
    read more); ``attempt`` is for the rest. ``pool`` gives the transport's pool (None
    while it is not entered); ``resolver`` vets a token endpoint's addresses with
    the guard on, as a webhook's; ``proxy`` is the transport's.
    """

    def __init__(
        self,
        settings: DeliverySettings,
        clock: Clock,
        pool: Callable[[], Http1Pool | None],
        *,
        resolver: Resolver,
        allowed: AllowedNetworks,
        proxy: Proxy | None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._pool = pool
        self._guarded = not settings.allow_private_networks
        self._resolver = resolver
        self._allowed = allowed
        self._proxy = proxy
        self.tokens: OAuth2Tokens[ClientTls | None] = OAuth2Tokens(clock, self._fetch_token)

    def __repr__(self) -> str:
        return f"OAuth2Exchange({self.tokens!r})"

    @property
    def fetches(self) -> int:
        """OAuth2 token requests started since the start."""
        return self.tokens.fetches

    async def attempt(
        self,
        grant: OAuth2ClientCredentials,
        endpoint: Endpoint,
        request: RenderedRequest,
        secrets: tuple[str, ...],
        cached: tuple[str, str] | None,
        refused: Outcome | None,
        exchange: Exchange,
    ) -> Outcome:
        """The attempt with a new token (SPEC §6): none was cached, or the receiver
        answered ``refused`` (401) to the ``cached`` one. A 401 to a new token gets
        one more token and one more try; all within the attempt's ``total_timeout_s``.
        """
        tries = 2
        started = time.perf_counter()
        if cached is not None and refused is not None:
            self.tokens.refused(grant, cached[0])
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
            outcome = await exchange(
                auth=header, secrets=with_token(secrets, token), deadline=deadline
            )
            if outcome.http_status != 401:
                break
            self.tokens.refused(grant, token)
        assert outcome is not None
        return msgspec.structs.replace(outcome, latency_ms=elapsed_ms(started))

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
                return await self.tokens.header(grant, endpoint.tls)
        except DeliveryRefused as exc:
            message = f"token endpoint {grant.token_url}: {exc}"
            return not_sent("ssrf_blocked", clean(message, request, secrets), started)
        except AuthFailed as exc:
            message = str(exc)
        except TimeoutError:
            message = f"no answer within {timeout_s} s"
        except Exception as exc:
            message = translate(exc, self._settings)[1]
        # sent_at: the token request went out; the attempt counts (and is retried).
        return Outcome(
            error_class="auth_error",
            http_status=None,
            error=clean(f"token endpoint {grant.token_url}: {message}", request, secrets),
            latency_ms=elapsed_ms(started),
            sent_at_ms=self._clock.now_ms(),
        )

    async def _fetch_token(self, grant: OAuth2ClientCredentials, tls: ClientTls | None) -> Token:
        """POST the grant to its token endpoint, as a webhook request goes: guard, proxy.

        AuthFailed for an answer without a token; DeliveryRefused, TimeoutError and
        http1's exceptions as they come.
        """
        pool = self._pool()
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
        lines = [f"Host: {origin.host_header}", f"User-Agent: {USER_AGENT}"]
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
