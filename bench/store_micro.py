"""Micro-benchmark of the store's commit path: CPU µs per action (or write) of ``Store.write``.

    .venv/bin/python -m bench.store_micro [--rounds N] [--only NAME ...]

Each scenario writes to a fresh SQLite file (WAL, as the processor's) through the
group-commit writer, under uvloop, with an in-memory changelog sink whose
acknowledgement is ready at once, so the figures are the store's own work: the
SQL, the changelog records' encoding, the writer's bookkeeping, its checkpoints
(on aiosqlite's thread: ``time.process_time`` counts every thread). Scenarios:

- ``done``: 500 instant actions stored finished at their first write
  (``WriteBatch.done``), one transaction: what every instant delivery costs.
- ``pending``: 500 new scheduled actions with their record snapshots (~1 KB
  events), one transaction: the scheduling path.
- ``finished``: 500 of those pending actions finished, one transaction: a fired
  timer's report.
- ``quota``: 100 quota blocks, one write each, one after the other: a
  transaction's fixed cost (each one a commit and a changelog record).

Each scenario runs once to warm up, then ``--rounds`` times (default 25); the
median and the fastest round are printed (on a shared machine the fastest is the
steadier figure: other processes only ever add to a round's CPU time). Compare
two versions of ``src/`` by running this with ``PYTHONPATH`` set to each one's
``src`` (A/B, alternated: the machine is shared).
It uses only what both the store module and the store package export.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Literal

import uvloop

from bench.harness import event_bytes
from crmhooks.actions import Action
from crmhooks.store import ChangelogRecord, Store, WriteBatch

ACTIONS = 500  # a fetch's worth of events (app.FETCH_MAX_RECORDS)
QUOTA_WRITES = 100
PARTITIONS = 6  # the bench's events topic


class CountingSink:
    """A changelog sink that keeps only a count: acknowledged at once."""

    def __init__(self) -> None:
        self.records = 0

    async def __call__(self, records: Sequence[ChangelogRecord]) -> Awaitable[dict[int, int]]:
        self.records += len(records)
        return self._acked()

    @staticmethod
    async def _acked() -> dict[int, int]:
        return {}


def action(n: int, kind: Literal["instant", "scheduled"]) -> Action:
    org = f"org-{n % PARTITIONS}"
    return Action(
        action_id=f"ev-{n}:rule-1:Hook",
        event_id=f"ev-{n}",
        org_id=org,
        module="Potentials",
        record_id=f"r{n}",
        rule_id="rule-1",
        webhook="Hook",
        kind=kind,
        slot=0 if kind == "instant" else 1,
        due_ms=1_764_320_400_000 + n,
        partition=n % PARTITIONS,
        source_offset=n,
    )


Scenario = Callable[[Store, int], Awaitable[int]]  # (store, round) -> units written


async def done(store: Store, r: int) -> int:
    base = r * ACTIONS
    batch = WriteBatch(
        done=[(action(base + i, "instant"), "delivered", 1_764_320_400_000) for i in range(ACTIONS)]
    )
    await store.write(batch)
    return ACTIONS


async def pending(store: Store, r: int) -> int:
    base = r * ACTIONS
    actions = [action(base + i, "scheduled") for i in range(ACTIONS)]
    await store.write(
        WriteBatch(
            new_actions=actions,
            snapshots=[
                (a.record_key, a.partition, event_bytes(base + i, a.org_id, "Negotiation"))
                for i, a in enumerate(actions)
            ],
        )
    )
    return ACTIONS


async def finished(store: Store, r: int) -> int:
    """Finishes the actions ``pending`` wrote in the same round (set up untimed)."""
    base = r * ACTIONS
    await store.write(
        WriteBatch(
            finished=[
                (action(base + i, "scheduled").action_id, "delivered", 1_764_320_500_000)
                for i in range(ACTIONS)
            ]
        )
    )
    return ACTIONS


async def quota(store: Store, r: int) -> int:
    for i in range(QUOTA_WRITES):
        org = f"org-{i % 50}"
        await store.write(WriteBatch(quota=[(org, "2026-11-28", i % PARTITIONS, 16)]))
    return QUOTA_WRITES


SCENARIOS: dict[str, Scenario] = {
    "done": done,
    "pending": pending,
    "finished": finished,
    "quota": quota,
}


async def run_scenario(name: str, rounds: int, workdir: Path) -> tuple[float, float, float]:
    """(median CPU µs per unit, fastest round's, median wall µs per unit) over
    ``rounds`` after a warm-up."""
    scenario = SCENARIOS[name]
    cpu_us: list[float] = []
    wall_us: list[float] = []
    async with Store(workdir / f"{name}.db") as store:
        store.changelog = CountingSink()
        for r in range(rounds + 1):
            if name == "finished":
                await pending(store, r)  # untimed: the rows to finish
            cpu, wall = time.process_time(), time.perf_counter()
            units = await scenario(store, r)
            cpu = time.process_time() - cpu
            wall = time.perf_counter() - wall
            if r:  # round 0 warms up
                cpu_us.append(cpu * 1e6 / units)
                wall_us.append(wall * 1e6 / units)
    return statistics.median(cpu_us), min(cpu_us), statistics.median(wall_us)


async def main_async(names: Sequence[str], rounds: int) -> None:
    import crmhooks.store as store_module

    print(f"store: {Path(store_module.__file__ or '?').parent}")
    with tempfile.TemporaryDirectory(prefix="store-micro-") as tmp:
        for name in names:
            cpu, fastest, wall = await run_scenario(name, rounds, Path(tmp))
            unit = "write" if name == "quota" else "action"
            print(
                f"{name:9s} {cpu:8.2f} µs CPU / {unit} (fastest {fastest:6.2f})"
                f"   {wall:8.2f} µs wall / {unit}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS))
    args = parser.parse_args()
    uvloop.run(main_async(args.only, args.rounds))


if __name__ == "__main__":
    main()
