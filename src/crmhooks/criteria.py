"""Criteria compiled once into closures over an event, evaluated per event (no I/O).

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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from crmhooks.comparisons import Const, as_text, compare, equals, is_empty
from crmhooks.config import AllOf, AnyOf, Condition, Criteria, Not
from crmhooks.events import RecordEvent
from crmhooks.modules import ORG_NAMESPACES, USER_NAMESPACES, ModuleCatalog

Matcher = Callable[[RecordEvent], bool]
_Getter = Callable[[RecordEvent], Any]
_Pred = Callable[[Any], bool]

# The standard modules, for callers that give no catalog: one object, so that
# ``evaluate``'s cache (by identity) finds the criteria it compiled with it.
DEFAULT_CATALOG = ModuleCatalog()


def _true(event: RecordEvent) -> bool:
    return True


def _false(event: RecordEvent) -> bool:
    return False


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


def _scalar_predicate(op: str, const: Const) -> _Pred:
    """A test of one (non-array) value for the positive operators."""
    if op == "is":
        return lambda v: equals(v, const)
    if op == "contains":
        return lambda v: const.folded in as_text(v).casefold()
    if op == "starts_with":
        return lambda v: as_text(v).casefold().startswith(const.folded)
    if op == "ends_with":
        return lambda v: as_text(v).casefold().endswith(const.folded)
    if op == "eq":
        return lambda v: compare(v, const) == 0
    if type(const.raw) is bool:
        return lambda v: False  # booleans have no order
    if op == "lt":
        return lambda v: (c := compare(v, const)) is not None and c < 0
    if op == "le":
        return lambda v: (c := compare(v, const)) is not None and c <= 0
    if op == "gt":
        return lambda v: (c := compare(v, const)) is not None and c > 0
    if op == "ge":
        return lambda v: (c := compare(v, const)) is not None and c >= 0
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
        now_is = _any_element(_scalar_predicate("is", Const.of(cond.value)))
        return lambda e: changed(e) and now_is(get(e))
    if op in ("in", "not_in"):
        consts = tuple(Const.of(v) for v in cond.value)
        one = _any_element(lambda v: any(equals(v, c) for c in consts))
        if op == "in":
            return lambda e: one(get(e))
        return lambda e: not one(get(e))
    if op == "between":
        low, high = (Const.of(v) for v in cond.value)

        def within(v: Any) -> bool:
            lo = compare(v, low)
            if lo is None or lo < 0:
                return False
            hi = compare(v, high)
            return hi is not None and hi <= 0

        inside = _any_element(within)
        return lambda e: inside(get(e))
    if op == "ne":
        const = Const.of(cond.value)

        def differs(v: Any) -> bool:
            if type(v) is list:  # no element equal, and something to compare
                results = [compare(x, const) for x in v]
                return any(r is not None for r in results) and 0 not in results
            c = compare(v, const)
            return c is not None and c != 0

        return lambda e: differs(get(e))
    negated = {"is_not": "is", "not_contains": "contains"}.get(op)
    positive = _any_element(_scalar_predicate(negated or op, Const.of(cond.value)))
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
    catalog = DEFAULT_CATALOG if catalog is None else catalog
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
    return _compile_condition(cond, DEFAULT_CATALOG if catalog is None else catalog, module)


def field_value(
    name: str, event: RecordEvent, catalog: ModuleCatalog | None = None, module: str | None = None
) -> Any:
    """The value a criteria field names in ``event``, read as conditions read it (None:
    missing)."""
    return _field_ref(name, DEFAULT_CATALOG if catalog is None else catalog, module).get(event)


# Criteria compiled by `evaluate`, by object identity: config criteria live as
# long as the process, so a lookup is one dict get with no hashing of the tree.
# Bounded (criteria built per call, as in tests, would otherwise pile up).
_EVALUATE_CACHE_SIZE = 4096
_evaluate_cache: dict[tuple[int, int], tuple[Criteria, ModuleCatalog, Matcher]] = {}


def evaluate(criteria: Criteria, event: RecordEvent, catalog: ModuleCatalog | None = None) -> bool:
    """Whether ``event`` meets ``criteria`` (compiled once per criteria object and catalog)."""
    catalog = DEFAULT_CATALOG if catalog is None else catalog
    key = (id(criteria), id(catalog))
    entry = _evaluate_cache.get(key)
    if entry is None or entry[0] is not criteria or entry[1] is not catalog:
        if len(_evaluate_cache) >= _EVALUATE_CACHE_SIZE:
            _evaluate_cache.clear()
        entry = (criteria, catalog, compile_criteria(criteria, catalog))
        _evaluate_cache[key] = entry
    return entry[2](event)
