"""Decoding record events (SPEC §2): valid events, every poison pill, arbitrary input."""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec.structs import fields, replace

from crmhooks import event_shape, events, rfc3339
from crmhooks.errors import InvalidEvent
from crmhooks.events import (
    DEFAULT_MAX_EVENT_BYTES,
    MAX_EVENT_DEPTH,
    OPERATIONS,
    RecordEvent,
    decode_event,
    decode_json_object,
    decode_wanted,
    event_from_json,
    find_duplicate_key,
    parse_rfc3339_ms,
)
from crmhooks.record_event import EventView
from crmhooks.results import dead_letter, encode
from tests.schemas import validate_dead_letter

# The example of SPEC §2, verbatim.
SPEC_EVENT: dict[str, Any] = {
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
MINIMAL: dict[str, Any] = {
    "event_id": "e1",
    "org_id": "org-acme",
    "module": "Leads",
    "operation": "create",
    "occurred_at": "2026-11-28T09:00:00Z",
    "record_id": "1",
    "record": {},
}
SPEC_OCCURRED_MS = int(datetime(2026, 11, 28, 9, tzinfo=UTC).timestamp()) * 1000
DELETE = object()  # marks a key to remove in variant()


def variant(**changes: Any) -> dict[str, Any]:
    """The SPEC event with top-level keys replaced (or removed with DELETE)."""
    event = {k: v for k, v in SPEC_EVENT.items() if changes.get(k) is not DELETE}
    event.update({k: v for k, v in changes.items() if v is not DELETE})
    return event


def with_record(**fields: Any) -> dict[str, Any]:
    return variant(record={**SPEC_EVENT["record"], **fields})


def nested(depth: int) -> Any:
    """``depth`` containers, alternating arrays and objects."""
    value: Any = 1
    for level in range(depth):
        value = [value] if level % 2 else {"n": value}
    return value


def spec_bytes_with(fragment: bytes) -> bytes:
    """The SPEC event with ``fragment`` (``"key": value`` text) spliced in first."""
    return b"{" + fragment + b"," + orjson.dumps(SPEC_EVENT)[1:]


def raises(data: bytes | None, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        decode_event(data, max_bytes)
    return info.value


def ev(**changes: Any) -> bytes:
    return orjson.dumps(variant(**changes))


def pill(
    name: str,
    data: bytes | None,
    message: str,
    *,
    parsed: bool = False,
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> Any:
    """One poison pill: the value, the limit, the message substring, whether `parsed` is set."""
    return pytest.param(data, max_bytes, message, parsed, id=name)


FIELD_VALUE = "must be a string, number, boolean, null or an array of these"
POISON = [
    pill("tombstone", None, "tombstone"),
    pill("empty", b"", "not valid JSON: empty value"),
    pill("not json", b"{nope", "not valid JSON"),
    pill("truncated", orjson.dumps(SPEC_EVENT)[:-1], "not valid JSON"),
    pill("trailing", orjson.dumps(SPEC_EVENT) + b"x", "not valid JSON"),
    pill("bom", b"\xef\xbb\xbf" + orjson.dumps(MINIMAL), "BOM"),
    pill("utf8 in string", spec_bytes_with(b'"x":"\xff"'), "UTF-8"),
    pill("utf8 in key", spec_bytes_with(b'"\xc3":1'), "UTF-8"),
    pill("utf8 surrogate", spec_bytes_with(b'"x":"\xed\xa0\x80"'), "UTF-8"),
    pill("lone surrogate escape", spec_bytes_with(b'"x":"\\ud800"'), "surrogate"),
    pill("array", b"[1, 2]", "must be a JSON object, not an array"),
    pill("string", b'"evt"', "must be a JSON object, not a string"),
    pill("null", b"null", "must be a JSON object, not null"),
    pill("number", b"42", "must be a JSON object, not a number"),
    pill("deep arrays", b"[" * 100_000 + b"]" * 100_000, "nested deeper than 1024"),
    pill("deep objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested deeper than 1024"),
    pill(
        "deep in event",
        spec_bytes_with(b'"x":' + b"[" * 100_000 + b"]" * 100_000),
        "nested deeper than 1024",
    ),
    pill(
        "too deep to re-encode",
        ev(x=nested(MAX_EVENT_DEPTH)),
        f"nested deeper than {MAX_EVENT_DEPTH} levels",
    ),
    pill("5000-digit integer", spec_bytes_with(b'"x":' + b"9" * 5000), "number out of range"),
    pill("5000-digit negative", spec_bytes_with(b'"x":-' + b"9" * 5000), "number out of range"),
    pill("1e400", spec_bytes_with(b'"x":1e400'), "number out of range"),
    pill("NaN", spec_bytes_with(b'"x":NaN'), "NaN and Infinity"),
    pill("Infinity", spec_bytes_with(b'"x":Infinity'), "NaN and Infinity"),
    pill("-Infinity", spec_bytes_with(b'"x": -Infinity'), "NaN and Infinity"),
    pill(
        "duplicate top-level key",
        spec_bytes_with(b'"event_id":"evt-other"'),
        "duplicate key 'event_id' in $",
    ),
    pill(
        "duplicate via escape",
        spec_bytes_with(b'"\\u006frg_id":"org-other"'),
        "duplicate key 'org_id' in $",
    ),
    pill(
        "duplicate in record",
        orjson.dumps(SPEC_EVENT).replace(b'"Stage":', b'"Stage":"Lost","Stage":', 1),
        "duplicate key 'Stage' in $.record",
    ),
    pill(
        "duplicate in related",
        orjson.dumps(SPEC_EVENT).replace(
            b'"Account Name":', b'"Account Name":1,"Account Name":', 1
        ),
        "duplicate key 'Account Name' in $.related.Accounts",
    ),
    pill(
        "duplicate in array",
        spec_bytes_with(b'"x":[{"a":1},{"a":1,"a":2}]'),
        "duplicate key 'a' in $.x[1]",
    ),
    # Same colon count as without the duplicate: the cheap check alone would miss it.
    pill(
        "duplicate hidden by escaped colon",
        spec_bytes_with(b'"x":{"k":"v","k":"\\u003a"}'),
        "duplicate key 'k' in $.x",
    ),
    pill(
        "duplicate deep",
        spec_bytes_with(b'"x":' + b'{"a":' * 200 + b'{"k":1,"k":2}' + b"}" * 200),
        "duplicate key 'k' in $.x.a.a",
    ),
    pill(
        "over the default limit",
        ev(x="y" * DEFAULT_MAX_EVENT_BYTES),
        "exceeds the limit of 1048576 bytes",
    ),
    pill(
        "over a configured limit",
        orjson.dumps(SPEC_EVENT),
        "exceeds the limit of 100 bytes",
        max_bytes=100,
    ),
    pill("missing event_id", ev(event_id=DELETE), "missing required field 'event_id'", parsed=True),
    pill("missing org_id", ev(org_id=DELETE), "missing required field 'org_id'", parsed=True),
    pill("missing module", ev(module=DELETE), "missing required field 'module'", parsed=True),
    pill(
        "missing operation", ev(operation=DELETE), "missing required field 'operation'", parsed=True
    ),
    pill(
        "missing occurred_at",
        ev(occurred_at=DELETE),
        "missing required field 'occurred_at'",
        parsed=True,
    ),
    pill(
        "missing record_id", ev(record_id=DELETE), "missing required field 'record_id'", parsed=True
    ),
    pill("missing record", ev(record=DELETE), "missing required field 'record'", parsed=True),
    pill(
        "event_id number",
        ev(event_id=123),
        "field 'event_id' must be a non-empty string, not a number",
        parsed=True,
    ),
    pill(
        "event_id empty",
        ev(event_id=""),
        "field 'event_id' must be a non-empty string",
        parsed=True,
    ),
    pill(
        "event_id newline",
        ev(event_id="e1\r\nX-Evil: 1"),
        "field 'event_id' contains a control character",
        parsed=True,
    ),
    pill(
        "org_id null",
        ev(org_id=None),
        "field 'org_id' must be a non-empty string, not null",
        parsed=True,
    ),
    pill(
        "module object",
        ev(module={"name": "Leads"}),
        "field 'module' must be a non-empty string, not an object",
        parsed=True,
    ),
    pill(
        "record_id list",
        ev(record_id=["1"]),
        "field 'record_id' must be a non-empty string or an integer, not an array",
        parsed=True,
    ),
    pill(
        "record_id boolean",
        ev(record_id=True),
        "field 'record_id' must be a non-empty string or an integer, not a boolean",
        parsed=True,
    ),
    pill("record_id float", ev(record_id=1.5), "not a number", parsed=True),
    pill(
        "record_id beyond 64 bits",
        spec_bytes_with(b'"record_id":' + b"9" * 30).replace(
            b',"record_id":"4150868000000224005"', b""
        ),
        "field 'record_id' must be a non-empty string or an integer, not a number",
        parsed=True,
    ),
    pill(
        "record_id null",
        ev(record_id=None),
        "field 'record_id' must be a non-empty string, not null",
        parsed=True,
    ),
    pill(
        "record string",
        ev(record="Big deal"),
        "field 'record' must be an object, not a string",
        parsed=True,
    ),
    pill(
        "record array", ev(record=[]), "field 'record' must be an object, not an array", parsed=True
    ),
    pill("record null", ev(record=None), "field 'record' must be an object, not null", parsed=True),
    pill(
        "record value object",
        orjson.dumps(with_record(Owner={"name": "Ana"})),
        f"field 'record.Owner' {FIELD_VALUE}, not an object",
        parsed=True,
    ),
    pill(
        "record value array of objects",
        orjson.dumps(with_record(Tags=[{"t": 1}])),
        "not an array holding non-scalars",
        parsed=True,
    ),
    pill(
        "record value nested array",
        orjson.dumps(with_record(Tags=[["a"]])),
        "field 'record.Tags'",
        parsed=True,
    ),
    pill(
        "related string",
        ev(related="Accounts"),
        "field 'related' must be an object, not a string",
        parsed=True,
    ),
    pill(
        "related.X string",
        ev(related={"Accounts": "Acme"}),
        "field 'related.Accounts' must be an object, not a string",
        parsed=True,
    ),
    pill(
        "related.X array",
        ev(related={"Accounts": [{}]}),
        "field 'related.Accounts' must be an object, not an array",
        parsed=True,
    ),
    pill(
        "related.X value object",
        ev(related={"Accounts": {"Parent": {}}}),
        "field 'related.Accounts.Parent' must be",
        parsed=True,
    ),
    pill(
        "previous number",
        ev(previous=5),
        "field 'previous' must be an object, not a number",
        parsed=True,
    ),
    pill(
        "previous value object",
        ev(previous={"Stage": {}}),
        "field 'previous.Stage' must be",
        parsed=True,
    ),
    pill(
        "user string", ev(user="Ana"), "field 'user' must be an object, not a string", parsed=True
    ),
    pill(
        "organization array",
        ev(organization=[]),
        "field 'organization' must be an object, not an array",
        parsed=True,
    ),
    pill(
        "organization value object",
        ev(organization={"Address": {"City": "X"}}),
        "field 'organization.Address' must be",
        parsed=True,
    ),
    pill(
        "unknown operation",
        ev(operation="update"),
        "field 'operation' must be one of create, edit, delete, not 'update'",
        parsed=True,
    ),
    pill(
        "operation case", ev(operation="Create"), "must be one of create, edit, delete", parsed=True
    ),
    pill(
        "operation number",
        ev(operation=1),
        "field 'operation' must be a non-empty string, not a number",
        parsed=True,
    ),
    pill(
        "occurred_at date only",
        ev(occurred_at="2026-11-28"),
        "field 'occurred_at' is not RFC 3339",
        parsed=True,
    ),
    pill(
        "occurred_at no offset", ev(occurred_at="2026-11-28T09:00:00"), "not RFC 3339", parsed=True
    ),
    pill(
        "occurred_at no seconds", ev(occurred_at="2026-11-28T09:00Z"), "not RFC 3339", parsed=True
    ),
    pill(
        "occurred_at basic format", ev(occurred_at="20261128T090000Z"), "not RFC 3339", parsed=True
    ),
    pill(
        "occurred_at week date", ev(occurred_at="2026-W48-1T09:00:00Z"), "not RFC 3339", parsed=True
    ),
    pill(
        "occurred_at CRM datetime", ev(occurred_at="2026-11-28 09:00"), "not RFC 3339", parsed=True
    ),
    pill("occurred_at Feb 30", ev(occurred_at="2026-02-30T09:00:00Z"), "not RFC 3339", parsed=True),
    pill(
        "occurred_at hour 24",
        ev(occurred_at="2026-11-28T24:00:00Z"),
        "time of day out of range",
        parsed=True,
    ),
    pill(
        "occurred_at offset 24h",
        ev(occurred_at="2026-11-28T09:00:00+24:00"),
        "offset out of range",
        parsed=True,
    ),
    pill("occurred_at year 0", ev(occurred_at="0000-01-01T00:00:00Z"), "not RFC 3339", parsed=True),
    pill(
        "occurred_at other digits",
        ev(occurred_at="٢٠٢٦-11-28T09:00:00Z"),
        "not RFC 3339",
        parsed=True,
    ),
    pill(
        "occurred_at number",
        ev(occurred_at=1764320400000),
        "field 'occurred_at' must be a non-empty string, not a number",
        parsed=True,
    ),
]


@pytest.mark.parametrize(("data", "max_bytes", "message", "has_parsed"), POISON)
def test_poison_pill(data: bytes | None, max_bytes: int, message: str, has_parsed: bool) -> None:
    exc = raises(data, max_bytes)
    assert message in exc.message
    assert str(exc) == exc.message
    if has_parsed:
        assert data is not None
        assert exc.parsed == orjson.loads(data)
    else:
        assert exc.parsed is None
    # Whatever was rejected, its dead letter can be built, encoded and validated.
    letter = dead_letter(
        error_code="internal_process_error",
        message=f"invalid event: {exc.message}",
        failed_at_ms=SPEC_OCCURRED_MS,
        topic="crm.record-events",
        partition=0,
        offset=7,
        key=b"org-acme",
        event=exc.parsed,
        raw=data,
    )
    validate_dead_letter(orjson.loads(encode(letter)))


def test_the_spec_example_decodes_field_by_field() -> None:
    event = decode_event(orjson.dumps(SPEC_EVENT))
    assert event.event_id == "evt-000123"
    assert event.org_id == "org-acme"
    assert event.module == "Potentials"
    assert event.operation == "edit"
    assert event.occurred_at_ms == SPEC_OCCURRED_MS
    assert event.record_id == "4150868000000224005"
    assert event.record == SPEC_EVENT["record"]
    assert event.previous == {"Stage": "Negotiation"}
    assert event.related == SPEC_EVENT["related"]
    assert event.user == SPEC_EVENT["user"]
    assert event.organization == {"Company Name": "Acme"}
    assert event.data == SPEC_EVENT
    assert event.record_key == "org-acme/Potentials/4150868000000224005"
    assert (
        repr(event)
        == "RecordEvent('evt-000123', org='org-acme', Potentials/4150868000000224005 edit)"
    )


def test_a_minimal_event_decodes_with_empty_optionals() -> None:
    event = decode_event(orjson.dumps(MINIMAL))
    assert (event.operation, event.record, event.related) == ("create", {}, {})
    assert event.previous is None
    assert event.user is None
    assert event.organization is None


def test_optional_objects_may_be_null() -> None:
    event = decode_event(
        orjson.dumps(
            MINIMAL | {"previous": None, "related": None, "user": None, "organization": None}
        )
    )
    assert (event.previous, event.related, event.user, event.organization) == (None, {}, None, None)


def test_the_deals_alias_is_kept_for_the_catalog_to_resolve() -> None:
    event = decode_event(orjson.dumps(variant(module="Deals")))
    assert event.module == "Deals"


@pytest.mark.parametrize("record_id", [4150868000000224005, 0, -1, 2**64 - 1])
def test_an_integer_record_id_becomes_its_decimal_string(record_id: int) -> None:
    event = decode_event(orjson.dumps(variant(record_id=record_id)))
    assert event.record_id == str(record_id)


def test_field_values_of_every_allowed_type() -> None:
    values = {
        "s": "x",
        "i": -3,
        "f": 2.5,
        "t": True,
        "n": None,
        "a": ["x", 1, 2.5, False, None],
        "e": [],
    }
    event = decode_event(
        orjson.dumps(variant(record=values, user=values, related={"Accounts": values}))
    )
    assert event.record == values
    assert event.related["Accounts"] == values


def test_unknown_top_level_fields_are_kept_uninspected() -> None:
    event = decode_event(orjson.dumps(variant(x={"any": [{"shape": {}}]})))
    assert event.data["x"] == {"any": [{"shape": {}}]}


def test_a_decoded_event_has_every_field_and_is_frozen() -> None:
    event = decode_event(orjson.dumps(SPEC_EVENT))
    assert type(event) is RecordEvent
    # getattr raises AttributeError for a field the fast constructor never set.
    values = {field.name: getattr(event, field.name) for field in fields(RecordEvent)}
    assert RecordEvent(**values) == event
    assert replace(event, module="Deals") == RecordEvent(**values | {"module": "Deals"})
    with pytest.raises(AttributeError):
        event.module = "Deals"  # type: ignore[misc]


ID_FIELDS = ["event_id", "org_id", "module", "record_id"]


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize("char", ["\x00", "\t", "\n", "\x1f", "\x7f"])
def test_a_control_character_in_an_id_is_rejected(field: str, char: str) -> None:
    message = raises(ev(**{field: f"a{char}b"})).message
    assert message == f"field {field!r} contains a control character"


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize("char", [" ", "\x80", "\x85", "\xa0", "\u200b", "\u2028", "\U000e0001"])
def test_other_unprintable_characters_in_an_id_are_accepted(field: str, char: str) -> None:
    assert getattr(decode_event(ev(**{field: f"a{char}b"})), field) == f"a{char}b"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"event_id": "a\nb", "org_id": DELETE}, "field 'event_id' contains a control character"),
        ({"event_id": "", "org_id": "a\nb"}, "field 'event_id' must be a non-empty string"),
        ({"module": "a\nb", "operation": "x"}, "field 'module' contains a control character"),
        ({"operation": "x", "occurred_at": "x"}, "field 'operation' must be one of"),
        ({"occurred_at": "x", "record_id": "a\nb"}, "field 'occurred_at' is not RFC 3339"),
        ({"record_id": "a\nb", "record": None}, "field 'record_id' contains a control character"),
    ],
)
def test_of_several_problems_the_first_in_field_order_is_named(
    changes: dict[str, Any], message: str
) -> None:
    assert raises(ev(**changes)).message.startswith(message)


@pytest.mark.parametrize(
    "text",
    [
        '{"a":"\\u003a","b":"x"}',  # escaped colon: the slow check runs, finds nothing
        '{"a":{"k":1},"b":{"k":1}}',  # the same key in sibling objects
        '{"a":[{"k":1},{"k":2}]}',  # ... and in elements of one array
        '{"k":1,"K":2}',  # keys are case-sensitive
        '{"a:b":"c:d","a":"b"}',  # colons inside keys and values
        '{"a\\"":1,"a":2}',  # an escaped quote is part of the key
    ],
)
def test_objects_without_duplicate_keys_pass(text: str) -> None:
    assert decode_json_object(text.encode()) == json.loads(text)


def test_a_value_exactly_at_the_limit_passes() -> None:
    data = orjson.dumps(SPEC_EVENT)
    assert decode_event(data, max_bytes=len(data)).event_id == "evt-000123"
    assert "exceeds the limit" in raises(data, len(data) - 1).message


def test_the_deepest_accepted_event_fits_in_a_dead_letter() -> None:
    data = orjson.dumps(variant(x=nested(MAX_EVENT_DEPTH - 1)))  # the event is one level more
    event = decode_event(data)
    letter = dead_letter(
        error_code="internal_process_error",
        message="template failed",
        failed_at_ms=0,
        topic="t",
        partition=0,
        offset=0,
        key=None,
        event=event.data,
        raw=None,
    )
    assert orjson.loads(encode(letter))["event"] == SPEC_EVENT | {"x": nested(MAX_EVENT_DEPTH - 1)}


def test_non_ascii_events_decode_whether_escaped_or_not() -> None:
    event = variant(record={"客户名称": "阿克米公司", "Amount": 1}, org_id="组织-1")
    for data in (orjson.dumps(event), json.dumps(event, ensure_ascii=True).encode()):
        decoded = decode_event(data)
        assert decoded.record["客户名称"] == "阿克米公司"
        assert decoded.org_id == "组织-1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-28T09:00:00Z", datetime(2026, 11, 28, 9, tzinfo=UTC)),
        ("2026-11-28T17:00:00+08:00", datetime(2026, 11, 28, 9, tzinfo=UTC)),
        ("2026-11-28T06:30:00-02:30", datetime(2026, 11, 28, 9, tzinfo=UTC)),
        ("2026-11-28t09:00:00.123z", datetime(2026, 11, 28, 9, 0, 0, 123_000, tzinfo=UTC)),
        ("2026-11-28T09:00:00.9999999Z", datetime(2026, 11, 28, 9, 0, 0, 999_000, tzinfo=UTC)),
        ("2026-11-28T09:00:00.5+00:00", datetime(2026, 11, 28, 9, 0, 0, 500_000, tzinfo=UTC)),
        ("2016-12-31T23:59:60Z", datetime(2017, 1, 1, tzinfo=UTC)),  # a leap second
        ("1969-12-31T23:59:59.999Z", datetime(1969, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)),
    ],
)
def test_rfc3339_forms(text: str, expected: datetime) -> None:
    assert parse_rfc3339_ms(text) == (expected - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(
        milliseconds=1
    )


@given(
    moment=st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.builds(
            lambda minutes: timezone(timedelta(minutes=minutes)),
            st.integers(-23 * 60 - 59, 23 * 60 + 59),
        ),
    )
)
def test_rfc3339_agrees_with_datetime(moment: datetime) -> None:
    text = moment.isoformat(timespec="milliseconds")
    expected = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    assert parse_rfc3339_ms(text) == expected


# The parser as it was before its per-event cost was cut (computing everything
# from one regex's groups, no cache, no tables): the reference for the fast one.
_REFERENCE_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)


def reference_rfc3339_ms(text: str) -> int:
    match = _REFERENCE_RFC3339.fullmatch(text)
    if match is None:
        raise ValueError("expected yyyy-MM-ddTHH:mm:ss[.fff] followed by Z or ±HH:mm")
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    hours, minutes, seconds = int(hour), int(minute), int(second)
    if hours > 23 or minutes > 59 or seconds > 60:
        raise ValueError(f"time of day out of range: {hour}:{minute}:{second}")
    days = date(int(year), int(month), int(day)).toordinal() - date(1970, 1, 1).toordinal()
    ms = days * 86_400_000 + ((hours * 60 + minutes) * 60 + seconds) * 1000
    if fraction:
        ms += int(fraction[:3].ljust(3, "0"))
    if sign:
        offset_h, offset_m = int(off_h), int(off_m)
        if offset_h > 23 or offset_m > 59:
            raise ValueError(f"offset out of range: {sign}{off_h}:{off_m}")
        offset_ms = (offset_h * 60 + offset_m) * 60_000
        ms -= offset_ms if sign == "+" else -offset_ms
    return ms


def rfc3339_outcome(parse: Any, text: str) -> int | str:
    try:
        result: int = parse(text)
    except ValueError as exc:
        return f"ValueError: {exc}"
    return result


@st.composite
def rfc3339_like(draw: st.DrawFn) -> str:
    """RFC 3339 shaped text: fields mostly in range, some not; maybe with an edit."""

    def digits(width: int, low: int, high: int) -> str:
        value = draw(st.integers(low, high) | st.integers(0, 10**width - 1))
        return f"{value:0{width}d}"

    text = (
        f"{digits(4, 1, 9999)}-{digits(2, 1, 12)}-{digits(2, 1, 31)}"
        f"{draw(st.sampled_from('Tt'))}{digits(2, 0, 23)}:{digits(2, 0, 59)}:{digits(2, 0, 60)}"
    )
    if draw(st.booleans()):
        text += "." + draw(st.text(alphabet="0123456789", min_size=1, max_size=12))
    if draw(st.booleans()):
        text += draw(st.sampled_from(["Z", "z"]))
    else:
        text += f"{draw(st.sampled_from('+-'))}{digits(2, 0, 23)}:{digits(2, 0, 59)}"
    if draw(st.booleans()):  # an edit somewhere: most are malformed, some stay valid
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 2))
        insert = draw(st.text(alphabet="0123456789-:.+TtZz ٢", max_size=2))
        text = text[:at] + insert + text[at + cut :]
    return text


@settings(max_examples=1000)
@given(text=rfc3339_like())
def test_rfc3339_agrees_with_the_reference_parser(text: str) -> None:
    assert rfc3339_outcome(parse_rfc3339_ms, text) == rfc3339_outcome(reference_rfc3339_ms, text)


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-28T09:00:00Z",
        "2016-12-31T23:59:60.5+01:00",  # a leap second, a fraction, an offset
        "2026-11-28T09:00:00.1234567890123-23:59",
        "2026-02-29T09:00:00Z",  # no such day
        "0000-01-01T00:00:00Z",  # no year 0 either
        "2026-11-28T23:60:00Z",
        "2026-11-28T09:00:61Z",
        "2026-11-28T09:00:00+23:60",
        "2026-11-28T09:00:00-99:00",
        "2026-11-28T09:00:00.Z",
        "2026-11-28T09:00:00+0100",
    ],
)
def test_rfc3339_edge_cases_agree_with_the_reference_parser(text: str) -> None:
    for _ in range(2):  # the second time from the cache
        assert rfc3339_outcome(parse_rfc3339_ms, text) == rfc3339_outcome(
            reference_rfc3339_ms, text
        )


def test_rfc3339_every_fraction_and_offset_agree_with_the_reference_parser() -> None:
    fractions = [f"{n:0{width}d}" for width in (1, 2, 3, 4) for n in range(10**width)]
    offsets = [f"{sign}{n // 100:02d}:{n % 100:02d}" for sign in "+-" for n in range(10_000)]
    for text in [f"2026-11-28T09:00:00.{fraction}Z" for fraction in fractions] + [
        f"2026-11-28T09:00:00{offset}" for offset in offsets
    ]:
        assert rfc3339_outcome(parse_rfc3339_ms, text) == rfc3339_outcome(
            reference_rfc3339_ms, text
        )


# Heads and tails of RFC 3339 texts, valid and not: the parser caches the value of
# each valid one, and a text of a cached head and a cached tail skips the regex.
RFC3339_HEADS = [
    "2026-11-28T09:00:00",
    "2026-11-28t23:59:59",
    "2016-12-31T23:59:60",  # a leap second
    "2026-02-29T09:00:00",  # no such day
    "2026-11-28T24:00:00",
    "2026-11-28 09:00:00",
    "2026-11-28T09:00:0",  # 18 characters: the tail's first one completes the head
    "٢٠٢٦-11-28T09:00:00",
]
RFC3339_TAILS = [
    "Z",
    "z",
    ".5Z",
    ".123+08:00",
    ".1234567-02:30",  # more than 3 digits: never cached
    "+23:59",
    "-00:00",
    "+24:00",
    "-00:60",
    ".Z",
    "",
    "Z ",
    "+0100",
    "0Z",
    "0.1Z",
]
RFC3339_VALID_TAILS = ["Z", "z", ".5Z", ".123+08:00", ".1234567-02:30", "+23:59", "-00:00"]


def test_rfc3339_cached_heads_and_tails_combine_as_the_reference_parser() -> None:
    texts = [head + tail for head in RFC3339_HEADS for tail in RFC3339_TAILS]
    # The second time, every valid head and tail cached (whole texts forgotten, so that
    # heads and tails are combined); the third, every valid text cached whole.
    for time in range(3):
        for text in texts:
            if time == 1:
                rfc3339._TEXT_MS.clear()
            assert rfc3339_outcome(parse_rfc3339_ms, text) == rfc3339_outcome(
                reference_rfc3339_ms, text
            ), text
    assert len(rfc3339._TEXT_MS) > 0


def test_the_rfc3339_caches_are_bounded() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for second in range(rfc3339._CACHE_SIZE + 10):
        moment = start + timedelta(seconds=second, milliseconds=second % 1000)
        text = moment.isoformat(timespec="milliseconds").replace("+00:00", "+01:30")
        assert parse_rfc3339_ms(text) == reference_rfc3339_ms(text)
        assert len(rfc3339._TEXT_MS) <= rfc3339._CACHE_SIZE
        assert len(rfc3339._HEAD_MS) <= rfc3339._CACHE_SIZE
        assert len(rfc3339._TAIL_MS) <= rfc3339._CACHE_SIZE


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise KeyError("duplicate")
    return dict(pairs)


def has_duplicate_keys(text: str) -> bool:
    """The reference: the standard library's parser, with a hook (small inputs only)."""
    try:
        json.loads(text, object_pairs_hook=_reject_duplicates)
    except KeyError:
        return True
    return False


# JSON texts whose objects are lists of pairs, so keys may repeat; strings are
# written with colons, quotes, backslashes and \u escapes (colons among them).
KEYS = st.sampled_from(["a", "b", ":", "a:b", "é", '"', "\\"])
STRINGS = st.text(alphabet=':ab"\\é\x01', max_size=6)


@st.composite
def json_strings(draw: st.DrawFn, strings: st.SearchStrategy[str]) -> str:
    text = json.dumps(draw(strings), ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):
        text = text.replace(":", draw(st.sampled_from(["\\u003a", "\\u003A"])))
    return text


def json_texts() -> st.SearchStrategy[str]:
    scalars = json_strings(STRINGS) | st.sampled_from(["1", "-2.5e3", "true", "null"])
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]")
            | st.lists(st.tuples(json_strings(KEYS), inner), max_size=4).map(
                lambda pairs: "{" + " , ".join(f"{k} : {v}" for k, v in pairs) + "}"
            )
        ),
        max_leaves=12,
    )
    return st.lists(st.tuples(json_strings(KEYS), values), max_size=4).map(
        lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"
    )


@settings(max_examples=400)
@given(text=json_texts())
def test_duplicate_keys_are_found_exactly_when_present(text: str) -> None:
    if has_duplicate_keys(text):
        assert find_duplicate_key(text) is not None
        assert "duplicate key" in raises(text.encode()).message
    else:
        assert find_duplicate_key(text) is None
        assert decode_json_object(text.encode()) == json.loads(text)


def decode_or_error(data: bytes) -> RecordEvent | InvalidEvent:
    try:
        return decode_event(data)
    except InvalidEvent as exc:
        return exc


def _check_rejection_or_event(data: bytes) -> None:
    outcome = decode_or_error(data)
    if isinstance(outcome, RecordEvent):
        assert outcome.data == orjson.loads(data)
    else:
        assert outcome.message
        if outcome.parsed is not None:  # the dead letter will carry it: it must encode
            assert orjson.loads(orjson.dumps([outcome.parsed])) == [outcome.parsed]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_raise_only_invalid_event(data: bytes) -> None:
    _check_rejection_or_event(data)


@given(
    position=st.integers(0, len(orjson.dumps(SPEC_EVENT))),
    cut=st.integers(0, 4),
    insert=st.binary(max_size=4),
)
def test_mutated_events_raise_only_invalid_event(position: int, cut: int, insert: bytes) -> None:
    data = orjson.dumps(SPEC_EVENT)
    _check_rejection_or_event(data[:position] + insert + data[position + cut :])


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    event=st.fixed_dictionaries(
        {},
        optional={key: JSON_VALUES | st.just(SPEC_EVENT[key]) for key in SPEC_EVENT},
    )
)
def test_arbitrary_json_objects_decode_or_raise_invalid_event(event: dict[str, Any]) -> None:
    try:
        decoded: RecordEvent | InvalidEvent = event_from_json(event)
    except InvalidEvent as exc:
        decoded = exc
    assert (decoded.data if isinstance(decoded, RecordEvent) else decoded.parsed) is event
    _check_rejection_or_event(orjson.dumps(event))


# The fast path of event_from_json (_plain_event) against the checked one
# (_checked_event, which names the first problem): on events of which some fields
# are spoiled, every outcome must be the same: the event, or the message.


class Text(str):
    """A str subclass: never decoded from JSON, and refused where a string is required."""


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4)
)
FIELDS = st.dictionaries(st.text(max_size=4), SCALARS | st.lists(SCALARS, max_size=3), max_size=4)
# Ids without control characters, some ending in other non-printable ones (which
# the fast path leaves to the checked one); and bad ids.
IDS = st.builds(
    operator.add,
    st.text(st.characters(whitelist_categories=["L", "N", "P", "S"]), min_size=1, max_size=6),
    st.sampled_from([""] * 12 + ["\x85", "\u2028", "\U000e0001", "\xa0"]),
)
BAD_IDS = st.sampled_from(["", "a\nb", "\x00", "a\x7f", "\t"])
MOMENTS = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=8)), timezone(-timedelta(hours=2))]),
)
# Per field of the SPEC: values that mostly pass ...
VALID: dict[str, st.SearchStrategy[Any]] = {
    "event_id": IDS,
    "org_id": IDS,
    "module": IDS,
    "operation": st.sampled_from(sorted(OPERATIONS)),
    "occurred_at": st.builds(
        datetime.isoformat, MOMENTS, timespec=st.sampled_from(["seconds", "milliseconds"])
    )
    | st.sampled_from([f"2026-11-28T09:00:00{tail}" for tail in RFC3339_VALID_TAILS]),
    "record_id": IDS | st.integers(-(2**63), 2**64 - 1),
    "record": FIELDS,
    "previous": st.none() | FIELDS,
    "related": st.none() | st.dictionaries(st.text(max_size=4), FIELDS, max_size=3),
    "user": st.none() | FIELDS,
    "organization": st.none() | FIELDS,
}
# ... and values that mostly do not; a field may also be missing.
NOT_SCALARS = (
    st.dictionaries(st.text(max_size=2), SCALARS, max_size=2)
    | st.lists(SCALARS, max_size=2).map(tuple)
    | st.just(Text("x"))
)
# Field values, one of them neither a scalar nor an array of scalars.
NOT_FIELDS = st.builds(
    lambda fields, name, bad: fields | {name: bad},
    FIELDS,
    st.text(max_size=4),
    NOT_SCALARS
    | st.builds(
        lambda items, bad: [*items, bad],
        st.lists(SCALARS, max_size=2),
        NOT_SCALARS | st.lists(SCALARS, max_size=1),
    ),
)
SPOILED: dict[str, st.SearchStrategy[Any]] = {
    "event_id": BAD_IDS | st.just(Text("e1")),
    "org_id": BAD_IDS | st.just(Text("org")),
    "module": BAD_IDS | st.just(Text("Leads")),
    "operation": st.sampled_from(["", "Create", "update", "create "]) | st.just(Text("edit")),
    "occurred_at": rfc3339_like() | st.just(Text("2026-11-28T09:00:00Z")),
    "record_id": BAD_IDS | st.sampled_from([Text("1"), 1.0, -0.0, True, False]),
    "record": NOT_FIELDS,
    "previous": NOT_FIELDS,
    "related": st.builds(
        lambda related, name, bad: related | {name: bad},
        st.dictionaries(st.text(max_size=4), FIELDS, max_size=2),
        st.text(max_size=4),
        NOT_FIELDS | SCALARS,
    ),
    "user": NOT_FIELDS,
    "organization": NOT_FIELDS,
}


@st.composite
def spoiled_events(draw: st.DrawFn) -> dict[str, Any]:
    """An event with its fields in random order, a few spoiled, missing or extra."""
    count = draw(st.sampled_from([0, 1, 1, 1, 2]))
    spoiled = draw(st.lists(st.sampled_from(list(VALID)), min_size=count, max_size=count))
    event: dict[str, Any] = {}
    for key in draw(st.permutations(list(VALID))):
        if key not in spoiled:
            event[key] = draw(VALID[key])
        else:
            how = draw(st.sampled_from(["missing", "any", "bad", "bad"]))
            if how != "missing":
                event[key] = draw(JSON_VALUES if how == "any" else SPOILED[key])
    if draw(st.booleans()):
        event["x"] = draw(JSON_VALUES)
    return event


def outcome(decode: Callable[[dict[str, Any]], RecordEvent], event: dict[str, Any]) -> Any:
    """What decoding gives: the event's fields, or the error's message; and what it keeps."""
    try:
        decoded = decode(event)
    except InvalidEvent as exc:
        error = exc
    else:
        assert type(decoded) is RecordEvent
        assert decoded.data is event
        for name in ("record", "previous", "user", "organization"):
            assert getattr(decoded, name) is event.get(name)
        if event.get("related") is not None:
            assert decoded.related is event["related"]
        return [(name, getattr(decoded, name)) for name in RecordEvent.__struct_fields__]
    assert error.parsed is event
    return error.message


def bytes_outcome(decode: Callable[[bytes], RecordEvent], data: bytes) -> Any:
    try:
        decoded = decode(data)
    except InvalidEvent as exc:
        return exc.message, exc.parsed
    return [(name, getattr(decoded, name)) for name in RecordEvent.__struct_fields__]


def decode_checked(data: bytes) -> RecordEvent:
    """decode_event without the fast path."""
    return events._checked_event(decode_json_object(data))


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(event=spoiled_events())
def test_the_fast_path_decides_as_the_checked_one(event: dict[str, Any]) -> None:
    fast = events._plain_event(event)
    checked = outcome(events._checked_event, event)
    if fast is not None:  # only what the checked path accepts, as it builds it
        assert outcome(lambda _: fast, event) == checked
    assert outcome(event_from_json, event) == checked
    try:
        data = orjson.dumps(event)
    except orjson.JSONEncodeError:  # integers of more than 64 bits
        return
    assert bytes_outcome(decode_event, data) == bytes_outcome(decode_checked, data)


# The msgspec fast path of decode_event (_typed_event) against the checked path,
# on the bytes producers write: compact or spaced, ASCII-escaped or not, with a
# key repeated or unknown, big integers, colons escaped in strings.


@st.composite
def event_texts(draw: st.DrawFn) -> bytes:
    event = draw(spoiled_events())
    style = draw(st.sampled_from(["orjson", "spaced", "ascii", "repeat", "escaped colon"]))
    if style == "orjson":
        try:
            return orjson.dumps(event)
        except orjson.JSONEncodeError:  # integers of more than 64 bits
            return json.dumps(event, separators=(",", ":")).encode()
    if style == "spaced":
        return json.dumps(event, ensure_ascii=False).encode()
    if style == "ascii":
        return json.dumps(event).encode()
    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    if style == "escaped colon" and type(event.get("record")) is dict:
        # A key of the record repeated, its kept value a colon written as an escape:
        # the colon counts of the text and of its re-encoding agree.
        return text.replace('"record":{', '"record":{"x":0,"x":"\\u003a",', 1).encode()
    # "repeat": one key of the top level or of the record written twice, the first
    # value different (a JSON parser keeps the last).
    key = draw(st.sampled_from([*event, "record.x"]))
    if key == "record.x" and type(event.get("record")) is dict:
        return text.replace('"record":{', '"record":{"x":0,', 1).encode()
    return ("{" + json.dumps(key) + ":" + json.dumps(draw(JSON_VALUES)) + "," + text[1:]).encode()


def strict(outcome: Any) -> Any:
    """An outcome, its values told apart by type (1 == 1.0 == True in Python), the keys
    of objects in any order (the fast path makes ``data`` in SPEC §2's order)."""
    if isinstance(outcome, list):
        return [
            (name, orjson.dumps(value, default=repr, option=orjson.OPT_SORT_KEYS))
            for name, value in outcome
        ]
    return outcome


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(data=event_texts())
def test_the_typed_fast_path_decides_as_the_checked_one(data: bytes) -> None:
    fast = event_shape.typed_event(data)
    checked = bytes_outcome(decode_checked, data)
    if fast is not None:  # only what the checked path accepts, as it builds it
        assert strict(bytes_outcome(lambda _: fast, data)) == strict(checked)
    assert strict(bytes_outcome(decode_event, data)) == strict(checked)


@dataclass(frozen=True)
class Valued:
    """A record of the events topic, as ``decode_wanted`` reads one."""

    value: bytes | None


def decode_wanted_event(data: bytes | None, wanted: Callable[[EventView], bool]) -> Any:
    """``decode_wanted`` of one record: its event, None, or its InvalidEvent raised."""
    found, invalid = decode_wanted([Valued(data)], wanted)
    assert len(found) + len(invalid) <= 1
    if invalid:
        raise invalid[0][1]
    return found[0][1] if found else None


def wanted_outcome(data: bytes, wanted: Callable[[RecordEvent], bool]) -> Any:
    """``decode_wanted``'s outcome, and the events it asked ``wanted`` about (as the
    events they are made into when asked for the whole event)."""
    asked: list[Any] = []

    def asking(view: EventView) -> bool:
        event = view.as_event()
        assert (view.org_id, view.module, view.record) == (
            event.org_id,
            event.module,
            event.record,
        )
        asked.append(strict(bytes_outcome(lambda _: event, data))[:-1])  # all but data
        return wanted(event)

    try:
        decoded = decode_wanted_event(data, asking)
    except InvalidEvent as exc:
        return (exc.message, exc.parsed), asked
    if decoded is None:
        return None, asked
    return strict(bytes_outcome(lambda _: decoded, data)), asked


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(data=event_texts(), wants=st.sampled_from(["all", "none", "some"]))
def test_a_wanted_event_decodes_as_the_checked_path_and_others_differ_only_when_repeated(
    data: bytes, wants: str
) -> None:
    """Wanted: the checked path's outcome. Not wanted: None where it would accept the
    event or refuse it for a repeated key, else its error. ``wanted`` is only asked
    about events the checked path builds alike (but for their data)."""

    def wanted(event: RecordEvent) -> bool:
        return wants == "all" or (wants == "some" and event.event_id < "m")

    checked = strict(bytes_outcome(decode_checked, data))
    got, asked = wanted_outcome(data, wanted)
    if isinstance(checked, tuple) and not checked[0].startswith("duplicate key"):
        assert got == checked
        assert not asked  # refused before anyone is asked
    elif isinstance(checked, tuple):  # a repeated key: refused if wanted
        assert got == checked or (got is None and asked)
        if wants == "all":
            assert got == checked
    else:
        assert asked
        assert all(question == checked[:-1] for question in asked)
        assert got == (checked if wanted(decode_checked(data)) else None)


def test_a_repeated_key_refuses_a_wanted_event_and_not_one_nothing_acts_on() -> None:
    data = orjson.dumps(SPEC_EVENT).replace(b'"Stage":', b'"Stage":"Lost","Stage":')
    assert decode_wanted_event(data, lambda event: False) is None
    with pytest.raises(InvalidEvent, match=re.escape("duplicate key 'Stage' in $.record")):
        decode_wanted_event(data, lambda event: True)


def test_a_wanted_event_keeps_the_keys_the_fast_path_does_not_know() -> None:
    data = orjson.dumps({**SPEC_EVENT, "trace": "t-1"})
    event = decode_wanted_event(data, lambda event: True)
    assert event is not None
    assert event.data["trace"] == "t-1"
    assert decode_wanted_event(data, lambda event: event.module == "Leads") is None


@pytest.mark.parametrize(
    "data",
    [
        orjson.dumps(SPEC_EVENT),
        json.dumps(SPEC_EVENT).encode(),  # spaced, non-ASCII escaped
        orjson.dumps({**SPEC_EVENT, "record_id": 4150868000000224005}),
    ],
)
def test_valid_events_take_the_typed_fast_path(data: bytes) -> None:
    fast = event_shape.typed_event(data)
    assert fast is not None
    assert bytes_outcome(lambda _: fast, data) == bytes_outcome(decode_checked, data)


@pytest.mark.parametrize(
    "data",
    [
        orjson.dumps({**SPEC_EVENT, "trace": "t-1"}),  # unknown: kept by the checked path
        b'{"event_id":"x",' + orjson.dumps(SPEC_EVENT)[1:],  # repeated: refused there
        orjson.dumps(SPEC_EVENT).replace(b'"Amount":25000', b'"Amount":123456789012345678901'),
        orjson.dumps({**SPEC_EVENT, "event_id": "e\x85"}),  # non-printable, not control
    ],
)
def test_what_the_typed_fast_path_leaves_to_the_checked_one(data: bytes) -> None:
    assert event_shape.typed_event(data) is None
    decode_or_error(data)  # decided there, event or error


BAD_FIELDS: list[Any] = [
    None,
    [],
    "x",
    {"a": {}},
    {"a": [[]]},
    {"a": ["x", {}]},
    {"a": (1,)},
    {"a": Text("x")},
    {"a": [Text("x")]},
    {"a": ["x", 1, 2.5, True, None], "b": []},
]
SPOILED_IDS: list[Any] = [
    *["", "a\nb", "\x00", "a\x7f", "\t", "a\x85b", "a\u2028b", Text("e1")],
    *[None, 1, -0.0, True, [], {}, DELETE],
]
SPOILED_TIMES: list[Any] = [
    *["", "x", "2026-11-28T09:00:00", "2026-11-28T24:00:00Z", "2026-11-28T09:00:00+0100"],
    *[Text("2026-11-28T09:00:00Z"), 1764320400000, None, DELETE],
]
ONE_SPOILED: list[tuple[str, Any]] = [
    *[(key, value) for key in ("event_id", "org_id", "module") for value in SPOILED_IDS],
    *[("record_id", value) for value in [*SPOILED_IDS, 0, -1, 2**64 - 1, -(2**63), 1.0, False]],
    *[
        ("operation", value)
        for value in ["", "Create", "update", "create ", Text("edit"), None, 1, ["create"], DELETE]
    ],
    *[("occurred_at", value) for value in SPOILED_TIMES],
    *[
        (key, value)
        for key in ("record", "previous", "user", "organization")
        for value in [*BAD_FIELDS, DELETE]
    ],
    *[("related", {"A": value}) for value in BAD_FIELDS],
    *[("related", value) for value in [None, [], "x", {}, DELETE]],
]


@pytest.mark.parametrize(("key", "value"), ONE_SPOILED)
@pytest.mark.parametrize("base", [SPEC_EVENT, MINIMAL], ids=["spec", "minimal"])
def test_with_one_field_spoiled_the_fast_path_decides_as_the_checked_one(
    base: dict[str, Any], key: str, value: Any
) -> None:
    event = {k: v for k, v in base.items() if k != key}
    if value is not DELETE:
        event[key] = value
    fast = events._plain_event(event)
    checked = outcome(events._checked_event, event)
    if fast is not None:
        assert outcome(lambda _: fast, event) == checked
    assert outcome(event_from_json, event) == checked


@pytest.mark.parametrize(
    "event",
    [
        SPEC_EVENT,
        MINIMAL,
        MINIMAL | {"previous": None, "related": None, "user": None, "organization": None},
        variant(record_id=4150868000000224005, record={"Tags": ["a", 1, None], "Empty": []}),
        variant(occurred_at="2026-11-28T17:00:00.123456+08:00", related={}),
    ],
)
def test_plain_events_take_the_fast_path(event: dict[str, Any]) -> None:
    fast = events._plain_event(event)
    assert fast is not None
    assert fast == events._checked_event(event)


def test_decode_wanted_keeps_each_record_with_its_event_or_its_problem_in_order() -> None:
    tombstone = Valued(None)
    not_json = Valued(b"{not json")
    first = Valued(orjson.dumps({**SPEC_EVENT, "event_id": "evt-1"}))
    ignored = Valued(orjson.dumps({**SPEC_EVENT, "event_id": "evt-2", "module": "Leads"}))
    last = Valued(orjson.dumps({**SPEC_EVENT, "event_id": "evt-3"}))
    found, invalid = decode_wanted(
        [first, tombstone, ignored, not_json, last], lambda view: view.module != "Leads"
    )
    assert [(rec, event.event_id) for rec, event in found] == [(first, "evt-1"), (last, "evt-3")]
    assert [rec for rec, _ in invalid] == [tombstone, not_json]
    assert invalid[0][1].message == "empty record value (tombstone)"
    assert invalid[1][1].message.startswith("not valid JSON")
