"""A demo webhook receiver: prints every request it gets, answers 200 (or as told)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import TextIO
from urllib.parse import parse_qsl

from aiohttp import web

# Paths that answer an error, so the demo shows a retry: the first attempt of each
# webhook-id fails, the retry succeeds.
FLAKY_PREFIX = "/flaky"
# Paths of a receiver that is down for good: every request gets 500, so the demo
# shows a webhook failing its retry, suspended, and the administrator alerted.
BROKEN_PREFIX = "/broken"
# Where the demo's administrator alerts arrive (config/demo.toml, OpsAlerts).
ALERTS_PREFIX = "/ops/alerts"


def _show(request: web.Request, body: bytes, status: int) -> str:
    what = "ADMINISTRATOR ALERT" if request.path.startswith(ALERTS_PREFIX) else "webhook"
    lines = [f"── {what} received → answering {status} ──", f"{request.method} {request.path_qs}"]
    for name in ("Content-Type", "User-Agent", "webhook-id", "webhook-signature"):
        if name in request.headers:
            lines.append(f"  {name}: {request.headers[name]}")
    text = body.decode("utf-8", "replace")
    if request.content_type == "application/x-www-form-urlencoded":
        for key, value in parse_qsl(text, keep_blank_values=True):
            lines.append(f"  form {key} = {value.strip()}")
    elif text:
        lines.extend("  " + line for line in text.strip().splitlines())
    return "\n".join(lines)


def make_app(stream: TextIO = sys.stdout) -> web.Application:
    seen: dict[str, int] = {}

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        status = 200
        if request.path.startswith(FLAKY_PREFIX):
            # The first attempt of each webhook-id fails, the retry succeeds.
            wid = request.headers.get("webhook-id", "")
            seen[wid] = seen.get(wid, 0) + 1
            status = 503 if seen[wid] == 1 else 200
        elif request.path.startswith(BROKEN_PREFIX):
            status = 500
        print(_show(request, body, status), file=stream, flush=True)
        return web.Response(status=status, text="ok\n" if status == 200 else "try later\n")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"demo receiver listening on http://{host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
