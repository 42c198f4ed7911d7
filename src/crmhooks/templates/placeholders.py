"""Placeholders: ``${Namespace.Field}`` found in a template, and where each value comes from."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Final
from zoneinfo import ZoneInfo

import msgspec

from crmhooks.errors import TemplateError
from crmhooks.modules import ORG_NAMESPACES, USER_NAMESPACES, ModuleCatalog


@dataclass(frozen=True, slots=True)
class Placeholder:
    """``${Namespace.Field Name}`` as written in a template."""

    namespace: str
    field: str


class RenderContext(msgspec.Struct, frozen=True, gc=False):
    """What a template is rendered from: the latest version of a record and its neighbours."""

    module: str  # canonical module name of the record (e.g. "Potentials")
    record: Mapping[str, Any]
    related: Mapping[str, Mapping[str, Any]]  # canonical module name → record
    user: Mapping[str, Any] | None
    organization: Mapping[str, Any] | None
    time_zone: ZoneInfo


_OPEN: Final = "${"
_ENV_PREFIX: Final = "env:"

# The canonical namespace of the owner and organisation in ``crm_fields``.
USER_NAMESPACE: Final = "User"
ORG_NAMESPACE: Final = "Organization"

# A placeholder with its span in the template: (start, end, placeholder).
Span = tuple[int, int, Placeholder]


def scan(text: str) -> list[Span]:
    """Every placeholder of ``text`` with its span; TemplateError if one is malformed."""
    found: list[Span] = []
    start = text.find(_OPEN)
    while start != -1:
        close = text.find("}", start + 2)
        if close == -1:
            raise TemplateError(f"unterminated placeholder at {text[start : start + 40]!r}")
        inner = text[start + 2 : close]
        written = text[start : close + 1]
        if _OPEN in inner:
            raise TemplateError(f"nested placeholder in {written}")
        if inner.startswith(_ENV_PREFIX):
            raise TemplateError(
                f"{written}: ${{env:NAME}} is only allowed in custom parameters and secret"
            )
        namespace, dot, field = inner.partition(".")
        namespace, field = namespace.strip(), field.strip()
        if not dot or not namespace or not field:
            raise TemplateError(f"placeholder {written} must be ${{Module.Field Name}}")
        found.append((start, close + 1, Placeholder(namespace, field)))
        start = text.find(_OPEN, close + 1)
    return found


def parse_placeholders(text: str) -> list[Placeholder]:
    """The placeholders of ``text`` in order, as written; TemplateError if malformed."""
    return [p for _, _, p in scan(text)]


# Where a placeholder's value is read from: a record of the context, or None.
Source = Callable[[RenderContext], Mapping[str, Any] | None]


def _related_source(names: tuple[str, ...]) -> Source:
    """Finds the related record by its canonical name, then by any other name of it."""

    def source(ctx: RenderContext) -> Mapping[str, Any] | None:
        related = ctx.related
        for name in names:
            rec = related.get(name)
            if rec is not None:
                return rec
        return None

    return source


_RECORD: Final[Source] = attrgetter("record")
_USER: Final[Source] = attrgetter("user")
_ORG: Final[Source] = attrgetter("organization")


class Resolver:
    """Maps a placeholder's namespace to where its value comes from."""

    __slots__ = ("_catalog", "_module", "_own_names", "_related")

    def __init__(self, module: str, catalog: ModuleCatalog) -> None:
        self._catalog = catalog
        self._module = catalog.canonical(module) or module
        self._own_names = catalog.names_of(self._module) | {module, self._module}
        self._related: dict[str, Source] = {}

    def resolve(self, ph: Placeholder) -> tuple[Placeholder, Source]:
        """(the placeholder with its canonical namespace, its value source)."""
        ns = ph.namespace
        if ns in self._own_names:
            return Placeholder(self._module, ph.field), _RECORD
        if ns in USER_NAMESPACES:
            return Placeholder(USER_NAMESPACE, ph.field), _USER
        if ns in ORG_NAMESPACES:
            return Placeholder(ORG_NAMESPACE, ph.field), _ORG
        canonical = self._catalog.canonical(ns)
        if canonical is None:
            raise TemplateError(f"unknown namespace {ns!r} in ${{{ns}.{ph.field}}}")
        source = self._related.get(canonical)
        if source is None:
            others = sorted(self._catalog.names_of(canonical) - {canonical})
            source = _related_source((canonical, *others))
            self._related[canonical] = source
        return Placeholder(canonical, ph.field), source
