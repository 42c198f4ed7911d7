"""Workflow rules compiled (trigger and criteria) and indexed by organisation and module.

``repeat = "once"`` needs durable per-record state and is applied by the
processor after ``matches``; nothing here knows about it. How criteria are
evaluated is ``criteria``'s docstring.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from crmhooks.comparisons import Const, as_text
from crmhooks.config import AllOf, Condition, Criteria, Rule
from crmhooks.criteria import DEFAULT_CATALOG, Matcher, compile_criteria, evaluate
from crmhooks.events import RecordEvent
from crmhooks.modules import ModuleCatalog
from crmhooks.record_event import EventView

# Names importers found here before comparisons.py and criteria.py.
__all__ = [
    "CompiledRule",
    "RuleIndex",
    "as_text",
    "compile_criteria",
    "compile_trigger",
    "evaluate",
    "matches",
    "trigger_fires",
]


# --- triggers ------------------------------------------------------------------


def compile_trigger(rule: Rule) -> Matcher:
    """The rule's trigger as a closure over an event."""
    trigger = rule.trigger
    if trigger == "create_or_edit":
        return lambda e: e.operation != "delete"
    if trigger in ("create", "edit", "delete"):
        return lambda e: e.operation == trigger
    if trigger == "field_update":
        return lambda e: trigger_fires(rule, e)
    raise ValueError(f"rule {rule.id}: unknown trigger {trigger!r}")


def trigger_fires(rule: Rule, event: RecordEvent) -> bool:
    """Whether the event is of the kind the rule's trigger reacts to.

    ``field_update`` fires when one of ``rule.fields`` is in ``event.previous``
    (an edit) or present in the record of a create; never on a delete.
    """
    trigger = rule.trigger
    operation = event.operation
    if trigger == "create_or_edit":
        return operation != "delete"
    if trigger == "field_update":
        if operation == "edit":
            previous = event.previous
            return previous is not None and any(f in previous for f in rule.fields)
        return operation == "create" and any(f in event.record for f in rule.fields)
    return operation == trigger


def matches(rule: Rule, event: RecordEvent, catalog: ModuleCatalog | None = None) -> bool:
    """Trigger fires and criteria hold (module and org are RuleIndex's business)."""
    return trigger_fires(rule, event) and evaluate(rule.criteria, event, catalog)


# --- the index -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule with its trigger and criteria compiled."""

    rule: Rule
    fires: Matcher
    criteria_met: Matcher
    # Keeps per-record state (pending scheduled actions, repeat="once" flags), so
    # even an event it does not match may change something. Set by ``of``.
    stateful: bool

    def matches(self, event: RecordEvent) -> bool:
        return self.fires(event) and self.criteria_met(event)

    @classmethod
    def of(cls, rule: Rule, catalog: ModuleCatalog) -> CompiledRule:
        return cls(
            rule,
            compile_trigger(rule),
            compile_criteria(rule.criteria, catalog, rule.module),
            bool(rule.scheduled) or rule.repeat == "once",
        )


# An (org, module) group gets a value-keyed selector only from this many indexable rules.
_MIN_INDEXED = 2


def _index_key(criteria: Criteria) -> tuple[str, str] | None:
    """``(field, folded text)`` when the criteria can only hold if that record field ``is``
    that plain text: an ``is`` on a field without ``.`` with a constant that is neither
    a number nor a date, alone or (first such) at the top of an ``all``. Then
    ``comparisons.equals`` is ``as_text(v).casefold() == folded`` for the value, or any
    element of an array.
    """
    if isinstance(criteria, Condition):
        if criteria.op != "is" or "." in criteria.field:
            return None
        const = Const.of(criteria.value)
        if const.number is not None or const.instant is not None:
            return None
        return criteria.field, const.folded
    if isinstance(criteria, AllOf):
        for item in criteria.items:
            key = _index_key(item)
            if key is not None:
                return key
    return None


@dataclass(frozen=True, slots=True)
class _Selector:
    """The instant-only rules of one (org, module) group, most looked up by a field's value.

    ``by_field``: per record field, the rules whose criteria need that field to be (as
    folded text) the key. ``rest``: rules that are always evaluated.
    """

    by_field: tuple[tuple[str, Mapping[str, tuple[CompiledRule, ...]]], ...]
    rest: tuple[CompiledRule, ...]


# What decides whether an event of an (org, module) group needs planning: True (a
# stateful rule), a tuple of instant-only rules to evaluate in turn, or a selector.
_Plan = bool | tuple[CompiledRule, ...] | _Selector


def _plan(compiled: Sequence[CompiledRule]) -> _Plan:
    if not compiled:
        return False
    if any(c.stateful for c in compiled):
        return True
    keyed: dict[str, dict[str, list[CompiledRule]]] = {}
    rest: list[CompiledRule] = []
    keys = [_index_key(c.rule.criteria) for c in compiled]
    if sum(k is not None for k in keys) < _MIN_INDEXED:
        return tuple(compiled)
    for c, key in zip(compiled, keys, strict=True):
        if key is None:
            rest.append(c)
        else:
            field, folded = key
            keyed.setdefault(field, {}).setdefault(folded, []).append(c)
    return _Selector(
        tuple((f, {k: tuple(cs) for k, cs in table.items()}) for f, table in keyed.items()),
        tuple(rest),
    )


def _any_matches(compiled: Iterable[CompiledRule], event: RecordEvent) -> bool:
    for c in compiled:  # noqa: SIM110  (no generator per event)
        if c.matches(event):
            return True
    return False


def _first(placed: tuple[int, CompiledRule]) -> int:
    return placed[0]


class RuleIndex:
    """Rules by (organisation, canonical module), compiled once.

    Lookups are dict gets: their cost does not grow with the rules of other
    organisations or modules. Only (org, module) pairs that have org-scoped
    rules get an entry (built here, never per event), so unknown organisation ids
    arriving in events cannot grow it.
    """

    __slots__ = (
        "_by_id",
        "_catalog",
        "_orgless",
        "_plans",
        "_rules",
        "_scoped",
    )

    def __init__(self, rules: Iterable[Rule], catalog: ModuleCatalog | None = None) -> None:
        self._catalog = DEFAULT_CATALOG if catalog is None else catalog
        compiled = [CompiledRule.of(rule, self._catalog) for rule in rules]
        self._by_id: Mapping[str, CompiledRule] = {c.rule.id: c for c in compiled}
        # Each with its place in the config, to merge org-less and org-scoped rules in
        # config order in time linear in the rules (not rules x organisations).
        orgless: dict[str, list[tuple[int, CompiledRule]]] = {}
        own: dict[tuple[str, str], list[tuple[int, CompiledRule]]] = {}
        for i, c in enumerate(compiled):
            module = self._catalog.canonical(c.rule.module) or c.rule.module
            if c.rule.org is None:
                orgless.setdefault(module, []).append((i, c))
            else:
                own.setdefault((c.rule.org, module), []).append((i, c))
        self._orgless = {m: tuple(c for _, c in cs) for m, cs in orgless.items()}
        # Org-less and org-scoped rules together, in config order.
        self._scoped = {
            key: tuple(c for _, c in heapq.merge(orgless.get(key[1], ()), cs, key=_first))
            for key, cs in own.items()
        }
        self._rules: dict[tuple[str, str] | str, tuple[Rule, ...]] = {
            m: tuple(c.rule for c in cs) for m, cs in self._orgless.items()
        }
        self._rules.update({k: tuple(c.rule for c in cs) for k, cs in self._scoped.items()})
        # By each name of a module, as events may write it (an event's module is looked
        # up as it comes, with no call to find its canonical name first), then by
        # organisation, None for the org-less rules: two dict gets, no key built.
        self._plans: dict[str, dict[str | None, _Plan]] = {}
        for module, cs in self._orgless.items():
            plan = _plan(cs)
            for name in self._names(module):
                self._plans.setdefault(name, {})[None] = plan
        for (org, module), cs in self._scoped.items():
            plan = _plan(cs)
            for name in self._names(module):
                self._plans.setdefault(name, {})[org] = plan

    def _names(self, module: str) -> frozenset[str]:
        return self._catalog.names_of(module) | {module}

    def compiled(self, org_id: str, module: str) -> Sequence[CompiledRule]:
        """The compiled rules that apply to events of ``module`` (any of its names) in an org."""
        canonical = self._catalog.canonical(module)
        if canonical is None:
            return ()
        found = self._scoped.get((org_id, canonical))
        return found if found is not None else self._orgless.get(canonical, ())

    def needs_planning(self, event: EventView) -> bool:
        """Whether any rule of ``compiled(event.org_id, event.module)`` is stateful or matches.

        The same answer as trying them all, but a rule whose criteria need a record
        field to be some text is only tried when the event's field is that text. The
        whole event (``as_event``) is asked for only when some rule is tried.
        """
        by_org = self._plans.get(event.module)
        if by_org is None:
            return False
        plan = by_org.get(event.org_id)
        if plan is None:
            plan = by_org.get(None, False)
        if not isinstance(plan, _Selector):  # the selector first: many rules, many events
            return plan if isinstance(plan, bool) else _any_matches(plan, event.as_event())
        record = event.record
        for field, table in plan.by_field:
            value = record.get(field)
            if type(value) is str:  # most are: as_text inlined
                found = table.get(value.casefold())
                if found is not None and _any_matches(found, event.as_event()):
                    return True
            elif type(value) is list:
                for element in value:
                    found = table.get(as_text(element).casefold())
                    if found is not None and _any_matches(found, event.as_event()):
                        return True
            else:
                found = table.get(as_text(value).casefold())
                if found is not None and _any_matches(found, event.as_event()):
                    return True
        return bool(plan.rest) and _any_matches(plan.rest, event.as_event())

    def candidates(self, org_id: str, module: str) -> Sequence[Rule]:
        """The rules of that organisation (and org-less ones) for that module, in config order."""
        canonical = self._catalog.canonical(module)
        if canonical is None:
            return ()
        found = self._rules.get((org_id, canonical))
        return found if found is not None else self._rules.get(canonical, ())

    def matching(self, event: RecordEvent) -> list[Rule]:
        """Rules whose trigger fires and whose criteria hold for ``event``."""
        return [c.rule for c in self.compiled(event.org_id, event.module) if c.matches(event)]

    def criteria_met(self, rule: Rule, event: RecordEvent) -> bool:
        """Whether ``event`` meets the rule's criteria (e.g. to cancel pending actions)."""
        found = self._by_id.get(rule.id)
        if found is not None and found.rule is rule:
            return found.criteria_met(event)
        return evaluate(rule.criteria, event, self._catalog)

    def get(self, rule_id: str) -> Rule | None:
        found = self._by_id.get(rule_id)
        return None if found is None else found.rule

    def __len__(self) -> int:
        return len(self._by_id)

    def __repr__(self) -> str:
        return f"RuleIndex({len(self._by_id)} rules)"
