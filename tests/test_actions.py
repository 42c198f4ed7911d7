"""Actions: the fast constructor builds the same frozen value as ``Action(...)``."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crmhooks.actions import Action, action_ids, first_action_id, new_action

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
def test_new_action_is_the_action_its_fields_make(fields: dict[str, Any]) -> None:
    made = new_action(**fields)
    expected = Action(**fields)
    assert type(made) is Action
    assert made == expected
    for name in Action.__slots__:  # every slot set, to the same value
        assert getattr(made, name) == getattr(expected, name), name
    assert made.record_key == f"{fields['org_id']}/{fields['module']}/{fields['record_id']}"
    assert dataclasses.replace(made, due_ms=7) == dataclasses.replace(expected, due_ms=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.due_ms = 1  # type: ignore[misc]


def test_the_record_key_follows_a_replaced_record() -> None:
    a = new_action("e:r:H", "e", "org", "Leads", "1", "r", "H", "instant", 0, 5, 0, 9, 0, "x")
    assert dataclasses.replace(a, record_id="2").record_key == "org/Leads/2"


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
