"""Actions: a frozen value with a derived record key; deterministic ids."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from msgspec.structs import replace

from crmhooks.actions import Action, action_ids, first_action_id

texts = st.text(min_size=1, max_size=12)
ints = st.integers(min_value=0, max_value=2**53)


@given(
    st.fixed_dictionaries(
        {
            "action_id": texts,
            "event_id": texts,
            "org_id": texts,
            "module": texts,
            "record_id": texts,
            "rule_id": texts,
            "webhook": texts,
            "kind": st.sampled_from(["instant", "scheduled"]),
            "slot": st.integers(min_value=0, max_value=5),
            "due_ms": ints,
            "partition": st.integers(min_value=0, max_value=64),
            "source_offset": ints,
            "attempt": st.integers(min_value=0, max_value=10),
            "relative_to": texts,
        }
    )
)
def test_an_action_derives_its_record_key_and_is_frozen(fields: dict[str, Any]) -> None:
    made = Action(**fields)
    assert made.record_key == f"{fields['org_id']}/{fields['module']}/{fields['record_id']}"
    assert [getattr(made, name) for name in fields] == list(fields.values())
    in_order = [fields[name] for name in Action.__struct_fields__ if name != "record_key"]
    assert Action(*in_order) == made
    assert Action(**fields, record_key="given") == made  # derived, whatever is given
    moved = replace(made, due_ms=7)
    assert (moved.due_ms, moved.record_key) == (7, made.record_key)
    with pytest.raises(AttributeError):
        made.due_ms = 1  # type: ignore[misc]


def test_the_record_key_follows_a_replaced_record() -> None:
    a = Action("e:r:H", "e", "org", "Leads", "1", "r", "H", "instant", 0, 5, 0, 9, 0, "x")
    assert replace(a, record_id="2").record_key == "org/Leads/2"
    assert a.retried(9).record_key == "org/Leads/1"


@given(
    event_id=st.text(min_size=1, max_size=8),
    rule_id=st.text(min_size=1, max_size=8),
    names=st.lists(st.sampled_from(["A", "B", "C"]), max_size=6),
)
def test_action_ids_number_a_webhook_named_again(
    event_id: str, rule_id: str, names: list[str]
) -> None:
    ids = action_ids(event_id, rule_id, names)
    assert len(ids) == len(names) == len(set(ids))
    for i, (name, got) in enumerate(zip(names, ids, strict=True)):
        n = names[: i + 1].count(name)
        first = first_action_id(event_id, rule_id, name)
        assert first == f"{event_id}:{rule_id}:{name}"
        assert got == (first if n == 1 else f"{first}#{n}")
