"""Field values as text (dates, numbers, arrays) and as whole JSON values, before any escaping.

The rules are SPEC §4's; the package docstring (``crmhooks.templates``) lists
them. A whole JSON value lives here, not in ``jsondoc``, because an object
value formats as JSON text in every context.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Final
from zoneinfo import ZoneInfo

import orjson

# An encoder turns a field value (None when missing) into text for one context.
Encoder = Callable[[Any, ZoneInfo], str]

_SURROGATES: Final = re.compile("[\ud800-\udfff]")
# Cheap pre-check before the exact RFC 3339 pattern: "yyyy-MM-ddT..." shapes only.
_RFC3339: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:[Zz]|[+-]\d{2}:\d{2})"
)
# Python's repr switches to exponent notation outside [1e-4, 1e16); below 2**53
# every integral float is exact, so int() is a safe fast path.
_EXACT_INT_FLOAT: Final = 2.0**53


class Verbatim:
    """Text that formats as itself: a secret is sent as written, never read as a
    date-time (``format_value`` ends in ``str(value)`` for it)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:  # never the value
        return "Verbatim(***)"


def fix_surrogates(text: str) -> str:
    """Lone surrogates (any surrogate code point in a str) → U+FFFD; they cannot be UTF-8."""
    return _SURROGATES.sub("\ufffd", text)


def _format_datetime(dt: datetime, tz: ZoneInfo) -> str:
    local = dt.astimezone(tz) if dt.tzinfo is not None else dt
    return f"{local.year:04d}-{local.month:02d}-{local.day:02d} {local.hour:02d}:{local.minute:02d}"


def _format_str(text: str, tz: ZoneInfo) -> str:
    # Only an RFC 3339 date-time with an offset changes: yyyy-MM-dd and
    # yyyy-MM-dd HH:mm are already the CRM forms (and carry no zone to convert).
    if len(text) >= 17 and text[4] == "-" and text[10] in "Tt " and _RFC3339.fullmatch(text):
        try:
            parsed = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
            return _format_datetime(parsed, tz)
        except (ValueError, OverflowError):
            return text  # e.g. month 13: not a date-time after all, send it as written
    return text


def format_number(value: float | Decimal) -> str:
    """A number in plain notation, never with an exponent (``1e21`` → ``1000…0``)."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < _EXACT_INT_FLOAT:
            return str(int(value))  # also turns -0.0 into "0"
        text = repr(value)
        if "e" not in text:
            return text
        value = Decimal(text)  # repr is the shortest round-tripping form
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def format_value(value: Any, tz: ZoneInfo) -> str:
    """A field value as text (SPEC §4): see the package docstring for the rules."""
    if type(value) is str:
        return _format_str(value, tz)
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_number(value) if math.isfinite(value) else ""
    if isinstance(value, Decimal):
        return format_number(value) if value.is_finite() else ""
    if isinstance(value, str):
        return _format_str(value, tz)
    if isinstance(value, list | tuple):
        # Multi-select picklists: the CRM joins the chosen options with ";".
        return ";".join([format_value(item, tz) for item in value])
    if isinstance(value, datetime):
        return _format_datetime(value, tz)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return json_value(value, tz)
    return str(value)


def needs_json_escape(text: str) -> bool:
    """Whether ``json_string`` must escape a character of ``text``: a quote, a
    backslash, or one ``isprintable`` rejects (control characters, U+2028/U+2029,
    surrogates...). Most field values have none, and go as they are."""
    return not text.isprintable() or '"' in text or "\\" in text


def json_string(text: str) -> str:
    """``text`` as a quoted JSON string literal, safe to embed anywhere (also in JS)."""
    if not needs_json_escape(text):
        return f'"{text}"'  # as orjson writes it (a property test compares them)
    try:
        out = orjson.dumps(text)
    except orjson.JSONEncodeError:  # lone surrogates are not valid UTF-8
        out = orjson.dumps(fix_surrogates(text))
    result = out.decode()
    if "\u2028" in result or "\u2029" in result:
        result = result.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return result


def json_value(value: Any, tz: ZoneInfo) -> str:
    """A field value as a whole JSON value: its type is kept; missing/null → ``null``."""
    if type(value) is str:
        return json_string(_format_str(value, tz))
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_number(value) if math.isfinite(value) else "null"
    if isinstance(value, Decimal):
        return format_number(value) if value.is_finite() else "null"
    if isinstance(value, list | tuple):
        return "[" + ",".join([json_value(item, tz) for item in value]) + "]"
    if isinstance(value, Mapping):
        items = [json_string(str(k)) + ":" + json_value(v, tz) for k, v in value.items()]
        return "{" + ",".join(items) + "}"
    return json_string(format_value(value, tz))
