"""Timer math (due times of scheduled actions) and the in-memory part of the delay heap."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import re
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import TYPE_CHECKING, Any, Final
from zoneinfo import ZoneInfo

from crmhooks.clock import Clock

if TYPE_CHECKING:
    from crmhooks.settings import ScheduledSpec

__all__ = [
    "DAY_MS",
    "MAX_OFFSET_MS",
    "TRIGGER",
    "DelayHeap",
    "add_offset_ms",
    "compute_due_ms",
    "field_value_ms",
    "move_to_time_of_day_ms",
    "parse_offset_ms",
    "parse_time_of_day",
    "split_offset_ms",
    "wait_for_due",
    "wall_time_ms",
]

# ``relative_to`` value meaning "the event's occurred_at" rather than a record field.
TRIGGER: Final = "trigger"

_UNIT_MS: Final = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
DAY_MS: Final = _UNIT_MS["d"]
# Ten years (as config.py's bound): no CRM schedule is further away, so anything larger
# is a typo; it also keeps calendar arithmetic far from datetime's year 1..9999 range.
MAX_OFFSET_MS: Final = 3660 * DAY_MS

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)

# re.ASCII everywhere: ``\d`` would otherwise accept Arabic-Indic and other digits.
_OFFSET_RE: Final = re.compile(r"([+-]?)((?:[0-9]+[smhd])+)", re.ASCII)
_OFFSET_GROUP_RE: Final = re.compile(r"([0-9]+)([smhd])", re.ASCII)
_TIME_OF_DAY_RE: Final = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?", re.ASCII)
_DATE_RE: Final = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})", re.ASCII)
_LOCAL_DATETIME_RE: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2}) ([0-9]{2}):([0-9]{2})", re.ASCII
)
_RFC3339_RE: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))",
    re.ASCII,
)


# --------------------------------------------------------------------------- parsing


def parse_offset_ms(text: str) -> int:
    """``"-1d"``, ``"2h"``, ``"1d2h"``, ``"30s"``, ``"+15m"`` → signed milliseconds.

    Grammar: an optional sign, then one or more ``<digits><s|m|h|d>`` groups; the
    sign applies to the whole offset. No spaces, lower-case units only, at most
    ``MAX_OFFSET_MS`` in magnitude. ValueError with a message naming the text otherwise.
    Whole days of the result are applied as calendar days (see ``add_offset_ms``).
    """
    given: object = text  # TOML may hand over a number; say so instead of a TypeError
    if not isinstance(given, str):
        raise ValueError(f"offset {given!r}: expected a string such as '-1d', '2h' or '1d2h'")
    match = _OFFSET_RE.fullmatch(given)
    if match is None:
        raise ValueError(
            f"offset {text!r}: expected an optional sign and one or more <number><unit>"
            " groups with unit s, m, h or d, such as '-1d', '2h', '1d2h', '+15m'"
        )
    sign, groups = match.groups()
    magnitude = sum(
        int(number) * _UNIT_MS[unit] for number, unit in _OFFSET_GROUP_RE.findall(groups)
    )
    if magnitude > MAX_OFFSET_MS:
        raise ValueError(f"offset {text!r}: larger than {MAX_OFFSET_MS // DAY_MS} days")
    return -magnitude if sign == "-" else magnitude


def parse_time_of_day(text: str) -> time:
    """``"09:00"`` (or ``"09:00:30"``) → a time of day; ValueError otherwise.

    24-hour clock, two-digit fields, ``00:00`` … ``23:59:59``.
    """
    given: object = text  # TOML may hand over a number or a time; say so instead of a TypeError
    match = _TIME_OF_DAY_RE.fullmatch(given) if isinstance(given, str) else None
    if match is None:
        raise ValueError(f"time of day {text!r}: expected HH:MM or HH:MM:SS (24-hour clock)")
    hour, minute, second = match.groups()
    return time(int(hour), int(minute), int(second or 0))


# ------------------------------------------------------------------ wall time ↔ instant


def wall_time_ms(wall: datetime, tz: ZoneInfo) -> int:
    """A naive local wall time in ``tz`` → epoch ms.

    Resolved with ``fold=0`` (PEP 495, zoneinfo): a wall time inside a
    spring-forward gap is read with the offset in force *before* the gap, so it
    lands that much later (Europe/Berlin 2026-03-29 02:30 → 03:30 CEST); an
    ambiguous fall-back wall time is its first occurrence (the summer-time one).
    """
    aware = wall.replace(tzinfo=tz, fold=0)
    return (aware - _EPOCH) // _ONE_MS


def _local(ms: int, tz: ZoneInfo) -> datetime:
    return (_EPOCH + timedelta(milliseconds=ms)).astimezone(tz)


def split_offset_ms(offset_ms: int) -> tuple[int, int]:
    """A signed offset → (whole calendar days, remaining exact ms), both with its sign.

    ``-(1d2h)`` → ``(-1, -7_200_000)``. The configuration stores offsets as plain
    ms, so ``"24h"`` and ``"1d"`` are indistinguishable here: both count as a day.
    """
    sign = -1 if offset_ms < 0 else 1
    days, rest_ms = divmod(abs(offset_ms), DAY_MS)
    return sign * days, sign * rest_ms


def add_offset_ms(base_ms: int, offset_ms: int, tz: ZoneInfo) -> int:
    """``base_ms`` moved by ``offset_ms``: whole days as calendar days in ``tz``, then the rest.

    Days keep the local wall time (``-1d`` from Europe/Berlin 2026-03-29 09:00 CEST
    is 2026-03-28 09:00 CET, 23 h earlier); the wall time reached is resolved as in
    ``wall_time_ms``. The sub-day remainder (s/m/h) is an exact duration, added after.
    """
    days, rest_ms = split_offset_ms(offset_ms)
    due_ms = base_ms
    if days:
        wall = _local(base_ms, tz).replace(tzinfo=None)
        due_ms = wall_time_ms(wall + timedelta(days=days), tz)
    return due_ms + rest_ms


def move_to_time_of_day_ms(ms: int, at: time, tz: ZoneInfo) -> int:
    """The instant ``at`` (wall clock in ``tz``) on the local date of ``ms``.

    May be earlier or later than ``ms``; gap and fold resolved as in ``wall_time_ms``.
    A tzinfo on ``at`` is ignored: it is always the organisation's time of day.
    """
    local_date = _local(ms, tz).date()
    return wall_time_ms(datetime.combine(local_date, at.replace(tzinfo=None)), tz)


# ------------------------------------------------------------------------ due times


def field_value_ms(value: Any, tz: ZoneInfo) -> int | None:
    """A record's date/datetime field value → epoch ms, or None if it is not one.

    ``yyyy-MM-dd`` is midnight in ``tz``; ``yyyy-MM-dd HH:mm`` is wall time in ``tz``;
    RFC 3339 (``2026-12-05T09:30:00+08:00``, ``…Z``, fractional seconds truncated to
    ms) carries its own offset. Local wall times resolve as in ``wall_time_ms``
    (gap → forward, fold → first occurrence). Anything else — other types,
    other formats, impossible dates, leap seconds — is None.
    """
    if not isinstance(value, str):
        return None
    try:
        if match := _DATE_RE.fullmatch(value):
            y, mo, d = (int(g) for g in match.groups())
            return wall_time_ms(datetime.combine(date(y, mo, d), time()), tz)
        if match := _LOCAL_DATETIME_RE.fullmatch(value):
            y, mo, d, h, mi = (int(g) for g in match.groups())
            return wall_time_ms(datetime(y, mo, d, h, mi), tz)
        if match := _RFC3339_RE.fullmatch(value):
            return _rfc3339_ms(match)
    except (ValueError, OverflowError):
        # Out-of-range fields (month 13, 24:00, offset ≥ 24 h) or dates near year 1/9999.
        return None
    return None


def _rfc3339_ms(match: re.Match[str]) -> int:
    y, mo, d, h, mi, s, fraction, zulu, sign, off_h, off_m = match.groups()
    if zulu:
        offset = UTC
    else:
        delta = timedelta(hours=int(off_h), minutes=int(off_m))
        offset = timezone(-delta if sign == "-" else delta)
    instant = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=offset)
    fraction_ms = int((fraction or "")[:3].ljust(3, "0"))
    return (instant - _EPOCH) // _ONE_MS + fraction_ms


def compute_due_ms(
    spec: ScheduledSpec, record: dict[str, Any], trigger_ms: int, tz: ZoneInfo
) -> int | None:
    """``base + offset``, then moved to ``spec.at`` in ``tz`` on that local day.

    ``base`` is ``trigger_ms`` when ``spec.relative_to == "trigger"``, else the
    record's field (see ``field_value_ms``); None when that field is missing or
    not a date/datetime, or when the due time falls outside datetime's range.
    The offset's whole days are calendar days in ``tz``, the rest exact
    (``add_offset_ms``); ``at`` is applied on the local date of ``base + offset``
    (``move_to_time_of_day_ms``). Non-existent wall times (spring-forward gap)
    resolve forward by the gap length, ambiguous ones (fall-back) to their first
    occurrence — zoneinfo's ``fold=0``.
    """
    if spec.relative_to == TRIGGER:
        base_ms: int | None = trigger_ms
    else:
        base_ms = field_value_ms(record.get(spec.relative_to), tz)
    if base_ms is None:
        return None
    try:
        due_ms = add_offset_ms(base_ms, spec.offset_ms, tz)
        if spec.at is not None:
            due_ms = move_to_time_of_day_ms(due_ms, spec.at, tz)
    except OverflowError:
        return None
    return due_ms


# ----------------------------------------------------------------------- delay heap


class DelayHeap:
    """Pending actions due soon, ordered by due time; lazy deletion; O(log n) push/pop.

    The heap holds ``(due_ms, seq, action_id)`` tuples; ``_live`` maps each pending
    action to its current ``(due_ms, seq, partition)``. A heap tuple whose ``seq``
    is not the live one is stale (removed or rescheduled) and skipped when it
    surfaces; the heap is rebuilt when stale tuples outnumber live ones. Equal due
    times pop in push order (``seq``); a reschedule counts as a new push.
    """

    __slots__ = ("_heap", "_live", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, str]] = []
        self._live: dict[str, tuple[int, int, int]] = {}
        self._seq = itertools.count()

    def push(self, action_id: str, due_ms: int, partition: int) -> None:
        """Add an action, or replace its entry (reschedule) if it is already pending."""
        seq = next(self._seq)
        self._live[action_id] = (due_ms, seq, partition)
        heapq.heappush(self._heap, (due_ms, seq, action_id))
        self._maybe_compact()

    def remove(self, action_id: str) -> bool:
        """Forget a pending action; False if it was not pending."""
        if self._live.pop(action_id, None) is None:
            return False
        self._maybe_compact()
        return True

    def pop_due(self, now_ms: int, limit: int | None = None) -> list[tuple[str, int, int]]:
        """Remove and return up to ``limit`` actions with ``due_ms <= now_ms``, earliest first.

        Each item is ``(action_id, due_ms, partition)``.
        """
        due: list[tuple[str, int, int]] = []
        heap, live = self._heap, self._live
        while heap and heap[0][0] <= now_ms and (limit is None or len(due) < limit):
            due_ms, seq, action_id = heapq.heappop(heap)
            entry = live.get(action_id)
            if entry is not None and entry[1] == seq:
                del live[action_id]
                due.append((action_id, due_ms, entry[2]))
        self._maybe_compact()
        return due

    def next_due_ms(self) -> int | None:
        """The earliest pending due time, or None when empty."""
        self._drop_stale_top()
        return self._heap[0][0] if self._heap else None

    def drop_partition(self, partition: int) -> int:
        """Forget every entry of a revoked partition; return how many there were."""
        gone = [aid for aid, (_, _, p) in self._live.items() if p == partition]
        for action_id in gone:
            del self._live[action_id]
        self._maybe_compact()
        return len(gone)

    def __contains__(self, action_id: object) -> bool:
        return action_id in self._live

    def __len__(self) -> int:
        return len(self._live)

    def __repr__(self) -> str:
        # No clean-up here (repr must not mutate); the heap top is a lower bound.
        earliest = self._heap[0][0] if self._live else None
        return (
            f"DelayHeap(pending={len(self._live)}, stale={len(self._heap) - len(self._live)},"
            f" earliest_ms>={earliest})"
        )

    def _drop_stale_top(self) -> None:
        heap, live = self._heap, self._live
        while heap:
            _, seq, action_id = heap[0]
            entry = live.get(action_id)
            if entry is not None and entry[1] == seq:
                return
            heapq.heappop(heap)

    def _maybe_compact(self) -> None:
        # Rebuilding is O(n) and happens only after n/2 stale entries accumulated,
        # so it is amortised O(1) per operation and memory stays ≤ 2 × pending.
        if len(self._heap) - len(self._live) > len(self._heap) // 2:
            self._heap = [(d, s, aid) for aid, (d, s, _) in self._live.items()]
            heapq.heapify(self._heap)


async def wait_for_due(heap: DelayHeap, clock: Clock, changed: asyncio.Event) -> None:
    """Return when the earliest entry of ``heap`` is due by ``clock``, or ``changed`` is set.

    With an empty heap it waits for ``changed`` only. It does not clear
    ``changed``: the scheduler clears it *before* calling ``pop_due`` and sets it
    after every push/remove that may move the earliest due time, so no wake-up is lost.
    Cancellable; it leaves no task behind.
    """
    if changed.is_set():
        return
    due_ms = heap.next_due_ms()
    if due_ms is not None and due_ms <= clock.now_ms():
        return
    waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(changed.wait())]
    if due_ms is not None:
        waiters.append(asyncio.ensure_future(clock.sleep_until(due_ms)))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
