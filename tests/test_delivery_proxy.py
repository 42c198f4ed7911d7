"""The egress proxy and allowed networks: a real forward proxy and receivers on 127.0.0.1.

The proxy (tests.net_support.ForwardProxy) tunnels CONNECT and forwards
absolute-form requests; it records every request line it gets.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest
import uvloop

from crmhooks.auth import OAuth2ClientCredentials
from crmhooks.clock import FakeClock
from crmhooks.config import DeliverySettings
from crmhooks.delivery import HttpTransport
from crmhooks.endpoints import PLAIN, ClientTls, Endpoint
from crmhooks.http1 import Proxy
from crmhooks.templates import RenderedRequest
from tests.net_support import ForwardProxy, Pki, make_pki, recorder
from tests.test_netguard import FakeResolver

NOW_MS = 1_764_320_400_000
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path, "receiver.test")


def guarded() -> DeliverySettings:
    return DeliverySettings(
        allow_private_networks=False, connect_timeout_s=2.0, total_timeout_s=3.0
    )


def post(url: str) -> RenderedRequest:
    return RenderedRequest("POST", url, {}, b'{"a": 1}', url)


async def test_https_through_a_connect_tunnel_to_the_vetted_address(pki: Pki) -> None:
    """The guard vets receiver.test (127.0.0.1 is allowed here); the proxy is asked
    for that address, never the name; TLS inside checks the certificate of the name."""
    resolver = FakeResolver({"receiver.test": ["127.0.0.1"]})
    tls = Endpoint(tls=ClientTls(ca_file=pki.ca_file))
    async with (
        recorder(tls=pki.server_context(require_client_cert=False)) as rec,
        ForwardProxy() as proxy,
        HttpTransport(
            guarded(), FakeClock(NOW_MS), resolver=resolver, proxy=proxy.url,
            allowed_networks=LOOPBACK,
        ) as transport,
    ):  # fmt: skip
        url = f"https://receiver.test:{rec.port}/hook"
        for n in range(3):
            assert (await transport.send(f"a{n}", post(url), tls)).delivered
    assert proxy.lines == [f"CONNECT 127.0.0.1:{rec.port} HTTP/1.1"]  # one tunnel, reused
    assert f"Host: 127.0.0.1:{rec.port}" in proxy.heads[0]
    assert [s.headers["Host"] for s in rec.seen] == [f"receiver.test:{rec.port}"] * 3
    assert resolver.asked == ["receiver.test"]


async def test_http_in_absolute_form_naming_the_vetted_address() -> None:
    resolver = FakeResolver({"gateway.test": ["127.0.0.1"]})
    async with (
        recorder() as rec,
        ForwardProxy() as proxy,
        HttpTransport(
            guarded(), FakeClock(NOW_MS), resolver=resolver, proxy=proxy.url,
            allowed_networks=LOOPBACK,
        ) as transport,
    ):  # fmt: skip
        url = f"http://gateway.test:{rec.port}/sms?to=1"
        outcome = await transport.send("a", post(url), PLAIN)
    assert outcome.delivered
    assert proxy.lines == [f"POST http://127.0.0.1:{rec.port}/sms?to=1 HTTP/1.1"]
    assert rec.seen[0].headers["Host"] == f"gateway.test:{rec.port}"
    assert rec.seen[0].path == "/sms?to=1"
    assert rec.seen[0].body == b'{"a": 1}'


async def test_without_the_guard_the_proxy_resolves_the_name(pki: Pki) -> None:
    settings = DeliverySettings(allow_private_networks=True, total_timeout_s=3.0)
    async with (
        recorder(tls=pki.server_context(require_client_cert=False)) as rec,
        ForwardProxy({"receiver.test": "127.0.0.1"}) as proxy,
        HttpTransport(settings, FakeClock(NOW_MS), proxy=proxy.url) as transport,
    ):
        url = f"https://receiver.test:{rec.port}/hook"
        outcome = await transport.send("a", post(url), Endpoint(tls=ClientTls(ca_file=pki.ca_file)))
    assert outcome.delivered
    assert proxy.lines == [f"CONNECT receiver.test:{rec.port} HTTP/1.1"]


async def test_the_guard_refuses_a_loopback_target_even_through_the_proxy() -> None:
    resolver = FakeResolver({"rebind.test": ["127.0.0.1"]})
    async with (
        recorder() as rec,
        ForwardProxy() as proxy,
        HttpTransport(guarded(), FakeClock(NOW_MS), resolver=resolver, proxy=proxy.url) as t,
    ):
        for url in (
            f"http://127.0.0.1:{rec.port}/hook",
            f"https://127.0.0.1:{rec.port}/hook",
            f"http://rebind.test:{rec.port}/hook",
        ):
            outcome = await t.send("a", post(url), PLAIN)
            assert outcome.error_class == "ssrf_blocked", url
            assert outcome.sent_at_ms is None
    assert proxy.lines == []
    assert proxy.connections == 0
    assert rec.seen == []


async def test_a_proxy_that_refuses_connect(pki: Pki) -> None:
    async with (
        ForwardProxy() as proxy,
        HttpTransport(
            DeliverySettings(allow_private_networks=True), FakeClock(NOW_MS),
            proxy=f"http://user:pr0xy-pass@127.0.0.1:{proxy.port}",
        ) as transport,
    ):  # fmt: skip
        proxy.refuse = True
        outcome = await transport.send("a", post("https://127.0.0.1:9/x"), PLAIN)
    assert outcome.error_class == "connection_error"
    assert outcome.error == (
        f"proxy 127.0.0.1:{proxy.port} refused CONNECT 127.0.0.1:9: 403 Forbidden"
    )
    assert "Proxy-Authorization: Basic dXNlcjpwcjB4eS1wYXNz" in proxy.heads[0]


async def test_a_proxy_that_is_down() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = DeliverySettings(allow_private_networks=True)
    async with HttpTransport(settings, FakeClock(NOW_MS), proxy=f"http://127.0.0.1:{port}") as t:
        outcomes = [
            await t.send("a", post(f"{scheme}://x.test/"), PLAIN) for scheme in ["http", "https"]
        ]
    for outcome in outcomes:
        assert outcome.error_class == "connection_error"
        assert outcome.error == f"connection refused: proxy 127.0.0.1:{port}"


async def test_token_requests_take_the_proxy_too() -> None:
    async with (
        recorder() as receiver,
        recorder() as tokens,
        ForwardProxy() as proxy,
        HttpTransport(
            DeliverySettings(allow_private_networks=True), FakeClock(NOW_MS), proxy=proxy.url
        ) as transport,
    ):

        async def issue(request: object) -> object:
            from aiohttp import web

            return web.json_response({"access_token": "t0k3n", "expires_in": 60})

        tokens.answer = issue  # type: ignore[assignment]
        grant = OAuth2ClientCredentials(f"http://127.0.0.1:{tokens.port}/token", "id", "s3cret")
        url = f"http://127.0.0.1:{receiver.port}/hook"
        assert (await transport.send("a", post(url), Endpoint(auth=grant))).delivered
    assert proxy.lines == [
        f"POST http://127.0.0.1:{tokens.port}/token HTTP/1.1",
        f"POST http://127.0.0.1:{receiver.port}/hook HTTP/1.1",
    ]
    assert receiver.seen[0].headers["Authorization"] == "Bearer t0k3n"


async def test_the_environment_names_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    async with (
        recorder() as rec,
        HttpTransport(DeliverySettings(allow_private_networks=True), FakeClock(NOW_MS)) as t,
    ):
        assert (await t.send("a", post(f"http://127.0.0.1:{rec.port}/x"), PLAIN)).delivered


def test_the_tunnel_works_on_uvloop(tmp_path: Path) -> None:
    """``crmhooks run`` uses uvloop: CONNECT, then TLS started on the tunnel."""
    pki = make_pki(tmp_path)

    async def scenario() -> tuple[bool, list[str]]:
        async with (
            recorder(tls=pki.server_context(require_client_cert=True)) as rec,
            ForwardProxy() as proxy,
            HttpTransport(
                DeliverySettings(allow_private_networks=True), FakeClock(NOW_MS), proxy=proxy.url
            ) as transport,
        ):
            tls = ClientTls(pki.client_cert_file, pki.client_key_file, pki.ca_file)
            url = f"https://127.0.0.1:{rec.port}/hook"
            outcome = await transport.send("a", post(url), Endpoint(tls=tls))
            return outcome.delivered, proxy.lines

    delivered, lines = uvloop.run(scenario())
    assert delivered
    assert len(lines) == 1
    assert lines[0].startswith("CONNECT 127.0.0.1:")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://proxy.test:3128", "only http:// proxies"),
        ("socks5://proxy.test:1080", "only http:// proxies"),
        ("http://proxy.test:3128/path", "without a path"),
        ("http://:3128", "no host"),
        ("http://proxy.test:99999", "out of range"),
    ],
)
def test_proxy_urls_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Proxy.from_url(url)


def test_proxy_url_parsed() -> None:
    proxy = Proxy.from_url("http://us%40er:p%3Ass@Proxy.Internal:3128/")
    assert (proxy.host, proxy.port, proxy.password) == ("proxy.internal", 3128, "p:ss")
    assert proxy.authorization == "Basic dXNAZXI6cDpzcw=="
    assert "p:ss" not in repr(proxy)
    assert Proxy.from_url("http://proxy.internal").port == 80
