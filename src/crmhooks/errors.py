"""The one error tree of crmhooks; each class says whether retrying can help.

    CrmhooksError                 root; ``retriable`` says if a retry may succeed
    ├── ConfigError               the config file is invalid (lists every error)
    ├── InvalidEvent              a record event that cannot be processed (poison pill)
    ├── TemplateError             a webhook cannot be rendered (bad header, CR/LF in URL, ...)
    ├── StoreError                the SQLite store failed
    ├── KafkaIOError              Kafka failed (aiokafka errors are translated in kafka_io)
    │   └── ProduceError          a produce was not acknowledged (retriable)
    │       └── RecordsTooLarge   the broker refused records as too large for their topic
    ├── DeliveryRefused           delivery refused before any connection (SSRF guard)
    ├── AuthFailed                no OAuth2 token from the token endpoint (retriable)
    └── AdminError                the admin endpoint cannot listen (address in use, bad address)

Third-party exceptions (aiohttp, aiokafka, sqlite3) are translated once, in the
module that talks to them (outcomes, for delivery; kafka_io, store).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class CrmhooksError(Exception):
    """Root of every crmhooks error."""

    retriable: bool = False


class ConfigError(CrmhooksError):
    """The configuration is invalid; ``errors`` lists each problem, naming its item."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors: tuple[str, ...] = tuple(errors)
        super().__init__("\n".join(self.errors))


class InvalidEvent(CrmhooksError):
    """A record event that cannot be processed: dead-lettered, never retried.

    ``parsed`` is the event as a JSON object when the bytes parsed as one, so the
    dead letter can carry it as ``event``; otherwise the dead letter carries ``raw``.
    """

    def __init__(self, message: str, parsed: dict[str, Any] | None = None) -> None:
        self.message = message
        self.parsed = parsed
        super().__init__(message)


class TemplateError(CrmhooksError):
    """A webhook request could not be rendered (internal process error).

    ``problems`` lists every problem found (the message is the first), so that a
    config check can name them all at once.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)


class StoreError(CrmhooksError):
    """The durable store failed."""

    retriable = True


class KafkaIOError(CrmhooksError):
    """Talking to Kafka failed."""

    retriable = True


class ProduceError(KafkaIOError):
    """A record was not acknowledged by the broker."""


class RecordsTooLarge(ProduceError):
    """The broker refused ``records`` (topic, key, value) as larger than their topic
    takes: sending them again cannot help. The other records were acknowledged."""

    retriable = False

    def __init__(self, message: str, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        super().__init__(message)
        self.records = list(records)


class DeliveryRefused(CrmhooksError):
    """A request refused before any connection was made (``ssrf_blocked``)."""


class AuthFailed(CrmhooksError):
    """The token endpoint gave no usable token (the attempt's ``auth_error``)."""

    retriable = True


class AdminError(CrmhooksError):
    """The admin endpoint (``[admin] listen``) cannot serve: a bad address, or it is taken."""
