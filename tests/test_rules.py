"""Rule matching: every criteria operator, triggers, and the per-(org, module) index."""

from __future__ import annotations

from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crmhooks import event_shape
from crmhooks.config import AllOf, AnyOf, Condition, Criteria, Not, Rule, Trigger
from crmhooks.event_shape import EventShape
from crmhooks.events import RecordEvent, event_from_json
from crmhooks.modules import ModuleCatalog
from crmhooks.rules import (
    RuleIndex,
    as_text,
    compile_criteria,
    evaluate,
    matches,
    trigger_fires,
)

MISSING = object()


def make_event(
    record: dict[str, Any] | None = None,
    *,
    operation: str = "edit",
    previous: dict[str, Any] | None = None,
    related: dict[str, Any] | None = None,
    module: str = "Potentials",
    org: str = "org-acme",
    **extra: Any,
) -> RecordEvent:
    data: dict[str, Any] = {
        "event_id": "evt-1",
        "org_id": org,
        "module": module,
        "operation": operation,
        "occurred_at": "2026-11-28T09:00:00Z",
        "record_id": "42",
        "record": record or {},
        **extra,
    }
    if previous is not None:
        data["previous"] = previous
    if related is not None:
        data["related"] = related
    return event_from_json(data)


def holds(value: Any, op: str, const: Any = None) -> bool:
    """Evaluate ``F <op> const`` on a record whose field F is ``value`` (or absent)."""
    record = {} if value is MISSING else {"F": value}
    return evaluate(Condition("F", op, const), make_event(record))


# (field value, operator, constant, expected)
OPERATOR_TABLE: list[tuple[Any, str, Any, bool]] = [
    # is / is_not: numbers as numbers, dates as dates, text ignoring case
    ("Closed Won", "is", "closed won", True),
    ("Closed Lost", "is", "Closed Won", False),
    ("STRASSE", "is", "straße", True),  # casefold, not lower
    (25000, "is", "25000", True),
    ("25000.0", "is", 25000, True),
    (25000.5, "is", 25000, False),
    (True, "is", "true", True),
    (True, "is", True, True),
    (False, "is", True, False),
    (MISSING, "is", "x", False),
    (None, "is", "x", False),
    ("2026-12-05 09:30", "is", "2026-12-05", True),  # a date compares by day
    ("2026-12-05", "is", "2026-12-06", False),
    (["Red", "Blue"], "is", "blue", True),  # multi-select: any element
    (["Red"], "is", "blue", False),
    ("Closed Won", "is_not", "closed won", False),
    ("Closed Lost", "is_not", "Closed Won", True),
    (MISSING, "is_not", "x", True),
    (["Red", "Blue"], "is_not", "red", False),
    ([], "is_not", "red", True),
    # contains / not_contains / starts_with / ends_with
    ("Big Deal", "contains", "DEAL", True),
    ("Big Deal", "contains", "x", False),
    (MISSING, "contains", "x", False),
    (25000, "contains", "500", True),
    (["Red", "Blue"], "contains", "LU", True),
    ("Big Deal", "not_contains", "deal", False),
    ("Big Deal", "not_contains", "x", True),
    (MISSING, "not_contains", "x", True),
    ("Acme Corp", "starts_with", "ACME", True),
    ("Acme Corp", "starts_with", "Corp", False),
    ("Acme Corp", "ends_with", "corp", True),
    ("Acme Corp", "ends_with", "Acme", False),
    # is_empty / is_not_empty
    (MISSING, "is_empty", None, True),
    (None, "is_empty", None, True),
    ("", "is_empty", None, True),
    ([], "is_empty", None, True),
    (0, "is_empty", None, False),
    (False, "is_empty", None, False),
    ("x", "is_empty", None, False),
    (MISSING, "is_not_empty", None, False),
    ("x", "is_not_empty", None, True),
    ([""], "is_not_empty", None, True),
    # eq / ne: typed; incompatible types are false, ne too
    (25000, "eq", 25000.0, True),
    ("25000", "eq", 25000, True),
    (25000, "eq", 25001, False),
    ("abc", "eq", 5, False),
    (MISSING, "eq", 5, False),
    ("Closed Won", "eq", "CLOSED WON", True),
    (True, "eq", True, True),
    (True, "eq", False, False),
    ("2026-11-30", "eq", "2026-11-30", True),
    (1, "ne", 2, True),
    (1, "ne", 1.0, False),
    ("abc", "ne", 5, False),
    (MISSING, "ne", 5, False),
    ("a", "ne", "B", True),
    (True, "ne", False, True),
    ([1, 2], "ne", 3, True),
    ([1, 3], "ne", 3, False),
    # lt / le / gt / ge
    (9, "lt", 10, True),
    ("9", "lt", 10, True),  # numbers, not text ("9" > "10" as text)
    (10, "lt", 10, False),
    (10, "le", 10, True),
    (11, "le", 10, False),
    (11, "gt", 10, True),
    (10, "gt", 10, False),
    (10, "ge", 10, True),
    (9, "ge", 10, False),
    (-1.5, "lt", "-1", True),
    ("2026-11-29", "lt", "2026-11-30", True),
    ("2026-12-01", "lt", "2026-11-30", False),
    ("2026-12-01 08:00", "lt", "2026-12-01 09:00", True),
    ("2026-12-01 10:00", "gt", "2026-12-01", False),  # same day: not after it
    ("2026-12-01 10:00", "ge", "2026-12-01", True),
    ("2026-11-28T09:00:00Z", "lt", "2026-11-28T10:00:00+01:00", False),  # equal instants
    ("2026-11-28T09:00:00Z", "le", "2026-11-28T10:00:00+01:00", True),
    ("2026-11-28T09:00:00Z", "lt", "2026-12-01 09:00", False),  # offset vs wall time
    ("2026-11-28T09:00:00Z", "ge", "2026-12-01 09:00", False),
    ("2026-11-28T09:00:00Z", "lt", "2026-11-29", True),
    ("not a date", "lt", "2026-11-30", False),
    ("abc", "lt", 5, False),
    (MISSING, "lt", 5, False),
    (MISSING, "ge", 5, False),
    ("apple", "lt", "Banana", True),  # text ignoring case
    (True, "lt", True, False),  # booleans have no order
    (True, "ge", True, False),
    ([1, 20], "gt", 10, True),
    # between
    (5, "between", (1, 10), True),
    (1, "between", (1, 10), True),
    (10, "between", (1, 10), True),
    (11, "between", (1, 10), False),
    ("5", "between", [1, 10], True),
    ("2026-11-30", "between", ("2026-11-01", "2026-11-30"), True),
    ("2026-12-01", "between", ("2026-11-01", "2026-11-30"), False),
    (MISSING, "between", (1, 10), False),
    ("x", "between", (1, 10), False),
    # in / not_in
    ("Retail", "in", ("retail", "Food"), True),
    ("Tech", "in", ("retail", "Food"), False),
    (5, "in", ("5", 6), True),
    (["a", "x"], "in", ("X",), True),
    (MISSING, "in", ("x",), False),
    ("Retail", "not_in", ("retail", "Food"), False),
    ("Tech", "not_in", ("retail", "Food"), True),
    (MISSING, "not_in", ("x",), True),
]


@pytest.mark.parametrize(
    ("value", "op", "const", "expected"),
    OPERATOR_TABLE,
    ids=[f"{v!r}-{op}-{c!r}" for v, op, c, _ in OPERATOR_TABLE],
)
def test_operator(value: Any, op: str, const: Any, expected: bool) -> None:
    assert holds(value, op, const) is expected


def test_every_operator_is_in_the_table() -> None:
    covered = {op for _, op, _, _ in OPERATOR_TABLE} | {"changed", "changed_to"}
    assert covered == {
        "is", "is_not", "contains", "not_contains", "starts_with", "ends_with",
        "is_empty", "is_not_empty", "eq", "ne", "lt", "le", "gt", "ge",
        "between", "in", "not_in", "changed", "changed_to",
    }  # fmt: skip
    assert all(
        any(e for v, o, _, e in OPERATOR_TABLE if o == op)
        and any(not e for v, o, _, e in OPERATOR_TABLE if o == op)
        for op in covered - {"changed", "changed_to"}
    )


def test_changed_and_changed_to() -> None:
    stage = Condition("Stage", "changed")
    to_won = Condition("Stage", "changed_to", "closed won")
    edit = make_event({"Stage": "Closed Won"}, previous={"Stage": "Negotiation"})
    assert evaluate(stage, edit)
    assert evaluate(to_won, edit)
    other = make_event({"Stage": "Closed Won"}, previous={"Amount": 1})
    assert not evaluate(stage, other)
    assert not evaluate(to_won, other)
    to_lost = make_event({"Stage": "Closed Lost"}, previous={"Stage": "Negotiation"})
    assert evaluate(stage, to_lost)
    assert not evaluate(to_won, to_lost)
    no_previous = make_event({"Stage": "Closed Won"})
    assert not evaluate(stage, no_previous)
    create = make_event({"Stage": "Closed Won"}, operation="create")
    assert evaluate(stage, create)
    assert evaluate(to_won, create)
    assert not evaluate(stage, make_event({"Amount": 1}, operation="create"))
    delete = make_event({"Stage": "Closed Won"}, operation="delete", previous={"Stage": "x"})
    assert not evaluate(stage, delete)
    # A related record's fields are not part of this edit.
    related = make_event(previous={"Industry": "x"}, related={"Accounts": {"Industry": "y"}})
    assert not evaluate(Condition("Accounts.Industry", "changed"), related)
    # The rule's own module as a prefix is the record itself.
    assert evaluate(Condition("Potentials.Stage", "changed"), edit)


def test_field_lookup_in_related_records_and_namespaces() -> None:
    event = make_event(
        {"Amount": 5, "Foo.Bar": "x"},
        related={"Accounts": {"Industry": "Retail"}, "Contact": {"Last Name": "Wong"}},
        user={"Mobile": "+351"},
        organization={"Company Name": "Acme"},
    )
    assert evaluate(Condition("Accounts.Industry", "is", "retail"), event)
    assert evaluate(Condition("Account.Industry", "is", "retail"), event)  # singular prefix
    assert evaluate(Condition("Contacts.Last Name", "is", "wong"), event)  # keyed singular
    assert evaluate(Condition("Deals.Amount", "eq", 5), event)  # own module, by alias
    assert evaluate(Condition("Potential.Amount", "eq", 5), event)
    assert evaluate(Condition("User.Mobile", "is", "+351"), event)
    assert evaluate(Condition("Org.Company Name", "is", "acme"), event)
    assert evaluate(Condition("Foo.Bar", "is", "x"), event)  # not a module: a field name
    assert evaluate(Condition("Vendors.Name", "is_empty"), event)  # related record absent
    assert evaluate(Condition("Accounts.Missing", "is_empty"), event)
    assert not evaluate(Condition("Industry", "is", "retail"), event)
    # Compiled for a Leads rule, "Potentials." still names a related record.
    leads_rule = compile_criteria(Condition("Potentials.Amount", "eq", 5), module="Leads")
    assert not leads_rule(event)
    assert leads_rule(make_event(module="Leads", related={"Potentials": {"Amount": 5}}))


def test_custom_module_prefix_needs_the_catalog() -> None:
    event = make_event(related={"Ships": {"Name": "Ever Given"}}, record={"Ships.Name": "no"})
    condition = Condition("Ships.Name", "is", "ever given")
    assert not evaluate(condition, event)  # unknown prefix: the whole text is a field
    assert evaluate(condition, event, ModuleCatalog(["Ships"]))


def test_criteria_tree() -> None:
    won = Condition("Stage", "is", "Closed Won")
    new = Condition("Type", "is", "New Business")
    event = make_event({"Stage": "Closed Won", "Type": "Existing Business"})
    assert evaluate(AllOf(()), event)
    assert not evaluate(AnyOf(()), event)
    assert not evaluate(AllOf((won, new)), event)
    assert evaluate(AnyOf((won, new)), event)
    assert evaluate(AllOf((won, Not(new))), event)
    assert evaluate(AllOf((won, won, Not(new))), event)
    assert not evaluate(AnyOf((new, new, Not(won))), event)
    assert not evaluate(Not(AnyOf((won, new))), event)


def test_evaluate_accepts_hand_built_list_values() -> None:
    event = make_event({"F": 3})
    assert evaluate(Condition("F", "between", [1, 5]), event)
    assert evaluate(Condition("F", "in", [3]), event)


# --- properties over open-ended inputs --------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["2026-11-30", "2026-11-30 09:30", "2026-11-30T09:30:00Z", "12", "1e3"]),
)
field_values = st.one_of(scalars, st.lists(scalars, max_size=3))
constants = st.one_of(
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["2026-11-30", "2026-12-01 10:00", "7"]),
)
orderable = st.one_of(
    st.integers(-1000, 1000),
    st.integers(-1000, 1000).map(str),
    st.dates().map(lambda d: d.isoformat()),
)
ALL_OPS = ["is", "contains", "starts_with", "ends_with", "eq", "ne", "lt", "le", "gt", "ge"]


@given(field_values, constants)
def test_is_not_is_the_negation_of_is(value: Any, const: Any) -> None:
    assert holds(value, "is_not", const) is not holds(value, "is", const)
    assert holds(value, "not_in", (const,)) is not holds(value, "in", (const,))
    assert holds(value, "in", (const,)) is holds(value, "is", const)
    if isinstance(const, str):
        assert holds(value, "not_contains", const) is not holds(value, "contains", const)


@given(field_values, constants, st.sampled_from(ALL_OPS))
def test_operators_never_raise(value: Any, const: Any, op: str) -> None:
    if op in ("contains", "starts_with", "ends_with") and not isinstance(const, str):
        const = str(const)
    assert holds(value, op, const) in (True, False)


@given(
    st.one_of(st.integers(-1000, 1000), st.floats(-1e6, 1e6)),
    st.integers(-1000, 1000),
    st.integers(-1000, 1000),
)
def test_between_is_ge_low_and_le_high(value: float, low: int, high: int) -> None:
    expected = holds(value, "ge", low) and holds(value, "le", high)
    assert holds(value, "between", (low, high)) is expected
    assert expected is (low <= value <= high)


@given(orderable, orderable)
def test_order_operators_agree_when_comparable(value: str | int, const: str | int) -> None:
    lt, le, gt, ge = (holds(value, op, const) for op in ("lt", "le", "gt", "ge"))
    eq, ne = holds(value, "eq", const), holds(value, "ne", const)
    if lt or le or gt or ge or eq or ne:  # comparable: exactly one of <, =, >
        assert [lt, eq, gt].count(True) == 1
        assert le is (lt or eq)
        assert ge is (gt or eq)
        assert ne is not eq
    else:  # only a number against a date is incomparable
        assert _is_date(value) != _is_date(const)


def _is_date(value: str | int) -> bool:
    return isinstance(value, str) and len(value) == 10 and value[4] == "-"


@given(st.integers(-(10**9), 10**9), st.integers(-(10**9), 10**9))
def test_numeric_strings_compare_as_numbers(a: int, b: int) -> None:
    assert holds(str(a), "lt", b) is (a < b)
    assert holds(a, "gt", str(b)) is (a > b)
    assert holds(str(a), "is", b) is (a == b)


# --- triggers -----------------------------------------------------------------------

TRIGGER_TABLE: list[tuple[Trigger, str, bool]] = [
    ("create", "create", True),
    ("create", "edit", False),
    ("create", "delete", False),
    ("edit", "edit", True),
    ("edit", "create", False),
    ("edit", "delete", False),
    ("create_or_edit", "create", True),
    ("create_or_edit", "edit", True),
    ("create_or_edit", "delete", False),
    ("delete", "delete", True),
    ("delete", "edit", False),
    ("delete", "create", False),
]


@pytest.mark.parametrize(("trigger", "operation", "expected"), TRIGGER_TABLE)
def test_trigger(trigger: Trigger, operation: str, expected: bool) -> None:
    rule = Rule(id="r", module="Potentials", trigger=trigger)
    event = make_event({"Stage": "x"}, operation=operation)
    assert trigger_fires(rule, event) is expected
    assert matches(rule, event) is expected


def test_field_update_trigger() -> None:
    rule = Rule(id="r", module="Potentials", trigger="field_update", fields=("Stage", "Amount"))

    def fires(event: RecordEvent) -> bool:
        return trigger_fires(rule, event)

    assert fires(make_event({"Stage": "b"}, previous={"Amount": 1}))
    assert not fires(make_event({"Stage": "b"}, previous={"Type": "x"}))
    assert not fires(make_event({"Stage": "b"}))  # an edit without previous values
    assert fires(make_event({"Stage": "b"}, operation="create"))
    assert not fires(make_event({"Type": "b"}, operation="create"))
    assert not fires(make_event({"Stage": "b"}, operation="delete", previous={"Stage": "a"}))


def test_matches_needs_trigger_and_criteria() -> None:
    rule = Rule(id="r", module="Potentials", trigger="edit", criteria=Condition("A", "eq", 1))
    assert matches(rule, make_event({"A": 1}))
    assert not matches(rule, make_event({"A": 2}))
    assert not matches(rule, make_event({"A": 1}, operation="create"))


# --- the index ------------------------------------------------------------------------

ACME_POT = Rule(id="acme-pot", module="Potentials", org="org-acme")
ANY_POT = Rule(id="any-pot", module="Potentials", criteria=Condition("Stage", "is", "won"))
BETA_POT = Rule(id="beta-pot", module="Potentials", org="org-beta")
ANY_LEADS = Rule(id="any-leads", module="Leads", trigger="create")
ACME_LEADS = Rule(id="acme-leads", module="Leads", org="org-acme")
ACME_SHIPS = Rule(id="acme-ships", module="Ships", org="org-acme")
ALL_RULES = [ACME_POT, ANY_POT, BETA_POT, ANY_LEADS, ACME_LEADS, ACME_SHIPS]


@pytest.mark.parametrize(
    ("org", "module", "expected"),
    [
        ("org-acme", "Potentials", [ACME_POT, ANY_POT]),
        ("org-acme", "Deals", [ACME_POT, ANY_POT]),  # any name of the module
        ("org-acme", "Potential", [ACME_POT, ANY_POT]),
        ("org-beta", "Potentials", [ANY_POT, BETA_POT]),  # config order
        ("org-gamma", "Potentials", [ANY_POT]),
        ("org-beta", "Leads", [ANY_LEADS]),
        ("org-acme", "Leads", [ANY_LEADS, ACME_LEADS]),
        ("org-acme", "Ships", [ACME_SHIPS]),
        ("org-beta", "Ships", []),
        ("org-acme", "Calls", []),
        ("org-acme", "Contacts", []),
        ("org-acme", "Nonsense", []),
    ],
)
def test_index_scoping(org: str, module: str, expected: list[Rule]) -> None:
    index = RuleIndex(ALL_RULES, ModuleCatalog(["Ships"]))
    assert list(index.candidates(org, module)) == expected
    assert [c.rule for c in index.compiled(org, module)] == expected


def test_index_never_returns_rules_of_other_orgs_or_modules() -> None:
    index = RuleIndex(ALL_RULES, ModuleCatalog(["Ships"]))
    for org in ("org-acme", "org-beta", "org-x"):
        for module in ("Potentials", "Leads", "Ships", "Tasks"):
            for rule in index.candidates(org, module):
                assert rule.org in (None, org)
                assert rule.module == module


def test_index_matching_and_criteria_met() -> None:
    index = RuleIndex(ALL_RULES)
    won = make_event({"Stage": "Won"}, org="org-beta")
    assert index.matching(won) == [ANY_POT, BETA_POT]
    lost = make_event({"Stage": "Lost"}, org="org-beta")
    assert index.matching(lost) == [BETA_POT]
    assert index.criteria_met(ANY_POT, won)
    assert not index.criteria_met(ANY_POT, lost)
    # A rule the index does not hold is evaluated directly.
    other = Rule(id="any-pot", module="Potentials", criteria=Condition("Stage", "is", "lost"))
    assert index.criteria_met(other, lost)
    assert index.matching(make_event({}, operation="edit", module="Leads")) == [ACME_LEADS]
    assert index.get("beta-pot") is BETA_POT
    assert index.get("nope") is None
    assert len(index) == len(ALL_RULES)
    assert repr(index) == "RuleIndex(6 rules)"


def _criteria_of_size(n: int) -> Criteria:
    return AllOf(tuple(Condition(f"F{i}", "is", f"v{i}") for i in range(n)))


def test_compiled_criteria_equal_evaluate() -> None:
    criteria = AnyOf((_criteria_of_size(3), Not(Condition("G", "in", ("a", "b")))))
    matcher = compile_criteria(criteria)
    for record in ({"F0": "v0", "F1": "V1", "F2": "v2"}, {"G": "a"}, {"G": "c"}, {}):
        event = make_event(record)
        assert matcher(event) is evaluate(criteria, event)


# --- needs_planning: the value-keyed selector gives the answer of trying every rule -----


def _tried_in_turn(index: RuleIndex, event: RecordEvent) -> bool:
    """What the processor did before ``needs_planning``: any rule stateful or matching."""
    for c in index.compiled(event.org_id, event.module):  # noqa: SIM110
        if c.stateful or c.matches(event):
            return True
    return False


def _shape_of(event: RecordEvent) -> EventShape:
    """The shape the processor parses the event's JSON into: what ``needs_planning``
    reads first (an ``EventView``), made into the event only to try a rule."""
    shape = event_shape.decode_shape(orjson.dumps(event.data))
    assert shape.as_event() == msgspec.structs.replace(event, data=shape.as_event().data)
    return shape


def _stage_rules(n: int, org: str = "org-acme") -> list[Rule]:
    return [
        Rule(id=f"s{i}", module="Potentials", org=org, criteria=Condition("Stage", "is", f"St-{i}"))
        for i in range(n)
    ]


def test_needs_planning_looks_rules_up_by_text() -> None:
    extra = [
        Rule(
            id="two",
            module="Deals",
            org="org-acme",
            trigger="edit",
            criteria=AllOf((Condition("Amount", "gt", 10), Condition("Type", "is", "new"))),
        ),
        Rule(id="empty", module="Potentials", criteria=Condition("Region", "is", "")),
        Rule(id="yes", module="Potentials", criteria=Condition("Flag", "is", True)),
        Rule(id="seven", module="Potentials", criteria=Condition("Code", "is", "7")),
        Rule(id="day", module="Potentials", criteria=Condition("Day", "is", "2026-11-30")),
        # Not looked up: a related field, a prefix naming the module itself, an `any`.
        Rule(id="acct", module="Potentials", criteria=Condition("Accounts.Name", "is", "acme")),
        Rule(id="own", module="Potentials", criteria=Condition("Deals.Kind", "is", "big")),
        Rule(
            id="either",
            module="Potentials",
            criteria=AnyOf((Condition("Color", "is", "red"), Condition("Size", "is", "xl"))),
        ),
    ]
    index = RuleIndex(_stage_rules(50) + extra)
    cases: list[tuple[dict[str, Any], str, bool]] = [
        ({"Stage": "Closed Won", "Region": "EU"}, "edit", False),
        ({"Stage": "st-7", "Region": "EU"}, "edit", True),  # any case
        ({"Stage": ["x", "ST-49"], "Region": "EU"}, "edit", True),  # any element
        ({"Stage": [], "Region": "EU"}, "edit", False),
        ({"Stage": "x"}, "edit", True),  # a missing field `is` ""
        ({"Stage": "x", "Region": None}, "edit", True),
        ({"Stage": "x", "Region": [None]}, "edit", True),
        ({"Stage": "x", "Region": []}, "edit", False),
        ({"Region": "EU", "Flag": "TRUE"}, "edit", True),
        ({"Region": "EU", "Flag": False}, "edit", False),
        ({"Region": "EU", "Code": 7.0}, "edit", True),  # a number compares as a number
        ({"Region": "EU", "Code": "7.00"}, "edit", True),
        ({"Region": "EU", "Day": "2026-11-30 10:00"}, "edit", True),  # a date as a date
        ({"Region": "EU", "Type": "NEW", "Amount": 11}, "edit", True),
        ({"Region": "EU", "Type": "NEW", "Amount": 9}, "edit", False),
        ({"Region": "EU", "Type": "NEW", "Amount": 11}, "create", False),  # trigger
        ({"Region": "EU", "Kind": "BIG"}, "edit", True),
        ({"Region": "EU", "Deals.Kind": "big"}, "edit", False),
        ({"Region": "EU", "Size": "XL"}, "edit", True),
        ({"Region": "EU", "Color": "XL"}, "edit", False),
    ]
    related = {"Accounts": {"Name": "ACME"}}
    assert index.needs_planning(make_event({"Region": "EU"}, related=related))
    for record, operation, expected in cases:
        event = make_event(record, operation=operation)
        assert index.needs_planning(event) is expected, record
        assert index.needs_planning(_shape_of(event)) is expected, record
        assert _tried_in_turn(index, event) is expected, record
    # Other organisations only have the org-less rules; unknown modules none.
    other_org = make_event({"Stage": "st-1", "Region": "EU"}, org="o", module="Deals")
    assert not index.needs_planning(other_org)
    assert index.needs_planning(make_event({"Code": 7}, org="o"))
    assert index.needs_planning(make_event({"Code": 7}, org="o", module="Potential"))
    assert not index.needs_planning(make_event({"Code": 7}, module="Nonsense"))


def test_needs_planning_is_true_with_a_stateful_rule() -> None:
    once = Rule(
        id="once",
        module="Potentials",
        org="org-acme",
        repeat="once",
        criteria=Condition("S", "is", "x"),
    )
    index = RuleIndex([*_stage_rules(5), once])
    assert index.needs_planning(make_event({"Stage": "nothing"}))
    assert index.needs_planning(make_event({"Stage": "nothing"}, module="Deals"))  # an alias
    assert not index.needs_planning(make_event({"Stage": "nothing"}, org="other"))
    assert RuleIndex([once]).needs_planning(make_event({}))
    assert not RuleIndex([]).needs_planning(make_event({}))


_PLAN_FIELDS = ["Stage", "Stage", "Type", "Type", "Amount", "Accounts.Stage", "Deals.Stage"]
_plan_texts = st.sampled_from(
    ["won", "WON", "Won", "lost", "straße", "STRASSE", "", " won", "true"]
)
_plan_scalars = st.one_of(
    _plan_texts,
    st.sampled_from(["7", "7.0", "07", "1e3", "2026-11-30", "2026-11-30 09:30"]),
    st.sampled_from([7, 7.0, 1000, 0, -1.5, True, False, None]),
)
_plan_values = st.one_of(_plan_scalars, st.lists(_plan_scalars, max_size=3))


@st.composite
def _plan_conditions(draw: st.DrawFn) -> Condition:
    field = draw(st.sampled_from(_PLAN_FIELDS))
    op = draw(st.sampled_from(["is"] * 6 + ["is_not", "contains", "gt", "in", "is_empty"]))
    if op == "is_empty":
        return Condition(field, op)
    if op == "in":
        return Condition(field, op, tuple(draw(st.lists(_plan_scalars, min_size=1, max_size=3))))
    if op == "contains":
        return Condition(field, op, draw(st.sampled_from(["o", "WO", "7"])))
    if op == "is" and draw(st.booleans()):
        return Condition(field, op, draw(_plan_texts))
    return Condition(field, op, draw(_plan_scalars))


_plan_criteria = st.one_of(
    _plan_conditions(),
    st.lists(_plan_conditions(), max_size=3).map(lambda items: AllOf(tuple(items))),
    st.recursive(
        _plan_conditions(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3).map(lambda items: AllOf(tuple(items))),
            st.lists(inner, max_size=3).map(lambda items: AnyOf(tuple(items))),
            inner.map(Not),
        ),
        max_leaves=5,
    ),
)


# Criteria that mostly can be looked up: an `is` alone or first in an `all`.
_plan_keyed = st.builds(
    lambda field, const, others: (
        AllOf((Condition(field, "is", const), *others)) if others else Condition(field, "is", const)
    ),
    st.sampled_from(["Stage", "Type", "Amount"]),
    st.one_of(_plan_texts, _plan_scalars),
    st.lists(_plan_conditions(), max_size=2),
)


@st.composite
def _plan_rules(draw: st.DrawFn) -> list[Rule]:
    rules = []
    # Mostly no stateful rule: a group with one always needs planning.
    repeats = ["every"] * 7 + ["once"] if draw(st.integers(0, 3)) == 0 else ["every"]
    # Often one group only, so that groups have enough rules for a selector.
    modules = ["Potentials", "Deals", "Potentials", "Leads"] if draw(st.booleans()) else ["Deals"]
    orgs = [None, None, "org-a", "org-b"] if draw(st.booleans()) else [None]
    for i in range(draw(st.integers(0, 12) | st.integers(4, 12))):
        rules.append(
            Rule(
                id=f"r{i}",
                module=draw(st.sampled_from(modules)),
                org=draw(st.sampled_from(orgs)),
                trigger=draw(st.sampled_from(["create_or_edit", "edit", "field_update"])),
                fields=("Stage",),
                repeat=draw(st.sampled_from(repeats)),
                criteria=draw(st.one_of(_plan_keyed, _plan_criteria)),
            )
        )
    return rules


def _constants(criteria: Criteria) -> list[Any]:
    if isinstance(criteria, Condition):
        value = criteria.value
        return list(value) if isinstance(value, tuple) else [value]
    if isinstance(criteria, Not):
        return _constants(criteria.item)
    return [v for item in criteria.items for v in _constants(item)]


def _near(const: Any) -> list[Any]:
    """Field values that are, or nearly are, ``const`` (so that lookups are put to the test)."""
    text = as_text(const)
    return [const, text, text.upper(), text.title(), f" {text}", f"{text}.0", f"{text} 10:00"]


def _first_condition(criteria: Criteria) -> Condition | None:
    if isinstance(criteria, Condition):
        return criteria
    if isinstance(criteria, AllOf | AnyOf) and criteria.items:
        return _first_condition(criteria.items[0])
    return None


@st.composite
def _plan_events(draw: st.DrawFn, rules: list[Rule]) -> RecordEvent:
    near = sorted(
        {repr(v): v for r in rules for c in _constants(r.criteria) for v in _near(c)}.items()
    )
    values = _plan_values
    if near:
        close = st.sampled_from([v for _, v in near])
        values = st.one_of(_plan_values, close, st.lists(close, min_size=1, max_size=3))
    fields = st.sampled_from(["Stage", "Type", "Amount", "Deals.Stage"])
    org = draw(st.sampled_from(["org-a", "org-b", "org-c"]))
    module = draw(st.sampled_from(["Potentials", "Deals", "Leads"]))
    aimed: bool = draw(st.booleans())
    if rules and aimed:  # mostly events some rule is for
        rule = draw(st.sampled_from(rules))
        org, module = rule.org or org, rule.module
    record = draw(st.dictionaries(fields, values))
    target = _first_condition(draw(st.sampled_from(rules)).criteria) if rules else None
    if target is not None and not isinstance(target.value, tuple):  # give it a close value
        like = st.sampled_from(_near(target.value))
        value = draw(like | st.lists(like | _plan_scalars, min_size=1, max_size=3))
        record[target.field.rpartition(".")[2]] = value
    return make_event(
        record,
        operation=draw(st.sampled_from(["create", "edit", "edit", "delete"])),
        org=org,
        module=module,
        previous=draw(st.sampled_from([{"Stage": "x"}, {"Stage": "x"}, None, {"Type": "y"}])),
        related={"Accounts": draw(st.dictionaries(st.sampled_from(["Stage", "Type"]), values))},
    )


@settings(max_examples=300)
@given(_plan_rules(), st.data())
def test_needs_planning_equals_trying_every_rule(rules: list[Rule], data: st.DataObject) -> None:
    index = RuleIndex(rules)
    for event in data.draw(st.lists(_plan_events(rules), min_size=1, max_size=10)):
        assert index.needs_planning(event) is _tried_in_turn(index, event)
        assert index.needs_planning(_shape_of(event)) is _tried_in_turn(index, event)
