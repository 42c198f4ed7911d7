"""Processor scenarios of issue 24: instant delivery over HTTPS, to 1,000 origins, and
with a cached OAuth2 token — each through ``crmhooks run`` with the config keys
(``[webhooks.tls]``, ``[webhooks.auth]``), against its ceiling in alternated pairs.

- ``https``: qualifying events pre-produced as in the instant scenario (30,000, quick
  5,000), one instant webhook to ``https://127.0.0.1:<port>/hook`` on a TLS sink
  (``bench.sink``, the Python one: bench/sink.c speaks no TLS; a CA made by trustme
  at the start, named in ``[webhooks.tls] ca_file``). Ceiling: the bare aiohttp
  client over TLS, 64 in flight, to the same sink (``bench.transport_scenarios``'s
  ``bare_runner``). Target ≥ 1.0 ×.
- ``origins``: one sink listening on 1,000 origins (127.0.0.2–127.0.0.251 × 4 ports
  from ``BENCH_ORIGINS_PORT``, default 23400), 20 deliveries each (quick 3), in
  rounds over the origins: 1,000 webhooks, each with a rule of its own
  organisation (one rule to match per event, as a CRM's many tenants would have).
  The processor fires up to ``max_in_flight`` (512) at once: an origin's second
  request made while its first is in flight opens a second connection, so the
  quick run (3 rounds, read in two fetches) opens more a delivery than the full one.
  Ceiling: the bare client to the same URLs, with no limit on connections. Both
  report the connections opened per delivery (the sink counts the connections
  that carried a webhook).
- ``oauth2``: the instant scenario (the C sink) with an OAuth2 client-credentials
  webhook — a token endpoint in the bench process, the token fetched once, then
  cached — against the same run without auth, alternated. Target ≥ 0.95 ×.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import trustme
from aiohttp import web

from bench.harness import (
    PYTHON,
    REPO,
    CpuSampler,
    Sink,
    Topics,
    base_config,
    count_results,
    create_topics,
    event_bytes,
    new_topics,
    processors,
)
from bench.report import Figure, ratio_at_least
from bench.transport_scenarios import HOSTS, PORTS_PER_HOST, Run, bare_runner

if TYPE_CHECKING:
    from bench.run import Bench, Burst

CONCURRENCY = 64  # the bare client's requests in flight, as in the instant scenario
HTTPS_EVENTS = (30_000, 5_000)  # full, quick: the Python TLS sink is slower than the C one
ORIGINS = (1_000, 1_000)  # full, quick
PER_ORIGIN = (20, 3)
ORIGINS_PORT = int(os.environ.get("BENCH_ORIGINS_PORT", "23400"))
BODY_TEMPLATE = (
    '{"deal":"${Potentials.Potential Name}","amount":${Potentials.Amount},'
    '"owner":"${Potentials.Potential Owner}","t":${Potentials.T}}'
)


class PythonSink(Sink):
    """``bench.sink`` (Python) with arguments: TLS, several addresses; its control
    requests go to ``host`` (the first address), over TLS when it serves TLS."""

    def __init__(self, workdir: Path, *args: str, host: str = "127.0.0.1",
                 client_tls: ssl.SSLContext | None = None) -> None:  # fmt: skip
        super().__init__(workdir, "python")
        self.args = args
        self.host = host
        self.client_tls = client_tls

    async def __aenter__(self) -> PythonSink:
        port_file = self.workdir / "sink-extra.port"
        port_file.unlink(missing_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            str(PYTHON), "-m", "bench.sink", "--port-file", str(port_file), *self.args, cwd=REPO
        )
        for _ in range(400):
            if port_file.exists() and port_file.read_text().strip():
                self.port = int(port_file.read_text())
                return self
            await asyncio.sleep(0.05)
        raise RuntimeError("the sink did not start")

    @property
    def url(self) -> str:
        scheme = "https" if self.client_tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def _get(self, path: str) -> bytes:
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.client_tls)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: sink\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            return await reader.readexactly(length)
        finally:
            writer.close()
            await asyncio.sleep(0)  # the close goes out; a TLS shutdown is not waited for

    async def connections(self) -> int:
        """Connections that carried a webhook since the last reset."""
        return int(await self._get("/_conns"))


async def processor_run(
    bench: Bench,
    name: str,
    config: dict[str, Any],
    sink: Sink,
    topics: Topics,
    records: list[tuple[int, bytes, bytes]],
    ceiling_cpu_us: float | None,
    scenario: str,
) -> Burst:
    """The processor over pre-produced ``records``: deliveries/s from the first request
    the sink got to the last ``delivered`` result, and its CPU a delivery."""
    from bench.run import Burst

    n = len(records)
    await create_topics(bench.bootstrap, topics)
    await bench.produce(topics, records)
    await sink.reset()
    async with (
        processors(config, bench.workdir, name) as procs,
        CpuSampler(procs[0].pid) as cpu,
    ):
        count, first_ms, last_ms = await sink.wait_count(n, timeout_s=n / 100 + 60)
        delivered = 0
        last_result_ms = 0.0
        for _ in range(50):  # results come just after the answers: wait for the last ones
            delivered, last_result_ms = await count_results(
                bench.bootstrap, topics.results, topics.partitions, "delivered"
            )
            if delivered >= n:
                break
            await asyncio.sleep(0.2)
    end_ms = max(last_result_ms, last_ms)
    rate = delivered / ((end_ms - first_ms) / 1000) if delivered and end_ms > first_ms else 0.0
    figures = bench.cpu_figures(cpu, first_ms, last_ms, count, "delivery", ceiling_cpu_us, scenario)
    note = "" if delivered >= n else f"{delivered} of {n} delivered"
    return Burst(rate, note, None, tuple(figures))


def report(bench: Bench, name: str, pairs: list[tuple[Run, Burst]], least: float | None,
           unit_note: str = "") -> None:  # fmt: skip
    from bench.run import median_pair

    ratios = [burst.rate / base.rate if base.rate else 0.0 for base, burst in pairs]
    notes = [burst.note for _, burst in pairs]
    index, note = median_pair(ratios, "pairs (ceiling, then processor)", notes)
    base, burst = pairs[index]
    for figure in burst.cpu_figures:
        bench.add(Figure(f"{figure.name} ({name})", figure.value, figure.unit, figure.ceiling))
    passed = None
    target = ""
    if least is not None:
        target = f"ratio ≥ {least}"
        passed = False if any(notes) else ratio_at_least(burst.rate, base.rate, least)
    note = "; ".join(n for n in (note, unit_note) if n)
    bench.add(Figure(name, burst.rate, burst.unit, base.rate, target, passed, note))


def full(bench: Bench) -> bool:
    return bench.sizes.instant_pairs > 1


def instant_config(
    bench: Bench, topics: Topics, name: str, webhook: dict[str, Any]
) -> dict[str, Any]:
    """The instant scenario's config (its rule) with ``webhook`` as its one webhook."""
    from bench.run import stage_rule

    config = base_config(bench.bootstrap, topics, bench.workdir / f"{name}.db")
    config["webhooks"] = [webhook]
    config["rules"] = [stage_rule("instant", "Closed Won", instant=webhook["name"])]
    return config


# -- https --------------------------------------------------------------------------


async def https(bench: Bench) -> None:
    from bench.run import PARTITIONS, qualifying, say

    n = HTTPS_EVENTS[0 if full(bench) else 1]
    pairs_count = bench.sizes.instant_pairs
    say(f"8. instant delivery over HTTPS: {n:,} events, {pairs_count} pairs (bare client over TLS)")
    ca = trustme.CA()
    ca_file = bench.workdir / "https-ca.pem"
    cert_file, key_file = bench.workdir / "https-sink.pem", bench.workdir / "https-sink.key"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf = ca.issue_cert("127.0.0.1")
    for i, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert_file), append=i > 0)
    leaf.private_key_pem.write_to_path(str(key_file))
    client_tls = ssl.create_default_context(cafile=str(ca_file))
    args = ("--tls-cert", str(cert_file), "--tls-key", str(key_file))
    async with PythonSink(bench.workdir, *args, client_tls=client_tls) as sink:
        url = f"{sink.url}/hook"
        bare = bare_runner(client_tls, CONCURRENCY)
        await bare([url], max(n // 5, 1000))  # warm-up: TLS sessions, imports
        pairs: list[tuple[Run, Burst]] = []
        for run in range(pairs_count):
            base = await bare([url], n)
            name = f"https{run}"
            topics = new_topics(name, PARTITIONS)
            webhook = {**hook("Hook", url), "tls": {"ca_file": str(ca_file)}}
            config = instant_config(bench, topics, name, webhook)
            records = qualifying(n, f"h{run}")
            burst = await processor_run(
                bench, name, config, sink, topics, records, base.cpu_us, "HTTPS"
            )
            say(f"  pair {run + 1}: bare {base.rate:,.0f}/s, processor {burst.rate:,.0f}/s")
            pairs.append((base, burst))
    report(bench, "instant delivery over HTTPS (TLS sink)", pairs, 1.0)


# -- origins ------------------------------------------------------------------------


def origin_event(n: int, origin: int, prefix: str) -> tuple[int, bytes, bytes]:
    """Event ``n``, for the webhook of ``origin``: organisation ``o<origin>``."""
    from bench.run import PARTITIONS

    org = f"o{origin}"
    data = orjson.loads(event_bytes(n, org, "Closed Won", prefix=prefix))
    return origin % PARTITIONS, org.encode(), orjson.dumps(data)


async def origins(bench: Bench) -> None:
    from bench.run import PARTITIONS, say

    size = 0 if full(bench) else 1
    count, each = ORIGINS[size], PER_ORIGIN[size]
    total = count * each
    ports = [ORIGINS_PORT + n for n in range(PORTS_PER_HOST)]
    listen = [f"{host}:{port}" for host in HOSTS for port in ports][:count]
    say(f"9. {count:,} origins × {each} deliveries, {bench.sizes.instant_pairs} pairs")
    args = tuple(arg for where in listen for arg in ("--listen", where))
    host = listen[0].rpartition(":")[0]
    async with PythonSink(bench.workdir, *args, host=host) as sink:
        urls = [f"http://{where}/hook" for where in listen]
        bare = bare_runner(None, 0)  # no limit: a connection per origin, as the processor
        await bare(urls, count)  # warm-up
        pairs: list[tuple[Run, Burst]] = []
        connections: list[tuple[float, float]] = []
        for run in range(bench.sizes.instant_pairs):
            await sink.reset()
            base = await bare(urls, total)
            bare_connections = await sink.connections() / total
            name = f"origins{run}"
            topics = new_topics(name, PARTITIONS)
            config = base_config(bench.bootstrap, topics, bench.workdir / f"{name}.db")
            # One rule per origin, in an organisation of its own: each event has one to match.
            config["webhooks"] = [
                {**hook(f"H{i}", f"{u}"), "org": f"o{i}"} for i, u in enumerate(urls)
            ]
            config["orgs"] = [{"id": f"o{i}"} for i in range(count)]
            config["rules"] = [
                {"id": f"r{i}", "org": f"o{i}", "module": "Potentials", "instant": f"H{i}"}
                for i in range(count)
            ]
            records = [origin_event(n, n % count, f"g{run}") for n in range(total)]
            burst = await processor_run(
                bench, name, config, sink, topics, records, base.cpu_us, f"{count} origins"
            )
            ours = await sink.connections() / total
            connections.append((bare_connections, ours))
            say(
                f"  pair {run + 1}: bare {base.rate:,.0f}/s ({bare_connections:.3f} connections "
                f"a request), processor {burst.rate:,.0f}/s ({ours:.3f} a delivery)"
            )
            pairs.append((base, burst))
    per = ", ".join(f"{b:.3f} / {o:.3f}" for b, o in connections)
    report(
        bench,
        f"instant delivery to {count:,} origins × {each}",
        pairs,
        None,
        f"connections opened a delivery, bare client / processor: {per}",
    )


# -- oauth2 -------------------------------------------------------------------------


async def token_endpoint() -> tuple[web.AppRunner, str, list[int]]:
    """A token endpoint in this process: (its runner, its URL, the token requests made)."""
    asked: list[int] = []

    async def issue(request: web.Request) -> web.Response:
        asked.append(1)
        return web.json_response(
            {"access_token": "bench-token", "token_type": "Bearer", "expires_in": 3600}
        )

    app = web.Application()
    app.router.add_post("/token", issue)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/token", asked


Arm = tuple[str, dict[str, Any], Sink, Topics, list[tuple[int, bytes, bytes]]]


def arm(bench: Bench, run: int, url: str, token_url: str | None) -> Arm:
    """An instant run's name, config, sink, topics and events; with an OAuth2 webhook
    when ``token_url`` is given."""
    from bench.run import PARTITIONS, qualifying

    name = f"{'oauth2' if token_url else 'plain'}{run}"
    topics = new_topics(name, PARTITIONS)
    webhook = hook("Hook", url)
    if token_url is not None:
        webhook["auth"] = {
            "type": "oauth2",
            "token_url": token_url,
            "client_id": "bench",
            "client_secret": "bench-secret",
        }
    config = instant_config(bench, topics, name, webhook)
    return name, config, bench.sink, topics, qualifying(bench.sizes.instant, f"{name}-")


async def oauth2(bench: Bench) -> None:
    from bench.run import say

    n = bench.sizes.instant
    say(f"10. instant delivery with a cached OAuth2 token: {n:,} events, against no auth")
    runner, token_url, asked = await token_endpoint()
    url = f"{bench.sink.url}/hook"
    pairs: list[tuple[Run, Burst]] = []
    try:
        for run in range(bench.sizes.instant_pairs):
            # The arms' order alternates: the second run of a pair is not always the
            # same one (a machine speeding up or slowing down favours neither).
            if run % 2 == 0:
                plain = await processor_run(bench, *arm(bench, run, url, None), None, "no auth")
                plain_us = plain.cpu_figures[0].value if plain.cpu_figures else None
                with_token = await processor_run(
                    bench, *arm(bench, run, url, token_url), plain_us, "OAuth2"
                )
            else:
                with_token = await processor_run(
                    bench, *arm(bench, run, url, token_url), None, "OAuth2"
                )
                plain = await processor_run(bench, *arm(bench, run, url, None), None, "no auth")
                plain_us = plain.cpu_figures[0].value if plain.cpu_figures else None
            say(f"  pair {run + 1}: no auth {plain.rate:,.0f}/s, OAuth2 {with_token.rate:,.0f}/s")
            pairs.append((Run(plain.rate, plain_us or 0.0, 0.0), with_token))
    finally:
        await runner.cleanup()
    report(
        bench,
        "instant delivery with a cached OAuth2 token",
        pairs,
        0.95,
        f"{len(asked)} token requests in all (one a processor run)",
    )


def hook(name: str, url: str) -> dict[str, Any]:
    return {
        "name": name,
        "url": url,
        "module": "Potentials",
        "method": "POST",
        "body": {"format": "json", "template": BODY_TEMPLATE},
    }


Scenario = Callable[["Bench"], Coroutine[Any, Any, None]]
SCENARIOS: dict[str, Scenario] = {"https": https, "origins": origins, "oauth2": oauth2}
