"""The admin endpoint's cost (issue 25): instant delivery and filtering with ``/metrics``
scraped every second, against the same runs with the endpoint off.

    scripts/bench --only admin            (4 pairs of each; --quick: 2)

Each pair is two runs of the scenario of bench/run.py (``instant_run``,
``filtering_run``: the same events, config and sink), one with ``[admin] listen``
on a free port and a scraper GETting ``/metrics`` every second from the
processor's start to the run's end, as Prometheus would, one without. Which
comes first alternates from pair to pair, so that the shared machine's drift over
a few minutes favours neither. The figure is the pair with the median ratio
(scraped / not scraped, target ≥ 0.97 ×); its note lists every pair's ratio.

The effect is small against the machine's noise, so the cost of one scrape is also
measured on its own: an idle processor scraped ``COST_SCRAPES`` times back to back,
its CPU (``/proc/PID/stat``) per scrape, and what one scrape a second takes of a core.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp

from bench.harness import CpuSampler, admin_port, create_topics, new_topics, now_ms, processors
from bench.report import Figure, ratio_at_least

if TYPE_CHECKING:
    from bench.run import Bench, Burst

# Prometheus's scrape interval in the figure: every second (its default is
# 15 s; a second is the harshest setting an operator is likely to use).
SCRAPE_S = 1.0
TARGET = 0.97
# Scrapes of an idle processor, back to back, for the CPU of one: ~1 ms each, so
# ~0.3 s of CPU, 30 ticks of /proc's 10 ms clock (a 3 % resolution).
COST_SCRAPES = 300
# Run numbers of these runs: apart from those of the instant and filtering scenarios
# (their files in var/bench-run, the filtering runs' consumer groups).
FIRST_RUN = 100

Run = Callable[[int, float | None], Awaitable["Burst"]]


async def admin(bench: Bench) -> None:
    from bench.run import say

    # 4 (quick: 2): the ratio's spread is the point; BENCH_ADMIN_PAIRS for more.
    pairs = int(os.environ.get("BENCH_ADMIN_PAIRS") or bench.sizes.instant_pairs + 1)
    say(
        f"8. the admin endpoint: instant delivery and filtering with /metrics scraped every "
        f"{SCRAPE_S:.0f} s against the same without, {pairs} alternated pairs each"
    )
    bare_us = bench.bare_client_cpu_us or 0.0
    consume_us = bench.consume_cpu_us or 0.0
    await measure(
        bench,
        f"instant delivery ({bench.sizes.instant:,} events), /metrics scraped every 1 s",
        pairs,
        lambda run, scrape_s: bench.instant_run(run, bare_us, scrape_s),
        FIRST_RUN,
    )
    await measure(
        bench,
        f"filtering ({bench.sizes.filtering:,} events), /metrics scraped every 1 s",
        pairs,
        lambda run, scrape_s: bench.filtering_run(run, consume_us, scrape_s),
        FIRST_RUN + 2 * pairs,
    )
    await scrape_cost(bench)


async def scrape_cost(bench: Bench) -> None:
    """The processor's CPU for one /metrics scrape, idle (no events), back to back."""
    from bench.run import PARTITIONS, with_admin

    topics = new_topics("scrape-cost", PARTITIONS)
    await create_topics(bench.bootstrap, topics)
    config = with_admin(bench.instant_config(topics, "scrape-cost"), SCRAPE_S)
    async with (
        processors(config, bench.workdir, "scrape-cost") as procs,
        aiohttp.ClientSession() as http,
        CpuSampler(procs[0].pid) as cpu,
    ):
        port = await admin_port(procs[0].log)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # partitions assigned: the loop idles
            async with http.get(f"{url}/readyz") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.1)
        size = 0
        start_ms = now_ms()
        for _ in range(COST_SCRAPES):
            async with http.get(f"{url}/metrics") as resp:
                size = len(await resp.read())
        end_ms = now_ms()
    per_ms = cpu.cpu_per(start_ms, end_ms, COST_SCRAPES)
    per_ms = None if per_ms is None else per_ms / 1000  # µs → ms
    bench.add(
        Figure(
            "processor's CPU per /metrics scrape (idle, back to back)",
            per_ms,
            "ms",
            note=f"{size:,} bytes a scrape (process collector included)",
        )
    )
    share = None if per_ms is None else per_ms / (SCRAPE_S * 1000) * 100
    bench.add(Figure("its share of a core at one scrape a second", share, "%"))


async def measure(bench: Bench, name: str, pairs: int, run: Run, first_run: int) -> None:
    """``pairs`` alternated pairs of ``run`` without and with scraping; the median pair."""
    from bench.run import median_pair, say

    results: list[tuple[Burst, Burst]] = []
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        got: dict[bool, Burst] = {}
        for k, scraped in enumerate(order):
            got[scraped] = await run(first_run + 2 * i + k, SCRAPE_S if scraped else None)
        say(
            f"  pair {i + 1} ({'off first' if i % 2 == 0 else 'on first'}): "
            f"{got[False].rate:,.0f} without, {got[True].rate:,.0f} {got[True].unit} scraped; "
            f"CPU {_cpu(got[False])} → {_cpu(got[True])} µs"
        )
        results.append((got[False], got[True]))
    ratios = [on.rate / off.rate if off.rate else 0.0 for off, on in results]
    notes = [off.note or on.note for off, on in results]
    index, note = median_pair(ratios, "pairs (not scraped, scraped)", notes)
    cpus = ", ".join(f"{_cpu(off)} → {_cpu(on)}" for off, on in results)
    per = "delivery" if results[0][0].unit.startswith("deliver") else "event"
    note = f"{note}; the processor's CPU µs a {per}, each pair (not → scraped): {cpus}"
    off, on = results[index]
    scrapes = next((f.value for f in on.cpu_figures if f.name.startswith("scrapes")), None)
    if not scrapes:
        note = f"{note}; no scrape was made: not measured".lstrip("; ")
    # The scraped run's figures against the same of the run without (CPU per delivery
    # or event, share of a core): the ceiling column holds the run without.
    without = {f.name: f.value for f in off.cpu_figures}
    for figure in on.cpu_figures:
        bench.add(
            Figure(
                f"{figure.name}, scraped (ceiling: not)",
                figure.value,
                figure.unit,
                without.get(figure.name),
            )
        )
    passed = False if any(notes) or not scrapes else ratio_at_least(on.rate, off.rate, TARGET)
    bench.add(Figure(name, on.rate, on.unit, off.rate, f"ratio ≥ {TARGET}", passed, note))


def _cpu(burst: Burst) -> str:
    """The processor's CPU per delivery or event of a run, µs."""
    found = next(
        (f.value for f in burst.cpu_figures if f.name.startswith("processor's CPU per")), None
    )
    return "?" if found is None else f"{found:.1f}"
