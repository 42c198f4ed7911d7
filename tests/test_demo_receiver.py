"""The demo receiver's OAuth2 mode (README: a webhook to an OAuth2-protected receiver)."""

from __future__ import annotations

import base64
import io

import aiohttp
from aiohttp.test_utils import TestServer

from crmhooks.demo_receiver import OAuth2Server, make_app


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_tokens_for_its_client_only_and_the_desk_needs_one() -> None:
    printed = io.StringIO()
    server = TestServer(make_app(printed, OAuth2Server("crm hooks", "s3cret")), host="127.0.0.1")
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}"
    grant = {"grant_type": "client_credentials"}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/desk/x", data=b"{}") as r:
                assert r.status == 401  # no token
            wrong = {"Authorization": basic("crm+hooks", "nope")}
            async with session.post(f"{base}/oauth/token", data=grant, headers=wrong) as r:
                assert (r.status, await r.json()) == (401, {"error": "invalid_client"})
            async with session.post(f"{base}/oauth/token", data={"grant_type": "password"}) as r:
                assert r.status == 400
            # Basic, its parts form-encoded (RFC 6749 §2.3.1), or the form fields.
            good = {"Authorization": basic("crm+hooks", "s3cret")}
            async with session.post(f"{base}/oauth/token", data=grant, headers=good) as r:
                token = (await r.json())["access_token"]
            form = {**grant, "client_id": "crm hooks", "client_secret": "s3cret"}
            async with session.post(f"{base}/oauth/token", data=form) as r:
                assert r.status == 200
            bearer = {"Authorization": f"Bearer {token}"}
            async with session.post(f"{base}/desk/x", data=b"{}", headers=bearer) as r:
                assert r.status == 200
            async with session.post(
                f"{base}/desk/x", headers={"Authorization": "Bearer forged"}
            ) as r:
                assert r.status == 401
    finally:
        await server.close()
    shown = printed.getvalue()
    assert "token request → answering 200: a token granted" in shown
    assert "token request → answering 401: no token" in shown
    assert token not in shown  # the receiver prints the scheme, never the token
