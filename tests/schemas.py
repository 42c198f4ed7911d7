"""The wire-record JSON Schemas of docs/, as validators any test can use."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

DOCS = Path(__file__).resolve().parent.parent / "docs"
RESULTS_SCHEMA = DOCS / "results.schema.json"
DEAD_LETTER_SCHEMA = DOCS / "dead-letter.schema.json"


@cache
def _validator(path: Path) -> Any:
    schema = json.loads(path.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def load_schema(path: Path) -> dict[str, Any]:
    """The schema document itself (e.g. to compare its enums with the code's)."""
    schema: dict[str, Any] = _validator(path).schema
    return schema


def _validate(path: Path, record: dict[str, Any]) -> None:
    errors = sorted(_validator(path).iter_errors(record), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors]
        raise AssertionError(f"not a valid record per {path.name}:\n" + "\n".join(lines))


def validate_result(record: dict[str, Any]) -> None:
    """AssertionError listing every violation unless ``record`` fits results.schema.json."""
    _validate(RESULTS_SCHEMA, record)


def validate_dead_letter(record: dict[str, Any]) -> None:
    """AssertionError listing every violation unless ``record`` fits dead-letter.schema.json."""
    _validate(DEAD_LETTER_SCHEMA, record)
