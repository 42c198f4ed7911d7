"""Receiver authentication: Basic, Bearer, and OAuth2 client-credentials tokens.

``BasicAuth`` and ``BearerAuth`` are an ``Authorization`` value made once per
config snapshot. ``OAuth2ClientCredentials`` gets a token from its token
endpoint (RFC 6749 §4.4); ``OAuth2Tokens`` caches it, shares one token request
among all deliveries that need it at the same time, and forgets a token the
receiver refused. The HTTP exchange with the token endpoint is
``oauth2.OAuth2Exchange``'s (the way the transport's requests go: SSRF guard,
proxy, TLS); this module builds the request and reads the answer.

No secret (password, token, client secret) appears in a ``repr`` or an error.
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar
from urllib.parse import quote_plus, urlencode

import orjson

from crmhooks.clock import Clock
from crmhooks.errors import AuthFailed

# A token is used until this long before it expires. Its lifetime is counted from
# when we asked for it (it was issued later), and a request made just before the
# end must still be accepted on arrival: 60 s covers an attempt's whole
# total_timeout_s (15 s by default) and the usual clock skew between the token
# server and the receiver (token libraries allow 0-60 s of leeway).
EXPIRY_MARGIN_S = 60.0
# ... but never more than half a lifetime, or a 60 s token would never be used.
EXPIRY_MARGIN_SHARE = 0.5
# A token endpoint that gives no expires_in (RFC 6749 makes it optional): the
# token is asked for again after this long. A receiver that refuses it earlier
# (401) gets a new one anyway.
DEFAULT_TOKEN_LIFETIME_S = 300.0
# Enough of an error_description to tell an operator what the token server said.
DESCRIPTION_CHARS = 200
# RFC 9110 §5.5: these end a header line; a token holding one is never sent.
_HEADER_BREAKERS = frozenset("\r\n\0")


@dataclass(frozen=True, slots=True)
class BasicAuth:
    """HTTP Basic authentication (RFC 7617), UTF-8."""

    username: str
    password: str = field(repr=False)
    header: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if ":" in self.username:
            raise ValueError("a Basic auth username cannot contain ':'")
        credentials = f"{self.username}:{self.password}".encode()
        object.__setattr__(self, "header", "Basic " + base64.b64encode(credentials).decode())

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.password, self.header, self.header.removeprefix("Basic "))


@dataclass(frozen=True, slots=True)
class BearerAuth:
    """A fixed bearer token (RFC 6750)."""

    token: str = field(repr=False)
    header: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "header", f"Bearer {self.token}")

    def __repr__(self) -> str:
        return "BearerAuth(token=***)"

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.token,)


@dataclass(frozen=True, slots=True)
class OAuth2ClientCredentials:
    """An OAuth2 client-credentials grant (RFC 6749 §4.4).

    ``client_auth``: how the client authenticates to the token endpoint. "basic"
    (the default: HTTP Basic with the form-encoded id and secret, RFC 6749
    §2.3.1, which every token server must support) or "body" (``client_id`` and
    ``client_secret`` as form fields, for servers that accept only that).
    ``audience`` is sent as a form field (Auth0 and others want it).
    """

    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    scope: str | None = None
    audience: str | None = None
    client_auth: Literal["basic", "body"] = "basic"
    # What the token cache is keyed by: the same grant in a reloaded config keeps its token.
    key: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.client_auth not in ("basic", "body"):
            raise ValueError(f"client_auth must be basic or body, not {self.client_auth!r}")
        key = (self.token_url, self.client_id, self.client_secret, self.scope or "")
        object.__setattr__(self, "key", (*key, self.audience or "", self.client_auth))

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.client_secret,)

    def token_request(self) -> tuple[dict[str, str], bytes]:
        """The token request's headers (besides Host, User-Agent, Content-Length) and body."""
        form = [("grant_type", "client_credentials")]
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        if self.client_auth == "basic":
            pair = f"{_form(self.client_id)}:{_form(self.client_secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form += [("client_id", self.client_id), ("client_secret", self.client_secret)]
        if self.scope:
            form.append(("scope", self.scope))
        if self.audience:
            form.append(("audience", self.audience))
        return headers, urlencode(form).encode("ascii")


Auth = BasicAuth | BearerAuth | OAuth2ClientCredentials


def _form(value: str) -> str:
    return quote_plus(value, safe="")


@dataclass(frozen=True, slots=True)
class Token:
    """An access token and how long it lives, as the token endpoint said."""

    value: str = field(repr=False)
    lifetime_s: float


def parse_token_response(status: int, body: bytes) -> Token:
    """The token of a token endpoint's answer; AuthFailed saying what is wrong with it."""
    doc: object
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if not 200 <= status < 300:
        detail = ""
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            detail = f" ({doc['error']}"
            description = doc.get("error_description")
            if isinstance(description, str) and description:
                detail += f": {description[:DESCRIPTION_CHARS]}"
            detail += ")"
        raise AuthFailed(f"the token endpoint answered HTTP {status}{detail}")
    if not isinstance(doc, dict):
        raise AuthFailed("the token endpoint's answer is not a JSON object")
    value = doc.get("access_token")
    if not isinstance(value, str) or not value:
        raise AuthFailed("the token endpoint's answer has no access_token")
    if _HEADER_BREAKERS.intersection(value):
        raise AuthFailed("the token endpoint's access_token holds CR/LF/NUL")
    token_type = doc.get("token_type")
    if token_type is not None and (
        not isinstance(token_type, str) or token_type.lower() != "bearer"
    ):
        # RFC 6749 §7.1: a client must not use a token type it does not understand.
        raise AuthFailed(f"the token endpoint's token_type {token_type!r} is not Bearer")
    return Token(value, _lifetime_s(doc.get("expires_in")))


def _lifetime_s(expires_in: object) -> float:
    if isinstance(expires_in, str):
        try:
            expires_in = float(expires_in)
        except ValueError:
            return DEFAULT_TOKEN_LIFETIME_S
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
        return DEFAULT_TOKEN_LIFETIME_S
    if not math.isfinite(expires_in) or expires_in <= 0:
        return DEFAULT_TOKEN_LIFETIME_S
    return float(expires_in)


@dataclass(slots=True)
class _Entry:
    token: str = field(repr=False)
    header: str = field(repr=False)  # "Bearer <token>"
    use_until_ms: int = 0


# What the transport needs to reach a token endpoint besides the grant (its TLS).
Via = TypeVar("Via")


class OAuth2Tokens(Generic[Via]):
    """Tokens of client-credentials grants, cached and fetched once for all who wait.

    ``header`` returns ``Bearer <token>`` from the cache while the token is good
    (until ``EXPIRY_MARGIN_S`` before it expires, by ``clock``); otherwise it
    starts one fetch for the grant, which every delivery asking meanwhile awaits
    (single flight). A failed fetch fails all who waited for it and is not
    remembered: the next delivery asks again. ``refused`` forgets a token a
    receiver answered 401 to, unless a newer one already replaced it.
    """

    def __init__(
        self, clock: Clock, fetch: Callable[[OAuth2ClientCredentials, Via], Awaitable[Token]]
    ) -> None:
        self._clock = clock
        self._fetch = fetch
        self._cache: dict[tuple[str, ...], _Entry] = {}
        self._fetching: dict[tuple[str, ...], asyncio.Future[_Entry]] = {}
        self.fetches = 0  # token requests started, for tests and the operator

    def __repr__(self) -> str:
        return f"OAuth2Tokens(cached={len(self._cache)}, fetching={len(self._fetching)})"

    def cached(self, grant: OAuth2ClientCredentials) -> tuple[str, str] | None:
        """(token, ``Bearer <token>``) while the cached token is good, else None.

        No coroutine, no timer: what almost every delivery of an OAuth2 webhook does.
        """
        entry = self._cache.get(grant.key)
        if entry is not None and self._clock.now_ms() < entry.use_until_ms:
            return entry.token, entry.header
        return None

    async def header(self, grant: OAuth2ClientCredentials, via: Via) -> tuple[str, str]:
        """(token, ``Bearer <token>``); AuthFailed (or what ``fetch`` raised) if none.

        ``via`` is passed to ``fetch`` when a token must be fetched.
        """
        entry = self._cache.get(grant.key)
        if entry is not None and self._clock.now_ms() < entry.use_until_ms:
            return entry.token, entry.header
        pending = self._fetching.get(grant.key)
        if pending is None:
            pending = asyncio.ensure_future(self._refresh(grant, via))
            self._fetching[grant.key] = pending
            # Retrieved here too: when every waiter gave up, a failure is not "never retrieved".
            pending.add_done_callback(_retrieve)
        # Shielded: one waiter's deadline must not cancel the fetch the others await.
        entry = await asyncio.shield(pending)
        return entry.token, entry.header

    def refused(self, grant: OAuth2ClientCredentials, token: str) -> None:
        """The receiver refused ``token`` (401): the next ``header`` fetches a new one."""
        entry = self._cache.get(grant.key)
        if entry is not None and entry.token == token:
            del self._cache[grant.key]

    async def _refresh(self, grant: OAuth2ClientCredentials, via: Via) -> _Entry:
        self.fetches += 1
        asked_ms = self._clock.now_ms()
        try:
            token = await self._fetch(grant, via)
        finally:
            del self._fetching[grant.key]
        margin_s = min(EXPIRY_MARGIN_S, token.lifetime_s * EXPIRY_MARGIN_SHARE)
        use_until_ms = asked_ms + int((token.lifetime_s - margin_s) * 1000)
        entry = _Entry(token.value, f"Bearer {token.value}", use_until_ms)
        self._cache[grant.key] = entry
        return entry


def _retrieve(future: asyncio.Future[_Entry]) -> None:
    if not future.cancelled():
        future.exception()
