"""A demo webhook receiver: prints every request it gets, answers 200 (or as told).

With ``--oauth2-client-id`` (and the client secret in ``DEMO_CLIENT_SECRET``) it
is also a tiny OAuth2 authorization server, so that a webhook with
``[webhooks.auth] type = "oauth2"`` can be tried locally: ``POST /oauth/token``
grants access tokens by the client-credentials grant (RFC 6749 §4.4; the client
authenticates with HTTP Basic or form fields), and every path under
``/desk/`` (standing in for a support desk's REST API) answers 401 unless the
request carries ``Authorization: Bearer <a token it granted>``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import secrets
import sys
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import web

# Paths that answer an error, so the demo shows a retry: the first attempt of each
# webhook-id fails, the retry succeeds.
FLAKY_PREFIX = "/flaky"
# Paths of a receiver that is down for good: every request gets 500, so the demo
# shows a webhook failing its retry, suspended, and the administrator alerted.
BROKEN_PREFIX = "/broken"
# Where the demo's administrator alerts arrive (config/demo.toml, OpsAlerts).
ALERTS_PREFIX = "/ops/alerts"
# Paths that need a token from the OAuth2 mode (a support desk's API, in the demo).
PROTECTED_PREFIX = "/desk/"
TOKEN_PATH = "/oauth/token"
# Where the client secret of the OAuth2 mode is read from (never a command-line
# argument: those show in `ps`).
CLIENT_SECRET_ENV = "DEMO_CLIENT_SECRET"
# Tokens live an hour, as most authorization servers' do: crmhooks caches one and
# asks again shortly before it expires.
TOKEN_LIFETIME_S = 3600


@dataclass
class OAuth2Server:
    """The client it knows, and the tokens it granted."""

    client_id: str
    client_secret: str = field(repr=False)
    granted: set[str] = field(default_factory=set, repr=False)
    requests: int = 0  # token requests answered

    def client_of(self, request: web.Request, form: dict[str, str]) -> tuple[str, str]:
        """(client id, secret) from HTTP Basic (form-encoded, RFC 6749 §2.3.1) or the form."""
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                pair = base64.b64decode(header[6:], validate=True).decode()
            except ValueError:
                return "", ""
            user, _, password = pair.partition(":")
            return unquote_plus(user), unquote_plus(password)
        return form.get("client_id", ""), form.get("client_secret", "")

    async def token(self, request: web.Request) -> web.Response:
        self.requests += 1
        form = dict(parse_qsl(await request.text()))
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        client_id, secret = self.client_of(request, form)
        if client_id != self.client_id or not secrets.compare_digest(secret, self.client_secret):
            return web.json_response({"error": "invalid_client"}, status=401)
        token = f"demo-{secrets.token_urlsafe(24)}"
        self.granted.add(token)
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME_S}
        )

    def allows(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        return header.startswith("Bearer ") and header[7:] in self.granted


def _show(request: web.Request, body: bytes, status: int) -> str:
    what = "ADMINISTRATOR ALERT" if request.path.startswith(ALERTS_PREFIX) else "webhook"
    lines = [f"── {what} received → answering {status} ──", f"{request.method} {request.path_qs}"]
    for name in ("Content-Type", "User-Agent", "webhook-id", "webhook-signature"):
        if name in request.headers:
            lines.append(f"  {name}: {request.headers[name]}")
    if "Authorization" in request.headers:
        scheme = request.headers["Authorization"].partition(" ")[0]
        lines.append(f"  Authorization: {scheme} …")
    text = body.decode("utf-8", "replace")
    if request.content_type == "application/x-www-form-urlencoded":
        for key, value in parse_qsl(text, keep_blank_values=True):
            lines.append(f"  form {key} = {value.strip()}")
    elif text:
        lines.extend("  " + line for line in text.strip().splitlines())
    return "\n".join(lines)


def make_app(stream: TextIO = sys.stdout, oauth2: OAuth2Server | None = None) -> web.Application:
    seen: dict[str, int] = {}

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        status = 200
        if request.path.startswith(FLAKY_PREFIX):
            # The first attempt of each webhook-id fails, the retry succeeds.
            wid = request.headers.get("webhook-id", "")
            seen[wid] = seen.get(wid, 0) + 1
            status = 503 if seen[wid] == 1 else 200
        elif request.path.startswith(PROTECTED_PREFIX):
            status = 200 if oauth2 is not None and oauth2.allows(request) else 401
        elif request.path.startswith(BROKEN_PREFIX):
            status = 500
        print(_show(request, body, status), file=stream, flush=True)
        text = {200: "ok\n", 401: "a valid bearer token is needed\n"}.get(status, "try later\n")
        return web.Response(status=status, text=text)

    async def token(request: web.Request) -> web.Response:
        assert oauth2 is not None
        response = await oauth2.token(request)
        granted = "a token granted" if response.status == 200 else "no token"
        print(
            f"── token request → answering {response.status}: {granted} ──", file=stream, flush=True
        )
        return response

    app = web.Application()
    if oauth2 is not None:
        app.router.add_post(TOKEN_PATH, token)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(host: str, port: int, oauth2: OAuth2Server | None) -> None:
    runner = web.AppRunner(make_app(oauth2=oauth2), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"demo receiver listening on http://{host}:{port}", flush=True)
    if oauth2 is not None:
        print(
            f"OAuth2: tokens for client {oauth2.client_id!r} at http://{host}:{port}{TOKEN_PATH}; "
            f"{PROTECTED_PREFIX}… needs one",
            flush=True,
        )
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--oauth2-client-id",
        help=f"also grant OAuth2 tokens to this client (its secret: env {CLIENT_SECRET_ENV})",
    )
    args = parser.parse_args()
    oauth2 = None
    if args.oauth2_client_id:
        secret = os.environ.get(CLIENT_SECRET_ENV, "")
        if not secret:
            parser.error(f"--oauth2-client-id needs the client secret in {CLIENT_SECRET_ENV}")
        oauth2 = OAuth2Server(args.oauth2_client_id, secret)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, oauth2))


if __name__ == "__main__":
    main()
