"""Criteria values typed (number, date, text) and compared as SPEC §3 says (no I/O).

How each operator uses them is ``criteria``'s docstring.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_INT_RE = re.compile(r"[+-]?\d+")
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATETIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def as_number(value: Any) -> int | float | None:
    """A number, or a string holding one (``"25000"``, ``"-1.5e3"``); else None."""
    kind = type(value)
    if kind is int or kind is float:  # `type is`: bool is not a number here
        return value  # type: ignore[no-any-return]  # checked by the type test
    if kind is str:
        text = value.strip()
        if _NUMBER_RE.fullmatch(text) is None:
            return None
        if _INT_RE.fullmatch(text):
            return int(text)
        number = float(text)
        return number if math.isfinite(number) else None
    return None


def as_instant(value: Any) -> date | datetime | None:
    """``yyyy-MM-dd`` → date; ``yyyy-MM-dd HH:mm`` or RFC 3339 → datetime; else None."""
    if type(value) is not str or len(value) < 10 or value[4] != "-":
        return None
    try:
        if len(value) == 10:
            return date.fromisoformat(value) if _DATE_RE.fullmatch(value) else None
        if _DATETIME_RE.match(value):
            return datetime.fromisoformat(value.replace("t", "T").replace("z", "Z"))
    except ValueError:
        return None
    return None


def _compare_instants(a: date, b: date) -> int | None:
    a_is_dt = isinstance(a, datetime)
    b_is_dt = isinstance(b, datetime)
    if a_is_dt != b_is_dt:
        # One side is a day: compare days (a datetime's own calendar day).
        a = a.date() if isinstance(a, datetime) else a
        b = b.date() if isinstance(b, datetime) else b
    elif (
        isinstance(a, datetime)
        and isinstance(b, datetime)
        and (a.tzinfo is None) != (b.tzinfo is None)
    ):
        return None  # wall time vs an instant: no time zone to relate them
    return (a > b) - (a < b)


def as_text(value: Any) -> str:
    """The text a value is matched as: numbers without exponent noise, true/false."""
    kind = type(value)
    if kind is str:
        return value  # type: ignore[no-any-return]  # checked by the type test
    if value is None:
        return ""
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        return str(int(value)) if value.is_integer() else repr(value)
    return ""


def is_empty(value: Any) -> bool:
    return value is None or value == "" or value == []


@dataclass(frozen=True, slots=True)
class Const:
    """A criteria constant with its typed forms computed once."""

    raw: Any
    number: int | float | None
    instant: date | None
    folded: str

    @classmethod
    def of(cls, raw: Any) -> Const:
        return cls(raw, as_number(raw), as_instant(raw), as_text(raw).casefold())

    @property
    def plain_text(self) -> bool:
        return type(self.raw) is str and self.number is None and self.instant is None


def compare(value: Any, const: Const) -> int | None:
    """Typed three-way comparison of a field value with a constant; None if incompatible."""
    if const.number is not None:
        number = as_number(value)
        if number is not None:
            return (number > const.number) - (number < const.number)
        return None
    if const.instant is not None:
        instant = as_instant(value)
        return None if instant is None else _compare_instants(instant, const.instant)
    if const.plain_text:
        if type(value) is not str:
            return None
        folded = value.casefold()
        return (folded > const.folded) - (folded < const.folded)
    if type(const.raw) is bool and type(value) is bool:
        return 0 if value is const.raw else 1  # equality only: ordering ops reject bools
    return None


def equals(value: Any, const: Const) -> bool:
    """``is``: typed equality when both sides are numbers or dates, else text, any case."""
    if const.number is not None:
        number = as_number(value)
        if number is not None:
            return number == const.number
    if const.instant is not None:
        instant = as_instant(value)
        if instant is not None:
            return _compare_instants(instant, const.instant) == 0
    return as_text(value).casefold() == const.folded
