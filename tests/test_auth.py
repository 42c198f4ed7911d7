"""auth: token answers, and the token cache's single flight and expiry (fake fetch, fake clock)."""

from __future__ import annotations

import asyncio

import pytest

from crmhooks.auth import (
    DEFAULT_TOKEN_LIFETIME_S,
    BasicAuth,
    OAuth2ClientCredentials,
    OAuth2Tokens,
    Token,
    parse_token_response,
)
from crmhooks.clock import FakeClock
from crmhooks.errors import AuthFailed

GRANT = OAuth2ClientCredentials("https://auth.test/token", "id", "secret", scope="s")


@pytest.mark.parametrize(
    ("body", "token", "lifetime_s"),
    [
        (b'{"access_token":"a","token_type":"Bearer","expires_in":3600}', "a", 3600.0),
        (b'{"access_token":"a","token_type":"bearer","expires_in":"90"}', "a", 90.0),
        (b'{"access_token":"a"}', "a", DEFAULT_TOKEN_LIFETIME_S),
        (b'{"access_token":"a","expires_in":0}', "a", DEFAULT_TOKEN_LIFETIME_S),
        (b'{"access_token":"a","expires_in":-5}', "a", DEFAULT_TOKEN_LIFETIME_S),
        (b'{"access_token":"a","expires_in":true}', "a", DEFAULT_TOKEN_LIFETIME_S),
        (b'{"access_token":"a","expires_in":"soon"}', "a", DEFAULT_TOKEN_LIFETIME_S),
    ],
)
def test_token_answers(body: bytes, token: str, lifetime_s: float) -> None:
    assert parse_token_response(200, body) == Token(token, lifetime_s)


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (400, b'{"error":"invalid_scope"}', r"HTTP 400 \(invalid_scope\)"),
        (500, b"<html>", "HTTP 500$"),
        (200, b"[1]", "not a JSON object"),
        (200, b'{"access_token":""}', "no access_token"),
        (200, b'{"access_token":7}', "no access_token"),
        (200, b'{"access_token":"a\\r\\nX: 1"}', "CR/LF/NUL"),
        (200, b'{"access_token":"a","token_type":"DPoP"}', "'DPoP' is not Bearer"),
        (200, b'{"access_token":"a","token_type":1}', "1 is not Bearer"),
    ],
)
def test_token_answers_refused(status: int, body: bytes, message: str) -> None:
    with pytest.raises(AuthFailed, match=message):
        parse_token_response(status, body)


def test_basic_auth_refuses_a_colon_in_the_username() -> None:
    with pytest.raises(ValueError, match="':'"):
        BasicAuth("a:b", "c")


class FakeTokenEndpoint:
    def __init__(self, lifetime_s: float = 3600.0) -> None:
        self.lifetime_s = lifetime_s
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def fetch(self, grant: OAuth2ClientCredentials, via: None) -> Token:
        self.calls += 1
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return Token(f"t{self.calls}", self.lifetime_s)


async def test_single_flight_and_the_failure_shared_then_forgotten() -> None:
    endpoint = FakeTokenEndpoint()
    tokens = OAuth2Tokens(FakeClock(0), endpoint.fetch)
    endpoint.gate.clear()
    endpoint.fail = AuthFailed("down")
    waiting = [asyncio.ensure_future(tokens.header(GRANT, None)) for _ in range(10)]
    await asyncio.sleep(0)
    endpoint.gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, AuthFailed) for r in results)
    assert endpoint.calls == 1
    endpoint.fail = None
    assert await tokens.header(GRANT, None) == ("t2", "Bearer t2")
    assert endpoint.calls == 2


async def test_a_waiter_that_gives_up_does_not_cancel_the_fetch() -> None:
    endpoint = FakeTokenEndpoint()
    tokens = OAuth2Tokens(FakeClock(0), endpoint.fetch)
    endpoint.gate.clear()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await tokens.header(GRANT, None)
    endpoint.gate.set()
    assert await tokens.header(GRANT, None) == ("t1", "Bearer t1")
    assert endpoint.calls == 1


async def test_refused_forgets_only_the_token_refused() -> None:
    endpoint = FakeTokenEndpoint()
    tokens = OAuth2Tokens(FakeClock(0), endpoint.fetch)
    assert (await tokens.header(GRANT, None))[0] == "t1"
    tokens.refused(GRANT, "t1")
    assert (await tokens.header(GRANT, None))[0] == "t2"
    tokens.refused(GRANT, "t1")  # a late 401 for the old token: t2 stays
    assert (await tokens.header(GRANT, None))[0] == "t2"
    assert endpoint.calls == 2


@pytest.mark.parametrize(
    ("lifetime_s", "usable_s"),
    [(3600.0, 3540.0), (120.0, 60.0), (60.0, 30.0), (10.0, 5.0)],
)
async def test_a_token_is_used_until_shortly_before_it_expires(
    lifetime_s: float, usable_s: float
) -> None:
    clock = FakeClock(1_000_000)
    endpoint = FakeTokenEndpoint(lifetime_s)
    tokens = OAuth2Tokens(clock, endpoint.fetch)
    await tokens.header(GRANT, None)
    clock.advance(int(usable_s * 1000) - 1)
    assert (await tokens.header(GRANT, None))[0] == "t1"
    clock.advance(1)
    assert (await tokens.header(GRANT, None))[0] == "t2"


async def test_the_same_grant_in_a_new_config_keeps_its_token() -> None:
    endpoint = FakeTokenEndpoint()
    tokens = OAuth2Tokens(FakeClock(0), endpoint.fetch)
    await tokens.header(GRANT, None)
    same = OAuth2ClientCredentials("https://auth.test/token", "id", "secret", scope="s")
    other = OAuth2ClientCredentials("https://auth.test/token", "id", "secret", scope="t")
    assert (await tokens.header(same, None))[0] == "t1"
    assert (await tokens.header(other, None))[0] == "t2"


def test_token_request_form() -> None:
    headers, body = OAuth2ClientCredentials(
        "https://a.test/t", "i d", "s:e/c", scope="a b", audience="https://api"
    ).token_request()
    assert headers["Authorization"] == "Basic aStkOnMlM0FlJTJGYw=="  # i+d:s%3Ae%2Fc
    assert body == b"grant_type=client_credentials&scope=a+b&audience=https%3A%2F%2Fapi"
