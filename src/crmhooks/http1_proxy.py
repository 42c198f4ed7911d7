"""An HTTP forward proxy: its URL, and the answer to a CONNECT read before the tunnel."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import unquote, urlsplit

# A proxy's answer to CONNECT is a status line and a few headers.
MAX_CONNECT_HEAD_BYTES = 16 * 1024


class ProxyRefused(Exception):
    """The proxy answered CONNECT with something else than 2xx (or with no HTTP)."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP forward proxy (``[delivery] proxy``), e.g. ``http://proxy.internal:3128``.

    Credentials in the URL (``http://user:pass@proxy:3128``) are sent as
    ``Proxy-Authorization: Basic``.
    """

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)  # to scrub from texts

    @classmethod
    def from_url(cls, url: str) -> Proxy:
        """ValueError saying what is wrong with ``url``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "http":
            raise ValueError(f"proxy {parts.scheme or url!r}: only http:// proxies are supported")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("a proxy URL is http://host:port, without a path")
        if not parts.hostname:
            raise ValueError("the proxy URL has no host")
        port = parts.port or 80  # ValueError when out of range
        authorization = password = None
        if parts.username is not None:
            password = unquote(parts.password or "")
            pair = f"{unquote(parts.username)}:{password}".encode()
            authorization = "Basic " + base64.b64encode(pair).decode("ascii")
        return cls(parts.hostname, port, authorization, password or None)

    @property
    def key(self) -> str:
        return f"proxy {self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class ConnectSetup(asyncio.Protocol):
    """A connection to a proxy until its answer to CONNECT: reads that answer's head."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.answer.done():  # the proxy talks before our TLS hello: not a tunnel
            if self.transport is not None:
                self.transport.abort()
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end == -1:
            if len(self._buffer) > MAX_CONNECT_HEAD_BYTES:
                self.answer.set_exception(ProxyRefused("the proxy's answer is too large"))
            return
        if end + 4 != len(self._buffer):
            # Bytes after the head of a 2xx would be the target's, before our TLS
            # hello: a proxy that does not tunnel.
            self.answer.set_exception(ProxyRefused("the proxy sent data after its answer"))
            return
        status_line = self._buffer[: self._buffer.find(b"\r\n")].decode("latin-1")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not (code.isascii() and code.isdigit()):
            self.answer.set_exception(ProxyRefused("the proxy's answer is not HTTP"))
            return
        self.answer.set_result((int(code), reason))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ProxyRefused("the proxy closed the connection"))
