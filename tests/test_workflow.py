"""Workflow planning, pure: which actions an event creates, supersedes, cancels, moves."""

from __future__ import annotations

from dataclasses import replace
from datetime import time
from typing import Any

from crmhooks.actions import action_ids
from crmhooks.config import (
    AllOf,
    Condition,
    Config,
    OrgSettings,
    Rule,
    ScheduledSpec,
    Webhook,
)
from crmhooks.events import event_from_json, parse_rfc3339_ms
from crmhooks.workflow import EventPlan, RecordState, plan_event

NOW_MS = parse_rfc3339_ms("2026-11-28T01:00:00Z")  # 09:00 in Asia/Shanghai

RULE = Rule(
    id="r",
    module="Potentials",
    trigger="create_or_edit",
    criteria=AllOf((Condition("Stage", "is", "Closed Won"),)),
    instant="Now",
    scheduled=(
        ScheduledSpec(
            webhook="Later", relative_to="Payment Due", offset_ms=-86_400_000, at=time(9, 0)
        ),
        ScheduledSpec(webhook="Later", relative_to="trigger", offset_ms=3_600_000),
    ),
)
CONFIG = Config(
    orgs={"org": OrgSettings("org", users=3, time_zone="Asia/Shanghai")},
    webhooks={
        "Now": Webhook(name="Now", url="http://x/", module="Potentials"),
        "Later": Webhook(name="Later", url="http://x/", module="Potentials"),
    },
    rules=(RULE,),
)


def ev(n: int, operation: str = "create", previous: Any = None, **record: Any) -> Any:
    rec = {"Stage": "Closed Won", "Payment Due": "2026-12-05 09:30"}
    rec.update(record)
    return event_from_json(
        {
            "event_id": f"e{n}",
            "org_id": "org",
            "module": "Potentials",
            "operation": operation,
            "occurred_at": "2026-11-28T01:00:00Z",
            "record_id": "rec",
            "record": rec,
            "previous": previous,
        }
    )


def plan(event: Any, state: RecordState, suspended: bool = False, rule: Rule = RULE) -> EventPlan:
    return plan_event(
        event,
        "Potentials",
        [rule],
        state,
        config=CONFIG,
        partition=2,
        offset=7,
        now_ms=NOW_MS,
        is_suspended=lambda org, rule_id, webhook: suspended,
    )


def test_matching_event_creates_instant_and_scheduled_actions_with_deterministic_ids() -> None:
    p = plan(ev(1), RecordState())
    assert [a.action_id for a in p.new_actions] == ["e1:r:Now", "e1:r:Later", "e1:r:Later#2"]
    instant, by_field, by_trigger = p.new_actions
    assert (instant.kind, instant.due_ms, instant.slot) == ("instant", NOW_MS, 0)
    # 2026-12-05 09:30 Shanghai, minus one calendar day, at 09:00 → 2026-12-04 01:00 UTC
    assert by_field.due_ms == parse_rfc3339_ms("2026-12-04T01:00:00Z")
    assert by_trigger.due_ms == NOW_MS + 3_600_000
    assert all(a.partition == 2 and a.source_offset == 7 for a in p.new_actions)


def test_non_matching_event_creates_nothing() -> None:
    p = plan(ev(1, Stage="Negotiation"), RecordState())
    assert p.is_empty
    assert not p.new_actions


def test_new_trigger_supersedes_the_pending_scheduled_action_of_each_slot() -> None:
    state = RecordState()
    plan(ev(1), state)
    p = plan(ev(2, "edit", previous={"Amount": 1}), state)
    cancelled = {(f.action.action_id, f.status, f.reason) for f in p.finished}
    assert cancelled == {
        ("e1:r:Later", "cancelled", "superseded"),
        ("e1:r:Later#2", "cancelled", "superseded"),
    }
    assert "e1:r:Now" in state.pending  # instant actions are never superseded
    assert {"e2:r:Later", "e2:r:Later#2"} <= set(state.pending)


def test_criteria_lost_cancels_pending_scheduled_actions() -> None:
    state = RecordState()
    plan(ev(1), state)
    p = plan(ev(2, "edit", previous={"Stage": "Closed Won"}, Stage="Closed Lost"), state)
    assert {(f.action.action_id, f.reason) for f in p.finished} == {
        ("e1:r:Later", "criteria_not_met"),
        ("e1:r:Later#2", "criteria_not_met"),
    }
    assert not p.new_actions


def test_deleted_record_cancels_pending_scheduled_actions() -> None:
    state = RecordState()
    plan(ev(1), state)
    p = plan(ev(2, "delete"), state)
    assert {f.reason for f in p.finished} == {"record_deleted"}
    assert len(p.finished) == 2


def test_changed_due_field_reschedules_with_the_same_id() -> None:
    once = replace(RULE, trigger="create")
    state = RecordState()
    plan(ev(1), state, rule=once)
    p = plan(
        ev(
            2, "edit", previous={"Payment Due": "2026-12-05 09:30"}, **{"Payment Due": "2026-12-10"}
        ),
        state,
        rule=once,
    )
    assert [(a.action_id, a.due_ms) for a in p.moved] == [
        ("e1:r:Later", parse_rfc3339_ms("2026-12-09T01:00:00Z"))
    ]
    assert not p.new_actions
    assert not p.finished


def test_past_due_and_missing_field_are_skipped() -> None:
    p = plan(ev(1, **{"Payment Due": "2026-01-01"}), RecordState())
    assert [(f.action.action_id, f.status, f.reason) for f in p.finished] == [
        ("e1:r:Later", "skipped", "past_due")
    ]
    p = plan(ev(2, **{"Payment Due": ""}), RecordState())
    assert [(f.action.action_id, f.status) for f in p.finished] == [("e2:r:Later", "skipped")]


def test_suspended_webhook_gives_suspended_and_sends_nothing() -> None:
    p = plan(ev(1), RecordState(), suspended=True)
    assert not p.new_actions
    assert {f.status for f in p.finished} == {"suspended"}
    assert len(p.finished) == 3


def test_repeat_once_fires_again_only_after_criteria_were_lost() -> None:
    once = Rule(
        **{**{f: getattr(RULE, f) for f in RULE.__slots__}, "repeat": "once", "scheduled": ()}
    )
    state = RecordState()
    assert [a.action_id for a in plan(ev(1), state, rule=once).new_actions] == ["e1:r:Now"]
    assert plan(ev(2, "edit", previous={"Amount": 1}), state, rule=once).new_actions == []
    lost = plan(ev(3, "edit", previous={"Stage": "x"}, Stage="Lost"), state, rule=once)
    assert lost.once_updates == [("r", False)]
    again = plan(ev(4, "edit", previous={"Stage": "Lost"}), state, rule=once)
    assert [a.action_id for a in again.new_actions] == ["e4:r:Now"]


def test_an_instant_only_rule_creates_one_action_with_the_ids_of_any_rule() -> None:
    only_instant = replace(RULE, scheduled=())
    state = RecordState()
    p = plan(ev(1), state, rule=only_instant)
    (action,) = p.new_actions
    assert action.action_id == action_ids("e1", "r", ["Now"])[0] == "e1:r:Now"
    assert (action.kind, action.slot, action.due_ms) == ("instant", 0, NOW_MS)
    assert action.webhook == "Now"
    assert action.record_key == "org/Potentials/rec"
    assert state.pending == {"e1:r:Now": action}
    assert not p.touched  # nothing scheduled: no snapshot to keep


def test_an_instant_only_rule_still_cancels_its_pending_scheduled_actions() -> None:
    """A rule whose scheduled actions were removed from the config: what it left
    pending is cancelled when the criteria stop holding (the zone is looked up for
    those, though the rule has no scheduled action of its own now)."""
    state = RecordState()
    plan(ev(1), state)  # the full rule: two scheduled actions pending
    p = plan(ev(2, "edit", Stage="Lost"), state, rule=replace(RULE, scheduled=()))
    assert sorted((f.action.action_id, f.reason) for f in p.finished) == [
        ("e1:r:Later", "criteria_not_met"),
        ("e1:r:Later#2", "criteria_not_met"),
    ]


def test_a_pending_action_whose_scheduled_spec_was_removed_is_not_moved() -> None:
    """Its rule lost the scheduled spec in a config change: a later edit of the field
    its due time hangs on leaves it where it is (it has no spec to move it by)."""
    create_only = replace(RULE, trigger="create")
    state = RecordState()
    plan(ev(1), state, rule=create_only)
    before = dict(state.pending)
    edit = ev(
        2,
        "edit",
        previous={"Payment Due": "2026-12-05 09:30"},
        **{"Payment Due": "2026-12-09 10:00"},
    )
    p = plan(edit, state, rule=replace(create_only, scheduled=()))
    assert p.is_empty
    assert state.pending == before
