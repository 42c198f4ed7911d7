"""The generic decoding step: one msgspec convert, and on failure every bad key named."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from crmhooks.config.decoding import _translate, decode
from crmhooks.config.problems import Problems


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    size: Annotated[int, Meta(ge=1)] = 1


class Cat(msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="cat"):
    lives: int = 9


class Dog(msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="dog"):
    good: bool = True


class Toy(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(pattern=r"\S")]
    ratio: Annotated[float, Meta(gt=0, le=10)] = 1.0
    mode: Literal["fast", "slow"] = "fast"
    tags: tuple[str, ...] = ()
    limits: dict[str, int] = {}
    inner: Inner | None = None
    pet: Cat | Dog | None = None
    either: str | list[str] | None = None


def run(value: Any) -> tuple[Toy | None, set[str], list[str]]:
    problems = Problems()
    decoded, bad = decode(value, Toy, "toy", problems)
    return decoded, bad, problems.listed()


def test_a_valid_table_is_one_convert_with_no_problems() -> None:
    decoded, bad, problems = run({"name": "x", "pet": {"type": "dog"}})
    assert decoded == Toy(name="x", pet=Dog())
    assert (bad, problems) == (set(), [])


def test_every_bad_key_is_named_and_the_rest_still_decodes() -> None:
    decoded, bad, problems = run(
        {
            "name": "x",
            "ratio": 11,
            "mode": "medium",
            "tags": ["a", 1],
            "limits": {"a": "b"},
            "inner": {"size": 0, "colour": "red"},
            "either": 5,
            "naem": "typo",
        }
    )
    assert problems == [
        "toy.naem: unknown key (did you mean 'name'?)",
        "toy.ratio: must be at most 10",
        "toy.mode: must be fast or slow",
        "toy.tags[1]: must be a string",
        "toy.limits.a: must be an integer",
        "toy.inner.colour: unknown key",
        "toy.inner.size: must be an integer ≥ 1",
        "toy.either: must be a string or an array of strings",
    ]
    assert bad == {"naem", "ratio", "mode", "tags", "limits", "inner", "either"}
    assert decoded == Toy(name="x")  # the good key kept, the bad ones at their defaults


def test_a_required_key_that_is_wrong_leaves_nothing_decoded() -> None:
    decoded, bad, problems = run({"name": " ", "ratio": 0})
    assert decoded is None
    assert bad == {"name", "ratio"}
    assert problems == [
        "toy.name: must be a non-empty string",
        "toy.ratio: must be a positive number",
    ]
    assert run([1])[2] == ["toy: must be a table"]


def test_tagged_tables_are_explained_by_their_tag() -> None:
    assert run({"name": "x", "pet": {"lives": 3}})[2] == ["toy.pet.type: required: cat or dog"]
    assert run({"name": "x", "pet": {"type": ["cat"]}})[2] == ["toy.pet.type: must be cat or dog"]
    assert run({"name": "x", "pet": {"type": "cat", "good": True}})[2] == [
        "toy.pet.good: unknown key"
    ]


def test_msgspec_paths_become_item_paths() -> None:
    assert _translate("Expected `int`, got `str` - at `$.a.b[0]`", "webhooks[X]") == (
        "webhooks[X].a.b[0]",
        "Expected `int`, got `str`",
    )
    assert _translate("Expected `int` - at `$[2]`", "rules") == ("rules[2]", "Expected `int`")
    assert _translate("Expected `object`, got `int`", "kafka") == (
        "kafka",
        "Expected `object`, got `int`",
    )
