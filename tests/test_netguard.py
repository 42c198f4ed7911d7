"""SSRF guard: address verdicts, URL forms, and the guard in HttpTransport.

Public addresses appear only as verdicts: nothing here connects anywhere but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from crmhooks import delivery
from crmhooks.clock import FakeClock
from crmhooks.config import DeliverySettings
from crmhooks.delivery import HttpTransport
from crmhooks.endpoints import PLAIN
from crmhooks.errors import DeliveryRefused
from crmhooks.netguard import check_url, is_blocked_ip, parse_legacy_ipv4
from crmhooks.templates import RenderedRequest

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:4700::1111"

# (address, None if allowed else a word the refusal reason must contain)
ADDRESSES: list[tuple[str, str | None]] = [
    # IPv4 blocked
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.255", "carrier-grade NAT"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("192.0.0.170", "IETF"),
    ("192.0.2.1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.9", "documentation"),
    ("192.88.99.1", "6to4 relay"),
    # IPv4 allowed, including the neighbours of blocked ranges
    (PUBLIC_V4, None),
    ("8.8.8.8", None),
    ("172.15.255.255", None),
    ("172.32.0.1", None),
    ("100.63.255.255", None),
    ("100.128.0.1", None),
    ("192.169.0.1", None),
    ("169.253.0.1", None),
    ("198.20.0.1", None),
    ("223.255.255.254", None),
    # IPv6 blocked
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("[::1]", "loopback"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("febf::1", "link-local"),
    ("fc00::1", "unique-local"),
    ("fd12:3456::1", "unique-local"),
    ("ff02::1", "multicast"),
    ("fec0::1", "site-local"),
    ("::ffff:127.0.0.1", "IPv4-mapped form of 127.0.0.1"),
    ("::ffff:7f00:1", "IPv4-mapped form of 127.0.0.1"),
    ("::ffff:10.1.2.3", "private"),
    ("::ffff:169.254.169.254", "link-local"),
    ("::127.0.0.1", "IPv4-compatible form of 127.0.0.1"),
    ("::8.8.8.8", "deprecated IPv4-compatible"),
    ("::ffff:0:127.0.0.1", "IPv4-translated"),
    ("64:ff9b::127.0.0.1", "NAT64 form of 127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "NAT64 form of 169.254.169.254"),
    ("64:ff9b:1::1", "local-use NAT64"),
    ("2002:7f00:1::1", "6to4 form of 127.0.0.1"),
    ("2002:c0a8:101::1", "6to4 form of 192.168.1.1"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo (client) form of 127.0.0.1"),
    ("2001:0:a00:1:8000:63bf:a247:27dd", "Teredo (server) form of 10.0.0.1"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("100::1", "discard"),
    ("2001:2::1", "IETF protocol assignments"),
    ("5f00::1", "SRv6"),
    ("4000::1", "outside global unicast"),
    ("2606:4700::1111%eth0", "zone id"),
    # IPv6 allowed
    (PUBLIC_V6, None),
    ("2001:4860:4860::8888", None),
    ("2a00:1450:4001:81c::200e", None),
    ("::ffff:93.184.216.34", None),
    ("64:ff9b::5db8:d822", None),
    ("2002:5db8:d822::1", None),
    ("2001:0:4136:e378:8000:63bf:a247:27dd", None),
]


@pytest.mark.parametrize(("address", "expected"), ADDRESSES)
def test_is_blocked_ip(address: str, expected: str | None) -> None:
    reason = is_blocked_ip(address)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None
        assert expected in reason


def test_is_blocked_ip_rejects_non_addresses() -> None:
    with pytest.raises(ValueError, match="Expected 4 octets"):
        is_blocked_ip("example.com")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("192.168.257", "192.168.1.1"),
        ("1572395042", PUBLIC_V4),
        ("0", "0.0.0.0"),
        ("127.0.0.1.", "127.0.0.1"),
        ("256.0.0.1", None),
        ("08.0.0.1", None),
        ("0x.1", None),
        ("1.2.3.4.5", None),
        ("example.com", None),
        ("4294967296", None),
    ],
)
def test_parse_legacy_ipv4(host: str, expected: str | None) -> None:
    assert parse_legacy_ipv4(host) == expected


class FakeResolver:
    """Answers from a table; records every name it was asked about."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(self, host: str) -> list[str]:
        self.asked.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: name not known")
        return self.table[host]


NAMES = {
    "public.example": [PUBLIC_V4],
    "dual.example": [PUBLIC_V4, PUBLIC_V6],
    "rebind.example": [PUBLIC_V4, "127.0.0.1"],
    "internal.example": ["10.0.0.5"],
    "v6.example": [PUBLIC_V6, "fd00::1"],
    "mapped.example": ["::ffff:192.168.0.1"],
    "empty.example": [],
}

# (url, None if refused else the vetted addresses)
URLS: list[tuple[str, list[str] | None]] = [
    ("http://127.0.0.1/", None),
    ("http://user@127.0.0.1/", None),
    ("http://user:pass@127.0.0.1:8080/x", None),
    ("http://[::1]/", None),
    ("http://[::ffff:127.0.0.1]/", None),
    ("http://[0:0:0:0:0:ffff:7f00:1]/", None),
    ("http://[fe80::1%25eth0]/", None),
    ("http://[64:ff9b::7f00:1]/", None),
    ("http://2130706433/", None),
    ("http://0177.0.0.1/", None),
    ("http://0x7f.1/", None),
    ("http://127.1/", None),
    ("http://0x7f000001/", None),
    ("http://0/", None),
    ("http://127.0.0.1./", None),
    ("http://localhost/", None),
    ("http://LOCALHOST./", None),
    ("http://api.localhost/", None),
    ("http://①②⑦.0.0.1/", None),
    ("http://169.254.169.254/latest/meta-data/", None),
    ("http://rebind.example/", None),
    ("http://internal.example/", None),
    ("http://v6.example/", None),
    ("http://mapped.example/", None),
    ("http://999.1.1.1/", None),
    ("http://1.2.3.4.5/", None),
    ("http://%31%32%37.0.0.1/", None),
    ("ftp://public.example/", None),
    ("https://[2001:db8::1]:8443/", None),
    # the real host is the part after the userinfo / before the fragment
    ("http://127.0.0.1:80@public.example/", [PUBLIC_V4]),
    ("http://public.example#@127.0.0.1", [PUBLIC_V4]),
    ("http://93.184.216.34/", [PUBLIC_V4]),
    ("http://1572395042/", [PUBLIC_V4]),
    ("https://public.example/hook?x=1", [PUBLIC_V4]),
    ("https://PUBLIC.EXAMPLE./hook", None),  # trailing dot: not in the fake table
    ("http://dual.example/", [PUBLIC_V4, PUBLIC_V6]),
    ("http://[2606:4700::1111]/", [PUBLIC_V6]),
    ("http://[::ffff:93.184.216.34]/", ["::ffff:5db8:d822"]),
]


@pytest.mark.parametrize(("url", "expected"), URLS)
async def test_check_url(url: str, expected: list[str] | None) -> None:
    resolver = FakeResolver(NAMES)
    if expected is None:
        with pytest.raises((DeliveryRefused, OSError)):
            await check_url(url, resolver)
    else:
        assert await check_url(url, resolver) == expected


async def test_literals_are_never_looked_up() -> None:
    resolver = FakeResolver(NAMES)
    for url in ("http://127.0.0.1/", "http://[::1]/", "http://0x7f.1/", "http://2130706433/"):
        with pytest.raises(DeliveryRefused):
            await check_url(url, resolver)
    assert await check_url("http://93.184.216.34/", resolver) == [PUBLIC_V4]
    assert resolver.asked == []


async def test_one_blocked_address_among_public_ones_refuses() -> None:
    with pytest.raises(
        DeliveryRefused, match=r"rebind\.example resolves to 127\.0\.0\.1.*loopback"
    ):
        await check_url("https://rebind.example/", FakeResolver(NAMES))


async def test_dns_failure_is_an_os_error_not_a_refusal() -> None:
    with pytest.raises(OSError, match="name not known") as info:
        await check_url("https://nowhere.example/", FakeResolver(NAMES))
    assert not isinstance(info.value, DeliveryRefused)
    with pytest.raises(OSError, match="no addresses"):
        await check_url("https://empty.example/", FakeResolver(NAMES))


# --- against a real receiver on 127.0.0.1 -----------------------------------------


class Receiver:
    """A local HTTP server that records every request it gets."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = TestServer(app, host="127.0.0.1", port=0)

    async def _handle(self, request: web.Request) -> web.Response:
        self.hosts.append(request.headers.get("Host", ""))
        if request.path == "/close":  # this connection is not used again
            return web.Response(text="ok", headers={"Connection": "close"})
        return web.Response(text="ok")

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    await rec.server.start_server()
    try:
        yield rec
    finally:
        await rec.server.close()


def _request(url: str) -> RenderedRequest:
    return RenderedRequest(method="POST", url=url, headers={}, body=b"{}", redacted_url=url)


async def test_guard_refuses_loopback_and_sends_nothing(receiver: Receiver) -> None:
    settings = DeliverySettings(allow_private_networks=False, total_timeout_s=2.0)
    resolver = FakeResolver({"receiver.test": ["127.0.0.1"]})
    async with HttpTransport(settings, FakeClock(1_000_000), resolver=resolver) as transport:
        for url in (
            f"http://127.0.0.1:{receiver.port}/hook",
            f"http://user@127.0.0.1:{receiver.port}/hook",
            f"http://[::ffff:127.0.0.1]:{receiver.port}/hook",
            f"http://receiver.test:{receiver.port}/hook",
        ):
            outcome = await transport.send("a1", _request(url), PLAIN)
            assert outcome.error_class == "ssrf_blocked", url
            assert outcome.sent_at_ms is None
            assert outcome.http_status is None
            assert outcome.error is not None
            assert "loopback" in outcome.error
    assert receiver.hosts == []


async def test_guard_dns_failure_is_connection_error(receiver: Receiver) -> None:
    settings = DeliverySettings(allow_private_networks=False, total_timeout_s=2.0)
    async with HttpTransport(settings, FakeClock(), resolver=FakeResolver({})) as transport:
        outcome = await transport.send("a1", _request("http://nowhere.test/"), PLAIN)
    assert outcome.error_class == "connection_error"
    assert outcome.error is not None
    assert outcome.error.startswith("DNS lookup failed")


class HangingResolver:
    """A DNS server that never answers."""

    async def resolve(self, host: str) -> list[str]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_guard_dns_lookup_counts_against_the_total_timeout() -> None:
    settings = DeliverySettings(allow_private_networks=False, total_timeout_s=0.2)
    async with HttpTransport(settings, FakeClock(), resolver=HangingResolver()) as transport:
        outcome = await transport.send("a1", _request("http://slow-dns.test/"), PLAIN)
    assert outcome.error_class == "timeout"
    assert outcome.error == "DNS lookup timed out after 0.2 s"
    assert outcome.sent_at_ms is None


async def test_guard_connects_to_the_vetted_address_with_the_host_name(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    vetted_calls: list[str] = []

    async def vet(url: str, resolver: object, allowed: object = ()) -> list[str]:
        # As if receiver.test resolved to a public address: the loopback receiver
        # stands in for it, so the guard's wiring is what is tested here.
        vetted_calls.append(url)
        return ["127.0.0.1"]

    monkeypatch.setattr(delivery, "check_url", vet)
    settings = DeliverySettings(allow_private_networks=False, total_timeout_s=2.0)
    resolver = FakeResolver({})  # would fail every lookup: the vetted address is used
    url = f"http://receiver.test:{receiver.port}/hook"
    async with HttpTransport(settings, FakeClock(1_000_000), resolver=resolver) as transport:
        for _ in range(3):
            assert (await transport.send("a1", _request(url), PLAIN)).delivered
    assert receiver.hosts == [f"receiver.test:{receiver.port}"] * 3
    # One connection, vetted once: the idle connection's address was vetted when made.
    assert vetted_calls == [url]


async def test_guard_vets_again_for_every_new_connection(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = ["127.0.0.1", "10.1.2.3"]

    async def vet(url: str, resolver: object, allowed: object = ()) -> list[str]:
        address = answers.pop(0)
        reason = is_blocked_ip(address)
        if address != "127.0.0.1" and reason is not None:
            raise DeliveryRefused(reason)
        return [address]

    monkeypatch.setattr(delivery, "check_url", vet)
    settings = DeliverySettings(allow_private_networks=False, total_timeout_s=2.0)
    url = f"http://rebind.test:{receiver.port}/close"
    async with HttpTransport(settings, FakeClock(1_000_000)) as transport:
        first = await transport.send("a1", _request(url), PLAIN)
        assert first.delivered
        # The receiver closed the connection: the next request must connect, and so
        # vet again, and the name now answers with a private address.
        second = await transport.send("a2", _request(url), PLAIN)
    assert second.error_class == "ssrf_blocked"
    assert second.sent_at_ms is None
    assert answers == []


# --- allowed networks ([delivery] allowed_networks) ---------------------------------

ALLOWED = [ipaddress.ip_network("10.20.0.0/16"), ipaddress.ip_network("fd00:20::/32")]


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("10.20.1.5", True),
        ("10.20.255.255", True),
        ("10.21.0.1", False),
        ("192.168.1.1", False),
        ("127.0.0.1", False),
        ("::ffff:10.20.1.5", True),  # a dual-stack resolver's form of an allowed address
        ("::ffff:10.21.1.5", False),
        ("fd00:20::7", True),
        ("fd00:21::7", False),
        ("fd00:20::7%eth0", False),  # a zone id is refused all the same
        (PUBLIC_V4, True),
    ],
)
def test_allowed_networks_pass_the_guard(address: str, allowed: bool) -> None:
    assert (is_blocked_ip(address, ALLOWED) is None) is allowed
    if address != PUBLIC_V4:
        assert is_blocked_ip(address) is not None  # blocked without the allowance


async def test_check_url_with_allowed_networks() -> None:
    resolver = FakeResolver(
        {
            "sms.internal": ["10.20.0.9"],
            "mixed.internal": ["10.20.0.9", "10.30.0.1"],
        }
    )
    assert await check_url("http://10.20.0.9/send", resolver, ALLOWED) == ["10.20.0.9"]
    assert await check_url("http://sms.internal/send", resolver, ALLOWED) == ["10.20.0.9"]
    with pytest.raises(DeliveryRefused, match=r"10\.30\.0\.1 is private"):
        await check_url("http://mixed.internal/send", resolver, ALLOWED)
    with pytest.raises(DeliveryRefused, match="localhost"):
        await check_url("http://localhost/", resolver, [ipaddress.ip_network("127.0.0.0/8")])


async def test_guard_lets_an_allowed_network_through(receiver: Receiver) -> None:
    settings = DeliverySettings(allow_private_networks=False, total_timeout_s=2.0)
    loopback = [ipaddress.ip_network("127.0.0.1/32")]
    async with HttpTransport(settings, FakeClock(), allowed_networks=loopback) as transport:
        allowed = await transport.send("a1", _request(f"http://127.0.0.1:{receiver.port}/"), PLAIN)
        other = await transport.send("a2", _request(f"http://127.0.0.2:{receiver.port}/"), PLAIN)
        assert "1 allowed networks" in repr(transport)
    assert allowed.delivered
    assert other.error_class == "ssrf_blocked"
    assert len(receiver.hosts) == 1
