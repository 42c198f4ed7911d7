"""Timer math (due times of scheduled actions) and the in-memory part of the delay heap."""

from __future__ import annotations

from datetime import time
from typing import Any
from zoneinfo import ZoneInfo

from crmhooks.config import ScheduledSpec


def parse_offset_ms(text: str) -> int:
    """``"-1d"``, ``"2h"``, ``"1d2h"``, ``"30s"``, ``"+15m"`` → signed milliseconds."""
    raise NotImplementedError


def parse_time_of_day(text: str) -> time:
    """``"09:00"`` (or ``"09:00:30"``) → a time of day; ValueError otherwise."""
    raise NotImplementedError


def field_value_ms(value: Any, tz: ZoneInfo) -> int | None:
    """A record's date/datetime field value → epoch ms, or None if it is not one.

    ``yyyy-MM-dd`` is midnight in ``tz``; ``yyyy-MM-dd HH:mm`` is wall time in ``tz``;
    RFC 3339 carries its own offset.
    """
    raise NotImplementedError


def compute_due_ms(
    spec: ScheduledSpec, record: dict[str, Any], trigger_ms: int, tz: ZoneInfo
) -> int | None:
    """``base + offset``, then moved to ``spec.at`` in ``tz`` on that local day.

    ``base`` is ``trigger_ms`` when ``spec.relative_to == "trigger"``, else the
    record's field; None when that field is missing or not a date/datetime.
    """
    raise NotImplementedError
