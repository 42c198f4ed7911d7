"""Rows as dicts, built fast on hot paths (``keyed``)."""

from __future__ import annotations

import keyword
from collections.abc import Callable, Sequence
from typing import Any, cast


def keyed(names: Sequence[str]) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """A function making a row (a sequence of ``len(names)`` values) the dict
    ``dict(zip(names, row, strict=True))``, in half the time: one unpacking and
    one dict display (~0.45 against ~0.9 µs for 17 names in CPython 3.11). A row
    of another length raises ValueError, as the strict zip does. Names must be
    identifiers, as column names are (``keyed(("id", "status"))``).
    """
    names = tuple(names)
    if not names or len(set(names)) < len(names):
        raise ValueError(f"keyed needs distinct names, got {names!r}")
    for name in names:
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("__"):
            raise ValueError(f"keyed: {name!r} is not a plain identifier")
    source = (
        f"def keyed(row):\n    ({', '.join(names)},) = row\n"
        f"    return {{{', '.join(f'{name!r}: {name}' for name in names)}}}\n"
    )
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # the names are checked identifiers
    made = namespace["keyed"]
    made.__qualname__ = f"keyed({len(names)} names)"
    return cast(Callable[[Sequence[Any]], dict[str, Any]], made)
