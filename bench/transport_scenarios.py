"""Transport-level benchmarks of issue 24: HTTPS, many endpoints, a cached OAuth2 token.

    .venv/bin/python -m bench.transport_scenarios [--quick] [--only https endpoints oauth2]

Each scenario sends requests through one ``HttpTransport`` (the processor's
webhook client) under uvloop in this process, 64 in flight, against
``bench.sink`` in a process of its own, and against its ceiling in the same
conditions, in alternated pairs (3, quick 1), after a warm-up of each; it
prints every pair and the median one (deliveries/s and this process's CPU per
request; the ratio is of the rates):

- ``https``: a TLS sink (a CA made by trustme at the start), the transport
  against a bare ``aiohttp.ClientSession`` over TLS to the same sink.
  Target ≥ 1.0 ×.
- ``endpoints``: 1,000 distinct origins (127.0.0.2-127.0.0.251 × 4 ports from
  ``--base-port``, default 23400), 20 requests each (quick: 200 × 5), in rounds
  over all origins; private networks allowed. The same bare client (no limit on
  connections) is the ceiling; both report connections opened per request.
- ``oauth2``: the transport with an OAuth2 client-credentials webhook (a token
  endpoint in this process; the token is fetched once, then cached) against the
  same transport without auth, to the plain sink. Target ≥ 0.95 ×.

These run the transport alone: the processor's end-to-end scenarios for them
need the config keys ([webhooks.auth], [webhooks.tls]) wired to the processor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import trustme
import uvloop
from aiohttp import web

from crmhooks.auth import OAuth2ClientCredentials
from crmhooks.clock import SystemClock
from crmhooks.config import DeliverySettings
from crmhooks.delivery import HttpTransport
from crmhooks.endpoints import PLAIN, ClientTls, Endpoint
from crmhooks.templates import RenderedRequest

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = 64
BODY = b'{"deal":"Deal 1","amount":25000,"owner":"Ana Silva","t":0}'
HOSTS = [f"127.0.0.{n}" for n in range(2, 252)]  # 250 addresses
PORTS_PER_HOST = 4


@dataclass(frozen=True)
class Run:
    rate: float  # requests/s
    cpu_us: float  # this process's CPU per request
    connections: float  # connections opened per request


Runner = Callable[[list[str], int], Awaitable[Run]]


@contextlib.contextmanager
def sink(*args: str) -> Iterator[int]:
    """bench.sink in its own process with ``args``; yields its (first) port."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.sink", "--port-file", str(port_file), *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"},
        )
        try:
            for _ in range(400):
                if port_file.exists() and port_file.read_text().strip():
                    break
                if proc.poll() is not None:
                    raise SystemExit("the sink exited")
                time.sleep(0.05)
            else:
                raise SystemExit("the sink did not start")
            yield int(port_file.read_text())
        finally:
            proc.terminate()
            proc.wait()


def transport_runner(settings: DeliverySettings, endpoint: Endpoint) -> Runner:
    async def run(urls: list[str], total: int) -> Run:
        requests = [
            RenderedRequest("POST", u, {"Content-Type": "application/json"}, BODY, u) for u in urls
        ]
        async with HttpTransport(settings, SystemClock()) as transport:
            next_n = 0

            async def worker() -> None:
                nonlocal next_n
                while next_n < total:
                    n = next_n
                    next_n += 1
                    outcome = await transport.send(
                        f"bench-{n}", requests[n % len(requests)], endpoint
                    )
                    if not outcome.delivered:
                        raise RuntimeError(f"not delivered: {outcome}")

            cpu, wall = time.process_time(), time.monotonic()
            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            elapsed = time.monotonic() - wall
            cpu_us = (time.process_time() - cpu) * 1e6 / total
            return Run(total / elapsed, cpu_us, transport.connections_opened / total)

    return run


def bare_runner(tls: ssl.SSLContext | None, limit: int) -> Runner:
    async def run(urls: list[str], total: int) -> Run:
        opened = 0

        async def on_connect(*_: object) -> None:
            nonlocal opened
            opened += 1

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(on_connect)
        connector = aiohttp.TCPConnector(limit=limit, ssl=tls if tls is not None else True)
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
            next_n = 0

            async def worker() -> None:
                nonlocal next_n
                while next_n < total:
                    n = next_n
                    next_n += 1
                    headers = {"Content-Type": "application/json", "webhook-id": f"bare-{n}"}
                    async with session.post(urls[n % len(urls)], data=BODY, headers=headers) as r:
                        await r.read()
                        r.raise_for_status()

            cpu, wall = time.process_time(), time.monotonic()
            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            elapsed = time.monotonic() - wall
            cpu_us = (time.process_time() - cpu) * 1e6 / total
            return Run(total / elapsed, cpu_us, opened / total)

    return run


async def pairs(
    name: str, ceiling: Runner, ours: Runner, urls: list[str], total: int, count: int
) -> dict[str, object]:
    await ceiling(urls, max(total // 5, len(urls)))  # warm-up: imports, TLS session setup
    await ours(urls, max(total // 5, len(urls)))
    results: list[tuple[Run, Run]] = []
    for n in range(count):
        base = await ceiling(urls, total)
        mine = await ours(urls, total)
        results.append((base, mine))
        print(
            f"  {name} pair {n + 1}: ceiling {base.rate:,.0f}/s {base.cpu_us:.1f} µs "
            f"{base.connections:.3f} conn/req | crmhooks {mine.rate:,.0f}/s "
            f"{mine.cpu_us:.1f} µs {mine.connections:.3f} conn/req | ratio "
            f"{mine.rate / base.rate:.3f}",
            flush=True,
        )
    ratios = [mine.rate / base.rate for base, mine in results]
    median = statistics.median_low(ratios)
    base, mine = results[ratios.index(median)]
    return {
        "scenario": name,
        "ratio": round(median, 3),
        "ratios": [round(r, 3) for r in ratios],
        "ceiling": base.__dict__,
        "crmhooks": mine.__dict__,
    }


async def https(total: int, count: int, workdir: Path) -> dict[str, object]:
    ca = trustme.CA()
    ca_file, cert_file, key_file = workdir / "ca.pem", workdir / "sink.pem", workdir / "sink.key"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    for blob in leaf.cert_chain_pems[1:]:
        blob.write_to_path(str(cert_file), append=True)
    leaf.private_key_pem.write_to_path(str(key_file))
    with sink("--tls-cert", str(cert_file), "--tls-key", str(key_file)) as port:
        url = f"https://127.0.0.1:{port}/hook"
        settings = DeliverySettings(allow_private_networks=True, max_in_flight_per_host=64)
        ours = transport_runner(settings, Endpoint(tls=ClientTls(ca_file=str(ca_file))))
        bare = bare_runner(ssl.create_default_context(cafile=str(ca_file)), CONCURRENCY)
        return await pairs("https", bare, ours, [url], total, count)


async def endpoints(origins: int, each: int, count: int, base_port: int) -> dict[str, object]:
    ports = [base_port + n for n in range(PORTS_PER_HOST)]
    listen = [f"{host}:{port}" for host in HOSTS for port in ports][:origins]
    args = [arg for where in listen for arg in ("--listen", where)]
    with sink(*args):
        urls = [f"http://{where}/hook" for where in listen]
        settings = DeliverySettings(allow_private_networks=True)
        ours = transport_runner(settings, PLAIN)
        bare = bare_runner(None, 0)  # no limit: one connection per origin, as ours
        return await pairs(
            f"endpoints ({len(urls)} origins)", bare, ours, urls, len(urls) * each, count
        )


async def oauth2(total: int, count: int) -> dict[str, object]:
    async def issue(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "bench-token", "expires_in": 3600})

    app = web.Application()
    app.router.add_post("/token", issue)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    token_port = runner.addresses[0][1]
    try:
        with sink() as port:
            url = f"http://127.0.0.1:{port}/hook"
            settings = DeliverySettings(allow_private_networks=True, max_in_flight_per_host=64)
            grant = OAuth2ClientCredentials(f"http://127.0.0.1:{token_port}/token", "id", "secret")
            plain = transport_runner(settings, PLAIN)
            with_token = transport_runner(settings, Endpoint(auth=grant))
            return await pairs("oauth2 (cached token)", plain, with_token, [url], total, count)
    finally:
        await runner.cleanup()


async def main_async(args: argparse.Namespace) -> list[dict[str, object]]:
    quick = args.quick
    count = 1 if quick else 3
    total = 5_000 if quick else 30_000
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if "https" in args.only:
            results.append(await https(total, count, Path(tmp)))
        if "endpoints" in args.only:
            origins, each = (200, 5) if quick else (1_000, 20)
            results.append(await endpoints(origins, each, count, args.base_port))
        if "oauth2" in args.only:
            results.append(await oauth2(total, count))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--only", nargs="+", default=["https", "endpoints", "oauth2"],
        choices=["https", "endpoints", "oauth2"],
    )  # fmt: skip
    parser.add_argument("--base-port", type=int, default=23400)
    args = parser.parse_args()
    for result in uvloop.run(main_async(args)):
        print(
            f"{result['scenario']}: {result['ratio']} × (pairs {result['ratios']}); "
            f"ceiling {result['ceiling']}, crmhooks {result['crmhooks']}"
        )


if __name__ == "__main__":
    main()
