"""`crmhooks send-test`: one real request now, printed with secrets as ***; no action, no
quota, no Kafka, no store (SPEC §11). Against real receivers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from crmhooks.cli import main
from crmhooks.demo_receiver import OAuth2Server, make_app
from tests.net_support import recorder

API_KEY = "api-key-SECRET-1"
CLIENT_SECRET = "client-SECRET-2"
EVENT = Path(__file__).resolve().parents[1] / "config" / "events" / "closed-won.json"


def config_text(tmp_path: Path, port: int, *, path: str = "/desk/api/v1/portal", **kw: Any) -> str:
    guard_off = "false" if kw.get("guarded") else "true"
    return f"""
[kafka]
bootstrap_servers = "127.0.0.1:1"   # nothing listens: send-test never talks to Kafka

[store]
path = "{tmp_path / "store" / "never.db"}"

[delivery]
allow_private_networks = {guard_off}
total_timeout_s = 5

[[orgs]]
id = "org-acme"
time_zone = "Asia/Shanghai"

[[webhooks]]
name = "PortalAccess"
url = "http://127.0.0.1:{port}{path}"
module = "Potentials"

  [webhooks.body]
  format = "json"
  template = '{{"deal": "${{Potentials.Potential Name}}", "key": "${{env:API_KEY}}"}}'

  [webhooks.headers]
  X-Api-Key = "${{env:API_KEY}}"
  X-Deal = "${{Potentials.Potential Name}}"

  [webhooks.auth]
  type = "oauth2"
  token_url = "http://127.0.0.1:{port}/oauth/token"
  client_id = "crm hooks"
  client_secret = "${{env:CLIENT_SECRET}}"
"""


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEY", API_KEY)
    monkeypatch.setenv("CLIENT_SECRET", CLIENT_SECRET)


@contextlib.asynccontextmanager
async def desk(oauth2: OAuth2Server) -> AsyncIterator[tuple[int, io.StringIO]]:
    """The demo receiver with its OAuth2 token endpoint: (port, what it printed)."""
    printed = io.StringIO()
    server = TestServer(make_app(printed, oauth2), host="127.0.0.1", port=0)
    await server.start_server()
    assert server.port is not None
    try:
        yield server.port, printed
    finally:
        await server.close()


async def send_test(
    tmp_path: Path, config: str, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str, str]:
    path = tmp_path / "crmhooks.toml"
    path.write_text(config, encoding="utf-8")
    args = ["send-test", "--config", str(path), "--webhook", "PortalAccess", "--event", str(EVENT)]
    # main runs its own event loop: in a thread, while this one serves the receiver.
    code = await asyncio.to_thread(main, [*args, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def no_secret_in(text: str) -> None:
    for secret in (API_KEY, CLIENT_SECRET):
        assert secret not in text


async def test_sends_one_real_request_through_oauth2_and_prints_it_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    oauth2 = OAuth2Server("crm hooks", CLIENT_SECRET)
    async with desk(oauth2) as (port, printed):
        code, out, err = await send_test(tmp_path, config_text(tmp_path, port), capsys)
    assert code == 0, err
    request, _, outcome = out.partition("\n--- outcome\n")
    head, _, body = request.partition("\n\n")
    first, *header_lines = head.splitlines()
    headers = dict(line.split(": ", 1) for line in header_lines)
    assert first == f"POST http://127.0.0.1:{port}/desk/api/v1/portal"
    assert headers["X-Api-Key"] == "***"
    assert headers["X-Deal"] == "Big deal"
    assert headers["Authorization"] == (
        f"Bearer *** (an OAuth2 token from http://127.0.0.1:{port}/oauth/token)"
    )
    assert headers["webhook-id"].startswith("send-test-")  # never an action's id
    assert headers["webhook-timestamp"].isdigit()
    assert json.loads(body) == {"deal": "Big deal", "key": "***"}
    assert "status: delivered\nhttp_status: 200\nerror_class: -\n" in outcome
    assert "latency_ms: " in outcome
    no_secret_in(out + err)
    # What the receiver got: the real values, a token it granted (one token request).
    assert oauth2.requests == 1
    shown = printed.getvalue()
    assert "answering 200" in shown
    assert f'"key": "{API_KEY}"' in shown
    assert "webhook-id: send-test-" in shown
    # Nothing stored (the store file was never made) and no Kafka (none listens).
    assert not (tmp_path / "store").exists()


async def test_a_refusing_receiver_exits_1_with_the_outcome_scrubbed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        got = f"{request.headers.get('X-Api-Key')} {request.headers.get('Authorization')}"
        return web.Response(status=503, reason=f"Down {API_KEY}", text=f"echo: {got}\x1b[31m")

    async def token(request: web.Request) -> web.StreamResponse:
        return web.json_response({"access_token": "tok-SECRET-3", "expires_in": 60})

    async def answer(request: web.Request) -> web.StreamResponse:
        return await (token(request) if request.path == "/oauth/token" else echo(request))

    async with recorder(answer) as rec:
        code, out, err = await send_test(tmp_path, config_text(tmp_path, rec.port), capsys)
    assert code == 1
    _, _, outcome = out.partition("\n--- outcome\n")
    assert "status: not delivered\nhttp_status: 503\nerror_class: server_error\n" in outcome
    assert "error: HTTP 503 Down ***" in outcome
    assert "echo: *** Bearer ***\\x1b[31m" in outcome  # scrubbed, control characters escaped
    no_secret_in(out + err)
    assert "tok-SECRET-3" not in out + err
    assert rec.seen[-1].headers["X-Api-Key"] == API_KEY


async def test_the_ssrf_guard_applies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with recorder() as rec:
        config = config_text(tmp_path, rec.port, guarded=True)
        code, out, _ = await send_test(tmp_path, config, capsys)
    assert code == 1
    assert "status: not delivered (nothing was sent)" in out
    # The token endpoint is on 127.0.0.1 too: the guard refuses it first.
    assert "error_class: ssrf_blocked" in out
    assert "webhook-timestamp: (not sent)" in out
    assert rec.seen == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--webhook", "Nope"], "send-test: no webhook named 'Nope'"),
        (["--event", "/nonexistent/e.json"], "send-test: cannot read event file"),
    ],
)
async def test_bad_arguments_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = await send_test(tmp_path, config_text(tmp_path, 9), capsys, *args)
    assert code == 2
    assert out == ""
    assert err.startswith(message)
    assert err.count("\n") == 1


async def test_a_template_error_is_a_one_line_error_and_sends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    event = json.loads(EVENT.read_text(encoding="utf-8"))
    event["record"]["Potential Name"] = "two\r\nlines"
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event), encoding="utf-8")
    async with recorder() as rec:
        config = config_text(tmp_path, rec.port)
        code, out, err = await send_test(tmp_path, config, capsys, "--event", str(path))
    assert code == 1
    assert out == ""
    assert err == (
        "send-test: not sent: webhook PortalAccess: header X-Deal: "
        "a value holds CR, LF or NUL, which would end the header\n"
    )
    assert rec.seen == []
