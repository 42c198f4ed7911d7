"""What one attempt came to: the Outcome, its class (SPEC §5), Retry-After, the excerpt.

An Outcome is made from a response (``from_response``) or from what stopped the
request: an exception of ``http1``'s or the OS's (``translate``, ``failed``), or
something never sent (``not_sent``). Every text an Outcome carries is scrubbed
of the endpoint's secrets and has the receiver's control characters escaped
(``clean``; the texts to scrub: ``with_url``, ``with_token``).
"""

from __future__ import annotations

import email.utils
import errno
import functools
import http
import socket
import ssl
import time
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

import msgspec

from crmhooks.clock import Clock
from crmhooks.config import DeliverySettings
from crmhooks.endpoints import escape_controls, scrub, scrub_list
from crmhooks.http1 import (
    BadResponse,
    ConnectFailed,
    ConnectTimeout,
    ProxyRefused,
    Response,
    ServerDisconnected,
)
from crmhooks.request_head import split_url
from crmhooks.templates import RenderedRequest

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


# A msgspec.Struct, as every value made once an attempt or more: built in C (see
# record_event.RecordEvent). gc=False: it holds scalars only.
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


def from_response(
    response: Response,
    latency_ms: float,
    sent_at_ms: int,
    secrets: tuple[str, ...],
    clock: Clock,
) -> Outcome:
    """The Outcome of a response; ``clock`` dates a Retry-After given as an HTTP-date."""
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
            retry_after_s = parse_retry_after(retry_after, clock.now_ms())
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


def translate(exc: Exception, settings: DeliverySettings) -> tuple[str, str]:
    """An exception of a request (http1's, or the OS's) → (error_class, sentence)."""
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


def failed(
    exc: Exception,
    request: RenderedRequest,
    secrets: tuple[str, ...],
    started: float,
    sent_at_ms: int,
    settings: DeliverySettings,
) -> Outcome:
    """The Outcome of a request that ``exc`` stopped once sent (or being sent)."""
    error_class, message = translate(exc, settings)
    return Outcome(
        error_class=error_class,
        http_status=None,
        error=clean(message, request, secrets),
        latency_ms=elapsed_ms(started),
        sent_at_ms=sent_at_ms,
    )


def not_sent(error_class: str, error: str, started: float) -> Outcome:
    """The Outcome of an attempt that sent nothing; ``started``: its ``time.perf_counter()``."""
    return Outcome(
        error_class=error_class,
        http_status=None,
        error=error,
        latency_ms=elapsed_ms(started),
        sent_at_ms=None,
    )


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.perf_counter()``)."""
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


def clean(message: str, request: RenderedRequest, secrets: tuple[str, ...]) -> str:
    """An outcome's error text: no secret in it, no control character from a receiver."""
    return escape_controls(scrub(_scrub(message, request), secrets))


@functools.lru_cache(maxsize=256)
def with_token(secrets: tuple[str, ...], token: str) -> tuple[str, ...]:
    """An endpoint's texts to scrub and an OAuth2 access token's, made once per token."""
    return scrub_list({*secrets, token})


@functools.lru_cache(maxsize=1024)
def with_url(secrets: tuple[str, ...], url: str, own: tuple[str, ...]) -> tuple[str, ...]:
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
