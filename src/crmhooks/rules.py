"""Workflow-rule matching: triggers and criteria compiled once, evaluated per event (no I/O).

Semantics of the criteria operators (SPEC §3):

- A field is ``Field Name`` (the record) or ``Prefix.Field Name``: when the text
  before the first ``.`` names a module (singular, plural or alias), the field
  is read from ``event.related`` (or from the record itself when the prefix is
  the event's own module); ``User.`` / ``Users.`` read the record owner and
  ``Organization.`` / ``Org.`` the organisation. Any other prefix: the whole
  text is a record field name. A missing field is empty (None).
- Empty means None, ``""`` or ``[]``.
- ``is``/``is_not``/``in``/``not_in``: numbers compare as numbers (numeric
  strings too), dates and datetimes as dates, anything else as text, ignoring
  case (``casefold``). ``contains``/``starts_with``/``ends_with`` work on the
  text of the value, ignoring case.
- ``eq``/``ne``/``lt``/``le``/``gt``/``ge``/``between`` are typed: numbers with
  numbers, dates with dates (a date-only side compares at day granularity; a
  datetime with an offset never compares with one without), text with text
  (case-insensitively), booleans only for ``eq``/``ne``. Values of incompatible
  types make the comparison false — ``ne`` too; nothing raises.
- Arrays (multi-select fields): a positive operator holds when any element
  satisfies it; ``is_not``/``not_contains``/``not_in`` are the exact negations
  of ``is``/``contains``/``in``, so they hold when no element does.
- ``changed``: the field is in ``event.previous`` (an edit), or present in the
  record of a create; never for a delete or a related field. ``changed_to``:
  changed, and the new value ``is`` the given one.

``repeat = "once"`` needs durable per-record state and is applied by the
processor after ``matches``; nothing here knows about it.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from crmhooks.config import AllOf, AnyOf, Condition, Criteria, Not, Rule
from crmhooks.events import RecordEvent
from crmhooks.modules import ORG_NAMESPACES, USER_NAMESPACES, ModuleCatalog

Matcher = Callable[[RecordEvent], bool]
_Getter = Callable[[RecordEvent], Any]
_Pred = Callable[[Any], bool]

_DEFAULT_CATALOG = ModuleCatalog()


def _true(event: RecordEvent) -> bool:
    return True


def _false(event: RecordEvent) -> bool:
    return False


# --- typed values --------------------------------------------------------------

_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_INT_RE = re.compile(r"[+-]?\d+")
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATETIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def as_number(value: Any) -> int | float | None:
    """A number, or a string holding one (``"25000"``, ``"-1.5e3"``); else None."""
    kind = type(value)
    if kind is int or kind is float:  # `type is`: bool is not a number here
        return value  # type: ignore[no-any-return]  # checked by the type test
    if kind is str:
        text = value.strip()
        if _NUMBER_RE.fullmatch(text) is None:
            return None
        if _INT_RE.fullmatch(text):
            return int(text)
        number = float(text)
        return number if math.isfinite(number) else None
    return None


def as_instant(value: Any) -> date | datetime | None:
    """``yyyy-MM-dd`` → date; ``yyyy-MM-dd HH:mm`` or RFC 3339 → datetime; else None."""
    if type(value) is not str or len(value) < 10 or value[4] != "-":
        return None
    try:
        if len(value) == 10:
            return date.fromisoformat(value) if _DATE_RE.fullmatch(value) else None
        if _DATETIME_RE.match(value):
            return datetime.fromisoformat(value.replace("t", "T").replace("z", "Z"))
    except ValueError:
        return None
    return None


def _compare_instants(a: date, b: date) -> int | None:
    a_is_dt = isinstance(a, datetime)
    b_is_dt = isinstance(b, datetime)
    if a_is_dt != b_is_dt:
        # One side is a day: compare days (a datetime's own calendar day).
        a = a.date() if isinstance(a, datetime) else a
        b = b.date() if isinstance(b, datetime) else b
    elif (
        isinstance(a, datetime)
        and isinstance(b, datetime)
        and (a.tzinfo is None) != (b.tzinfo is None)
    ):
        return None  # wall time vs an instant: no time zone to relate them
    return (a > b) - (a < b)


def as_text(value: Any) -> str:
    """The text a value is matched as: numbers without exponent noise, true/false."""
    kind = type(value)
    if kind is str:
        return value  # type: ignore[no-any-return]  # checked by the type test
    if value is None:
        return ""
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        return str(int(value)) if value.is_integer() else repr(value)
    return ""


def is_empty(value: Any) -> bool:
    return value is None or value == "" or value == []


@dataclass(frozen=True, slots=True)
class _Const:
    """A criteria constant with its typed forms computed once."""

    raw: Any
    number: int | float | None
    instant: date | None
    folded: str

    @classmethod
    def of(cls, raw: Any) -> _Const:
        return cls(raw, as_number(raw), as_instant(raw), as_text(raw).casefold())

    @property
    def plain_text(self) -> bool:
        return type(self.raw) is str and self.number is None and self.instant is None


def _compare(value: Any, const: _Const) -> int | None:
    """Typed three-way comparison of a field value with a constant; None if incompatible."""
    if const.number is not None:
        number = as_number(value)
        if number is not None:
            return (number > const.number) - (number < const.number)
        return None
    if const.instant is not None:
        instant = as_instant(value)
        return None if instant is None else _compare_instants(instant, const.instant)
    if const.plain_text:
        if type(value) is not str:
            return None
        folded = value.casefold()
        return (folded > const.folded) - (folded < const.folded)
    if type(const.raw) is bool and type(value) is bool:
        return 0 if value is const.raw else 1  # equality only: ordering ops reject bools
    return None


def _equals(value: Any, const: _Const) -> bool:
    """``is``: typed equality when both sides are numbers or dates, else text, any case."""
    if const.number is not None:
        number = as_number(value)
        if number is not None:
            return number == const.number
    if const.instant is not None:
        instant = as_instant(value)
        if instant is not None:
            return _compare_instants(instant, const.instant) == 0
    return as_text(value).casefold() == const.folded


# --- compiling criteria --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _FieldRef:
    """How a criteria field is read; ``changed`` needs to know if it is the record's."""

    get: _Getter
    # The record field it names, for `changed`: None when it never is a record field.
    record_field: str | None = None
    # When set, it is a record field only in events of this (canonical) module.
    only_in_module: str | None = None


def _field_ref(name: str, catalog: ModuleCatalog, module: str | None) -> _FieldRef:
    prefix, dot, rest = name.partition(".")
    if dot and rest:
        if prefix in USER_NAMESPACES:
            return _FieldRef(lambda e: e.user.get(rest) if e.user is not None else None)
        if prefix in ORG_NAMESPACES:
            return _FieldRef(
                lambda e: e.organization.get(rest) if e.organization is not None else None
            )
        canonical = catalog.canonical(prefix)
        if canonical is not None:
            if module is not None:
                if catalog.canonical(module) == canonical:
                    return _FieldRef(lambda e: e.record.get(rest), rest)
                own = None
            else:  # decided per event: the prefix may be the event's own module
                own = canonical
            # Producers may key `related` by any name of the module: try them all.
            names = (prefix, canonical, *sorted(catalog.names_of(canonical) - {prefix, canonical}))

            def related(e: RecordEvent) -> Any:
                if own is not None and catalog.canonical(e.module) == own:
                    return e.record.get(rest)
                for key in names:
                    found = e.related.get(key)
                    if found is not None:
                        return found.get(rest)
                return None

            return _FieldRef(related, rest if own else None, own)
    return _FieldRef(lambda e: e.record.get(name), name)


def _changed(ref: _FieldRef, catalog: ModuleCatalog) -> Matcher:
    field = ref.record_field
    only_in = ref.only_in_module
    if field is None:
        return _false

    def changed(e: RecordEvent) -> bool:
        if only_in is not None and catalog.canonical(e.module) != only_in:
            return False  # a related record's field: not part of this edit
        if e.operation == "edit":
            return e.previous is not None and field in e.previous
        return e.operation == "create" and field in e.record

    return changed


def _scalar_predicate(op: str, const: _Const) -> _Pred:
    """A test of one (non-array) value for the positive operators."""
    if op == "is":
        return lambda v: _equals(v, const)
    if op == "contains":
        return lambda v: const.folded in as_text(v).casefold()
    if op == "starts_with":
        return lambda v: as_text(v).casefold().startswith(const.folded)
    if op == "ends_with":
        return lambda v: as_text(v).casefold().endswith(const.folded)
    if op == "eq":
        return lambda v: _compare(v, const) == 0
    if type(const.raw) is bool:
        return lambda v: False  # booleans have no order
    if op == "lt":
        return lambda v: (c := _compare(v, const)) is not None and c < 0
    if op == "le":
        return lambda v: (c := _compare(v, const)) is not None and c <= 0
    if op == "gt":
        return lambda v: (c := _compare(v, const)) is not None and c > 0
    if op == "ge":
        return lambda v: (c := _compare(v, const)) is not None and c >= 0
    raise ValueError(f"unknown operator {op!r}")


def _any_element(pred: _Pred) -> _Pred:
    """Arrays (multi-select): true when any element satisfies ``pred``."""

    def test(v: Any) -> bool:
        if type(v) is list:
            return any(pred(x) for x in v)
        return pred(v)

    return test


def _compile_condition(cond: Condition, catalog: ModuleCatalog, module: str | None) -> Matcher:
    ref = _field_ref(cond.field, catalog, module)
    get = ref.get
    op = cond.op
    if op == "is_empty":
        return lambda e: is_empty(get(e))
    if op == "is_not_empty":
        return lambda e: not is_empty(get(e))
    if op == "changed":
        return _changed(ref, catalog)
    if op == "changed_to":
        changed = _changed(ref, catalog)
        now_is = _any_element(_scalar_predicate("is", _Const.of(cond.value)))
        return lambda e: changed(e) and now_is(get(e))
    if op in ("in", "not_in"):
        consts = tuple(_Const.of(v) for v in cond.value)
        one = _any_element(lambda v: any(_equals(v, c) for c in consts))
        if op == "in":
            return lambda e: one(get(e))
        return lambda e: not one(get(e))
    if op == "between":
        low, high = (_Const.of(v) for v in cond.value)

        def within(v: Any) -> bool:
            lo = _compare(v, low)
            if lo is None or lo < 0:
                return False
            hi = _compare(v, high)
            return hi is not None and hi <= 0

        inside = _any_element(within)
        return lambda e: inside(get(e))
    if op == "ne":
        const = _Const.of(cond.value)

        def differs(v: Any) -> bool:
            if type(v) is list:  # no element equal, and something to compare
                results = [_compare(x, const) for x in v]
                return any(r is not None for r in results) and 0 not in results
            c = _compare(v, const)
            return c is not None and c != 0

        return lambda e: differs(get(e))
    negated = {"is_not": "is", "not_contains": "contains"}.get(op)
    positive = _any_element(_scalar_predicate(negated or op, _Const.of(cond.value)))
    if negated:
        return lambda e: not positive(get(e))
    return lambda e: positive(get(e))


def _all(matchers: Sequence[Matcher]) -> Matcher:
    if not matchers:
        return _true
    if len(matchers) == 1:
        return matchers[0]
    if len(matchers) == 2:
        first, second = matchers
        return lambda e: first(e) and second(e)

    def all_of(e: RecordEvent) -> bool:
        # A plain loop: no generator object per event on the hot path.
        for matcher in matchers:  # noqa: SIM110
            if not matcher(e):
                return False
        return True

    return all_of


def _any(matchers: Sequence[Matcher]) -> Matcher:
    if not matchers:
        return _false
    if len(matchers) == 1:
        return matchers[0]

    def any_of(e: RecordEvent) -> bool:
        for matcher in matchers:  # noqa: SIM110  (no generator per event)
            if matcher(e):
                return True
        return False

    return any_of


def compile_criteria(
    criteria: Criteria, catalog: ModuleCatalog | None = None, module: str | None = None
) -> Matcher:
    """The criteria as one closure over an event, constants parsed and casefolded once.

    ``module`` (the rule's module) lets ``Potentials.Amount`` in a Potentials rule
    read the record directly; without it that is decided per event.
    """
    catalog = _DEFAULT_CATALOG if catalog is None else catalog
    if isinstance(criteria, Condition):
        return _compile_condition(criteria, catalog, module)
    if isinstance(criteria, AllOf):
        return _all([compile_criteria(c, catalog, module) for c in criteria.items])
    if isinstance(criteria, AnyOf):
        return _any([compile_criteria(c, catalog, module) for c in criteria.items])
    if isinstance(criteria, Not):
        inner = compile_criteria(criteria.item, catalog, module)
        return lambda e: not inner(e)
    raise TypeError(f"not a criteria node: {criteria!r}")


def compile_condition(
    cond: Condition, catalog: ModuleCatalog | None = None, module: str | None = None
) -> Matcher:
    """One condition as a closure: the leaves ``compile_criteria`` combines (``explain``
    evaluates them one by one, with the very semantics of the compiled rules)."""
    return _compile_condition(cond, _DEFAULT_CATALOG if catalog is None else catalog, module)


def field_value(
    name: str, event: RecordEvent, catalog: ModuleCatalog | None = None, module: str | None = None
) -> Any:
    """The value a criteria field names in ``event``, read as conditions read it (None:
    missing)."""
    return _field_ref(name, _DEFAULT_CATALOG if catalog is None else catalog, module).get(event)


# Criteria compiled by `evaluate`, by object identity: config criteria live as
# long as the process, so a lookup is one dict get with no hashing of the tree.
# Bounded (criteria built per call, as in tests, would otherwise pile up).
_EVALUATE_CACHE_SIZE = 4096
_evaluate_cache: dict[tuple[int, int], tuple[Criteria, ModuleCatalog, Matcher]] = {}


def evaluate(criteria: Criteria, event: RecordEvent, catalog: ModuleCatalog | None = None) -> bool:
    """Whether ``event`` meets ``criteria`` (compiled once per criteria object and catalog)."""
    catalog = _DEFAULT_CATALOG if catalog is None else catalog
    key = (id(criteria), id(catalog))
    entry = _evaluate_cache.get(key)
    if entry is None or entry[0] is not criteria or entry[1] is not catalog:
        if len(_evaluate_cache) >= _EVALUATE_CACHE_SIZE:
            _evaluate_cache.clear()
        entry = (criteria, catalog, compile_criteria(criteria, catalog))
        _evaluate_cache[key] = entry
    return entry[2](event)


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
    a number nor a date, alone or (first such) at the top of an ``all``. Then ``_equals``
    is ``as_text(v).casefold() == folded`` for the value, or any element of an array.
    """
    if isinstance(criteria, Condition):
        if criteria.op != "is" or "." in criteria.field:
            return None
        const = _Const.of(criteria.value)
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
        self._catalog = _DEFAULT_CATALOG if catalog is None else catalog
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

    def needs_planning(self, event: RecordEvent) -> bool:
        """Whether any rule of ``compiled(event.org_id, event.module)`` is stateful or matches.

        The same answer as trying them all, but a rule whose criteria need a record
        field to be some text is only tried when the event's field is that text.
        """
        by_org = self._plans.get(event.module)
        if by_org is None:
            return False
        plan = by_org.get(event.org_id)
        if plan is None:
            plan = by_org.get(None, False)
        if not isinstance(plan, _Selector):  # the selector first: many rules, many events
            return plan if isinstance(plan, bool) else _any_matches(plan, event)
        record = event.record
        for field, table in plan.by_field:
            value = record.get(field)
            if type(value) is str:  # most are: as_text inlined
                found = table.get(value.casefold())
                if found is not None and _any_matches(found, event):
                    return True
            elif type(value) is list:
                for element in value:
                    found = table.get(as_text(element).casefold())
                    if found is not None and _any_matches(found, event):
                        return True
            else:
                found = table.get(as_text(value).casefold())
                if found is not None and _any_matches(found, event):
                    return True
        return bool(plan.rest) and _any_matches(plan.rest, event)

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
