"""Receiver auth against real aiohttp receivers and a real OAuth2 token endpoint on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from crmhooks.auth import EXPIRY_MARGIN_S, BasicAuth, BearerAuth, OAuth2ClientCredentials
from crmhooks.clock import FakeClock
from crmhooks.config import DeliverySettings
from crmhooks.delivery import ERROR_CLASSES, HttpTransport
from crmhooks.endpoints import PLAIN, Endpoint
from crmhooks.templates import RenderedRequest
from tests.net_support import Handler, recorder

NOW_MS = 1_764_320_400_000
CLIENT_SECRET = "cl1ent-s3cret/+="


def settings(**overrides: object) -> DeliverySettings:
    values: dict[str, object] = {
        "allow_private_networks": True,
        "connect_timeout_s": 1.0,
        "total_timeout_s": 3.0,
        "max_in_flight_per_host": 64,
    }
    values.update(overrides)
    return DeliverySettings(**values)  # type: ignore[arg-type]


def post(url: str, headers: dict[str, str] | None = None) -> RenderedRequest:
    return RenderedRequest("POST", url, headers or {}, b'{"a": 1}', url)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        (BasicAuth("us er", "pä:ss"), basic("us er", "pä:ss")),
        (BearerAuth("t0ken.abc"), "Bearer t0ken.abc"),
    ],
)
async def test_basic_and_bearer_set_authorization(
    auth: BasicAuth | BearerAuth, expected: str
) -> None:
    async with recorder() as rec, HttpTransport(settings(), FakeClock(NOW_MS)) as transport:
        url = f"http://127.0.0.1:{rec.port}/hook"
        endpoint = Endpoint(auth=auth)
        # The webhook's auth replaces a template's Authorization and the URL's user:pass.
        for request in (
            post(url),
            post(url, {"Authorization": "Bearer from-template"}),
            post(f"http://u:p@127.0.0.1:{rec.port}/hook"),
        ):
            assert (await transport.send("a", request, endpoint)).delivered
    assert [s.headers["Authorization"] for s in rec.seen] == [expected] * 3


async def test_url_credentials_still_work_and_a_template_header_wins_over_them() -> None:
    async with recorder() as rec, HttpTransport(settings(), FakeClock(NOW_MS)) as transport:
        url = f"http://us%40er:p%3Aw@127.0.0.1:{rec.port}/hook"
        assert (await transport.send("a", post(url), PLAIN)).delivered
        assert (
            await transport.send("a", post(url, {"Authorization": "Bearer x"}), PLAIN)
        ).delivered
    assert [s.headers["Authorization"] for s in rec.seen] == [basic("us@er", "p:w"), "Bearer x"]


def test_auth_reprs_hold_no_secret() -> None:
    grant = OAuth2ClientCredentials("https://a.test/t", "id", CLIENT_SECRET)
    for value in (
        BasicAuth("user", "hunter22"),
        BearerAuth("tok-123456"),
        grant,
        Endpoint(secret="whsec_c2VjcmV0c2VjcmV0", auth=grant, scrub=frozenset({"k3y-value"})),
    ):
        text = repr(value)
        for secret in ("hunter22", "tok-123456", CLIENT_SECRET, "whsec_", "k3y-value"):
            assert secret not in text


@dataclass
class TokenServer:
    """A local OAuth2 token endpoint; ``mode`` chooses how it answers."""

    mode: str = "ok"
    expires_in: object = 3600
    issued: int = 0
    requests: list[tuple[dict[str, str], dict[str, list[str]]]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}/oauth/token"

    @property
    def current(self) -> str:
        return f"tok-{self.issued}"

    async def handle(self, request: web.Request) -> web.Response:
        form = parse_qs((await request.read()).decode())
        self.requests.append((dict(request.headers), form))
        if self.gate is not None:
            await self.gate.wait()
        if self.mode == "401":
            body = {"error": "invalid_client", "error_description": f"bad {CLIENT_SECRET}"}
            return web.json_response(body, status=401)
        if self.mode == "bad-json":
            return web.Response(text="<html>oops</html>")
        if self.mode == "no-token":
            return web.json_response({"token_type": "Bearer"})
        if self.mode == "mac":
            return web.json_response({"access_token": "m", "token_type": "mac"})
        self.issued += 1
        return web.json_response(
            {"access_token": self.current, "token_type": "bearer", "expires_in": self.expires_in}
        )


@pytest.fixture
async def tokens() -> AsyncIterator[TokenServer]:
    srv = TokenServer()
    app = web.Application()
    app.router.add_post("/oauth/token", srv.handle)
    srv.server = TestServer(app, host="127.0.0.1", port=0)
    await srv.server.start_server()
    try:
        yield srv
    finally:
        if srv.gate is not None:
            srv.gate.set()
        await srv.server.close()


def bearer_receiver(accepted: list[str]) -> Handler:
    """A receiver that accepts only ``Bearer <accepted[0]>``."""

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {accepted[0]}":
            return web.Response(status=401, text="who are you?")
        return web.Response(text="ok")

    return answer


def grant_for(
    tokens: TokenServer,
    client_auth: Literal["basic", "body"] = "basic",
    audience: str | None = None,
) -> OAuth2ClientCredentials:
    return OAuth2ClientCredentials(
        tokens.url, "crm hooks", CLIENT_SECRET, "hooks.write", audience, client_auth
    )


async def test_oauth2_one_token_request_for_concurrent_deliveries(tokens: TokenServer) -> None:
    accepted = ["tok-1"]
    tokens.gate = asyncio.Event()  # hold the token answer until every delivery waits
    async with (
        recorder(bearer_receiver(accepted)) as rec,
        HttpTransport(settings(), FakeClock(NOW_MS)) as transport,
    ):
        endpoint = Endpoint(auth=grant_for(tokens))
        url = f"http://127.0.0.1:{rec.port}/hook"
        sends = [
            asyncio.create_task(transport.send(f"a{n}", post(url), endpoint)) for n in range(20)
        ]
        for _ in range(200):  # bounded: until the one token request arrived
            if tokens.requests:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        tokens.gate.set()
        outcomes = await asyncio.gather(*sends)
        assert transport.token_requests == 1
    assert all(o.delivered for o in outcomes), outcomes
    assert len(tokens.requests) == 1
    headers, form = tokens.requests[0]
    # RFC 6749 §2.3.1: id and secret form-encoded, then HTTP Basic.
    assert headers["Authorization"] == basic("crm+hooks", "cl1ent-s3cret%2F%2B%3D")
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert form == {"grant_type": ["client_credentials"], "scope": ["hooks.write"]}
    assert {s.headers["Authorization"] for s in rec.seen} == {"Bearer tok-1"}
    assert len(rec.seen) == 20


async def test_oauth2_client_secret_in_the_body(tokens: TokenServer) -> None:
    grant = grant_for(tokens, client_auth="body", audience="https://api.test")
    async with recorder() as rec, HttpTransport(settings(), FakeClock(NOW_MS)) as transport:
        url = f"http://127.0.0.1:{rec.port}/hook"
        assert (await transport.send("a", post(url), Endpoint(auth=grant))).delivered
    headers, form = tokens.requests[0]
    assert "Authorization" not in headers
    assert form == {
        "grant_type": ["client_credentials"],
        "client_id": ["crm hooks"],
        "client_secret": [CLIENT_SECRET],
        "scope": ["hooks.write"],
        "audience": ["https://api.test"],
    }


async def test_oauth2_a_rotated_token_is_renewed_within_the_attempt(tokens: TokenServer) -> None:
    accepted = ["tok-1"]
    async with (
        recorder(bearer_receiver(accepted)) as rec,
        HttpTransport(settings(), FakeClock(NOW_MS)) as transport,
    ):
        endpoint = Endpoint(auth=grant_for(tokens))
        url = f"http://127.0.0.1:{rec.port}/hook"
        assert (await transport.send("a1", post(url), endpoint)).delivered
        accepted[0] = "tok-2"  # the receiver revoked tok-1
        outcome = await transport.send("a2", post(url), endpoint)
    assert outcome.delivered
    assert outcome.http_status == 200
    assert len(tokens.requests) == 2
    assert [(s.headers["webhook-id"], s.headers["Authorization"]) for s in rec.seen] == [
        ("a1", "Bearer tok-1"),
        ("a2", "Bearer tok-1"),
        ("a2", "Bearer tok-2"),
    ]


async def test_oauth2_a_second_401_fails_the_attempt_after_one_renewal(
    tokens: TokenServer,
) -> None:
    async with (
        recorder(bearer_receiver(["never"])) as rec,
        HttpTransport(settings(), FakeClock(NOW_MS)) as transport,
    ):
        url = f"http://127.0.0.1:{rec.port}/hook"
        outcome = await transport.send("a", post(url), Endpoint(auth=grant_for(tokens)))
    assert outcome.error_class == "unauthorized"
    assert outcome.error == "HTTP 401 Unauthorized"
    assert len(tokens.requests) == 2
    assert len(rec.seen) == 2


async def test_oauth2_token_expiry_with_the_injected_clock(tokens: TokenServer) -> None:
    tokens.expires_in = "120"  # some servers send a string
    clock = FakeClock(NOW_MS)
    usable_ms = int((120 - min(EXPIRY_MARGIN_S, 60)) * 1000)
    async with recorder() as rec, HttpTransport(settings(), clock) as transport:
        endpoint = Endpoint(auth=grant_for(tokens))
        url = f"http://127.0.0.1:{rec.port}/hook"
        assert (await transport.send("a", post(url), endpoint)).delivered
        clock.advance(usable_ms - 1)
        assert (await transport.send("b", post(url), endpoint)).delivered
        assert len(tokens.requests) == 1
        clock.advance(1)
        assert (await transport.send("c", post(url), endpoint)).delivered
        assert len(tokens.requests) == 2
    assert [s.headers["Authorization"] for s in rec.seen] == [
        "Bearer tok-1",
        "Bearer tok-1",
        "Bearer tok-2",
    ]


async def test_oauth2_token_endpoint_down_is_an_auth_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    grant = OAuth2ClientCredentials(f"http://127.0.0.1:{port}/token", "id", CLIENT_SECRET)
    async with recorder() as rec, HttpTransport(settings(), FakeClock(NOW_MS)) as transport:
        url = f"http://127.0.0.1:{rec.port}/hook"
        outcomes = await asyncio.gather(
            *(transport.send(f"a{n}", post(url), Endpoint(auth=grant)) for n in range(5))
        )
        assert transport.token_requests == 1  # the waiting deliveries shared the failure
    for outcome in outcomes:
        assert outcome.error_class == "auth_error"
        assert outcome.error == (
            f"token endpoint http://127.0.0.1:{port}/token: connection refused: 127.0.0.1:{port}"
        )
        assert outcome.sent_at_ms == NOW_MS  # an attempt that counts, retried as any other
        assert outcome.http_status is None
    assert rec.seen == []
    assert "auth_error" in ERROR_CLASSES


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("401", "the token endpoint answered HTTP 401 (invalid_client: bad ***)"),
        ("bad-json", "the token endpoint's answer is not a JSON object"),
        ("no-token", "the token endpoint's answer has no access_token"),
        ("mac", "the token endpoint's token_type 'mac' is not Bearer"),
    ],
)
async def test_oauth2_token_endpoint_answers_without_a_token(
    tokens: TokenServer, mode: str, message: str
) -> None:
    tokens.mode = mode
    async with recorder() as rec, HttpTransport(settings(), FakeClock(NOW_MS)) as transport:
        url = f"http://127.0.0.1:{rec.port}/hook"
        outcome = await transport.send("a", post(url), Endpoint(auth=grant_for(tokens)))
        again = await transport.send("b", post(url), Endpoint(auth=grant_for(tokens)))
    assert outcome.error_class == "auth_error"
    assert outcome.error == f"token endpoint {tokens.url}: {message}"
    assert again.error_class == "auth_error"
    assert len(tokens.requests) == 2  # a failure is not cached: the next attempt asks again
    assert rec.seen == []


async def test_oauth2_a_hung_token_endpoint_costs_at_most_the_total_timeout(
    tokens: TokenServer,
) -> None:
    tokens.gate = asyncio.Event()
    async with (
        recorder() as rec,
        HttpTransport(settings(total_timeout_s=0.3), FakeClock(NOW_MS)) as transport,
    ):
        url = f"http://127.0.0.1:{rec.port}/hook"
        outcome = await transport.send("a", post(url), Endpoint(auth=grant_for(tokens)))
    assert outcome.error_class == "auth_error"
    assert outcome.error == f"token endpoint {tokens.url}: no answer within 0.3 s"
    assert outcome.latency_ms < 2000
    assert rec.seen == []


async def test_oauth2_token_endpoint_is_guarded(tokens: TokenServer) -> None:
    """The guard vets the token endpoint as it vets receivers (allowed networks too)."""
    assert tokens.server is not None
    grant = OAuth2ClientCredentials(
        f"http://127.0.0.2:{tokens.server.port}/oauth/token", "id", CLIENT_SECRET
    )
    config = settings(allow_private_networks=False)
    allowed = [ipaddress.ip_network("127.0.0.1/32")]
    async with (
        recorder() as rec,
        HttpTransport(config, FakeClock(NOW_MS), allowed_networks=allowed) as transport,
    ):
        url = f"http://127.0.0.1:{rec.port}/hook"
        assert (await transport.send("a", post(url), PLAIN)).delivered
        outcome = await transport.send("b", post(url), Endpoint(auth=grant))
    assert outcome.error_class == "ssrf_blocked"
    assert outcome.sent_at_ms is None
    assert outcome.error is not None
    assert outcome.error.startswith(f"token endpoint {grant.token_url}: 127.0.0.2 is loopback")
    assert tokens.requests == []
    assert len(rec.seen) == 1
