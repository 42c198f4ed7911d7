"""Tests of timers: offset and time parsing, due-time arithmetic across zones and DST, DelayHeap."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crmhooks.clock import FakeClock
from crmhooks.config import ScheduledSpec
from crmhooks.timers import (
    DAY_MS,
    MAX_OFFSET_MS,
    DelayHeap,
    add_offset_ms,
    compute_due_ms,
    field_value_ms,
    move_to_time_of_day_ms,
    parse_offset_ms,
    parse_time_of_day,
    split_offset_ms,
    wait_for_due,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
UTC_ZONE = ZoneInfo("UTC")
HOUR_MS = 3_600_000


def ms(rfc3339: str) -> int:
    """An RFC 3339 instant → epoch ms (independent of the code under test)."""
    return round(datetime.fromisoformat(rfc3339).timestamp() * 1000)


def local(epoch_ms: int, tz: ZoneInfo) -> str:
    """Epoch ms → ``yyyy-MM-ddTHH:mm±hh:mm`` in ``tz``, for readable assertions."""
    return datetime.fromtimestamp(epoch_ms / 1000, tz).isoformat(timespec="minutes")


def spec(relative_to: str = "trigger", offset: str = "0s", at: str | None = None) -> ScheduledSpec:
    return ScheduledSpec(
        webhook="W",
        relative_to=relative_to,
        offset_ms=parse_offset_ms(offset),
        at=None if at is None else parse_time_of_day(at),
    )


# ------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected_ms"),
    [
        ("-1d", -DAY_MS),
        ("2h", 2 * HOUR_MS),
        ("1d2h", DAY_MS + 2 * HOUR_MS),
        ("30s", 30_000),
        ("+15m", 15 * 60_000),
        ("0d", 0),
        ("-0s", 0),
        ("1h30m", 90 * 60_000),
        ("-1d2h30m15s", -(DAY_MS + 2 * HOUR_MS + 30 * 60_000 + 15_000)),
        ("90m", 90 * 60_000),
        ("007h", 7 * HOUR_MS),
        ("1d1d", 2 * DAY_MS),
        ("3660d", MAX_OFFSET_MS),
    ],
)
def test_parse_offset_valid(text: str, expected_ms: int) -> None:
    assert parse_offset_ms(text) == expected_ms


@pytest.mark.parametrize(
    "text",
    [
        "",
        "+",
        "-",
        "1",
        "d",
        "1D",
        "1 d",
        " 1d",
        "1d ",
        "1.5h",
        "1w",
        "1ms",
        "--1d",
        "+-1d",
        "1d-2h",
        "1d+2h",
        "٣d",  # Arabic-Indic digit three: only ASCII digits count
        "1d\n",
        "3661d",  # over MAX_OFFSET_MS
    ],
)
def test_parse_offset_invalid(text: str) -> None:
    with pytest.raises(ValueError, match=r"offset .*(expected|larger)"):
        parse_offset_ms(text)


def test_parse_offset_rejects_non_string_with_value_error() -> None:
    with pytest.raises(ValueError, match="expected a string"):
        parse_offset_ms(5)  # type: ignore[arg-type]


@given(
    sign=st.sampled_from(["", "+", "-"]),
    groups=st.lists(
        st.tuples(st.integers(0, 500), st.sampled_from("smhd")), min_size=1, max_size=4
    ),
)
def test_parse_offset_sums_groups(sign: str, groups: list[tuple[int, str]]) -> None:
    unit_ms = {"s": 1_000, "m": 60_000, "h": HOUR_MS, "d": DAY_MS}
    text = sign + "".join(f"{n}{u}" for n, u in groups)
    total = sum(n * unit_ms[u] for n, u in groups)
    assert parse_offset_ms(text) == (-total if sign == "-" else total)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("09:00", time(9)), ("00:00", time(0)), ("23:59", time(23, 59)), ("09:00:30", time(9, 0, 30))],
)
def test_parse_time_of_day_valid(text: str, expected: time) -> None:
    assert parse_time_of_day(text) == expected


@pytest.mark.parametrize(
    "text",
    ["9:00", "24:00", "12:60", "12:00:60", "", "0900", "09:00 ", "09:00:00.5", "noon", "09:00Z"],
)
def test_parse_time_of_day_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="time of day"):
        parse_time_of_day(text)


def test_split_offset_keeps_sign_on_both_parts() -> None:
    assert split_offset_ms(parse_offset_ms("-1d2h")) == (-1, -2 * HOUR_MS)
    assert split_offset_ms(parse_offset_ms("1d2h")) == (1, 2 * HOUR_MS)
    assert split_offset_ms(parse_offset_ms("30h")) == (1, 6 * HOUR_MS)
    assert split_offset_ms(0) == (0, 0)


# ------------------------------------------------------------------- field values


@pytest.mark.parametrize(
    ("value", "tz", "expected"),
    [
        ("2026-11-30", SHANGHAI, "2026-11-30T00:00:00+08:00"),
        ("2026-11-30", NEW_YORK, "2026-11-30T00:00:00-05:00"),
        ("2026-12-05 09:30", SHANGHAI, "2026-12-05T09:30:00+08:00"),
        ("2026-07-05 09:30", BERLIN, "2026-07-05T09:30:00+02:00"),
        ("2026-12-05T09:30:00Z", SHANGHAI, "2026-12-05T09:30:00+00:00"),
        ("2026-12-05t09:30:00z", SHANGHAI, "2026-12-05T09:30:00+00:00"),
        ("2026-12-05 09:30:00+05:30", BERLIN, "2026-12-05T09:30:00+05:30"),
        ("2026-12-05T09:30:00-00:00", BERLIN, "2026-12-05T09:30:00+00:00"),
        ("2026-12-05T09:30:00.123456-03:00", BERLIN, "2026-12-05T09:30:00.123-03:00"),
        ("2026-12-05T09:30:00.5+08:00", BERLIN, "2026-12-05T09:30:00.500+08:00"),
    ],
)
def test_field_value_ms_formats(value: str, tz: ZoneInfo, expected: str) -> None:
    assert field_value_ms(value, tz) == ms(expected)


@pytest.mark.parametrize(
    "value",
    [
        None,
        20261205,
        1.5,
        True,
        ["2026-12-05"],
        {"date": "2026-12-05"},
        "",
        "tomorrow",
        "2026-02-30",
        "2026-13-01",
        "2026-12-05 24:00",
        "2026-12-05 9:30",
        "2026-12-05T09:30",  # neither local format nor RFC 3339 (no seconds, no offset)
        "2026-12-05 09:30:00",  # RFC 3339 needs an offset
        "2026-12-05T09:30:00+25:00",
        "2026-12-05T09:30:60Z",  # leap second: not representable
        "26-12-05",
        " 2026-12-05",
        "2026-12-05\n",
        "٢٠٢٦-12-05",
    ],
)
def test_field_value_ms_rejects(value: Any) -> None:
    assert field_value_ms(value, BERLIN) is None


# ----------------------------------------------------------------------- due times


def test_trigger_relative_exact_offsets() -> None:
    trigger = ms("2026-11-28T09:00:00Z")
    assert compute_due_ms(spec(offset="2h"), {}, trigger, SHANGHAI) == trigger + 2 * HOUR_MS
    assert compute_due_ms(spec(offset="-30m"), {}, trigger, SHANGHAI) == trigger - 1_800_000
    assert compute_due_ms(spec(), {}, trigger, SHANGHAI) == trigger
    assert compute_due_ms(spec(offset="1d"), {}, trigger, SHANGHAI) == trigger + DAY_MS


def test_trigger_ignores_record_field_named_like_it() -> None:
    trigger = ms("2026-11-28T09:00:00Z")
    assert compute_due_ms(spec(), {"trigger": "2020-01-01"}, trigger, UTC_ZONE) == trigger


def test_date_field_is_local_midnight_then_at() -> None:
    record = {"Closing Date": "2026-11-30"}
    due = compute_due_ms(spec("Closing Date"), record, 0, SHANGHAI)
    assert due == ms("2026-11-30T00:00:00+08:00")
    due = compute_due_ms(spec("Closing Date", "-1d", "09:00"), record, 0, SHANGHAI)
    assert due == ms("2026-11-29T09:00:00+08:00")


def test_datetime_field_seed_example() -> None:
    record = {"Payment Due": "2026-12-05 09:30"}
    due = compute_due_ms(spec("Payment Due", "-1d", "09:00"), record, 0, SHANGHAI)
    assert due == ms("2026-12-04T09:00:00+08:00")
    due = compute_due_ms(spec("Payment Due", "-2h"), record, 0, SHANGHAI)
    assert due == ms("2026-12-05T07:30:00+08:00")


def test_rfc3339_field_uses_its_own_offset_and_at_uses_org_zone() -> None:
    record = {"Due": "2026-12-05T09:30:00Z"}  # 04:30 in New York
    assert compute_due_ms(spec("Due"), record, 0, NEW_YORK) == ms("2026-12-05T09:30:00Z")
    due = compute_due_ms(spec("Due", at="09:00"), record, 0, NEW_YORK)
    assert due == ms("2026-12-05T09:00:00-05:00")
    # Same instant, organisation in Shanghai: 17:30 local, `at` 09:00 moves it earlier.
    due = compute_due_ms(spec("Due", at="09:00"), record, 0, SHANGHAI)
    assert due == ms("2026-12-05T09:00:00+08:00")


def test_at_uses_local_date_not_utc_date() -> None:
    trigger = ms("2026-11-28T20:00:00Z")  # already 2026-11-29 04:00 in Shanghai
    due = compute_due_ms(spec(at="09:00"), {}, trigger, SHANGHAI)
    assert due == ms("2026-11-29T09:00:00+08:00")
    # ...and still 2026-11-28 in New York (15:00).
    due = compute_due_ms(spec(at="09:00"), {}, trigger, NEW_YORK)
    assert due == ms("2026-11-28T09:00:00-05:00")


def test_at_applies_after_offset() -> None:
    trigger = ms("2026-11-28T23:30:00+08:00")
    # +1h crosses midnight first, so `at` lands on the next local day.
    due = compute_due_ms(spec(offset="1h", at="09:00"), {}, trigger, SHANGHAI)
    assert due == ms("2026-11-29T09:00:00+08:00")


def test_missing_or_invalid_field_gives_none() -> None:
    s = spec("Payment Due", "-1d", "09:00")
    assert compute_due_ms(s, {}, 0, BERLIN) is None
    assert compute_due_ms(s, {"Payment Due": None}, 0, BERLIN) is None
    assert compute_due_ms(s, {"Payment Due": "soon"}, 0, BERLIN) is None
    assert compute_due_ms(s, {"Payment Due": 1_700_000_000_000}, 0, BERLIN) is None
    assert compute_due_ms(s, {"payment due": "2026-12-05"}, 0, BERLIN) is None


def test_due_outside_datetime_range_gives_none() -> None:
    assert compute_due_ms(spec("D", "1d"), {"D": "9999-12-31"}, 0, BERLIN) is None
    assert compute_due_ms(spec("D", "-1d"), {"D": "0001-01-01"}, 0, UTC_ZONE) is None


# Calendar days across DST: (zone, base wall time, offset, expected due instant, hours moved).
DST_CASES = [
    # Europe/Berlin spring forward 2026-03-29 02:00 → 03:00.
    (BERLIN, "2026-03-29 09:00", "-1d", "2026-03-28T09:00:00+01:00", -23),
    (BERLIN, "2026-03-28 09:00", "1d", "2026-03-29T09:00:00+02:00", 23),
    (BERLIN, "2026-03-28 02:30", "1d", "2026-03-29T03:30:00+02:00", 24),  # gap → forward
    # Europe/Berlin fall back 2026-10-25 03:00 → 02:00.
    (BERLIN, "2026-10-26 09:00", "-1d", "2026-10-25T09:00:00+01:00", -24),
    (BERLIN, "2026-10-24 09:00", "1d", "2026-10-25T09:00:00+01:00", 25),
    (BERLIN, "2026-10-24 02:30", "1d", "2026-10-25T02:30:00+02:00", 24),  # fold → first
    # America/New_York spring forward 2026-03-08 02:00 → 03:00.
    (NEW_YORK, "2026-03-09 10:00", "-1d", "2026-03-08T10:00:00-04:00", -24),
    (NEW_YORK, "2026-03-07 10:00", "1d", "2026-03-08T10:00:00-04:00", 23),
    (NEW_YORK, "2026-03-07 02:15", "1d", "2026-03-08T03:15:00-04:00", 24),  # gap → forward
    # America/New_York fall back 2026-11-01 02:00 → 01:00.
    (NEW_YORK, "2026-10-31 09:00", "1d", "2026-11-01T09:00:00-05:00", 25),
    (NEW_YORK, "2026-11-02 09:00", "-1d", "2026-11-01T09:00:00-05:00", -24),
    (NEW_YORK, "2026-10-31 01:30", "1d", "2026-11-01T01:30:00-04:00", 24),  # fold → first
    # Australia/Lord_Howe: half-hour DST; ends 2026-04-05 02:00 → 01:30, starts 10-04 02:00 → 02:30.
    (LORD_HOWE, "2026-04-04 09:00", "1d", "2026-04-05T09:00:00+10:30", 24.5),
    (LORD_HOWE, "2026-04-04 01:45", "1d", "2026-04-05T01:45:00+11:00", 24),  # fold → first
    (LORD_HOWE, "2026-10-04 09:00", "-1d", "2026-10-03T09:00:00+10:30", -23.5),
    (LORD_HOWE, "2026-10-03 02:15", "1d", "2026-10-04T02:45:00+11:00", 24),  # gap → forward
    # No DST in Shanghai: a calendar day is always 24 h.
    (SHANGHAI, "2026-03-29 09:00", "-1d", "2026-03-28T09:00:00+08:00", -24),
]


@pytest.mark.parametrize(("tz", "base", "offset", "expected", "hours"), DST_CASES)
def test_calendar_days_across_dst(
    tz: ZoneInfo, base: str, offset: str, expected: str, hours: float
) -> None:
    record = {"When": base}
    due = compute_due_ms(spec("When", offset), record, 0, tz)
    assert due == ms(expected), local(due or 0, tz)
    base_ms = field_value_ms(base, tz)
    assert base_ms is not None
    assert due - base_ms == hours * HOUR_MS


@pytest.mark.parametrize(
    ("tz", "wall", "expected"),
    [
        (BERLIN, "2026-03-29 02:30", "2026-03-29T03:30:00+02:00"),  # gap: shifted by the gap
        (BERLIN, "2026-10-25 02:30", "2026-10-25T02:30:00+02:00"),  # fold: first (CEST)
        (NEW_YORK, "2026-03-08 02:00", "2026-03-08T03:00:00-04:00"),
        (NEW_YORK, "2026-11-01 01:30", "2026-11-01T01:30:00-04:00"),  # fold: first (EDT)
        (LORD_HOWE, "2026-10-04 02:15", "2026-10-04T02:45:00+11:00"),
        (LORD_HOWE, "2026-04-05 01:45", "2026-04-05T01:45:00+11:00"),
    ],
)
def test_local_wall_times_in_gap_and_fold(tz: ZoneInfo, wall: str, expected: str) -> None:
    assert field_value_ms(wall, tz) == ms(expected)


def test_at_on_dst_days() -> None:
    # Payment due on the fall-back day; remind the day before at 09:00 (still summer time).
    record = {"Payment Due": "2026-10-25 18:00"}
    due = compute_due_ms(spec("Payment Due", "-1d", "09:00"), record, 0, BERLIN)
    assert due == ms("2026-10-24T09:00:00+02:00")
    # `at` inside the spring-forward gap resolves forward by the gap length.
    trigger = ms("2026-03-29T06:00:00Z")
    assert compute_due_ms(spec(at="02:30"), {}, trigger, BERLIN) == ms("2026-03-29T03:30:00+02:00")
    # `at` inside the fall-back fold takes the first occurrence, even from the second one.
    second_0130 = ms("2026-11-01T01:30:00-05:00")
    due = compute_due_ms(spec(at="01:30"), {}, second_0130, NEW_YORK)
    assert due == ms("2026-11-01T01:30:00-04:00")


def test_days_from_second_occurrence_of_fold() -> None:
    second_0130 = ms("2026-11-01T01:30:00-05:00")  # New York, EST occurrence
    assert compute_due_ms(spec(offset="1d"), {}, second_0130, NEW_YORK) == ms(
        "2026-11-02T01:30:00-05:00"
    )
    assert compute_due_ms(spec(offset="-1d"), {}, second_0130, NEW_YORK) == ms(
        "2026-10-31T01:30:00-04:00"
    )


def test_hours_are_exact_across_dst_and_days_come_first() -> None:
    trigger = ms("2026-03-29T01:30:00+01:00")  # Berlin, 30 min before the gap
    due = compute_due_ms(spec(offset="2h"), {}, trigger, BERLIN)
    assert due == trigger + 2 * HOUR_MS
    assert local(due or 0, BERLIN) == "2026-03-29T04:30+02:00"
    # 1d2h from 2026-03-28 09:00: calendar day to 03-29 09:00 CEST, then 2 h exact.
    due = compute_due_ms(spec("When", "1d2h"), {"When": "2026-03-28 09:00"}, 0, BERLIN)
    assert due == ms("2026-03-29T11:00:00+02:00")


ZONES = [SHANGHAI, NEW_YORK, BERLIN, LORD_HOWE, UTC_ZONE]
INSTANTS = st.integers(ms("2000-01-01T00:00:00Z"), ms("2060-01-01T00:00:00Z"))


@given(base_ms=INSTANTS, days=st.integers(-400, 400), tz=st.sampled_from(ZONES))
def test_calendar_days_keep_wall_time_unless_in_gap(base_ms: int, days: int, tz: ZoneInfo) -> None:
    due = add_offset_ms(base_ms, days * DAY_MS, tz)
    base_local = datetime.fromtimestamp(base_ms / 1000, tz)
    due_local = datetime.fromtimestamp(due / 1000, tz)
    target = base_local.replace(tzinfo=None) + timedelta(days=days)
    # DST moves are at most 1 h in these zones; outside a gap the wall time is kept.
    assert abs((due - base_ms) - days * DAY_MS) <= HOUR_MS
    if due_local.replace(tzinfo=None) != target:
        gap = due_local.replace(tzinfo=None) - target
        assert timedelta(0) < gap <= timedelta(hours=1)


@given(base_ms=INSTANTS, offset_ms=st.integers(-DAY_MS * 400, DAY_MS * 400))
def test_fixed_offset_zone_offsets_are_exact(base_ms: int, offset_ms: int) -> None:
    assert add_offset_ms(base_ms, offset_ms, SHANGHAI) == base_ms + offset_ms
    assert add_offset_ms(base_ms, offset_ms, UTC_ZONE) == base_ms + offset_ms


@given(
    base_ms=INSTANTS,
    at=st.times().map(lambda t: t.replace(microsecond=0)),
    tz=st.sampled_from(ZONES),
)
def test_at_keeps_local_date(base_ms: int, at: time, tz: ZoneInfo) -> None:
    due = move_to_time_of_day_ms(base_ms, at, tz)
    base_date = datetime.fromtimestamp(base_ms / 1000, tz).date()
    due_local = datetime.fromtimestamp(due / 1000, tz)
    wanted = datetime.combine(base_date, at)
    # Equal, or pushed forward out of a DST gap (which may cross into the next date).
    assert timedelta(0) <= due_local.replace(tzinfo=None) - wanted <= timedelta(hours=1)


# ----------------------------------------------------------------------- delay heap


def test_heap_orders_by_due_then_push_order() -> None:
    heap = DelayHeap()
    heap.push("c", 300, 0)
    heap.push("a", 100, 1)
    heap.push("b", 100, 2)
    heap.push("d", 100, 0)
    assert heap.next_due_ms() == 100
    assert heap.pop_due(99) == []
    assert heap.pop_due(300) == [("a", 100, 1), ("b", 100, 2), ("d", 100, 0), ("c", 300, 0)]
    assert len(heap) == 0
    assert heap.next_due_ms() is None


def test_heap_reschedule_replaces_entry_and_counts_as_new_push() -> None:
    heap = DelayHeap()
    heap.push("a", 100, 0)
    heap.push("b", 100, 0)
    heap.push("a", 100, 0)  # same due time, re-pushed: now after b
    assert len(heap) == 2
    assert heap.pop_due(100) == [("b", 100, 0), ("a", 100, 0)]
    heap.push("x", 50, 0)
    heap.push("x", 500, 3)  # later, other partition
    assert heap.pop_due(100) == []
    assert heap.next_due_ms() == 500
    assert heap.pop_due(1000) == [("x", 500, 3)]


def test_heap_remove_and_contains() -> None:
    heap = DelayHeap()
    heap.push("a", 100, 0)
    heap.push("b", 200, 0)
    assert "a" in heap
    assert heap.remove("a") is True
    assert heap.remove("a") is False
    assert heap.remove("never") is False
    assert "a" not in heap
    assert heap.next_due_ms() == 200
    assert heap.pop_due(1000) == [("b", 200, 0)]


def test_heap_pop_due_limit() -> None:
    heap = DelayHeap()
    for i in range(5):
        heap.push(f"a{i}", i, 0)
    assert heap.pop_due(10, limit=0) == []
    assert heap.pop_due(10, limit=2) == [("a0", 0, 0), ("a1", 1, 0)]
    assert heap.pop_due(3, limit=10) == [("a2", 2, 0), ("a3", 3, 0)]
    assert len(heap) == 1


def test_heap_drop_partition() -> None:
    heap = DelayHeap()
    heap.push("a", 1, 0)
    heap.push("b", 2, 1)
    heap.push("c", 3, 0)
    heap.push("b", 4, 0)  # moved to partition 0
    heap.push("d", 5, 1)
    assert heap.drop_partition(0) == 3
    assert heap.drop_partition(0) == 0
    assert heap.drop_partition(7) == 0
    assert ("a" in heap, "d" in heap) == (False, True)
    assert heap.pop_due(100) == [("d", 5, 1)]


def test_heap_compacts_stale_entries() -> None:
    heap = DelayHeap()
    for round_ in range(200):
        for i in range(10):
            heap.push(f"a{i}", round_ * 10 + i, 0)  # 2000 reschedules of 10 actions
    assert len(heap) == 10
    # White-box: memory stays bounded by twice the pending entries.
    assert len(heap._heap) <= 20
    for i in range(10):
        heap.remove(f"a{i}")
    assert heap._heap == []
    assert "pending=0" in repr(heap)


def test_heap_repr_is_readable() -> None:
    heap = DelayHeap()
    heap.push("a", 100, 0)
    assert repr(heap) == "DelayHeap(pending=1, stale=0, earliest_ms>=100)"


ACTION_ID_LIST = [f"evt-{i}:rule:W" for i in range(6)]
ACTION_IDS = st.sampled_from(ACTION_ID_LIST)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("push"), ACTION_IDS, st.integers(0, 50), st.integers(0, 2)),
        st.tuples(st.just("remove"), ACTION_IDS),
        st.tuples(st.just("pop"), st.integers(-5, 60), st.none() | st.integers(0, 4)),
        st.tuples(st.just("drop"), st.integers(0, 2)),
        st.tuples(st.just("next")),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(ops=OPS)
def test_heap_matches_sorted_list_model(ops: list[tuple[Any, ...]]) -> None:
    heap = DelayHeap()
    model: list[tuple[int, int, str, int]] = []  # (due_ms, push number, action_id, partition)
    pushes = 0
    for op in ops:
        match op:
            case ("push", action_id, due_ms, partition):
                model = [e for e in model if e[2] != action_id]
                model.append((due_ms, pushes, action_id, partition))
                pushes += 1
                heap.push(action_id, due_ms, partition)
            case ("remove", action_id):
                present = any(e[2] == action_id for e in model)
                model = [e for e in model if e[2] != action_id]
                assert heap.remove(action_id) is present
            case ("pop", now_ms, limit):
                due = sorted(e for e in model if e[0] <= now_ms)[:limit]
                model = [e for e in model if e not in due]
                assert heap.pop_due(now_ms, limit) == [(a, d, p) for d, _, a, p in due]
            case ("drop", partition):
                kept = [e for e in model if e[3] != partition]
                assert heap.drop_partition(partition) == len(model) - len(kept)
                model = kept
            case ("next",):
                assert heap.next_due_ms() == min((e[0] for e in model), default=None)
        assert len(heap) == len(model)
        assert {a for a in ACTION_ID_LIST if a in heap} == {e[2] for e in model}
        assert len(heap._heap) <= 2 * len(heap)


# ---------------------------------------------------------------------- wait_for_due


async def settle() -> None:
    """Let woken tasks run (yields to the loop; no time passes)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_wait_for_due_wakes_at_due_time() -> None:
    clock = FakeClock(now_ms=1_000)
    heap = DelayHeap()
    heap.push("a", 5_000, 0)
    changed = asyncio.Event()
    task = asyncio.create_task(wait_for_due(heap, clock, changed))
    await settle()
    assert not task.done()
    clock.set(4_999)
    await settle()
    assert not task.done()
    clock.set(5_000)
    await asyncio.wait_for(task, timeout=5)
    assert heap.pop_due(clock.now_ms()) == [("a", 5_000, 0)]


async def test_wait_for_due_wakes_on_change() -> None:
    clock = FakeClock(now_ms=0)
    heap = DelayHeap()
    changed = asyncio.Event()
    task = asyncio.create_task(wait_for_due(heap, clock, changed))  # empty heap
    await settle()
    clock.advance(10 * DAY_MS)
    await settle()
    assert not task.done()
    heap.push("a", 100, 0)
    changed.set()
    await asyncio.wait_for(task, timeout=5)


async def test_wait_for_due_returns_at_once_when_due_or_changed() -> None:
    clock = FakeClock(now_ms=1_000)
    heap = DelayHeap()
    heap.push("a", 1_000, 0)
    await asyncio.wait_for(wait_for_due(heap, clock, asyncio.Event()), timeout=5)
    heap.push("a", 9_000, 0)
    changed = asyncio.Event()
    changed.set()
    await asyncio.wait_for(wait_for_due(heap, clock, changed), timeout=5)


async def test_wait_for_due_cancel_leaves_nothing_behind() -> None:
    clock = FakeClock(now_ms=0)
    heap = DelayHeap()
    heap.push("a", 5_000, 0)
    before = len(asyncio.all_tasks())
    task = asyncio.create_task(wait_for_due(heap, clock, asyncio.Event()))
    await settle()
    assert len(asyncio.all_tasks()) > before
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle()
    assert len(asyncio.all_tasks()) == before
    assert clock._waiters == []


def test_utc_helper_sanity() -> None:
    # Guards the test helpers themselves.
    assert ms("1970-01-01T00:00:01Z") == 1_000
    assert local(0, UTC_ZONE) == "1970-01-01T00:00+00:00"
    assert datetime.fromtimestamp(0, UTC).year == 1970
