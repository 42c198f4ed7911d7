"""A rule's ``criteria``: a tree of all / any / not over conditions ``{field, op, value}``.

Parsed by hand, not declared: a node is one of four untagged shapes, told apart
by its keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

from crmhooks.config.decoding import unknown_key
from crmhooks.config.problems import Problems, join
from crmhooks.settings import AllOf, AnyOf, Condition, Criteria, Not

# Criteria operators (SPEC §3), grouped by the shape of their ``value``.
TEXT_OPS: frozenset[str] = frozenset({"contains", "not_contains", "starts_with", "ends_with"})
SCALAR_OPS: frozenset[str] = frozenset({"is", "is_not", "eq", "ne", "lt", "le", "gt", "ge"})
LIST_OPS: frozenset[str] = frozenset({"in", "not_in"})
NO_VALUE_OPS: frozenset[str] = frozenset({"is_empty", "is_not_empty", "changed"})
OPERATORS: frozenset[str] = (
    TEXT_OPS | SCALAR_OPS | LIST_OPS | NO_VALUE_OPS | frozenset({"between", "changed_to"})
)
_CONDITION_KEYS = ("field", "op", "value")


def parse_criteria(path: str, node: Any, problems: Problems) -> Criteria:
    """The criteria tree of ``node``; every problem is named in ``problems``."""
    if not isinstance(node, Mapping):
        problems.add(path, "must be a table: {all=[...]}, {any=[...]}, {not={...}} or a condition")
        return AllOf(())
    groups = [k for k in ("all", "any", "not") if k in node]
    if groups:
        if len(node) != 1:
            problems.add(path, "a criteria group has exactly one key: all, any or not")
            return AllOf(())
        key = groups[0]
        p = join(path, key)
        if key == "not":
            return Not(parse_criteria(p, node[key], problems))
        items = node[key]
        if not isinstance(items, list) or not items:
            problems.add(p, "must be a non-empty array")
            return AllOf(())
        parsed = tuple(parse_criteria(f"{p}[{i}]", x, problems) for i, x in enumerate(items))
        return AllOf(parsed) if key == "all" else AnyOf(parsed)
    return _condition(path, node, problems)


def _condition(path: str, node: Mapping[str, Any], problems: Problems) -> Condition:
    for key in node:
        if key not in _CONDITION_KEYS:
            unknown_key(problems, path, str(key), _CONDITION_KEYS)
    name = _string(path, node, "field", problems)
    op = _string(path, node, "op", problems)
    value = _value(path, op, node, problems)
    if op is not None and op not in OPERATORS:
        problems.add(join(path, "op"), f"unknown operator {op!r}")
    return Condition(field=name or "", op=op or "is", value=value)


def _string(path: str, node: Mapping[str, Any], key: str, problems: Problems) -> str | None:
    if key not in node:
        problems.add(join(path, key), "required")
        return None
    value = node[key]
    if not isinstance(value, str) or not value.strip():
        problems.add(join(path, key), "must be a non-empty string")
        return None
    return value


def _value(path: str, op: str | None, node: Mapping[str, Any], problems: Problems) -> Any:
    p = join(path, "value")
    if op is None or op not in OPERATORS:
        return None
    if op in NO_VALUE_OPS:
        if "value" in node:
            problems.add(p, f"{op} takes no value")
        return None
    if "value" not in node:
        problems.add(p, f"required for {op}")
        return None
    value = node["value"]
    if op in LIST_OPS or op == "between":
        if not isinstance(value, list) or (op == "between" and len(value) != 2) or not value:
            shape = "[low, high]" if op == "between" else "a non-empty array"
            problems.add(p, f"{op} needs {shape}")
            return None
        return tuple(_scalar(f"{p}[{i}]", v, problems) for i, v in enumerate(value))
    scalar = _scalar(p, value, problems)
    if op in TEXT_OPS and not isinstance(scalar, str):
        problems.add(p, f"{op} needs a string")
    return scalar


def _scalar(path: str, value: Any, problems: Problems) -> Any:
    """A criteria constant: str, number or bool; TOML dates become ISO strings."""
    if isinstance(value, datetime):
        if value.tzinfo is None and not (value.second or value.microsecond):
            return value.strftime("%Y-%m-%d %H:%M")
        return value.isoformat(sep=" " if value.tzinfo is None else "T")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str | bool):
        return value
    if isinstance(value, int | float) and math.isfinite(value):
        return value
    problems.add(path, "must be a string, number, boolean or date")
    return None
