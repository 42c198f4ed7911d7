"""The steady-state scenario: does a long run cost more per delivery than a short one?

A million instant deliveries in one run of the processor (a tenth of that with
``--quick``). The sink's count is sampled with the processor's CPU; the CPU per
delivery over the first tenth of the deliveries is compared with the last tenth
(target: within 10 %), and the store file's size at the end is reported, with
what it holds per delivery: caches, tables or the heap that grow with every
delivery would show in one or the other.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bench.harness import CpuSampler, count_results, create_topics, new_topics, now_ms, processors
from bench.report import Figure, at_most

if TYPE_CHECKING:
    from bench.run import Bench

# The last tenth may cost at most this much more CPU per delivery than the first.
MAX_GROWTH = 1.10
# How often the sink's count is read: each read is one request to the sink, and
# windows of a tenth of a run (10,000 deliveries at least) span many reads.
SAMPLE_S = 0.1


def crossing(samples: Sequence[tuple[float, int]], count: int) -> float:
    """The moment (epoch ms) the sink's count reached ``count``, between two samples."""
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if c0 <= count <= c1:
            if c1 == c0:
                return t0
            return t0 + (t1 - t0) * (count - c0) / (c1 - c0)
    raise ValueError(f"the sink never counted {count} requests")


def store_size_mb(path: Path) -> float:
    """The store's files (database, WAL, shared memory), in MB."""
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
    return sum(f.stat().st_size for f in files if f.exists()) / 1e6


async def steady(bench: Bench) -> None:
    from bench.run import PARTITIONS, say, spread

    n = bench.sizes.steady
    window = n // 10
    say(f"7. steady state: {n:,} instant deliveries in one run, first {window:,} against last")
    topics = new_topics("steady", PARTITIONS)
    await create_topics(bench.bootstrap, topics)
    await bench.produce(topics, spread(n, "Closed Won", "s"))
    await bench.sink.reset()
    config = bench.instant_config(topics, "steady")
    store = Path(config["store"]["path"])
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + n / 200 + 60
    async with (
        processors(config, bench.workdir, "steady") as procs,
        CpuSampler(procs[0].pid) as cpu,
    ):
        count = 0
        stalled = time.monotonic()
        while count < n and time.monotonic() < deadline:
            await asyncio.sleep(SAMPLE_S)
            now_count = (await bench.sink.stats())[0]
            samples.append((now_ms(), now_count))
            if now_count != count:
                count, stalled = now_count, time.monotonic()
            elif count and time.monotonic() - stalled > 10:
                break  # nothing for 10 s: the shortfall is reported below
        delivered, _ = await count_results(
            bench.bootstrap, topics.results, topics.partitions, "delivered"
        )
    note = "" if delivered >= n else f"{delivered:,} of {n:,} delivered"
    first = last = None
    if count >= n:
        starts = [t for t, c in samples if c > 0]
        first = cpu.cpu_per(starts[0], crossing(samples, window), window)
        last = cpu.cpu_per(crossing(samples, n - window), samples[-1][0], window)
    growth = last / first if first and last else None
    size_mb = store_size_mb(store)
    bench.add(Figure(f"steady state: CPU per delivery, first {window:,}", first, "µs"))
    bench.add(
        Figure(
            f"steady state: CPU per delivery, last {window:,} of {n:,}",
            last,
            "µs",
            first,
            f"ratio ≤ {MAX_GROWTH}",
            False if note else at_most(growth, MAX_GROWTH),
            note,
        )
    )
    bench.add(
        Figure(
            f"store file size after {n:,} deliveries (WAL included)",
            size_mb,
            "MB",
            note=f"{size_mb * 1e6 / max(n, 1):.0f} bytes a delivery; finished actions are kept "
            "for [store] finished_retention_s (7 days), then purged",
        )
    )
