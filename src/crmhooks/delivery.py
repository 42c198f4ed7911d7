"""HTTP delivery: one shared aiohttp session, SSRF guard, signing, outcome classes."""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from crmhooks.clock import Clock
from crmhooks.config import DeliverySettings
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
        "connection_error",
        "ssrf_blocked",
    }
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt of one action came to."""

    error_class: str | None  # None: delivered (2xx)
    http_status: int | None
    error: str | None  # human-readable, e.g. "HTTP 503: Service Unavailable"
    latency_ms: float
    sent_at_ms: int | None  # None when nothing was sent (ssrf_blocked)
    retry_after_s: float | None = None  # Retry-After of a 429/503, seconds
    response_excerpt: str | None = None  # first bytes of the response body, decoded

    @property
    def delivered(self) -> bool:
        return self.error_class is None


class Transport(Protocol):
    """Sends one rendered request for one action and classifies the result."""

    async def send(
        self, action_id: str, request: RenderedRequest, secret: str | None
    ) -> Outcome: ...


class HttpTransport:
    """The real transport (aiohttp). Use as ``async with HttpTransport(...) as t``."""

    def __init__(self, settings: DeliverySettings, clock: Clock) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> HttpTransport:
        raise NotImplementedError

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        raise NotImplementedError

    async def send(self, action_id: str, request: RenderedRequest, secret: str | None) -> Outcome:
        raise NotImplementedError
