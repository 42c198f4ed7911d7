"""values.keyed: the same dicts as a strict zip, faster."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crmhooks.actions import Action
from crmhooks.values import keyed

ANY = st.none() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5) | st.booleans()


KEYED_NAMES = ("action_id", "partition", "status", "finished_ms")


@given(row=st.lists(ANY, min_size=len(KEYED_NAMES), max_size=len(KEYED_NAMES)))
def test_keyed_makes_what_a_strict_zip_makes(row: list[Any]) -> None:
    made = keyed(KEYED_NAMES)(row)
    assert made == dict(zip(KEYED_NAMES, row, strict=True))
    assert list(made) == list(KEYED_NAMES)  # in order: the changelog's JSON keeps it
    assert keyed(KEYED_NAMES)(tuple(row)) == made


@pytest.mark.parametrize("length", [0, 3, 5])
def test_keyed_refuses_a_row_of_another_length(length: int) -> None:
    with pytest.raises(ValueError, match="values to unpack"):
        keyed(KEYED_NAMES)(list(range(length)))


@pytest.mark.parametrize(
    "names", [(), ("a", "a"), ("a b",), ("class",), ("__class__",), ("a", "x=1")]
)
def test_keyed_refuses_names_that_are_not_plain_distinct_identifiers(
    names: tuple[str, ...],
) -> None:
    with pytest.raises(ValueError, match="keyed"):
        keyed(names)


def test_the_store_changelog_rows_use_every_column_in_order() -> None:
    from crmhooks.store import SEP
    from crmhooks.store import actions as store

    row = tuple(range(len(store._ROW_FIELDS)))
    partition, key, value = store._action_change(row)
    assert partition == 1
    assert key == f"a{SEP}0".encode()
    assert value is not None
    assert list(orjson.loads(value).items()) == list(zip(store._ROW_FIELDS, row, strict=True))


@given(action=st.builds(Action), status=st.text(max_size=8), finished_ms=st.integers())
def test_a_finished_row_holds_each_column_of_its_action(
    action: Action, status: str, finished_ms: int
) -> None:
    from crmhooks.store import actions as store

    row = dict(zip(store._ROW_FIELDS, store._final_row(action, status, finished_ms), strict=True))
    assert row.pop("status") == status
    assert row.pop("finished_ms") == finished_ms
    assert row == {name: getattr(action, name) for name in row}
    assert set(row) == set(store._ROW_FIELDS) - {"status", "finished_ms"}
    pending = dict(zip(store._ACTION_COLUMNS.split(", "), store._action_row(action), strict=True))
    assert pending == {name: getattr(action, name) for name in pending}
