"""Real network parts for the delivery tests: a test CA, TLS receivers, a forward proxy.

Everything listens on 127.0.0.1 with an OS-chosen port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Pki:
    """A CA made at test time, a server certificate and a client certificate, as files."""

    ca: trustme.CA
    ca_file: str
    client_cert_file: str
    client_key_file: str
    server: trustme.LeafCert

    def server_context(self, *, require_client_cert: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(context)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(context)
        return context


def make_pki(directory: Path, *server_names: str) -> Pki:
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("crmhooks-client@example.test")
    cert_file, key_file = directory / "client.pem", directory / "client.key"
    for blob in client.cert_chain_pems:
        blob.write_to_path(str(cert_file), append=True)
    client.private_key_pem.write_to_path(str(key_file))
    server = ca.issue_cert(*(server_names or ("127.0.0.1",)))
    return Pki(ca, str(ca_file), str(cert_file), str(key_file), server)


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes
    peer_cert: dict[str, object] | None


@dataclass
class Recorder:
    """An aiohttp receiver recording each request; ``answer`` decides the response."""

    answer: Handler | None = None
    seen: list[Seen] = field(default_factory=list)
    server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        self.seen.append(
            Seen(
                request.path_qs,
                dict(request.headers),
                await request.read(),
                ssl_object.getpeercert() if ssl_object is not None else None,
            )
        )
        if self.answer is not None:
            return await self.answer(request)
        return web.Response(text="ok")

    port: int = 0


@contextlib.asynccontextmanager
async def recorder(
    answer: Handler | None = None, *, tls: ssl.SSLContext | None = None
) -> AsyncIterator[Recorder]:
    rec = Recorder(answer)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    rec.server = TestServer(app, host="127.0.0.1", port=0)
    await rec.server.start_server(ssl=tls)
    assert rec.server.port is not None
    rec.port = rec.server.port
    try:
        yield rec
    finally:
        await rec.server.close()


class ForwardProxy:
    """A small HTTP forward proxy: CONNECT tunnels and absolute-form requests.

    ``names`` resolves the host names it is asked for (a real proxy would use
    DNS); it reaches only 127.0.0.1. ``lines`` records each request line it
    got, ``headers`` each request's head. ``refuse`` answers every CONNECT with
    403. Absolute-form requests are forwarded one at a time on a connection of
    their own to the target, with the request line in origin form.
    """

    def __init__(self, names: dict[str, str] | None = None) -> None:
        self.names = names or {}
        self.lines: list[str] = []
        self.heads: list[str] = []
        self.connections = 0
        self.refuse = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _address(self, authority: str) -> tuple[str, int]:
        host, _, port = authority.rpartition(":")
        host = host.strip("[]")
        return self.names.get(host, host), int(port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                try:
                    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.heads.append(head)
                line = head.split("\r\n", 1)[0]
                self.lines.append(line)
                method, target, _ = line.split(" ", 2)
                if method == "CONNECT":
                    await self._tunnel(target, reader, writer)
                    return
                await self._forward(method, target, head, reader, writer)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _tunnel(
        self, authority: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        host, port = self._address(authority)
        if self.refuse or host != "127.0.0.1":
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        up_reader, up_writer = await asyncio.open_connection(host, port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def _forward(
        self,
        method: str,
        target: str,
        head: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        assert target.startswith("http://"), target
        authority, slash, path = target[len("http://") :].partition("/")
        host, port = self._address(authority)
        length = 0
        for header in head.split("\r\n")[1:]:
            if header.lower().startswith("content-length:"):
                length = int(header.split(":", 1)[1])
        body = await reader.readexactly(length)
        rest = head.split("\r\n", 1)[1]
        up_reader, up_writer = await asyncio.open_connection(host, port)
        up_writer.write(f"{method} {slash}{path} HTTP/1.1\r\n{rest}".encode("latin-1") + body)
        await up_writer.drain()
        answer = await up_reader.readuntil(b"\r\n\r\n")
        answer_length = 0
        for header in answer.decode("latin-1").split("\r\n")[1:]:
            if header.lower().startswith("content-length:"):
                answer_length = int(header.split(":", 1)[1])
        answer += await up_reader.readexactly(answer_length)
        up_writer.close()
        writer.write(answer)
        await writer.drain()
