"""Why a rule matched an event or not: the trigger and each condition, with the event's values.

``crmhooks explain`` answers "why didn't my webhook fire?". Each condition is
evaluated by the very closure the processor compiles (``criteria.compile_condition``),
and ``all``/``any``/``not`` combine them as ``criteria.compile_criteria`` does (a
property test holds the verdicts equal), so the explanation can never disagree
with what the processor decides. What lives in the running processor's store
(``repeat = "once"`` flags, suspensions) is taken from ``StoredState`` when the
caller could read it, and said to be unchecked otherwise; quota is never checked
here (it changes with every request sent).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from crmhooks.config import AllOf, AnyOf, Condition, Config, Criteria, Not, Rule
from crmhooks.criteria import compile_condition, field_value
from crmhooks.events import RecordEvent
from crmhooks.logs import escape_controls
from crmhooks.modules import UNSUPPORTED_MODULES, ModuleCatalog
from crmhooks.rules import RuleIndex, trigger_fires
from crmhooks.timers import compute_due_ms

# Operators that take no value, and those whose value is a list.
_NO_VALUE = frozenset({"is_empty", "is_not_empty", "changed"})


@dataclass(frozen=True, slots=True)
class Verdict:
    """One node of a rule's criteria, evaluated: a condition, or all/any/not of others."""

    kind: str  # condition | all | any | not
    holds: bool
    text: str  # the condition as written; "all of 3" for a group
    actual: str = ""  # the event's value, for a condition
    items: tuple[Verdict, ...] = ()


@dataclass(frozen=True, slots=True)
class StoredState:
    """What the processor's store knew of this record and organisation (None: not read)."""

    source: str  # where it was read, said in the output
    once_met: Mapping[str, bool] = field(default_factory=dict)  # rule id → met last time
    suspended: frozenset[tuple[str, str]] = frozenset()  # (rule id, webhook)


@dataclass(frozen=True, slots=True)
class Planned:
    """A webhook the rule would send: now, or at ``due_ms``; ``note`` when it would not."""

    webhook: str
    kind: str  # instant | scheduled
    due_ms: int | None
    how: str  # "now", or how the due time is computed
    note: str = ""  # why it would not be sent, if so


@dataclass(frozen=True, slots=True)
class RuleExplanation:
    rule: Rule
    fires: bool
    trigger: str
    criteria: Verdict
    once: str  # what repeat=once says ("" for repeat=every)
    matched: bool
    actions: tuple[Planned, ...]


# --- criteria -----------------------------------------------------------------------


def explain_criteria(
    criteria: Criteria,
    event: RecordEvent,
    catalog: ModuleCatalog | None = None,
    module: str | None = None,
) -> Verdict:
    """The criteria evaluated node by node, as ``compile_criteria`` would decide."""
    if isinstance(criteria, Condition):
        holds = compile_condition(criteria, catalog, module)(event)
        return Verdict(
            "condition",
            holds,
            condition_text(criteria),
            _actual(criteria, event, catalog, module),
        )
    if isinstance(criteria, AllOf):
        items = tuple(explain_criteria(c, event, catalog, module) for c in criteria.items)
        return Verdict("all", all(i.holds for i in items), f"all of {len(items)}", items=items)
    if isinstance(criteria, AnyOf):
        items = tuple(explain_criteria(c, event, catalog, module) for c in criteria.items)
        return Verdict("any", any(i.holds for i in items), f"any of {len(items)}", items=items)
    if isinstance(criteria, Not):
        inner = explain_criteria(criteria.item, event, catalog, module)
        return Verdict("not", not inner.holds, "not", items=(inner,))
    raise TypeError(f"not a criteria node: {criteria!r}")


def _shown(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def condition_text(cond: Condition) -> str:
    """``Stage is "Closed Won"``, ``Amount between 100 and 200``, ``Phone is_empty``."""
    if cond.op in _NO_VALUE:
        return f"{cond.field} {cond.op}"
    if cond.op == "between":
        low, high = cond.value
        return f"{cond.field} between {_shown(low)} and {_shown(high)}"
    return f"{cond.field} {cond.op} {_shown(cond.value)}"


def _actual(
    cond: Condition, event: RecordEvent, catalog: ModuleCatalog | None, module: str | None
) -> str:
    value = field_value(cond.field, event, catalog, module)
    now = "is missing" if value is None else f"= {_shown(value)}"
    if cond.op in ("changed", "changed_to"):
        if event.operation == "edit":
            previous = event.previous or {}
            if cond.field in previous:
                return f"{cond.field} changed from {_shown(previous[cond.field])}, now {now}"
            return f"{cond.field} did not change in this edit, {now}"
        return f"{cond.field} {now} (a {event.operation})"
    return f"{cond.field} {now}"


def deciding(verdict: Verdict) -> list[Verdict]:
    """The conditions that decided a verdict: for ``all`` that fails, its first failing
    item; for ``any`` that holds, its first holding one; otherwise every item."""
    if verdict.kind == "condition":
        return [verdict]
    if verdict.kind == "not":
        return deciding(verdict.items[0])
    if verdict.kind == "all" and not verdict.holds:
        return deciding(next(i for i in verdict.items if not i.holds))
    if verdict.kind == "any" and verdict.holds:
        return deciding(next(i for i in verdict.items if i.holds))
    return [c for i in verdict.items for c in deciding(i)]


# --- rules -------------------------------------------------------------------------


def _trigger_text(rule: Rule, event: RecordEvent, fires: bool) -> str:
    op = event.operation
    if rule.trigger == "field_update":
        fields = ", ".join(rule.fields)
        if op == "edit":
            changed = [f for f in rule.fields if f in (event.previous or {})]
            if changed:
                return f"field_update of {fields}: {', '.join(changed)} changed in this edit"
            return f"field_update of {fields}: none of them changed in this edit"
        if op == "create":
            present = [f for f in rule.fields if f in event.record]
            if present:
                return f"field_update of {fields}: a create setting {', '.join(present)}"
            return f"field_update of {fields}: a create setting none of them"
        return f"field_update of {fields}: never fires on a delete"
    article = "an" if op == "edit" else "a"
    return f"{rule.trigger}: {'fires on' if fires else 'does not fire on'} {article} {op}"


def explain_rule(
    rule: Rule,
    event: RecordEvent,
    config: Config,
    *,
    catalog: ModuleCatalog | None = None,
    now_ms: int,
    state: StoredState | None = None,
) -> RuleExplanation:
    """Whether ``rule`` matches ``event``, and the actions it would create if so.

    The decision is ``workflow.plan_event``'s: trigger and criteria, then for
    ``repeat = "once"`` only the first event meeting the criteria (after one that
    did not) fires."""
    catalog = config.catalog if catalog is None else catalog
    fires = trigger_fires(rule, event)
    verdict = explain_criteria(rule.criteria, event, catalog, rule.module)
    matched = fires and verdict.holds
    once = ""
    if rule.repeat == "once" and matched:
        if event.operation == "delete":
            once = "repeat once: not applied to a delete (each matching delete fires)"
        elif state is None:
            once = (
                "repeat once: fires only if the criteria did not hold for this record's "
                "previous event (not checked: that lives in the processor's store)"
            )
        elif state.once_met.get(rule.id, False):
            once = f"repeat once: criteria already met by an earlier event ({state.source})"
            matched = False
        else:
            once = f"repeat once: first time the criteria are met for this record ({state.source})"
    actions = _planned(rule, event, config, now_ms, state) if matched else ()
    return RuleExplanation(
        rule, fires, _trigger_text(rule, event, fires), verdict, once, matched, actions
    )


def _planned(
    rule: Rule, event: RecordEvent, config: Config, now_ms: int, state: StoredState | None
) -> tuple[Planned, ...]:
    grace_ms = int(config.delivery.past_due_grace_s * 1000)
    tz = ZoneInfo(config.org(event.org_id).time_zone)
    out: list[Planned] = []

    def suspended(webhook: str) -> str:
        if state is not None and (rule.id, webhook) in state.suspended:
            return f"suspended: nothing is sent until `crmhooks resume` ({state.source})"
        return ""

    if rule.instant:
        out.append(Planned(rule.instant, "instant", now_ms, "now", suspended(rule.instant)))
    for spec in rule.scheduled:
        due = compute_due_ms(spec, dict(event.record), event.occurred_at_ms, tz)
        base = "the event's time" if spec.relative_to == "trigger" else spec.relative_to
        how = f"{_offset_text(spec.offset_ms)}{base}"
        if spec.at is not None:
            how += f", at {spec.at.strftime('%H:%M')}"
        note = suspended(spec.webhook)
        if due is None:
            note = note or f"skipped (no_due_time): {spec.relative_to} is missing or not a date"
        elif due < now_ms - grace_ms:
            grace = f"{config.delivery.past_due_grace_s:g} s"
            note = note or f"skipped (past_due): due more than {grace} before now"
        out.append(Planned(spec.webhook, "scheduled", due, how, note))
    return tuple(out)


def _offset_text(offset_ms: int) -> str:
    if offset_ms == 0:
        return ""
    rest = abs(offset_ms) // 1000
    parts = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return f"{''.join(parts)} {'before' if offset_ms < 0 else 'after'} "


def explain_event(
    config: Config, event: RecordEvent, *, now_ms: int, state: StoredState | None = None
) -> list[RuleExplanation]:
    """Each rule of the event's organisation and module, in config order."""
    catalog = config.catalog
    rules = RuleIndex(config.rules, catalog).candidates(event.org_id, event.module)
    return [
        explain_rule(r, event, config, catalog=catalog, now_ms=now_ms, state=state) for r in rules
    ]


# --- output ------------------------------------------------------------------------


def _when(ms: int, tz: ZoneInfo) -> str:
    local = datetime.fromtimestamp(ms / 1000, tz)
    utc = datetime.fromtimestamp(ms / 1000, UTC)
    return f"{local:%Y-%m-%d %H:%M} {tz.key} ({utc:%Y-%m-%dT%H:%M:%SZ})"


def _verdict_lines(verdict: Verdict, depth: int) -> list[str]:
    pad = "  " * depth
    mark = "yes" if verdict.holds else "NO "
    if verdict.kind == "condition":
        return [f"{pad}{mark}  {verdict.text}    ({verdict.actual})"]
    lines = [f"{pad}{mark}  {verdict.text}:"]
    for item in verdict.items:
        lines += _verdict_lines(item, depth + 1)
    return lines


def _criteria_summary(verdict: Verdict) -> str:
    if verdict.kind == "all" and not verdict.items:
        return "criteria: none (every event meets them)"
    decided = deciding(verdict)
    names = "; ".join(f"{d.text} ({d.actual})" for d in decided)
    if verdict.holds:
        if verdict.kind == "any":
            return f"criteria met: {names} holds"
        if verdict.kind == "not":
            return f"criteria met: not ({names})"
        return "criteria met: every condition holds"
    if verdict.kind == "any":
        return f"criteria not met: none of the {len(verdict.items)} conditions of any holds"
    if verdict.kind == "not":
        return f"criteria not met: {names} holds, and the rule says not"
    return f"criteria not met: {names} fails"


def render(
    config: Config,
    event: RecordEvent,
    explanations: Sequence[RuleExplanation],
    state: StoredState | None,
) -> str:
    """The explanation as text for a CRM administrator; control characters escaped."""
    tz = ZoneInfo(config.org(event.org_id).time_zone)
    head = (
        f"event {event.event_id}: {event.operation} of {event.module} record "
        f"{event.record_id} in {event.org_id}, at {_when(event.occurred_at_ms, tz)}"
    )
    lines = [head]
    canonical = config.catalog.canonical(event.module)
    if event.module in UNSUPPORTED_MODULES:
        lines.append(f"{event.module} events are consumed and ignored: no webhook can use them.")
        return "\n".join(escape_controls(line) for line in lines) + "\n"
    if canonical is None:
        lines.append(
            f"no rule can name module {event.module!r}: not a CRM module nor a custom "
            "module of this config; its events are consumed and ignored."
        )
        return "\n".join(escape_controls(line) for line in lines) + "\n"
    if not explanations:
        lines.append(f"no rule of {event.org_id} is for {canonical}: nothing would be sent.")
        return "\n".join(escape_controls(line) for line in lines) + "\n"
    matched = sum(1 for e in explanations if e.matched)
    lines.append(
        f"{len(explanations)} rule(s) for {event.org_id} and {canonical}, "
        f"in config order; {matched} matched."
    )
    for e in explanations:
        lines.append("")
        lines.append(f"rule {e.rule.id}: {'MATCHED' if e.matched else 'not matched'}")
        lines.append(f"  trigger {e.trigger}")
        lines.append(f"  {_criteria_summary(e.criteria)}")
        if e.criteria.items or e.criteria.kind == "condition":
            lines += _verdict_lines(e.criteria, 2)
        if e.once:
            lines.append(f"  {e.once}")
        if e.matched:
            lines.append("  would send:")
            for a in e.actions:
                when = "now" if a.kind == "instant" else "no due time"
                if a.kind == "scheduled" and a.due_ms is not None:
                    when = f"due {_when(a.due_ms, tz)}: {a.how}"
                note = f" -- {a.note}" if a.note else ""
                lines.append(f"    {a.kind:<9}  {a.webhook}  {when}{note}")
        elif not e.fires:
            lines.append("  decided by the trigger: nothing would be sent")
    lines.append("")
    if state is None:
        lines.append(
            "(repeat = once and suspensions not checked: the config's store is not on this "
            "machine; quota never is: it changes with every request sent)"
        )
    else:
        lines.append(f"(repeat = once and suspensions read from {state.source}; quota not checked)")
    return "\n".join(escape_controls(line) for line in lines) + "\n"
