"""The bench's figures: a table on stdout and bench/results/latest.json with the machine."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure; ``ratio`` is value/ceiling, compared with ``target`` when set."""

    name: str
    value: float | None
    unit: str
    ceiling: float | None = None
    target: str = ""  # for the table, e.g. "ratio ≥ 0.8" or "≤ 50 ms"
    passed: bool | None = None  # None: informational
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.ceiling:
            return None
        return self.value / self.ceiling


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile ``q`` (0..100); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def at_least(value: float | None, limit: float) -> bool | None:
    return None if value is None else value >= limit


def at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _num(value: float | None, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "—"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}f}"
    return f"{text} {unit}".strip()


def table(figures: Sequence[Figure]) -> str:
    """A Markdown table: figure, value, ceiling, ratio, target, pass/short."""
    rows = ["| figure | value | ceiling | ratio | target | result |", "|---|---|---|---|---|---|"]
    for f in figures:
        result = {True: "pass", False: "**short**", None: "info"}[f.passed]
        if f.note:
            result += f" ({f.note})"
        # A figure judged against a target shows 3 decimals: 1.597 × short of ≥ 1.6
        # must not read "1.60".
        digits = 2 if f.passed is None else 3
        ratio = "—" if f.ratio is None else f"{f.ratio:.{digits}f}"
        rows.append(
            f"| {f.name} | {_num(f.value, f.unit, digits)} | {_num(f.ceiling, f.unit, digits)} "
            f"| {ratio} "
            f"| {f.target or '—'} | {result} |"
        )
    return "\n".join(rows)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_mb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_mb = int(line.split()[1]) // 1024
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_mb": mem_mb,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(path: Path, figures: Sequence[Figure], extra: dict[str, Any]) -> None:
    data = {
        **extra,
        "machine": machine(),
        "figures": [{**asdict(f), "ratio": f.ratio} for f in figures],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")


def ratio_at_least(value: float | None, ceiling: float | None, limit: float) -> bool | None:
    """value/ceiling ≥ limit; None (informational) when either is unknown."""
    if value is None or not ceiling:
        return None
    return value / ceiling >= limit
