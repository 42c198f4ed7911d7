"""The benchmark: ceilings, then the processor's figures against them (``scripts/bench``).

Each figure about the product runs ``crmhooks run`` as a child process against a
real broker and the lean sink (``bench/sink.c``, its own process), so that the
bench's producer and readers never share the processor's event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import orjson
import uvloop

from bench.admin_scenarios import admin
from bench.config_topic import config_topic
from bench.harness import (
    PYTHON,
    REPO,
    CpuSampler,
    FastProducer,
    GroupOffsets,
    Processor,
    Sink,
    Topics,
    append_delays,
    base_config,
    count_results,
    create_topics,
    event_bytes,
    new_topics,
    now_ms,
    processors,
    raw_consume_rate,
    render_toml,
    scraping,
)
from bench.report import (
    Figure,
    at_least,
    at_most,
    percentile,
    ratio_at_least,
    table,
    write_json,
)
from bench.steady import steady

# Partitions of every events topic: ≥ 6 so that two processors each get several
# organisations (SPEC §1: one organisation per key, so per partition here).
PARTITIONS = 6
# The broker's pid, when scripts/bench started it: its CPU is reported on its own.
BROKER_PID = int(os.environ.get("CRMHOOKS_BENCH_BROKER_PID") or 0) or None
ORGS = [f"org-{i}" for i in range(PARTITIONS)]
# In-flight requests of the bare-client ceiling; the processor gets the same per host.
CONCURRENCY = 64
# The supported modules (SPEC §2), for spreading the filtering rules.
MODULES = (
    "Leads",
    "Accounts",
    "Contacts",
    "Potentials",
    "Campaigns",
    "Cases",
    "Solutions",
    "Products",
    "Vendors",
    "Price Books",
    "Quotes",
    "Sales Orders",
    "Purchase Orders",
    "Invoices",
    "Events",
    "Tasks",
)
# Organisations the filtering rules are spread over (events come from the first six).
RULE_ORGS = 50
# The webhook body: a JSON document whose "t" is the record's T field (a time stamp
# in epoch ms) as a JSON number, so the sink can compute latency and lateness.
BODY_TEMPLATE = (
    '{"deal":"${Potentials.Potential Name}","amount":${Potentials.Amount},'
    '"owner":"${Potentials.Potential Owner}","t":${Potentials.T}}'
)
# Scheduled actions of the timer test are due this far ahead: never within the bench.
FAR_OFFSET = "30d"


@dataclass(frozen=True, slots=True)
class Sizes:
    instant: int
    instant_pairs: int
    filtering: int
    filter_pairs: int
    rules: int
    latency_s: float
    latency_rate: int
    timers: int
    lateness: int
    lateness_offset_s: int
    lateness_window_s: int
    scale: int
    scale_pairs: int
    sink_load_s: float
    bare_client: int
    security_pairs: int  # PLAINTEXT then SASL_SSL runs, alternated (instant and filtering)
    zstd_pairs: int
    steady: int
    documents: int  # config topic: organisations' documents
    active_orgs: int  # config topic: organisations the filtered events are spread over
    apply_pushes: int  # config topic: documents pushed for the apply latency


FULL = Sizes(
    instant=100_000,
    instant_pairs=3,
    filtering=500_000,
    filter_pairs=3,
    rules=1000,
    latency_s=20.0,
    latency_rate=1000,
    timers=1_000_000,
    lateness=10_000,
    lateness_offset_s=45,
    lateness_window_s=60,
    scale=50_000,
    scale_pairs=3,
    sink_load_s=3.0,
    bare_client=50_000,
    security_pairs=3,
    zstd_pairs=5,  # ~3 s a pair; this machine's runs differ by up to 20 %
    steady=1_000_000,
    documents=100_000,
    active_orgs=10_000,
    apply_pushes=50,
)
QUICK = Sizes(
    instant=5_000,
    instant_pairs=1,
    filtering=100_000,
    filter_pairs=1,
    rules=1000,
    latency_s=5.0,
    latency_rate=1000,
    timers=50_000,
    lateness=2_000,
    lateness_offset_s=12,
    lateness_window_s=10,
    scale=5_000,
    scale_pairs=1,
    sink_load_s=1.5,
    bare_client=5_000,
    security_pairs=1,
    zstd_pairs=1,
    steady=50_000,
    documents=5_000,
    active_orgs=1_000,
    apply_pushes=10,
)


def sasl_ssl_settings() -> dict[str, Any] | None:
    """The processor's [kafka] settings for the broker's SASL_SSL listener, from what
    ``scripts/kafka-local secure-env`` exports; None without one."""
    address = os.environ.get("CRMHOOKS_TEST_SASL_SSL")
    if not address:
        return None
    return {
        "bootstrap_servers": address,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": os.environ.get("CRMHOOKS_TEST_KAFKA_USERNAME", ""),
        "sasl_password": os.environ.get("CRMHOOKS_TEST_KAFKA_PASSWORD", ""),
        "ssl_ca_file": os.environ.get("CRMHOOKS_TEST_KAFKA_CA", ""),
    }


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


def scrape_figures(durations: list[float], scrape_s: float | None) -> list[Figure]:
    """How many scrapes a run had, and the slowest (a run with ``scrape_s`` None: none)."""
    if scrape_s is None:
        return []
    slowest = max(durations, default=None)
    return [
        Figure("scrapes of /metrics during the run", len(durations), ""),
        Figure("slowest scrape", None if slowest is None else slowest * 1000, "ms"),
    ]


def with_admin(config: dict[str, Any], scrape_s: float | None) -> dict[str, Any]:
    """``config`` with the admin endpoint on a free port when /metrics is to be scraped."""
    if scrape_s is not None:
        config["admin"] = {"listen": "127.0.0.1:0"}
    return config


def hook(name: str, url: str, template: str = BODY_TEMPLATE) -> dict[str, Any]:
    return {
        "name": name,
        "url": url,
        "module": "Potentials",
        "method": "POST",
        "body": {"format": "json", "template": template},
    }


def stage_rule(rule_id: str, stage: str, **actions: Any) -> dict[str, Any]:
    return {
        "id": rule_id,
        "module": "Potentials",
        "criteria": {"all": [{"field": "Stage", "op": "is", "value": stage}]},
        **actions,
    }


def spread(
    count: int, stage: str, prefix: str, **fields: Any
) -> Iterator[tuple[int, bytes, bytes]]:
    """``count`` events of ``stage`` spread round-robin over the organisations/partitions."""
    for n in range(count):
        p = n % PARTITIONS
        yield p, ORGS[p].encode(), event_bytes(n, ORGS[p], stage, prefix=prefix, **fields)


def qualifying(count: int, prefix: str) -> list[tuple[int, bytes, bytes]]:
    """``count`` instantly qualifying events, made before any clock starts."""
    return list(spread(count, "Closed Won", prefix))


class Burst(NamedTuple):
    """A run of a scenario (an instant or filtering run, a scale-out burst): its rate
    (deliveries or events /s, ``unit``), a note when it fell short, the CPU the whole
    machine (processors, sink, broker, bench) spent per delivery, which bounds the
    rate once every core is busy (scale-out), and the figures of where the CPU went."""

    rate: float
    note: str
    machine_us: float | None = None
    cpu_figures: tuple[Figure, ...] = ()
    unit: str = "deliveries/s"


def median_pair(ratios: list[float], what: str, notes: list[str]) -> tuple[int, str]:
    """The index of the pair with the median ratio, and the note that goes with it:
    every pair's ratio (when there are several) and the notes of runs that fell short."""
    index = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
    shown = [" ".join(n for n in notes if n)] if any(notes) else []
    if len(ratios) > 1:
        each = ", ".join(f"{r:.2f}" for r in ratios)
        shown.insert(0, f"the median of {len(ratios)} {what}: {each}")
    return index, "; ".join(shown)


class Bench:
    def __init__(self, bootstrap: str, sizes: Sizes, workdir: Path, sink: Sink) -> None:
        self.bootstrap = bootstrap
        self.sizes = sizes
        self.workdir = workdir
        self.sink = sink
        self.figures: list[Figure] = []
        self.filter_topics: Topics | None = None
        self.bare_client_rate: float | None = None
        self.consume_rate: float | None = None
        # CPU µs per request / per record of the ceilings (the bench process's own).
        self.bare_client_cpu_us: float | None = None
        self.consume_cpu_us: float | None = None

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        ratio = "" if figure.ratio is None else f" (ratio {figure.ratio:.2f})"
        say(f"  {figure.name}: {figure.value} {figure.unit}{ratio} {figure.note}")

    @staticmethod
    def cpu_figures(
        cpu: CpuSampler,
        start_ms: float,
        end_ms: float,
        count: float,
        what: str,
        ceiling_us: float | None,
        scenario: str,
    ) -> list[Figure]:
        """Two informational figures: the processor's CPU per ``what`` (against the
        ceiling's own CPU per request or record) and its share of a core, over the
        scenario's measured window. CPU counts stay comparable when the shared
        machine's speed moves; the share tells whether the processor was busy."""
        cpu_s, wall_s = cpu.usage(start_ms, end_ms)
        per = cpu.cpu_per(start_ms, end_ms, count)
        if not cpu_s or per is None:
            return []
        share = 100.0 * cpu_s / wall_s
        return [
            Figure(f"processor's CPU per {what}", per, "µs", ceiling_us),
            Figure(f"processor's CPU use ({scenario})", share, "% of a core"),
        ]

    async def measure_pairs(
        self,
        header: str,
        count: int,
        ceiling: tuple[str, Callable[[], Awaitable[tuple[float, float]]]],
        run: Callable[[int, float], Awaitable[Burst]],
        name: str,
        least: float,
        label: str = "",
    ) -> None:
        """``count`` pairs, each a run of the named ``ceiling`` (its rate and CPU µs a
        request or record) then a scenario ``run`` next to it; reports the pair with the
        median ratio: the run's CPU figures, and its rate against that ceiling, the target
        ``least`` ×. The machine's speed drifts within minutes, and a run lasts 1-8 s."""
        ceiling_name, measure_ceiling = ceiling
        times = f"{count} time{'s' if count > 1 else ''}"
        say(f"{header}, {times}, each right after a {ceiling_name} run")
        runs = []
        for i in range(count):
            ceiling_rate, ceiling_cpu_us = await measure_ceiling()
            runs.append((ceiling_rate, await run(i, ceiling_cpu_us)))
        ratios = [burst.rate / rate if rate else 0.0 for rate, burst in runs]
        notes = [burst.note for _, burst in runs]
        what = f"pairs ({ceiling_name}, then processor)"
        index, note = median_pair(ratios, what, notes)
        ceiling_rate, burst = runs[index]
        for figure in burst.cpu_figures:
            self.add(
                dataclasses.replace(figure, name=f"{figure.name} ({label})") if label else figure
            )
        passed = False if any(notes) else ratio_at_least(burst.rate, ceiling_rate, least)
        target = f"ratio ≥ {least}"
        self.add(Figure(name, burst.rate, burst.unit, ceiling_rate, target, passed, note))

    def instant_config(
        self, topics: Topics, store: str, kafka: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        config = base_config(self.bootstrap, topics, self.workdir / f"{store}.db")
        config["webhooks"] = [hook("Hook", f"{self.sink.url}/hook")]
        config["rules"] = [stage_rule("instant", "Closed Won", instant="Hook")]
        config["kafka"].update(kafka or {})
        return config

    async def produce(self, topics: Topics, records: Iterable[tuple[int, bytes, bytes]]) -> int:
        start = time.monotonic()
        async with FastProducer(self.bootstrap) as producer:
            count = await producer.send_many(topics.events, records)
        elapsed = time.monotonic() - start
        say(f"  produced {count:,} events in {elapsed:.1f} s")
        return count

    # -- 1. ceilings ---------------------------------------------------------------

    async def ceilings(self) -> None:
        say("1. ceilings: sink capacity, bare aiohttp client, raw consume")
        await self.sink.reset()
        proc = await asyncio.create_subprocess_exec(
            str(PYTHON),
            "-m",
            "bench.loadgen",
            "--port",
            str(self.sink.port),
            "--connections",
            "128",
            "--seconds",
            str(self.sizes.sink_load_s),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        count, elapsed = out.split()
        sink_rate = int(count) / float(elapsed)
        await self.bare_client()
        self.add(
            Figure(
                f"sink capacity ({self.sink.kind} sink, raw sockets, 128 connections)",
                sink_rate,
                "req/s",
                self.bare_client_rate,
                "≥ 2 × bare client",
                ratio_at_least(sink_rate, self.bare_client_rate, 2.0),
            )
        )
        # The filtering test's topic doubles as the raw consume ceiling's input.
        topics = self.filter_topics = new_topics("filter", PARTITIONS)
        await create_topics(self.bootstrap, topics)
        produced = await self.produce(topics, spread(self.sizes.filtering, "Closed Won", "f"))
        self.consume_rate, self.consume_cpu_us = await raw_consume_rate(
            self.bootstrap, topics.events, topics.partitions, produced
        )
        self.add(Figure("raw aiokafka consume (decode nothing)", self.consume_rate, "events/s"))
        self.add(Figure("raw consumer's CPU per event", self.consume_cpu_us, "µs"))

    async def bare_client(self) -> None:
        self.bare_client_rate, self.bare_client_cpu_us = await self.bare_client_run()
        self.add(
            Figure(f"bare aiohttp client ({CONCURRENCY} in flight)", self.bare_client_rate, "req/s")
        )
        self.add(Figure("bare client's CPU per request", self.bare_client_cpu_us, "µs"))

    async def bare_client_run(self) -> tuple[float, float]:
        """A bare aiohttp client POSTing the processor's bodies, 64 in flight:
        (requests/s, CPU µs a request)."""
        total = self.sizes.bare_client
        bodies = [
            b'{"deal":"Deal %d","amount":%d,"owner":"Ana Silva","t":0}' % (n, 25000 + n % 1000)
            for n in range(total)
        ]
        url = f"{self.sink.url}/hook"
        next_n = 0

        async def worker(session: aiohttp.ClientSession) -> None:
            nonlocal next_n
            while next_n < total:
                n = next_n
                next_n += 1
                headers = {"Content-Type": "application/json", "webhook-id": f"bare-{n}"}
                async with session.post(url, data=bodies[n], headers=headers) as resp:
                    await resp.read()
                    resp.raise_for_status()

        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(connector=connector) as session:
            start = time.monotonic()
            cpu = time.process_time()
            await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
            cpu_us = (time.process_time() - cpu) * 1e6 / total
            return total / (time.monotonic() - start), cpu_us

    # -- 2. instant delivery ---------------------------------------------------------

    async def instant(self) -> None:
        n = self.sizes.instant
        await self.measure_pairs(
            f"2. instant delivery: {n:,} pre-produced events, one webhook each",
            self.sizes.instant_pairs,
            ("bare client", self.bare_client_run),
            self.instant_run,
            "instant delivery throughput",
            0.8,
        )

    async def instant_run(
        self,
        run: int,
        bare_cpu_us: float,
        scrape_s: float | None = None,
        kafka: dict[str, Any] | None = None,
    ) -> Burst:
        """One run of the instant scenario: its rate, a note if it fell short, and the
        processor's CPU figures (against ``bare_cpu_us``). ``scrape_s``: the admin
        endpoint on, /metrics scraped that often (bench/admin_scenarios.py). ``kafka``:
        the processor's own [kafka] settings (a secured listener); the bench's clients
        stay on PLAINTEXT."""
        n = self.sizes.instant
        name = f"instant{run}" + ("-secured" if kafka else "")
        fresh(self.workdir, name)
        topics = new_topics(name, PARTITIONS)
        await create_topics(self.bootstrap, topics)
        await self.produce(topics, spread(n, "Closed Won", f"i{run}"))
        await self.sink.reset()
        config = with_admin(self.instant_config(topics, name, kafka), scrape_s)
        async with (
            processors(config, self.workdir, name, kafka=kafka) as procs,
            scraping(procs[0].log, scrape_s) as scrapes,
            CpuSampler(procs[0].pid) as cpu,
        ):
            count, first_ms, last_ms = await self.sink.wait_count(n, timeout_s=n / 200 + 60)
            say(f"  sink: {count:,} requests in {(last_ms - first_ms) / 1000:.1f} s")
            delivered, last_result_ms = await count_results(
                self.bootstrap, topics.results, topics.partitions, "delivered"
            )
        end_ms = max(last_result_ms, last_ms)
        rate = delivered / ((end_ms - first_ms) / 1000) if delivered and end_ms > first_ms else 0.0
        figures = self.cpu_figures(
            cpu, first_ms, last_ms, count, "delivery", bare_cpu_us, "instant delivery"
        )
        figures += scrape_figures(scrapes, scrape_s)
        note = "" if delivered >= n else f"{delivered} of {n} delivered"
        return Burst(rate, note, None, tuple(figures))

    # -- 3. filtering -----------------------------------------------------------------

    def filter_config(
        self, topics: Topics, run: int, kafka: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        config = base_config(self.bootstrap, topics, self.workdir / f"filter{run}.db")
        config["kafka"]["group_id"] = f"{topics.group}-{run}"  # each run reads from the start
        config["orgs"] = [{"id": f"org-{i}"} for i in range(RULE_ORGS)]
        config["webhooks"] = [
            {
                "name": f"Hook{j}",
                "url": f"{self.sink.url}/m{j}",
                "module": module,
                "body": {"format": "json", "template": '{"never":true}'},
            }
            for j, module in enumerate(MODULES)
        ]
        rules = []
        for i in range(self.sizes.rules):
            j = (i // RULE_ORGS) % len(MODULES)
            rules.append(
                {
                    "id": f"r{i}",
                    "org": f"org-{i % RULE_ORGS}",
                    "module": MODULES[j],
                    # Never true for the bench's events (Stage is "Closed Won").
                    "criteria": {
                        "all": [
                            {"field": "Stage", "op": "is", "value": f"Never{i}"},
                            {"field": "Amount", "op": "gt", "value": 1_000_000},
                        ]
                    },
                    "instant": f"Hook{j}",
                }
            )
        config["rules"] = rules
        config["kafka"].update(kafka or {})
        return config

    async def filtering(self) -> None:
        topics = self.filter_topics
        assert topics is not None
        n = self.sizes.filtering
        # The ceiling: the raw consumer reading the same events. Single raw consumes ranged
        # 1.7-2.2 µs of CPU an event within one hour.
        raw = functools.partial(
            raw_consume_rate, self.bootstrap, topics.events, topics.partitions, n
        )
        await self.measure_pairs(
            f"3. filtering: {n:,} events against {self.sizes.rules} rules, none matching",
            self.sizes.filter_pairs,
            ("raw consume", raw),
            self.filtering_run,
            "filtering throughput",
            0.5,
        )

    async def filtering_run(
        self,
        run: int,
        consume_cpu_us: float,
        scrape_s: float | None = None,
        kafka: dict[str, Any] | None = None,
        topics: Topics | None = None,
        from_assignment: bool = False,
    ) -> Burst:
        """One run of the filtering scenario, in a consumer group of its own: events/s,
        a note if it fell short, the processor's CPU figures (against ``consume_cpu_us``).
        ``scrape_s``: the admin endpoint on, /metrics scraped that often. ``kafka``: the
        processor's own [kafka] settings; ``topics``: other events than the filtering
        scenario's. ``from_assignment``: timed from the processor's partition
        assignment (its log), not from the first commit seen: over compressed events a
        fetch holds ~10 times the records, and the processor's consume loop does not
        yield while aiokafka has records buffered, so its commits are seen only near
        the end."""
        topics = topics or self.filter_topics
        assert topics is not None
        fresh(self.workdir, f"filter{run}")
        n = self.sizes.filtering
        await self.sink.reset()
        config = with_admin(self.filter_config(topics, run, kafka), scrape_s)
        async with (
            processors(config, self.workdir, f"filter{run}", kafka=kafka) as procs,
            scraping(procs[0].log, scrape_s) as scrapes,
            GroupOffsets(self.bootstrap, config["kafka"]["group_id"], topics.events) as offsets,
            CpuSampler(procs[0].pid) as cpu,
        ):
            rate, done, elapsed = await offsets.rate_to(n, timeout_s=n / 2000 + 60)
            end_ms = now_ms()
            assigned_ms = assigned_at_ms(procs[0].log) if from_assignment else None
        if assigned_ms is not None and done >= n:
            elapsed = (end_ms - assigned_ms) / 1000
            rate = n / elapsed
        start_ms = end_ms - elapsed * 1000
        figures = self.cpu_figures(
            cpu, start_ms, end_ms, rate * elapsed, "event", consume_cpu_us, "filtering"
        )
        figures += scrape_figures(scrapes, scrape_s)
        sent = (await self.sink.stats())[0]
        note = "" if done >= n else f"{done} of {n} committed"
        if done >= n and not rate:
            note = "all committed by the first poll: too few events to time"
        if sent:
            note += f" {sent} requests sent?!"
        cpu_us = f", {figures[0].value:.2f} µs of CPU an event" if figures else ""
        say(f"  run {run}: {rate:,.0f} events/s{cpu_us}")
        return Burst(rate, note.strip(), None, tuple(figures), "events/s")

    # -- 3b. the processor on a SASL_SSL listener; a zstd-compressed events topic -------

    async def security(self) -> None:
        """Instant delivery and filtering with the processor on the SASL_SSL listener
        (SCRAM-SHA-512, TLS), each against the same scenario on PLAINTEXT right before
        it: alternated pairs, the median ratio reported. The bench's own producer and
        readers stay on PLAINTEXT."""
        secured = sasl_ssl_settings()
        if secured is None:
            self.add(
                Figure(
                    "SASL_SSL scenario",
                    None,
                    "",
                    note="no SASL_SSL listener (CRMHOOKS_TEST_SASL_SSL unset; scripts/bench "
                    "starts its broker with --secure)",
                )
            )
            return
        pairs = self.sizes.security_pairs
        say(
            f"7. SASL_SSL (SCRAM-SHA-512): instant delivery and filtering, {pairs} pair(s) "
            "each (PLAINTEXT, then SASL_SSL)"
        )
        bare_us = self.bare_client_cpu_us or 0.0
        # Run numbers from SECURITY_FIRST_RUN: apart from every other scenario's.
        first = SECURITY_FIRST_RUN
        instant = [
            (
                await self.instant_run(first + i, bare_us),
                await self.instant_run(first + i, bare_us, kafka=secured),
            )
            for i in range(pairs)
        ]
        self.secured_figures("instant delivery", instant)
        consume_us = self.consume_cpu_us or 0.0
        filtering = [
            (
                await self.filtering_run(first + 2 * i, consume_us),
                await self.filtering_run(first + 1 + 2 * i, consume_us, kafka=secured),
            )
            for i in range(pairs)
        ]
        self.secured_figures("filtering", filtering)

    def secured_figures(self, what: str, runs: list[tuple[Burst, Burst]]) -> None:
        """The pair with the median SASL_SSL / PLAINTEXT ratio: both CPU figures, and the
        SASL_SSL rate against the PLAINTEXT one (target 0.85)."""
        ratios = [secured.rate / plain.rate if plain.rate else 0.0 for plain, secured in runs]
        notes = [b.note for pair in runs for b in pair]
        index, note = median_pair(ratios, "pairs (PLAINTEXT, then SASL_SSL)", notes)
        plain, secured = runs[index]
        if plain.cpu_figures and secured.cpu_figures:
            cpu = secured.cpu_figures[0]
            self.add(
                Figure(
                    f"{cpu.name} over SASL_SSL (ceiling: PLAINTEXT)",
                    cpu.value,
                    cpu.unit,
                    plain.cpu_figures[0].value,
                )
            )
        self.add(
            Figure(
                f"{what} over SASL_SSL (ceiling: PLAINTEXT)",
                secured.rate,
                secured.unit,
                plain.rate,
                "ratio ≥ 0.85",
                False if any(notes) else ratio_at_least(secured.rate, plain.rate, 0.85),
                note,
            )
        )

    async def zstd(self) -> None:
        """Filtering of an events topic whose batches are zstd-compressed, against a raw
        consume of the same topic (which decompresses them too)."""
        n = self.sizes.filtering
        topics = new_topics("zstd", PARTITIONS)
        await create_topics(self.bootstrap, topics)
        start = time.monotonic()
        async with FastProducer(self.bootstrap, compression_type="zstd") as producer:
            count = await producer.send_many(topics.events, spread(n, "Closed Won", "z"))
        say(f"  produced {count:,} events, zstd batches, in {time.monotonic() - start:.1f} s")
        raw = functools.partial(raw_consume_rate, self.bootstrap, topics.events, PARTITIONS, n)

        async def run(i: int, consume_us: float) -> Burst:
            return await self.filtering_run(
                200 + i, consume_us, topics=topics, from_assignment=True
            )

        await self.measure_pairs(
            f"8. filtering a zstd-compressed events topic: {n:,} events",
            self.sizes.zstd_pairs,
            ("raw consume of the zstd topic", raw),
            run,
            "filtering throughput, zstd events",
            0.5,
            label="zstd events",
        )

    # -- 4. latency --------------------------------------------------------------------

    async def warm_up(self, topics: Topics, producer: FastProducer, timeout_s: float) -> bool:
        """One event per partition, delivered: the processors consume every partition."""
        await self.sink.reset()
        stamp = now_ms()
        for p in range(topics.partitions):
            value = event_bytes(p, ORGS[p], "Closed Won", stamp_ms=stamp, prefix=f"w{stamp:.0f}")
            await producer.send_one(topics.events, p, ORGS[p].encode(), value)
        await producer.flush()
        count = (await self.sink.wait_count(topics.partitions, timeout_s))[0]
        return count >= topics.partitions

    async def latency(self) -> None:
        s = self.sizes
        total = int(s.latency_rate * s.latency_s)
        say(f"4. latency: {s.latency_rate} events/s for {s.latency_s:.0f} s")
        topics = new_topics("latency", PARTITIONS)
        # The broker stamps each event as it appends it: the figure below splits each
        # latency into the bench's and broker's share and the processor's.
        await create_topics(self.bootstrap, topics, {"message.timestamp.type": "LogAppendTime"})
        async with (
            processors(self.instant_config(topics, "latency"), self.workdir, "latency"),
            FastProducer(self.bootstrap) as producer,
        ):
            await self.warm_up(topics, producer, 60)
            await self.sink.reset()
            # Ticks of 10 ms, 10 events each: a steady 1000/s without a burst per second.
            tick_s = 0.01
            per_tick = max(1, round(s.latency_rate * tick_s))
            start = time.monotonic()
            n = 0
            while n < total:
                for _ in range(per_tick):
                    p = n % topics.partitions
                    value = event_bytes(n, ORGS[p], "Closed Won", stamp_ms=now_ms(), prefix="l")
                    await producer.send_one(topics.events, p, ORGS[p].encode(), value)
                    n += 1
                delay = start + (n // per_tick) * tick_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await producer.flush()
            count = (await self.sink.wait_count(total, 60))[0]
            samples = await self.sink.latencies()
        note = "" if count >= total else f"{count} of {total} received"
        # In the order received (~1 a ms): where the slow ones were, for a look later.
        (self.workdir / "latency-samples.json").write_bytes(orjson.dumps(samples))
        p50, p99 = percentile(samples, 50), percentile(samples, 99)
        self.add(Figure("latency p50 (produce → receive)", p50, "ms", note=note))
        self.add(
            Figure(
                "latency p99 (produce → receive)",
                p99,
                "ms",
                target="≤ 50 ms",
                passed=at_most(p99, 50.0) if not note else False,
                note=note,
            )
        )
        appended = await append_delays(self.bootstrap, topics.events, topics.partitions, "l-")
        (self.workdir / "append-delays.json").write_bytes(orjson.dumps(appended))
        late = sum(1 for ms in appended if ms > 50.0)
        self.add(
            Figure(
                "latency p99 (produce → broker append)",
                percentile(appended, 99) if appended else None,
                "ms",
                note=(
                    f"max {max(appended):.0f} ms, {late} > 50 ms"
                    if appended
                    else "no events read back"
                ),
            )
        )
        slow = [i for i, ms in enumerate(samples) if ms > 50.0]
        self.add(
            Figure(
                "latency max (and samples > 50 ms)",
                max(samples) if samples else None,
                "ms",
                note=f"{len(slow)} > 50 ms, received {slow[0]}th to {slow[-1]}th" if slow else "",
            )
        )

    # -- 5. timers -----------------------------------------------------------------------

    def timer_config(self, topics: Topics) -> dict[str, Any]:
        url = self.sink.url
        config = base_config(self.bootstrap, topics, self.workdir / "timers.db")
        config["webhooks"] = [
            hook("Far", f"{url}/far"),
            hook("Soon", f"{url}/soon"),
            hook("Ping", f"{url}/ping", '{"ping":"${Potentials.Potential Name}"}'),
        ]
        offset = f"{self.sizes.lateness_offset_s}s"
        config["rules"] = [
            stage_rule("far", "Far", scheduled=[{"webhook": "Far", "offset": FAR_OFFSET}]),
            stage_rule("soon", "Soon", scheduled=[{"webhook": "Soon", "offset": offset}]),
            stage_rule("ping", "Ping", instant="Ping"),
        ]
        return config

    async def timers(self) -> None:
        s = self.sizes
        say(f"5. timers: {s.timers:,} pending scheduled actions")
        topics = new_topics("timers", PARTITIONS)
        await create_topics(self.bootstrap, topics)
        await self.produce(topics, spread(s.timers, "Far", "t"))
        config = self.timer_config(topics)
        path = self.workdir / "timers.toml"

        path.write_text(render_toml(config))
        first = Processor(path, self.workdir / "timers-0.log")
        second = Processor(path, self.workdir / "timers-1.log")
        try:
            await first.start()
            async with GroupOffsets(self.bootstrap, topics.group, topics.events) as offsets:
                rate, done, _ = await offsets.rate_to(s.timers, timeout_s=s.timers / 1000 + 60)
            note = "" if done >= s.timers else f"{done} of {s.timers} committed"
            self.add(
                Figure(
                    "scheduling rate (actions due in 30 days)",
                    rate,
                    "events/s",
                    note=note,
                )
            )
            rss = first.rss_mb()
            self.add(
                Figure(
                    f"processor RSS with {done:,} pending timers",
                    rss,
                    "MB",
                    target="≤ 400 MB",
                    passed=at_most(rss, 400.0),
                )
            )
            stop_s = await first.stop()
            self.add(Figure("graceful stop (SIGTERM → exit)", stop_s, "s"))
            await self.sink.reset()
            async with FastProducer(self.bootstrap) as producer:
                await producer.send_one(
                    topics.events, 0, ORGS[0].encode(), event_bytes(0, ORGS[0], "Ping", prefix="p")
                )
                await producer.flush()
            started_ms = now_ms()
            await second.start()
            count, first_ms, _ = await self.sink.wait_count(1, 120)
            recovery_s = (first_ms - started_ms) / 1000 if count else None
            self.add(
                Figure(
                    "restart recovery (start → first delivery)",
                    recovery_s,
                    "s",
                    target="≤ 15 s",
                    passed=at_most(recovery_s, 15.0),
                )
            )
            await self.lateness(topics)
        finally:
            await first.stop()
            await second.stop()

    async def lateness(self, topics: Topics) -> None:
        """Timer precision: N timers due within one minute (the target), then N due at once.

        The second figure is bound by the delivery rate, not by the heap: its ceiling is
        the time the bare client needs to send N requests.
        """
        s = self.sizes
        window_ms = s.lateness_window_s * 1000
        say(
            f"  {s.lateness:,} timers due within {s.lateness_window_s} s, "
            f"{s.lateness_offset_s} s after their events"
        )
        late, note = await self.timers_due(topics, "s", window_ms)
        p50, p99 = percentile(late, 50), percentile(late, 99)
        self.add(
            Figure(
                f"timer lateness p50 ({s.lateness:,} due within {s.lateness_window_s} s)",
                p50,
                "ms",
                note=note,
            )
        )
        self.add(
            Figure(
                f"timer lateness p99 ({s.lateness:,} due within {s.lateness_window_s} s)",
                p99,
                "ms",
                target="≤ 100 ms",
                passed=at_most(p99, 100.0) if not note else False,
                note=note,
            )
        )
        say(f"  {s.lateness:,} timers due at the same millisecond, {s.lateness_offset_s} s on")
        late, note = await self.timers_due(topics, "b", 0)
        drain_ms = s.lateness / self.bare_client_rate * 1000 if self.bare_client_rate else None
        self.add(
            Figure(
                f"timer lateness p99 ({s.lateness:,} due at once)",
                percentile(late, 99),
                "ms",
                ceiling=drain_ms,  # the bare client's time for as many requests
                note=note,
            )
        )

    async def timers_due(
        self, topics: Topics, prefix: str, window_ms: int
    ) -> tuple[list[float], str]:
        """Lateness (receive − due, ms) of ``lateness`` timers due evenly over ``window_ms``."""
        s = self.sizes
        n_total = s.lateness
        await self.sink.reset()
        base_ms = math.ceil(time.time()) * 1000 + 1000
        records = []
        for n in range(n_total):
            p = n % PARTITIONS
            at_ms = base_ms + n * window_ms // n_total
            body = event_bytes(
                n, ORGS[p], "Soon", prefix=prefix, occurred_s=at_ms / 1000, stamp_ms=at_ms
            )
            records.append((p, ORGS[p].encode(), body))
        await self.produce(topics, records)
        timeout_s = s.lateness_offset_s + window_ms / 1000 + 60
        count = (await self.sink.wait_count(n_total, timeout_s))[0]
        offset_ms = s.lateness_offset_s * 1000
        late = [x - offset_ms for x in await self.sink.latencies()]
        return late, "" if count >= n_total else f"{count} of {n_total} fired"

    # -- 6. scale-out -------------------------------------------------------------------

    async def burst_rate(self, count: int, run: int, *, own_stores: bool = True) -> Burst:
        """Deliveries/s of a burst produced while the processors already consume."""
        n = self.sizes.scale
        name = f"scale{count}" + ("" if own_stores else "shared") + f"-{run}"
        topics = new_topics(name, PARTITIONS)
        await create_topics(self.bootstrap, topics)
        records = qualifying(n, f"s{name}")
        config = self.instant_config(topics, name)
        async with (
            processors(config, self.workdir, name, count, own_stores=own_stores) as procs,
            FastProducer(self.bootstrap) as producer,
            CpuSampler(None) as machine,
            CpuSampler(self.sink.pid) as sink_cpu,
            CpuSampler(os.getpid()) as bench_cpu,
            contextlib.AsyncExitStack() as stack,
        ):
            each = [await stack.enter_async_context(CpuSampler(p.pid)) for p in procs]
            broker = None
            if BROKER_PID is not None:
                broker = await stack.enter_async_context(CpuSampler(BROKER_PID))
            await wait_assigned(procs, 30)
            if not await self.warm_up(topics, producer, 60):
                return Burst(0.0, "warm-up not delivered")
            await self.sink.reset()
            # The burst is produced while the processors are stopped (SIGSTOP), as the
            # instant scenario's events are produced before its processor starts: the
            # bench's producer then takes none of the cores the processors share.
            with stopped(procs):
                await producer.send_many(topics.events, records)
                await producer.flush()
            got, first_ms, last_ms = await self.sink.wait_count(n, n / 200 + 60)
        rate = got / ((last_ms - first_ms) / 1000) if last_ms > first_ms else 0.0
        cpu_s, wall_s = machine.usage(first_ms, last_ms)
        what = f"{count} processor{'s' if count > 1 else ''}" + (
            "" if own_stores else ", one SQLite file"
        )
        figures: list[Figure] = []
        if wall_s:
            # Processors, broker, sink and the bench share the machine: at 100 % of
            # every core, the ratio is bound by the machine, not by the processors.
            cores = os.cpu_count() or 1
            busy = 100.0 * cpu_s / wall_s / cores
            figures.append(Figure(f"machine's CPU use, all {cores} cores ({what})", busy, "%"))

        # Where the machine's CPU went, per delivery: the processors' own (more with two
        # than with one would mean each works less efficiently), the sink's, the
        # bench's (its polling), the broker's (when the bench started it) and the
        # rest (the kernel's threads, other processes): the ratio's bound here.
        def per_delivery(sampler: CpuSampler) -> float:
            return sampler.cpu_per(first_ms, last_ms, got) or 0.0

        machine_us = per_delivery(machine)
        procs_us = sum(per_delivery(sampler) for sampler in each)
        sink_us = per_delivery(sink_cpu)
        bench_us = per_delivery(bench_cpu)
        broker_us = None if broker is None else per_delivery(broker)
        if procs_us and machine_us:
            parts = [("processors'", procs_us), ("sink's", sink_us), ("bench's", bench_us)]
            rest_us = machine_us - procs_us - sink_us - bench_us
            if broker_us is None:
                parts.append(("broker's and the rest's", rest_us))
            else:
                parts += [("broker's", broker_us), ("the rest's", rest_us - broker_us)]
            for part, part_us in parts:
                figures.append(Figure(f"{part} CPU per delivery ({what})", part_us, "µs"))
        return Burst(
            rate,
            "" if got >= n else f"{got} of {n} delivered",
            machine_us if procs_us and machine_us else None,
            tuple(figures),
        )

    async def scale_out(self) -> None:
        pairs = self.sizes.scale_pairs
        say(
            f"6. scale-out: {self.sizes.scale:,} deliveries by one processor, then by two, "
            f"{pairs} time{'s' if pairs > 1 else ''} alternated"
        )
        # Alternated pairs, and the pair with the median ratio reported: the machine's
        # speed drifts within minutes, and one burst lasts a few seconds.
        runs = [(await self.burst_rate(1, i), await self.burst_rate(2, i)) for i in range(pairs)]
        ratios = [two.rate / one.rate if one.rate else 0.0 for one, two in runs]
        notes = [b.note for pair in runs for b in pair]
        index, note = median_pair(ratios, "alternated pairs", notes)
        one, two = runs[index]
        for figure in one.cpu_figures + two.cpu_figures:
            self.add(figure)
        self.add(Figure("burst delivery, 1 processor", one.rate, "deliveries/s", note=one.note))
        self.add(Figure("burst delivery, 2 processors", two.rate, "deliveries/s", note=two.note))
        if two.machine_us and one.rate:
            # Every core busy at the CPU per delivery just measured with two: the most
            # two processors could deliver here, so the most the ratio could be while
            # the sink, the broker and the bench share the cores with them.
            bound = (os.cpu_count() or 1) * 1e6 / two.machine_us / one.rate
            self.add(Figure("scale-out ratio's bound on this machine (all cores busy)", bound, "×"))
        ratio = two.rate / one.rate if one.rate else None
        self.add(
            Figure(
                "scale-out ratio (2 processors / 1)",
                ratio,
                "×",
                target="≥ 1.6",
                passed=False if any(notes) else at_least(ratio, 1.6),
                note=note,
            )
        )
        shared = await self.burst_rate(2, 0, own_stores=False)
        for figure in shared.cpu_figures:
            self.add(figure)
        self.add(
            Figure(
                "burst delivery, 2 processors sharing one SQLite file",
                shared.rate,
                "deliveries/s",
                ceiling=two.rate,  # each with its own file
                note=shared.note,
            )
        )


def fresh(workdir: Path, name: str) -> None:
    """No files left by an earlier run of the same name: its store would know these
    events' action ids as finished (and send nothing), and its log's lines (appended
    to) would be read as this run's (its partition assignment, for the zstd timing)."""
    logs = [p for p in workdir.glob(f"{name}-*.log") if p.name[len(name) + 1 : -4].isdigit()]
    for path in (workdir / f"{name}.db", *logs):
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)


def assigned_at_ms(log: Path) -> float | None:
    """When the processor logged its first partition assignment (epoch ms), from its
    log's local-time stamps (``2026-12-06 21:09:13,554``)."""
    for line in log.read_text(errors="replace").splitlines():
        if "partitions assigned" in line:
            whole = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
            return (whole + int(line[20:23]) / 1000) * 1000
    return None


@contextlib.contextmanager
def stopped(procs: list[Processor]) -> Iterator[None]:
    """The processes stopped (SIGSTOP) inside the block, continued (SIGCONT) after."""
    for p in procs:
        os.kill(p.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGCONT)


async def wait_assigned(procs: list[Processor], timeout_s: float) -> None:
    """Until every processor logged a partition assignment (its group join is over)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all("partitions assigned" in p.log.read_text(errors="replace") for p in procs):
            await asyncio.sleep(1.0)  # a late joiner's rebalance settles
            return
        await asyncio.sleep(0.1)


def receivers(name: str) -> Callable[[Bench], Coroutine[Any, Any, None]]:
    """A scenario of bench/receivers.py, imported when it runs: it needs crmhooks'
    receiver modules (``auth``), so the other scenarios still run an older ``src/``
    (A/B runs with ``PYTHONPATH``)."""

    async def run(bench: Bench) -> None:
        from bench.receivers import SCENARIOS as RECEIVER_SCENARIOS

        await RECEIVER_SCENARIOS[name](bench)

    return run


SCENARIOS: dict[str, Callable[[Bench], Coroutine[Any, Any, None]]] = {
    "ceilings": Bench.ceilings,
    "instant": Bench.instant,
    "filtering": Bench.filtering,
    "security": Bench.security,
    "zstd": Bench.zstd,
    "latency": Bench.latency,
    "timers": Bench.timers,
    "scale": Bench.scale_out,
    "steady": steady,
    "config": config_topic,
    "admin": admin,
    # Issue 24's, through the processor: HTTPS, 1,000 origins, a cached OAuth2 token.
    **{name: receivers(name) for name in ("https", "origins", "oauth2")},
}

# Scenarios left out of the default full run, so that it stays under 15 minutes:
# the long ones (a million deliveries; 100,000 configuration documents) and those
# of one feature each (the admin endpoint, HTTPS, 1,000 origins, OAuth2), ~15
# minutes together. Run with ``--extended``, or named in ``--only``.
EXTENDED = ("steady", "config", "admin", "https", "origins", "oauth2")
# The security scenario's run numbers (its files in var/bench-run): apart from the
# instant and filtering scenarios' (0...), the admin's (100...) and zstd's (200...).
SECURITY_FIRST_RUN = 300


async def main_async(args: argparse.Namespace) -> int:
    # aiokafka logs a retried NotLeaderForPartition while a new topic elects its leader.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    bootstrap = os.environ.get("CRMHOOKS_BOOTSTRAP_SERVERS", "127.0.0.1:29092")
    sizes = QUICK if args.quick else FULL
    workdir = REPO / "var" / "bench-run"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    wall = time.monotonic()
    names = args.only or [n for n in SCENARIOS if args.extended or n not in EXTENDED]
    if {"filtering", "security", "admin"} & set(names) and "ceilings" not in names:
        names.insert(0, "ceilings")  # the filtering test reads the ceiling's topic
    async with Sink(workdir, args.sink, batch=args.sink_scheduling == "batch") as sink:
        say(f"the sink: {sink.kind}, scheduling policy {sink.scheduling}")
        bench = Bench(bootstrap, sizes, workdir, sink)
        for name in SCENARIOS:
            if name not in names:
                continue
            try:
                await SCENARIOS[name](bench)
            except Exception as exc:  # one broken scenario must not lose the others' figures
                traceback.print_exc()
                bench.add(Figure(f"{name} scenario", None, "", passed=False, note=f"error: {exc}"))
    wall_s = time.monotonic() - wall
    mode = "quick" if args.quick else "full"
    print()
    print(f"crmhooks bench ({mode}), {wall_s:.0f} s")
    print(table(bench.figures))
    write_json(
        args.out,
        bench.figures,
        {
            "mode": mode,
            "wall_s": round(wall_s, 1),
            "sizes": sizes_dict(sizes),
            "sink": {"kind": args.sink, "scheduling": sink.scheduling},
        },
    )
    print(f"\nwritten: {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 1 if any(f.passed is False for f in bench.figures) and args.strict else 0


def sizes_dict(sizes: Sizes) -> dict[str, Any]:
    return {name: getattr(sizes, name) for name in Sizes.__slots__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts (CI): < 2 minutes")
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), help="run only these")
    parser.add_argument(
        "--extended",
        action="store_true",
        help=f"also run the long scenarios ({', '.join(EXTENDED)}; minutes each), "
        "left out of the default run",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="the JSON report (default bench/results/latest.json, latest-quick.json with "
        "--quick; with --only, var/bench-run/partial.json, so a partial run never replaces "
        "the full report)",
    )
    parser.add_argument(
        "--sink",
        choices=["c", "python"],
        default="c",
        help="the sink's implementation: bench/sink.c, built with cc (default), or bench/sink.py",
    )
    parser.add_argument(
        "--sink-scheduling",
        choices=["batch", "default"],
        default="batch",
        help="the sink's scheduling policy: SCHED_BATCH (default; it does not preempt the "
        "processors when a request wakes it) or the default one",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a figure falls short of its target"
    )
    args = parser.parse_args()
    if args.out is None and args.only:
        args.out = REPO / "var" / "bench-run" / "partial.json"
    elif args.out is None:
        name = "latest-quick.json" if args.quick else "latest.json"
        args.out = REPO / "bench" / "results" / name
    # uvloop, as the processor (`crmhooks run`): the ceilings measured here (the bare
    # client, the raw consumer) on the same event loop as what they bound.
    sys.exit(uvloop.run(main_async(args)))


if __name__ == "__main__":
    main()
