"""Decoding one table into its shape with msgspec, and naming every error when it fails.

msgspec stops at the first error. A valid table (nearly all of them) costs one
``msgspec.convert``; only a failing one is walked key by key against its
declared type, so that every bad key is named (``webhooks[Hook].body.format:
must be xml or json``) and the remaining keys can still be checked.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import msgspec
from msgspec import Meta

from crmhooks.config.problems import Problems, join
from crmhooks.config.shapes import PATTERN_MESSAGES

S = TypeVar("S", bound=msgspec.Struct)

_AT_RE = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)


def decode(value: Any, shape: type[S], path: str, problems: Problems) -> tuple[S | None, set[str]]:
    """``value`` as ``shape``, and the keys that were wrong (each named in ``problems``).

    When some keys are wrong the rest is decoded without them (their defaults
    stand in), so the named checks of the good keys still run; None when that
    is impossible (a required key is wrong, or ``value`` is not a table).
    """
    try:
        return msgspec.convert(value, shape), set()
    except msgspec.ValidationError as exc:
        first = str(exc)
    before = len(problems)
    bad = explain_struct(value, shape, path, problems)
    if len(problems) == before:  # the walk below should always find it; never stay silent
        problems.add(*_translate(first, path))
    if not isinstance(value, Mapping):
        return None, bad
    rest = {k: v for k, v in value.items() if k not in bad}
    try:
        return msgspec.convert(rest, shape), bad
    except msgspec.ValidationError:
        return None, bad


def _translate(message: str, path: str) -> tuple[str, str]:
    """msgspec's ``"Expected `int` - at `$.a.b[0]`"`` → (``"<path>.a.b[0]"``, message)."""
    match = _AT_RE.match(message)
    assert match is not None  # the pattern matches any text
    where = (match.group("path") or "").lstrip(".")
    if not where:
        return path, match.group("message")
    if where.startswith("["):
        return f"{path}{where}", match.group("message")
    return join(path, where), match.group("message")


def unknown_key(problems: Problems, path: str, key: str, known: tuple[str, ...]) -> None:
    hint = difflib.get_close_matches(key, known, n=1)
    suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
    problems.add(join(path, key), f"unknown key{suffix}")


def explain_struct(
    value: Any, shape: type[msgspec.Struct], path: str, problems: Problems
) -> set[str]:
    """Name every problem of ``value`` as ``shape``; the set of keys that were wrong."""
    if not isinstance(value, Mapping):
        problems.add(path or "config", "must be a table")
        return set()
    config = shape.__struct_config__
    tag_field = config.tag_field if isinstance(config.tag, str) else None
    fields = msgspec.structs.fields(shape)
    known = tuple(f.encode_name for f in fields)
    bad: set[str] = set()
    for key in value:
        if key not in known and key != tag_field:
            unknown_key(problems, path, str(key), known)
            bad.add(key)
    for f in fields:
        p = join(path, f.encode_name)
        if f.encode_name in value:
            if not explain(value[f.encode_name], f.type, p, problems):
                bad.add(f.encode_name)
        elif f.required:
            problems.add(p, "required")
            bad.add(f.encode_name)
    return bad


def explain(value: Any, tp: Any, path: str, problems: Problems) -> bool:
    """Name the problems of ``value`` as a ``tp``; True when it has none."""
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return _explain_union(value, tp, path, problems)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        before = len(problems)
        explain_struct(value, tp, path, problems)
        return len(problems) == before
    if origin in (list, tuple) and isinstance(value, list | tuple):
        item_type = get_args(tp)[0]
        results = [explain(v, item_type, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return all(results)
    if origin is dict and isinstance(value, Mapping):
        value_type = get_args(tp)[1]
        results = [explain(v, value_type, join(path, str(k)), problems) for k, v in value.items()]
        return all(results)
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError:
        problems.add(path, expected(tp, value))
        return False
    return True


def _explain_union(value: Any, tp: Any, path: str, problems: Problems) -> bool:
    members = [m for m in get_args(tp) if m is not type(None)]
    if value is None and len(members) < len(get_args(tp)):
        return True
    tagged = {
        m.__struct_config__.tag: m
        for m in members
        if isinstance(m, type) and issubclass(m, msgspec.Struct) and m.__struct_config__.tag
    }
    if tagged and len(tagged) == len(members):
        tag_field = next(iter(tagged.values())).__struct_config__.tag_field or "type"
        if not isinstance(value, Mapping):
            problems.add(path, "must be a table")
            return False
        p = join(path, tag_field)
        if tag_field not in value:
            problems.add(p, f"required: {_choices(list(map(str, tagged)))}")
            return False
        tag = value[tag_field]
        shape = tagged.get(tag) if isinstance(tag, str) else None
        if shape is None:
            problems.add(p, f"must be {_choices(list(map(str, tagged)))}")
            return False
        before = len(problems)
        explain_struct(value, shape, path, problems)
        return len(problems) == before
    if len(members) == 1:
        return explain(value, members[0], path, problems)
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError:
        options = [expected(m, value).removeprefix("must be ") for m in members]
        problems.add(path, "must be " + " or ".join(options))
        return False
    return True


def _choices(values: list[str]) -> str:
    if len(values) == 2:
        return f"{values[0]} or {values[1]}"
    return "one of " + ", ".join(values)


def expected(tp: Any, value: Any) -> str:
    """What a value of ``tp`` must be, said for ``value`` (which is not one)."""
    if tp is Any:
        return "must be a value"
    meta = Meta()
    if get_origin(tp) is Annotated:
        tp, *extras = get_args(tp)
        meta = next((m for m in extras if isinstance(m, Meta)), meta)
    origin = get_origin(tp)
    if origin is Literal:
        return "must be " + _choices([str(v) for v in get_args(tp)])
    if tp is bool:
        return "must be true or false"
    if tp is int:
        return "must be an integer" + _bounds(meta)
    if tp is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and meta.le is not None and value > meta.le:
            return f"must be at most {meta.le:g}"
        if meta.gt == 0:
            return "must be a positive number"
        return "must be a number" + _bounds(meta)
    if tp is str:
        if isinstance(value, str) and meta.pattern is not None:
            return PATTERN_MESSAGES.get(meta.pattern, f"must match {meta.pattern}")
        if meta.pattern == r"\S":
            return PATTERN_MESSAGES[meta.pattern]
        return "must be a string"
    if origin in (list, tuple):
        item = expected(get_args(tp)[0], None).removeprefix("must be ")
        return f"must be an array of {_plural(item)}"
    if origin is dict:
        return "must be a table of name = string"
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return "must be a table"
    return "has the wrong type"


def _bounds(meta: Meta) -> str:
    if meta.ge is not None:
        return f" ≥ {meta.ge:g}"
    if meta.gt is not None:
        return f" > {meta.gt:g}"
    return ""


_NOUNS = ("string", "number", "integer", "table", "value")


def _plural(item: str) -> str:
    """``"a number ≥ 0"`` → ``"numbers ≥ 0"``; ``"a string"`` → ``"strings"``."""
    item = item.removeprefix("a ").removeprefix("an ")
    noun = next((n for n in _NOUNS if n in item), None)
    return item if noun is None else item.replace(noun, noun + "s", 1)
