"""RFC 3339 date-times parsed into epoch ms: strictly, and cached for texts alike."""

from __future__ import annotations

import re
from datetime import date

# RFC 3339 §5.6 date-time, strictly: Python's fromisoformat also takes ISO 8601
# forms (week dates, basic format, no seconds) that other consumers would not.
# Up to the seconds every field has a fixed width, so they are sliced by position;
# only the first 3 digits of a fraction are captured (the rest are truncated).
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.([0-9]{1,3})[0-9]*)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_MS_PER_DAY = 86_400_000
# Looked up rather than computed per event (int(), ljust): every 1-3 digit
# fraction, and every offset in range (±23:59) as the ms that make local time UTC;
# an offset missing is out of range. Built at import in ~2 ms.
_FRACTION_MS: dict[str | None, int] = {None: 0} | {
    f"{n:0{width}d}": n * 10 ** (3 - width) for width in (1, 2, 3) for n in range(10**width)
}
_OFFSET_MS: dict[str, int] = {"Z": 0, "z": 0} | {
    f"{sign}{h:02d}:{m:02d}": (h * 60 + m) * 60_000 * (-1 if sign == "+" else 1)
    for sign in "+-"
    for h in range(24)
    for m in range(60)
}


def parse_rfc3339_ms(text: str) -> int:
    """Epoch ms of an RFC 3339 date-time (offset or ``Z`` required); ValueError otherwise.

    Fractions of a millisecond are truncated; a leap second (``:60``) is the first
    millisecond of the next minute.
    """
    ms = _TEXT_MS.get(text)
    if ms is not None:
        return ms
    head_ms = _HEAD_MS.get(text[:19])
    tail_ms = _TAIL_MS.get(text[19:])
    if head_ms is not None and tail_ms is not None:
        ms = head_ms + tail_ms
    else:
        ms = _parse_rfc3339_ms(text)
    if len(_TEXT_MS) >= _CACHE_SIZE:
        _TEXT_MS.clear()
    _TEXT_MS[text] = ms
    return ms


# Why cached: events arrive roughly in time order, so at any rate that matters most
# share their time with one just before: its text whole (producers writing seconds,
# a bulk update, any rate over one event a millisecond), or its second, and their
# fraction and offset with many. So first the whole text (one dict get, ~40 ns);
# then a 19-character head (date, time to the second) and a tail (fraction,
# offset), each with its own share of the value: a text whose head and tail have
# both been seen in valid texts is valid, and its value their sum (two slices and
# two gets, ~0.2 µs); then the regex (~0.5 µs). A text seen once costs ~70 ns more
# than without the first cache. Only tails of up to 3 fraction digits are kept:
# they repeat, finer ones rarely do. Why 4096 entries: over an hour of seconds, or
# every millisecond in a few offsets, for producers lagging each other or a replayed
# backlog, in under 1 MB each; when full, a cache starts again empty (cheaper than
# an LRU on every hit).
_CACHE_SIZE = 4096
_TEXT_MS: dict[str, int] = {}  # a whole text → its ms
_HEAD_MS: dict[str, int] = {}  # yyyy-MM-ddTHH:mm:ss → ms since 1970-01-01T00:00:00 local
_TAIL_MS: dict[str, int] = {}  # [.fff](Z|±HH:mm) → ms to add: the fraction, minus the offset
# parse_rfc3339_ms's first step, for the loop every event read goes through
# (``event_shape.head_ms``), which inlines it: the ms of a text seen, or None.
cached_ms = _TEXT_MS.get


def _parse_rfc3339_ms(text: str) -> int:
    """``parse_rfc3339_ms`` for a text whose head or tail is not cached; caches them."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError("expected yyyy-MM-ddTHH:mm:ss[.fff] followed by Z or ±HH:mm")
    head = text[:19]
    ms = _HEAD_MS.get(head)
    if ms is None:
        ms = _local_second_ms(head)
        if ms is None:
            raise ValueError(f"time of day out of range: {text[11:19]}")
        if len(_HEAD_MS) >= _CACHE_SIZE:
            _HEAD_MS.clear()
        _HEAD_MS[head] = ms
    fraction, offset = match.groups()
    offset_ms = _OFFSET_MS.get(offset)
    if offset_ms is None:
        raise ValueError(f"offset out of range: {offset}")
    tail_ms = _FRACTION_MS[fraction] + offset_ms
    tail = text[19:]
    if fraction is None or len(tail) == 1 + len(fraction) + len(offset):  # none truncated
        if len(_TAIL_MS) >= _CACHE_SIZE:
            _TAIL_MS.clear()
        _TAIL_MS[tail] = tail_ms
    return ms + tail_ms


def _local_second_ms(head: str) -> int | None:
    """``yyyy-MM-ddTHH:mm:ss`` (as matched by _RFC3339) → ms since 1970-01-01T00:00:00
    in its own offset; None if the time of day is out of range, ValueError if the date."""
    hours, minutes, seconds = int(head[11:13]), int(head[14:16]), int(head[17:19])
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    days = date(int(head[:4]), int(head[5:7]), int(head[8:10])).toordinal() - _EPOCH_ORDINAL
    return days * _MS_PER_DAY + ((hours * 60 + minutes) * 60 + seconds) * 1000
