"""Micro-benchmark of event decoding: median µs per ``decode_event`` call, per event shape.

    .venv/bin/python -m bench.decode_micro [EVENTS_PY ...]

Without arguments it measures ``crmhooks.events``; given copies of events.py (say,
an older version from ``git show``), it measures each of them as well, on the same
events, to compare. Every shape is decoded once first and must give an equal event.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

from bench.harness import event_bytes
from crmhooks import events

_FIELDS: dict[str, Any] = {
    "Potential Name": "Renewal 2027 – Ação Global",
    "Amount": 125000.5,
    "Stage": "Negotiation/Review",
    "Probability": 60,
    "Type": "Existing Business",
    "Closing Date": "2027-03-31",
    "Potential Owner": "Ana Silva",
    "Lead Source": "Partner",
    "Next Step": "Send the revised quote",
    "Campaign Source": None,
    "Contact Name": "Wei Wong",
    "Account Name": "Acme Corp",
    "Expected Revenue": 75000.3,
    "Created Time": "2026-11-28 09:00",
    "Modified Time": "2026-11-28T09:00:00.123456+08:00",
    "Description": "Multi-year renewal. " * 8,
    "Tags": ["renewal", "priority", "emea"],
    "Regions": ["PT", "ES", "FR", "DE"],
    "Discount Approved": False,
    "Competitors": [],
}

# Shapes, each an event as producers write it (compact JSON, as orjson does).
SHAPES: dict[str, bytes] = {
    # The "filtering throughput" benchmark's event, verbatim.
    "bench": event_bytes(12345, "org-acme", "Negotiation", occurred_s=1_764_320_400.123),
    # SPEC §2's example: previous, two related records, user, organization.
    "spec": orjson.dumps(
        {
            "event_id": "evt-000123",
            "org_id": "org-acme",
            "module": "Potentials",
            "operation": "edit",
            "occurred_at": "2026-11-28T09:00:00Z",
            "record_id": "4150868000000224005",
            "record": {
                "Potential Name": "Big deal",
                "Amount": 25000,
                "Stage": "Closed Won",
                "Type": "New Business",
                "Closing Date": "2026-11-30",
                "Potential Owner": "Ana Silva",
                "Payment Due": "2026-12-05 09:30",
            },
            "previous": {"Stage": "Negotiation"},
            "related": {
                "Accounts": {"Account Name": "Acme Corp"},
                "Contacts": {"Last Name": "Wong", "Mobile": "+8613800000000"},
            },
            "user": {"Last Name": "Silva", "Mobile": "+351900000000", "Email": "ana@example.com"},
            "organization": {"Company Name": "Acme"},
        }
    ),
    # A wide record with arrays and non-ASCII text, an integer id, an offset,
    # microseconds, and every optional object.
    "wide": orjson.dumps(
        {
            "event_id": "0f8c2a7e-3b1d-4c5e-9a6f-1d2e3f4a5b6c",
            "org_id": "org-acme-eu",
            "module": "Deals",
            "operation": "edit",
            "occurred_at": "2026-11-28T17:00:00.123456+08:00",
            "record_id": 4150868000000224005,
            "record": _FIELDS,
            "previous": {"Stage": "Qualification", "Amount": 100000, "Tags": ["renewal"]},
            "related": {
                "Accounts": {"Account Name": "Acme Corp", "Industry": "Manufacturing"},
                "Contacts": {"Last Name": "Wong", "Mobile": "+8613800000000"},
                "Campaigns": {"Campaign Name": "EMEA Q1", "Status": "Active"},
            },
            "user": {"Last Name": "Silva", "Mobile": "+351900000000", "Email": "ana@example.com"},
            "organization": {"Company Name": "Acme", "Time Zone": "Asia/Shanghai"},
        }
    ),
    # A delete: required fields and an empty record only.
    "minimal": orjson.dumps(
        {
            "event_id": "e1",
            "org_id": "org-acme",
            "module": "Leads",
            "operation": "delete",
            "occurred_at": "2026-11-28T09:00:00Z",
            "record_id": "1",
            "record": {},
        }
    ),
}


def load_events_module(path: Path) -> ModuleType:
    """A copy of events.py, loaded as a module of its own."""
    spec = importlib.util.spec_from_file_location(f"events_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up
    spec.loader.exec_module(module)
    return module


def median_us(calls: list[Callable[[], object]], number: int, repeat: int) -> list[float]:
    """Per call: the median over ``repeat`` runs of its µs per call in ``number`` calls.

    The calls take turns, run by run, so that a busy moment slows them alike.
    """
    runs: list[list[float]] = [[] for _ in calls]
    for _ in range(repeat):
        for call, times in zip(calls, runs, strict=True):
            times.append(timeit.timeit(call, number=number, timer=time.perf_counter))
    return [statistics.median(times) / number * 1e6 for times in runs]


def _fields(event: object) -> tuple[object, ...]:
    return tuple(getattr(event, name) for name in events.RecordEvent.__struct_fields__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", type=Path, help="copies of events.py to compare")
    parser.add_argument("--number", type=int, default=20_000, help="calls per run")
    parser.add_argument("--repeat", type=int, default=25, help="runs per measure")
    args = parser.parse_args(argv)
    candidates = {"current": events} | {
        str(path): load_events_module(path) for path in args.modules
    }
    print(f"{'shape':8} {'bytes':>5}  " + "  ".join(f"{name:>12}" for name in candidates))
    for shape, data in SHAPES.items():
        reference = _fields(events.decode_event(data))
        calls: list[Callable[[], object]] = []
        for name, module in candidates.items():
            decode: Callable[[bytes], object] = module.decode_event
            if _fields(decode(data)) != reference:
                raise SystemExit(f"{shape}: {name} decodes differently")
            calls.append(partial(decode, data))
        cells = median_us(calls, args.number, args.repeat)
        print(f"{shape:8} {len(data):5}  " + "  ".join(f"{us:9.3f} µs" for us in cells))


if __name__ == "__main__":
    main()
