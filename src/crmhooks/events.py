"""Record events: the bytes of the events topic decoded into values, or rejected."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import date
from types import MappingProxyType
from typing import Annotated, Any, Literal

import msgspec
import orjson

from crmhooks.errors import InvalidEvent

Operation = Literal["create", "edit", "delete"]
OPERATIONS: frozenset[str] = frozenset({"create", "edit", "delete"})

# Why 1 MiB: a CRM record with 3000-character fields and a few related records
# is a few tens of KiB; anything much larger is a producer bug, and decoding it
# would cost the whole partition time. Configurable (kafka.max_event_bytes).
DEFAULT_MAX_EVENT_BYTES = 1 << 20

# orjson refuses to encode containers nested deeper than 254 levels. Whatever we
# accept must be encodable again, one level deeper: a dead letter nests the event
# in its envelope. SPEC §2 events are 4 levels deep; nobody legitimate gets near.
_ORJSON_MAX_ENCODE_DEPTH = 254
MAX_EVENT_DEPTH = _ORJSON_MAX_ENCODE_DEPTH - 1

Record = Mapping[str, Any]

# SPEC §2: a field value is a string, number, boolean, null, or an array of these.
_SCALAR_TYPES: frozenset[type] = frozenset({str, int, float, bool, type(None)})
_JSON_TYPE_NAMES: dict[type, str] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}

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

# Identifiers end up in action ids, the webhook-id header and log lines.
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")

# An int: ``in`` searches bytes for one with memchr, and for a bytes needle, even
# of length 1, with a loop ten times slower (CPython 3.11).
_BACKSLASH = ord("\\")

# Tokens of a JSON text that matter for finding duplicate keys: strings (an
# unrolled loop, linear time) and structural characters. Numbers, literals and
# whitespace never match and are skipped by finditer.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]:,]', re.DOTALL)


def record_key_of(org_id: str, module: str, record_id: str) -> str:
    """The key of a record across events and actions: ``org/module/record_id``."""
    return f"{org_id}/{module}/{record_id}"


class RecordEvent(msgspec.Struct, frozen=True, gc=False):
    """One CRM record event (SPEC §2). ``data`` is the JSON object as received.

    Frozen, like every value. A ``msgspec.Struct``: made in C, ~0.1 µs for these 12
    fields where a frozen dataclass's ``__init__`` (``object.__setattr__`` a field)
    takes ~1.5 µs, a tenth of an event's processing; ``msgspec.structs.replace``
    copies one with changes. ``gc=False``: it holds JSON values, which cannot refer
    back to it, so it is never part of a cycle for the collector to find.
    """

    event_id: str
    org_id: str
    module: str
    operation: Operation
    occurred_at_ms: int
    record_id: str
    record: Record
    previous: Record | None
    related: Mapping[str, Record]
    user: Record | None
    organization: Record | None
    data: Mapping[str, Any]

    @property
    def record_key(self) -> str:
        """Identifies the record across events: ``org/module/record_id``."""
        return record_key_of(self.org_id, self.module, self.record_id)

    def __repr__(self) -> str:
        return (
            f"RecordEvent({self.event_id!r}, org={self.org_id!r}, {self.module}/"
            f"{self.record_id} {self.operation})"
        )


def parse_rfc3339_ms(text: str) -> int:
    """Epoch ms of an RFC 3339 date-time (offset or ``Z`` required); ValueError otherwise.

    Fractions of a millisecond are truncated; a leap second (``:60``) is the first
    millisecond of the next minute.
    """
    head_ms = _HEAD_MS.get(text[:19])
    tail_ms = _TAIL_MS.get(text[19:])
    if head_ms is not None and tail_ms is not None:
        return head_ms + tail_ms
    return _parse_rfc3339_ms(text)


# Why cached: events arrive roughly in time order, so at any rate that matters most
# share their second with one just before, and their fraction and offset with many.
# The pattern is a 19-character head (date, time to the second) followed by a
# tail (fraction, offset), each with its own share of the value: a text whose head
# and tail have both been seen in valid texts is valid, and its value their sum.
# Two dict lookups (~0.1 µs) replace the regex (~0.5 µs). Only tails of up to 3
# fraction digits are kept: they repeat, finer ones rarely do. Why 4096
# entries: over an hour of seconds, or every millisecond in a few offsets, for
# producers lagging each other or a replayed backlog, in under 1 MB; when full, a
# cache starts again empty (cheaper than an LRU on every hit).
_CACHE_SIZE = 4096
_HEAD_MS: dict[str, int] = {}  # yyyy-MM-ddTHH:mm:ss → ms since 1970-01-01T00:00:00 local
_TAIL_MS: dict[str, int] = {}  # [.fff](Z|±HH:mm) → ms to add: the fraction, minus the offset


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


def _json_type(value: object) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _decode_error_message(exc: orjson.JSONDecodeError) -> str:
    """orjson's message, reworded where it would puzzle an operator."""
    msg = exc.msg
    if msg.startswith("str is not valid UTF-8"):
        return "not valid UTF-8"
    if msg.startswith("depth limit exceeded"):
        return "not valid JSON: nested deeper than 1024 levels"
    if msg.startswith("number is infinity"):
        return f"not valid JSON: number out of range at char {exc.pos}"
    if msg.startswith("Input is a zero-length"):
        return "not valid JSON: empty value"
    # orjson reports NaN/Infinity as an unexpected character; say what it is.
    if exc.doc[exc.pos : exc.pos + 8].startswith(("NaN", "Infinity")):
        return f"not valid JSON: NaN and Infinity are not JSON numbers (char {exc.pos})"
    return f"not valid JSON: {exc}"


def find_duplicate_key(text: str) -> str | None:
    """Where a key repeats in an object of this (valid) JSON text, or None.

    Iterative, so any nesting depth is safe. Linear, but in Python: only called
    when the cheap check in ``decode_json_object`` cannot rule duplicates out.
    """
    keys: list[set[str] | None] = []  # per open container: keys seen, None for arrays
    paths: list[str] = []
    indexes: list[int] = []
    last_string = ""
    last_key = ""
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        char = token[0]
        if char == '"':
            last_string = token
        elif char == ":":
            key: str = orjson.loads(last_string)
            seen = keys[-1]
            if seen is None:  # a colon only follows a key: the text is not valid JSON
                raise ValueError("not a valid JSON text")
            if key in seen:
                return f"duplicate key {key!r} in {paths[-1]}"
            seen.add(key)
            last_key = key
        elif char == ",":
            if keys[-1] is None:
                indexes[-1] += 1
        elif char in "{[":
            if not paths:
                path = "$"
            elif keys[-1] is None:
                path = f"{paths[-1]}[{indexes[-1]}]"
            else:
                path = f"{paths[-1]}.{last_key}"
            keys.append(set() if char == "{" else None)
            paths.append(path)
            indexes.append(0)
        else:
            keys.pop()
            paths.pop()
            indexes.pop()
    return None


def _may_have_dropped_keys(data: bytes, encoded: bytes) -> bool:
    """Whether parsing ``data`` may have dropped a key (repeated, or unknown to a
    shape); ``encoded`` is the parsed value re-encoded by orjson.

    Cheap checks, in C. First: if the input is its own re-encoding (a producer
    writing compact JSON as orjson does), no key was dropped, since orjson writes
    each key of a dict once; one memcmp. Else: every key contributes one colon
    outside strings, and the re-encoding keeps the parsed keys and strings, colons
    unescaped. So equal colon counts prove no key was dropped, unless the input
    wrote a colon in a string as the escape \\u003a, which the count does not see.
    (Testing for any backslash first is a memchr: most events have none.)
    """
    return encoded != data and (
        data.count(b":") != encoded.count(b":") or (_BACKSLASH in data and b"\\u003" in data)
    )


def decode_json_object(data: bytes, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> dict[str, Any]:
    """Bytes → a JSON object, or InvalidEvent saying what is wrong (parsed=None).

    Rejects what orjson accepts but the event cannot be: a value nested too deep
    to be encoded again (in a dead letter), and duplicate keys, which orjson
    resolves silently (the last wins) while other consumers may keep the first.
    Both carry ``parsed=None``: the dead letter then keeps the exact bytes.
    """
    if len(data) > max_bytes:
        raise InvalidEvent(f"event of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(_decode_error_message(exc)) from None
    if not isinstance(parsed, dict):
        raise InvalidEvent(f"event must be a JSON object, not {_json_type(parsed)}")
    try:
        # Wrapped in a list: encodable one level deeper, as inside a dead letter.
        encoded = orjson.dumps([parsed])
    except orjson.JSONEncodeError:
        # Nothing else can fail: orjson.loads yields only encodable strings and numbers.
        raise InvalidEvent(f"nested deeper than {MAX_EVENT_DEPTH} levels") from None
    if _may_have_dropped_keys(data, encoded[1:-1]):
        duplicate = find_duplicate_key(data.decode("utf-8"))
        if duplicate is not None:
            raise InvalidEvent(duplicate)
    return parsed


def decode_event(data: bytes | None, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> RecordEvent:
    """The one place where events-topic bytes become a RecordEvent (SPEC §2)."""
    if data is None:
        raise InvalidEvent("empty record value (tombstone)")
    if len(data) <= max_bytes:
        event = _typed_event(data)
        if event is not None:
            return event
    return event_from_json(decode_json_object(data, max_bytes))


def decode_wanted_event(
    data: bytes | None,
    wanted: Callable[[RecordEvent], bool],
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> RecordEvent | None:
    """``decode_event`` for an event ``wanted`` says something acts on; None for a valid
    event it does not want (consumed, ignored). InvalidEvent as ``decode_event``.

    What it skips for an event not wanted: the proof that no key repeated (a
    re-encoding, ~0.3 µs, a tenth of what a filtered event costs). A repeated key
    makes an event ambiguous: other consumers may read the first value where a JSON
    parser keeps the last. An event nothing acts on causes nothing either way;
    one that something acts on is proven as by ``decode_event``, and refused.
    """
    if data is None:
        raise InvalidEvent("empty record value (tombstone)")
    if len(data) <= max_bytes:
        shape = _shape_of(data)
        if shape is not None:
            event = _event_of(shape)
            if event is not None:
                if not wanted(event):
                    return None
                proven = _proven(event, shape, data)
                if proven is not None:
                    return proven
    event = event_from_json(decode_json_object(data, max_bytes))
    return event if wanted(event) else None


# The shape of a valid event (SPEC §2), for msgspec to check while it parses: in C,
# the types of every field and field value cost nothing beyond the parse itself,
# where checking them in Python (``_plain_event``) costs as much as the parse.
# What a type cannot say (non-empty printable ids, RFC 3339, no repeated or
# unknown keys) ``_event_of`` and ``_proven`` check after. Integers within 64 bits
# (signed): orjson encodes no more, and parses them as integers as msgspec does
# (beyond, it makes them floats); others go to the checked path.
_Int = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
_Scalar = str | _Int | float | bool | None
_Fields = dict[str, _Scalar | list[_Scalar]]


class _EventShape(msgspec.Struct, gc=False):
    """An event as msgspec parses it: a Struct, ~0.2 µs faster to make than a dict.

    An optional field absent and one written ``null`` are both None here; ``_proven``
    tells them apart. msgspec keeps the last of repeated keys and skips keys the shape
    does not name: ``_proven`` finds both. ``gc=False``: it holds JSON values only.
    """

    event_id: str
    org_id: str
    module: str
    operation: Operation
    occurred_at: str
    record_id: str | _Int
    record: _Fields
    previous: _Fields | None = None
    related: dict[str, _Fields] | None = None
    user: _Fields | None = None
    organization: _Fields | None = None


_EVENT_SHAPE = msgspec.json.Decoder(_EventShape)
# The data of an event made from a shape (``_event_of``), which only ``wanted`` sees
# (``decode_wanted_event``): an empty read-only mapping, not to be taken for the event.
_UNPROVEN: Mapping[str, Any] = MappingProxyType({})


def _typed_event(data: bytes) -> RecordEvent | None:
    """The event, if ``data`` is plainly valid; else None, for the checked path.

    The fast path of ``decode_event``: one parse that checks the shape, ~1.3 µs less
    per event than orjson's parse and the checks of ``_plain_event``. It accepts a
    subset of what the checked path accepts and builds the same event (a property
    test compares them); that path decides, and names the problem, for the rest.
    """
    shape = _shape_of(data)
    if shape is None:
        return None
    event = _event_of(shape)
    return None if event is None else _proven(event, shape, data)


def _shape_of(data: bytes) -> _EventShape | None:
    try:
        return _EVENT_SHAPE.decode(data)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None  # not JSON (or not UTF-8), not the shape


def _event_of(shape: _EventShape) -> RecordEvent | None:
    """The event of a shape, its ``data`` empty (``_proven`` copies it with its data);
    None unless its ids are printable and non-empty and its time RFC 3339."""
    event_id = shape.event_id
    org_id = shape.org_id
    module = shape.module
    record_id = shape.record_id
    if not (
        event_id
        and org_id
        and module
        and event_id.isprintable()
        and org_id.isprintable()
        and module.isprintable()
        and (isinstance(record_id, int) or (record_id and record_id.isprintable()))
    ):
        return None
    try:
        occurred_at_ms = parse_rfc3339_ms(shape.occurred_at)
    except ValueError:
        return None
    related = shape.related
    return RecordEvent(
        event_id,
        org_id,
        module,
        shape.operation,
        occurred_at_ms,
        record_id if type(record_id) is str else str(record_id),
        shape.record,
        shape.previous,
        {} if related is None else related,
        shape.user,
        shape.organization,
        _UNPROVEN,
    )


def _proven(event: RecordEvent, shape: _EventShape, data: bytes) -> RecordEvent | None:
    """``event`` with its data, if parsing ``data`` dropped no key; else None.

    The shape as a dict (in the shape's order), re-encoded by orjson, must have every
    key of ``data`` (``_may_have_dropped_keys``): none repeated, none unknown to the
    shape. An optional field written ``null`` is left out here like an absent one,
    so the check sends it to the checked path, which keeps it.
    """
    parsed: dict[str, Any] = {
        "event_id": shape.event_id,
        "org_id": shape.org_id,
        "module": shape.module,
        "operation": shape.operation,
        "occurred_at": shape.occurred_at,
        "record_id": shape.record_id,
        "record": shape.record,
    }
    if shape.previous is not None:
        parsed["previous"] = shape.previous
    if shape.related is not None:
        parsed["related"] = shape.related
    if shape.user is not None:
        parsed["user"] = shape.user
    if shape.organization is not None:
        parsed["organization"] = shape.organization
    try:
        encoded = orjson.dumps(parsed)
    except orjson.JSONEncodeError:  # none expected: the shape's values all encode
        return None
    if _may_have_dropped_keys(data, encoded):
        return None
    return msgspec.structs.replace(event, data=parsed)  # a copy: ``wanted`` has seen it


def _require_str(parsed: dict[str, Any], key: str) -> str:
    value = parsed.get(key)
    if type(value) is str and value:
        return value
    if key not in parsed:
        raise InvalidEvent(f"missing required field {key!r}", parsed)
    if type(value) is not str:
        raise InvalidEvent(
            f"field {key!r} must be a non-empty string, not {_json_type(value)}", parsed
        )
    raise InvalidEvent(f"field {key!r} must be a non-empty string", parsed)


def _require_id(parsed: dict[str, Any], key: str) -> str:
    """A non-empty string without control characters."""
    value = parsed.get(key)
    # isprintable() is False for every control character, and cheaper than the
    # regex; the regex decides for what it is false on (other non-printables).
    if type(value) is str and value and (value.isprintable() or not _CONTROL_CHAR.search(value)):
        return value
    _require_str(parsed, key)  # raises unless a non-empty string
    raise InvalidEvent(f"field {key!r} contains a control character", parsed)


def _check_fields(record: dict[str, Any], where: str, parsed: dict[str, Any]) -> None:
    """SPEC §2: field values are strings, numbers, booleans, null or arrays of these."""
    for name, value in record.items():
        kind = type(value)
        if kind in _SCALAR_TYPES:
            continue
        if kind is list and all(type(item) in _SCALAR_TYPES for item in value):
            continue
        found = _json_type(value) if kind is not list else "an array holding non-scalars"
        raise InvalidEvent(
            f"field '{where}.{name}' must be a string, number, boolean, null or an array "
            f"of these, not {found}",
            parsed,
        )


def _fields_object(parsed: dict[str, Any], key: str) -> Record | None:
    """An optional record (``previous``, ``user``, ...): an object of field values, or null."""
    value = parsed.get(key)
    if value is None:
        return None
    if type(value) is not dict:
        raise InvalidEvent(f"field {key!r} must be an object, not {_json_type(value)}", parsed)
    _check_fields(value, key, parsed)
    return value


def _related(parsed: dict[str, Any]) -> Mapping[str, Record]:
    value = parsed.get("related")
    if value is None:
        return {}
    if type(value) is not dict:
        raise InvalidEvent(f"field 'related' must be an object, not {_json_type(value)}", parsed)
    for name, record in value.items():
        if type(record) is not dict:
            raise InvalidEvent(
                f"field 'related.{name}' must be an object, not {_json_type(record)}", parsed
            )
        _check_fields(record, f"related.{name}", parsed)
    return value


def event_from_json(parsed: dict[str, Any]) -> RecordEvent:
    """Validate a parsed JSON object as a record event (SPEC §2)."""
    event = _plain_event(parsed)
    if event is None:
        return _checked_event(parsed)
    return event


def _plain_fields(fields: dict[str, Any]) -> bool:
    """Whether every value is a scalar or an array of scalars (``_check_fields`` passes)."""
    for value in fields.values():
        if type(value) not in _SCALAR_TYPES:
            if type(value) is not list:
                return False
            for item in value:
                if type(item) not in _SCALAR_TYPES:
                    return False
    return True


def _plain_event(parsed: dict[str, Any]) -> RecordEvent | None:
    """The event, if ``parsed`` is plainly valid; else None, for ``_checked_event``.

    The fast path of ``event_from_json``: the same checks, but as one condition that
    names no problem, without a call per field (~0.5 µs less per event). It accepts a
    subset of what ``_checked_event`` accepts (ids with non-printable characters
    other than control characters are left to it) and builds the same event; a
    property test compares the two. ``_checked_event`` decides whatever this
    does not accept, naming the first problem in field order.
    """
    get = parsed.get
    event_id = get("event_id")
    org_id = get("org_id")
    module = get("module")
    operation = get("operation")
    occurred_at = get("occurred_at")
    record_id = get("record_id")
    record = get("record")
    previous = get("previous")
    related = get("related")
    user = get("user")
    organization = get("organization")
    if not (
        type(event_id) is str
        and type(org_id) is str
        and type(module) is str
        and event_id
        and org_id
        and module
        and event_id.isprintable()
        and org_id.isprintable()
        and module.isprintable()
        and type(operation) is str
        and operation in OPERATIONS
        and type(occurred_at) is str
        and (
            (type(record_id) is str and record_id and record_id.isprintable())
            or type(record_id) is int
        )
        and type(record) is dict
        and _plain_fields(record)
        and (previous is None or (type(previous) is dict and _plain_fields(previous)))
        and (user is None or (type(user) is dict and _plain_fields(user)))
        and (organization is None or (type(organization) is dict and _plain_fields(organization)))
    ):
        return None
    if related is None:
        related = {}
    elif type(related) is dict:
        for fields in related.values():
            if type(fields) is not dict or not _plain_fields(fields):
                return None
    else:
        return None
    try:
        occurred_at_ms = parse_rfc3339_ms(occurred_at)
    except ValueError:
        return None
    if type(record_id) is not str:  # an int; converted last, as by _checked_event
        record_id = str(record_id)
    return RecordEvent(
        event_id,
        org_id,
        module,
        operation,  # type: ignore[arg-type]  # checked against OPERATIONS
        occurred_at_ms,
        record_id,
        record,
        previous,
        related,
        user,
        organization,
        parsed,
    )


def _checked_event(parsed: dict[str, Any]) -> RecordEvent:
    """``event_from_json`` checking each field in turn: InvalidEvent names the first problem."""
    event_id = _require_id(parsed, "event_id")
    org_id = _require_id(parsed, "org_id")
    module = _require_id(parsed, "module")
    operation = _require_str(parsed, "operation")
    if operation not in OPERATIONS:
        raise InvalidEvent(
            f"field 'operation' must be one of create, edit, delete, not {operation!r}", parsed
        )
    occurred_at = _require_str(parsed, "occurred_at")
    try:
        occurred_at_ms = parse_rfc3339_ms(occurred_at)
    except ValueError as exc:
        raise InvalidEvent(
            f"field 'occurred_at' is not RFC 3339: {occurred_at[:40]!r}: {exc}", parsed
        ) from None
    record_id_value = parsed.get("record_id")
    if type(record_id_value) is int:  # CRM ids are 64-bit integers; some producers say so
        record_id = str(record_id_value)
    elif record_id_value is None or type(record_id_value) is str:
        record_id = _require_id(parsed, "record_id")
    else:
        raise InvalidEvent(
            "field 'record_id' must be a non-empty string or an integer, "
            f"not {_json_type(record_id_value)}",
            parsed,
        )
    if "record" not in parsed:
        raise InvalidEvent("missing required field 'record'", parsed)
    record = _fields_object(parsed, "record")
    if record is None:
        raise InvalidEvent("field 'record' must be an object, not null", parsed)
    return RecordEvent(
        event_id,
        org_id,
        module,
        operation,  # type: ignore[arg-type]  # checked against OPERATIONS
        occurred_at_ms,
        record_id,
        record,
        _fields_object(parsed, "previous"),
        _related(parsed),
        _fields_object(parsed, "user"),
        _fields_object(parsed, "organization"),
        parsed,
    )
