"""An event's bytes read as one JSON object, strictly: its size, its depth, no repeated key."""

from __future__ import annotations

import re
from typing import Any

import orjson

from crmhooks.errors import InvalidEvent

# Why 1 MiB: a CRM record with 3000-character fields and a few related records
# is a few tens of KiB; anything much larger is a producer bug, and decoding it
# would cost the whole partition time. Configurable (kafka.max_event_bytes).
DEFAULT_MAX_EVENT_BYTES = 1 << 20

# orjson refuses to encode containers nested deeper than 254 levels. Whatever we
# accept must be encodable again, one level deeper: a dead letter nests the event
# in its envelope. SPEC §2 events are 4 levels deep; nobody legitimate gets near.
_ORJSON_MAX_ENCODE_DEPTH = 254
MAX_EVENT_DEPTH = _ORJSON_MAX_ENCODE_DEPTH - 1

_JSON_TYPE_NAMES: dict[type, str] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}

# An int: ``in`` searches bytes for one with memchr, and for a bytes needle, even
# of length 1, with a loop ten times slower (CPython 3.11).
_BACKSLASH = ord("\\")

# Tokens of a JSON text that matter for finding duplicate keys: strings (an
# unrolled loop, linear time) and structural characters. Numbers, literals and
# whitespace never match and are skipped by finditer.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]:,]', re.DOTALL)


def json_type(value: object) -> str:
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


def may_have_dropped_keys(data: bytes, encoded: bytes) -> bool:
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
        raise InvalidEvent(f"event must be a JSON object, not {json_type(parsed)}")
    try:
        # Wrapped in a list: encodable one level deeper, as inside a dead letter.
        encoded = orjson.dumps([parsed])
    except orjson.JSONEncodeError:
        # Nothing else can fail: orjson.loads yields only encodable strings and numbers.
        raise InvalidEvent(f"nested deeper than {MAX_EVENT_DEPTH} levels") from None
    if may_have_dropped_keys(data, encoded[1:-1]):
        duplicate = find_duplicate_key(data.decode("utf-8"))
        if duplicate is not None:
            raise InvalidEvent(duplicate)
    return parsed
