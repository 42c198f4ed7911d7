"""Secrets a receiver echoes back never reach an Outcome or a log line; its control
characters are escaped (SPEC §3.1, issues 24.5 and 25)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from crmhooks.auth import BasicAuth, BearerAuth
from crmhooks.clock import FakeClock
from crmhooks.config import DeliverySettings
from crmhooks.delivery import HttpTransport, Outcome
from crmhooks.endpoints import (
    MIN_SCRUB_CHARS,
    PLAIN,
    Endpoint,
    escape_controls,
    scrub,
    scrub_list,
)
from crmhooks.templates import RenderedRequest
from tests.net_support import recorder

NOW_MS = 1_764_320_400_000
API_KEY = "k3y/with spaces+plus"  # a header value from ${env:}
URL_PASSWORD = "u-pa55word"
BEARER = "bearer-t0ken-value"
SIGNING = "whsec_c2lnbmluZy1rZXktYnl0ZXMtMTIz"


def settings() -> DeliverySettings:
    return DeliverySettings(allow_private_networks=True, total_timeout_s=3.0)


async def echo(request: web.Request) -> web.StreamResponse:
    """Repeats whatever it got: in the body, the status reason and a redirect's Location."""
    seen = f"{request.headers.get('X-Api-Key')} {request.headers.get('Authorization')}"
    seen += f" {request.url} {request.query.get('key')}"
    where = request.path
    if where == "/reason":
        return web.Response(status=403, reason=f"Forbidden for {API_KEY}", text=seen)
    if where == "/redirect":
        location = f"https://other.example/?k={request.headers.get('X-Api-Key')}&t={BEARER}"
        return web.Response(status=302, headers={"Location": location}, text=seen)
    return web.Response(text=seen)


@pytest.fixture
async def transport() -> AsyncIterator[HttpTransport]:
    async with HttpTransport(settings(), FakeClock(NOW_MS)) as t:
        yield t


def texts(outcome: Outcome) -> str:
    return f"{outcome.error}\n{outcome.response_excerpt}"


@pytest.mark.parametrize("path", ["/body", "/reason", "/redirect"])
async def test_an_echoed_secret_appears_nowhere_in_the_outcome_or_logs(
    transport: HttpTransport, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="crmhooks")
    endpoint = Endpoint(secret=SIGNING, auth=BearerAuth(BEARER), scrub=frozenset({API_KEY}))
    async with recorder(echo) as rec:
        url = (
            f"http://user:{URL_PASSWORD}@127.0.0.1:{rec.port}{path}?key=k3y%2Fwith%20spaces%2Bplus"
        )
        request = RenderedRequest("POST", url, {"X-Api-Key": API_KEY}, b"{}", url)
        outcome = await transport.send("a", request, endpoint)
    # The receiver did get them: they were sent, and echoed.
    assert API_KEY in rec.seen[0].headers["X-Api-Key"]
    # What crmhooks logged (the test receiver's own access log shows what it received).
    logged = "\n".join(
        caplog.handler.format(r) for r in caplog.records if r.name.startswith("crmhooks")
    )
    shown = texts(outcome) + "\n" + logged
    for secret in (API_KEY, "k3y%2Fwith%20spaces%2Bplus", BEARER, URL_PASSWORD, SIGNING):
        assert secret not in shown, (secret, shown)
    assert "***" in texts(outcome)
    if path == "/reason":
        assert outcome.error == "HTTP 403 Forbidden for ***"
    if path == "/redirect":
        assert outcome.error == (
            "HTTP 302 Found (redirect to https://other.example/?k=***&t=*** not followed)"
        )


async def test_basic_auth_secrets_are_scrubbed(transport: HttpTransport) -> None:
    auth = BasicAuth("user", "b4sic-pass")
    async with recorder(echo) as rec:
        url = f"http://127.0.0.1:{rec.port}/body"
        outcome = await transport.send(
            "a", RenderedRequest("GET", url, {}, b"", url), Endpoint(auth=auth)
        )
    assert outcome.delivered
    assert outcome.response_excerpt == f"None *** {url} None"


async def test_control_characters_from_the_receiver_are_escaped(transport: HttpTransport) -> None:
    async def raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 302 Moved\x1b[31m red\x7f\r\n"
            b"Location: /next\x85\x9b31m\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(raw, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"http://127.0.0.1:{port}/x"
        outcome = await transport.send("a", RenderedRequest("GET", url, {}, b"", url), PLAIN)
    finally:
        server.close()
    assert outcome.error == (
        "HTTP 302 Moved\\x1b[31m red\\x7f (redirect to /next\\x85\\x9b31m not followed)"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text", "plain text"),
        ("a\r\nb", "a\\r\\nb"),
        ("nul\0", "nul\\x00"),
        ("tab\there", "tab\\there"),
        ("\x1b[2J", "\\x1b[2J"),
        ("c1\x85", "c1\\x85"),
        ("line\u2028sep", "line\\u2028sep"),
        ("bidi\u202eevil", "bidi\\u202eevil"),
        ("é ü 漢", "é ü 漢"),
    ],
)
def test_escape_controls(text: str, expected: str) -> None:
    assert escape_controls(text) == expected


@given(st.text())
def test_escaped_text_holds_no_control_character(text: str) -> None:
    escaped = escape_controls(text)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in escaped)
    if escaped == text:
        assert not any(ord(c) < 0x20 for c in text)


@given(
    secret=st.text(min_size=MIN_SCRUB_CHARS, max_size=12),
    before=st.text(max_size=20),
    after=st.text(max_size=20),
)
def test_a_scrubbed_secret_is_gone(secret: str, before: str, after: str) -> None:
    text = scrub(before + secret + after, scrub_list({secret}))
    assert secret not in text
    assert "***" in text


def test_longer_secrets_are_scrubbed_first() -> None:
    secrets = scrub_list({"abcd", "abcdefgh"})
    assert scrub("x abcdefgh y abcd", secrets) == "x *** y ***"
    assert scrub("abc", scrub_list({"abc"})) == "abc"  # shorter than MIN_SCRUB_CHARS
