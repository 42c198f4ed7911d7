"""`crmhooks explain`: verdicts equal the compiled rules', and the deciding condition is named."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crmhooks.cli import main
from crmhooks.config import (
    AllOf,
    AnyOf,
    Condition,
    Config,
    Criteria,
    Not,
    OrgSettings,
    Rule,
    ScheduledSpec,
    StoreSettings,
    Webhook,
)
from crmhooks.events import RecordEvent, event_from_json
from crmhooks.explain import (
    condition_text,
    deciding,
    explain_criteria,
    explain_event,
    explain_rule,
    render,
)
from crmhooks.modules import ModuleCatalog
from crmhooks.rules import CompiledRule, compile_criteria, evaluate, matches
from crmhooks.timers import parse_time_of_day

CATALOG = ModuleCatalog()
NOW_MS = 1_795_000_000_000  # 2026-11-19

# --- the same verdict as the compiled rules (hypothesis) ------------------------------

FIELDS = [
    "Stage",
    "Amount",
    "Closing Date",
    "Tags",
    "Missing",
    "Accounts.Industry",
    "Potentials.Amount",
    "Deals.Stage",
    "User.Email",
    "Org.Company Name",
]
TEXTS = ["Closed Won", "closed won", "Negotiation", "", "25000", "2026-11-30", "ü", "x"]
scalars = st.one_of(
    st.sampled_from(TEXTS),
    st.integers(-5, 30000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.sampled_from(["2026-11-30", "2026-11-30 09:00", "2026-11-30T09:00:00Z", "2026-12-01"]),
)
values = st.one_of(st.none(), scalars, st.lists(scalars, max_size=3))
ONE_VALUE_OPS = [
    "is",
    "is_not",
    "contains",
    "not_contains",
    "starts_with",
    "ends_with",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "changed_to",
]


@st.composite
def conditions(draw: st.DrawFn) -> Condition:
    field = draw(st.sampled_from(FIELDS))
    kind = draw(st.sampled_from(["one", "none", "between", "list"]))
    if kind == "none":
        return Condition(field, draw(st.sampled_from(["is_empty", "is_not_empty", "changed"])))
    if kind == "between":
        return Condition(field, "between", [draw(scalars), draw(scalars)])
    if kind == "list":
        op = draw(st.sampled_from(["in", "not_in"]))
        return Condition(field, op, draw(st.lists(scalars, min_size=1, max_size=3)))
    return Condition(field, draw(st.sampled_from(ONE_VALUE_OPS)), draw(scalars))


criteria_trees: st.SearchStrategy[Criteria] = st.recursive(
    conditions(),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: AllOf(tuple(xs))),
        st.lists(inner, max_size=3).map(lambda xs: AnyOf(tuple(xs))),
        inner.map(Not),
    ),
    max_leaves=6,
)
records = st.dictionaries(st.sampled_from(FIELDS[:5]), values, max_size=5)


@st.composite
def events(
    draw: st.DrawFn, modules: tuple[str, ...] = ("Potentials", "Deals", "Accounts")
) -> RecordEvent:
    operation = draw(st.sampled_from(["create", "edit", "delete"]))
    data: dict[str, Any] = {
        "event_id": "evt-1",
        "org_id": "org-acme",
        "module": draw(st.sampled_from(modules)),
        "operation": operation,
        "occurred_at": "2026-11-28T09:00:00Z",
        "record_id": "r1",
        "record": draw(records),
        "related": {"Accounts": {"Industry": draw(values)}},
        "user": {"Email": draw(values)},
        "organization": {"Company Name": draw(values)},
    }
    if operation == "edit":
        data["previous"] = draw(records)
    return event_from_json(data)


@given(criteria_trees, events(), st.sampled_from([None, "Potentials", "Accounts"]))
@settings(max_examples=400)
def test_explain_decides_as_the_compiled_criteria(
    criteria: Criteria, event: RecordEvent, module: str | None
) -> None:
    verdict = explain_criteria(criteria, event, CATALOG, module)
    assert verdict.holds == compile_criteria(criteria, CATALOG, module)(event)
    if module is None:
        assert verdict.holds == evaluate(criteria, event)
    for decider in deciding(verdict):  # what is named as deciding is a condition
        assert decider.kind == "condition"


@given(
    criteria_trees,
    # Events of the rule's module only, as RuleIndex.candidates gives (the processor's
    # `evaluate` decides a `Potentials.` field per event, the index per rule: the same
    # for events of the rule's own module).
    events(("Potentials", "Deals")),
    st.sampled_from(["create", "edit", "create_or_edit", "field_update", "delete"]),
    st.lists(st.sampled_from(FIELDS[:5]), min_size=1, max_size=2),
)
@settings(max_examples=300)
def test_explain_matches_a_rule_as_the_processor_does(
    criteria: Criteria, event: RecordEvent, trigger: Any, fields: list[str]
) -> None:
    rule = Rule(
        id="r",
        module="Potentials",
        trigger=trigger,
        fields=tuple(fields) if trigger == "field_update" else (),
        criteria=criteria,
        instant="Hook",
    )
    config = Config(rules=(rule,))
    explained = explain_rule(rule, event, config, catalog=CATALOG, now_ms=NOW_MS)
    assert explained.matched == CompiledRule.of(rule, CATALOG).matches(event)
    assert explained.matched == matches(rule, event, CATALOG)
    assert bool(explained.actions) == explained.matched


# --- what an administrator reads ---------------------------------------------------------


def seed(**changes: Any) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    data: dict[str, Any] = json.loads(
        (root / "config" / "events" / "closed-won.json").read_text(encoding="utf-8")
    )
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return data


def hook(name: str) -> Webhook:
    return Webhook(name=name, url=f"https://example.com/{name}", module="Potentials")


def demo_config(tmp_path: Path, *rules: Rule) -> Config:
    return Config(
        store=StoreSettings(path=str(tmp_path / "store" / "crmhooks.db")),
        orgs={"org-acme": OrgSettings("org-acme", 12, "Asia/Shanghai")},
        webhooks={n: hook(n) for n in ("CreatorCommission", "PaymentDueSms", "Other")},
        rules=rules,
    )


CLOSE = Rule(
    id="commission-on-close",
    module="Potentials",
    org="org-acme",
    criteria=AllOf(
        (Condition("Type", "is", "New Business"), Condition("Stage", "is", "Closed Won"))
    ),
    instant="CreatorCommission",
    scheduled=(
        ScheduledSpec(
            "PaymentDueSms",
            relative_to="Payment Due",
            offset_ms=-86_400_000,
            at=parse_time_of_day("09:00"),
        ),
    ),
)
BIG = Rule(
    id="big-deals",
    module="Deals",
    criteria=AnyOf((Condition("Amount", "ge", 50000), Condition("Type", "is", "Key Account"))),
    instant="Other",
)
OTHER_ORG = Rule(id="elsewhere", module="Potentials", org="org-other", instant="Other")
LEADS = Rule(id="leads", module="Leads", instant="Other")


def write(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "event.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def explain_cli(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    config: Config,
    event_file: str,
) -> tuple[int, str, str]:
    import crmhooks.cli

    monkeypatch.setattr(crmhooks.cli, "_load", lambda path: config)
    code = main(["explain", "--config", "crmhooks.toml", "--event", event_file])
    out, err = capsys.readouterr()
    return code, out, err


def test_an_event_that_matches_says_so_and_what_it_would_send(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = demo_config(tmp_path, CLOSE, BIG, OTHER_ORG, LEADS)
    event = seed(record={"Payment Due": "2027-12-05 09:30"})
    code, out, err = explain_cli(capsys, monkeypatch, config, write(tmp_path, event))
    assert code == 0, err
    assert out.startswith(
        "event evt-000123: edit of Potentials record 4150868000000224005 in org-acme, "
        "at 2026-11-28 17:00 Asia/Shanghai (2026-11-28T09:00:00Z)\n"
        "2 rule(s) for org-acme and Potentials, in config order; 1 matched.\n"
    )
    assert "rule commission-on-close: MATCHED\n" in out
    assert "  trigger create_or_edit: fires on an edit\n" in out
    assert "  criteria met: every condition holds\n" in out
    assert '      yes  Stage is "Closed Won"    (Stage = "Closed Won")\n' in out
    assert "    instant    CreatorCommission  now\n" in out
    assert (
        "    scheduled  PaymentDueSms  due 2027-12-04 09:00 Asia/Shanghai "
        "(2027-12-04T01:00:00Z): 1d before Payment Due, at 09:00\n"
    ) in out
    assert "rule big-deals: not matched\n" in out  # Deals: an alias of Potentials
    assert "elsewhere" not in out  # another organisation's rule
    assert "leads" not in out  # another module's
    assert "(repeat = once and suspensions not checked" in out  # no store on this machine
    assert not (tmp_path / "store").exists()  # and none created


def test_an_event_that_does_not_match_names_the_deciding_condition(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = demo_config(tmp_path, CLOSE, BIG)
    event = seed(record={"Stage": "Negotiation"})
    code, out, _ = explain_cli(capsys, monkeypatch, config, write(tmp_path, event))
    assert code == 0
    assert "0 matched." in out
    assert (
        "rule commission-on-close: not matched\n"
        "  trigger create_or_edit: fires on an edit\n"
        '  criteria not met: Stage is "Closed Won" (Stage = "Negotiation") fails\n'
    ) in out
    assert '      NO   Stage is "Closed Won"    (Stage = "Negotiation")\n' in out
    assert "  criteria not met: none of the 2 conditions of any holds\n" in out
    assert "    NO   Amount ge 50000    (Amount = 25000)\n" in out
    assert "would send" not in out


def test_a_trigger_that_does_not_fire_is_named(tmp_path: Path) -> None:
    rule = Rule(
        id="amount-changed",
        module="Potentials",
        trigger="field_update",
        fields=("Amount", "Closing Date"),
        instant="Other",
    )
    config = demo_config(tmp_path, rule)
    event = event_from_json(seed())  # previous: only Stage changed
    (e,) = explain_event(config, event, now_ms=NOW_MS)
    assert not e.matched
    assert e.trigger == "field_update of Amount, Closing Date: none of them changed in this edit"
    text = render(config, event, [e], None)
    assert "decided by the trigger: nothing would be sent" in text
    created = event_from_json(seed(operation="create", previous=None))
    (e,) = explain_event(config, created, now_ms=NOW_MS)
    assert e.matched
    assert (
        e.trigger == "field_update of Amount, Closing Date: a create setting Amount, Closing Date"
    )


def test_any_and_not_name_what_decided() -> None:
    event = event_from_json(seed())
    any_of = AnyOf((Condition("Amount", "gt", 100000), Condition("Stage", "changed")))
    verdict = explain_criteria(any_of, event)
    assert verdict.holds
    assert [d.text for d in deciding(verdict)] == ["Stage changed"]
    assert verdict.items[1].actual == 'Stage changed from "Negotiation", now = "Closed Won"'
    negated = explain_criteria(Not(Condition("Potential Owner", "starts_with", "ana")), event)
    assert not negated.holds
    assert [d.text for d in deciding(negated)] == ['Potential Owner starts_with "ana"']
    missing = explain_criteria(Condition("Accounts.Industry", "is_empty"), event)
    assert missing.holds
    assert missing.actual == "Accounts.Industry is missing"


@pytest.mark.parametrize(
    ("cond", "text"),
    [
        (Condition("Stage", "is", "Closed Won"), 'Stage is "Closed Won"'),
        (Condition("Amount", "between", [100, 200]), "Amount between 100 and 200"),
        (Condition("Tags", "in", ["a", "b"]), 'Tags in ["a", "b"]'),
        (Condition("Phone", "is_not_empty"), "Phone is_not_empty"),
        (Condition("Stage", "changed_to", "Won"), 'Stage changed_to "Won"'),
        (Condition("Name", "contains", "中文"), 'Name contains "中文"'),
    ],
)
def test_conditions_are_shown_as_written(cond: Condition, text: str) -> None:
    assert condition_text(cond) == text


def test_repeat_once_and_suspensions_come_from_the_store_when_it_is_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from crmhooks.store import Store, WriteBatch
    from crmhooks.workflow import once_key

    once = Rule(
        id="once-on-close",
        module="Potentials",
        repeat="once",
        criteria=Condition("Stage", "is", "Closed Won"),
        instant="CreatorCommission",
    )
    config = demo_config(tmp_path, once, CLOSE)
    event = event_from_json(seed(record={"Payment Due": "2027-12-05 09:30"}))

    async def store_state() -> None:
        batch = WriteBatch(
            once_state=[(once_key("once-on-close", event.record_key), 0, True)],
            suspensions=[("org-acme", "commission-on-close", "PaymentDueSms", 0, 1, True, "f")],
        )
        async with Store(config.store.path) as store:
            await store.write(batch)

    asyncio.run(store_state())
    code, out, _ = explain_cli(capsys, monkeypatch, config, write(tmp_path, seed(
        record={"Payment Due": "2027-12-05 09:30"}
    )))  # fmt: skip
    assert code == 0
    store = config.store.path
    assert "rule once-on-close: not matched\n" in out
    assert f"  repeat once: criteria already met by an earlier event (the store {store})\n" in out
    assert "rule commission-on-close: MATCHED\n" in out
    assert "PaymentDueSms" in out
    assert "-- suspended: nothing is sent until `crmhooks resume`" in out
    assert f"(repeat = once and suspensions read from the store {store}; quota not checked)" in out


def test_explain_escapes_control_characters_from_the_event(tmp_path: Path) -> None:
    config = demo_config(tmp_path, CLOSE)
    event = event_from_json(seed(record={"Stage": "Closed\x1b[2J\nWon"}))
    text = render(config, event, explain_event(config, event, now_ms=NOW_MS), None)
    assert "\x1b" not in text
    assert '(Stage = "Closed\\u001b[2J\\nWon")' in text


def test_events_no_rule_can_use_are_explained(tmp_path: Path) -> None:
    config = demo_config(tmp_path, CLOSE)
    for module, expected in [
        ("Calls", "Calls events are consumed and ignored: no webhook can use them."),
        ("Gadgets", "no rule can name module 'Gadgets'"),
        ("Leads", "no rule of org-acme is for Leads: nothing would be sent."),
    ]:
        event = event_from_json(seed(module=module))
        assert expected in render(config, event, explain_event(config, event, now_ms=NOW_MS), None)


def test_a_bad_event_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"event_id": 1}', encoding="utf-8")
    code, out, err = explain_cli(capsys, monkeypatch, demo_config(tmp_path, CLOSE), str(bad))
    assert code == 2
    assert out == ""
    assert err.startswith(f"explain: event file {bad} is not a valid record event: ")
