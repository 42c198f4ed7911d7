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


@dataclass(frozen=True, slots=True)
class Reference:
    """``${env:NAME}`` or ``${file:PATH}`` as written in a template: a secret, whose value
    the config resolved when it loaded (``Webhook.env_values``, keyed by ``key``)."""

    key: str  # the text inside the braces: "env:NAME", "file:/run/secrets/x"

    @property
    def written(self) -> str:
        return f"${{{self.key}}}"


class RenderContext(msgspec.Struct, frozen=True, gc=False):
    """What a template is rendered from: the latest version of a record and its neighbours."""

    module: str  # canonical module name of the record (e.g. "Potentials")
    record: Mapping[str, Any]
    related: Mapping[str, Mapping[str, Any]]  # canonical module name → record
    user: Mapping[str, Any] | None
    organization: Mapping[str, Any] | None
    time_zone: ZoneInfo


_OPEN: Final = "${"
# What starts a secret reference inside the braces (crmhooks.config.references).
_REFERENCE_PREFIXES: Final = ("env:", "file:")

# The canonical namespace of the owner and organisation in ``crm_fields``.
USER_NAMESPACE: Final = "User"
ORG_NAMESPACE: Final = "Organization"

# A placeholder or a secret reference with its span in the template: (start, end, it).
Span = tuple[int, int, Placeholder | Reference]


def scan(text: str) -> list[Span]:
    """Every placeholder and secret reference of ``text`` with its span; TemplateError
    if one is malformed."""
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
        if inner.startswith(_REFERENCE_PREFIXES):
            found.append((start, close + 1, Reference(inner)))
            start = text.find(_OPEN, close + 1)
            continue
        namespace, dot, field = inner.partition(".")
        namespace, field = namespace.strip(), field.strip()
        if not dot or not namespace or not field:
            raise TemplateError(f"placeholder {written} must be ${{Module.Field Name}}")
        found.append((start, close + 1, Placeholder(namespace, field)))
        start = text.find(_OPEN, close + 1)
    return found


def parse_placeholders(text: str) -> list[Placeholder]:
    """The placeholders of ``text`` in order, as written (secret references left out);
    TemplateError if one is malformed."""
    return [p for _, _, p in scan(text) if isinstance(p, Placeholder)]


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
    """Maps a placeholder's namespace to where its value comes from, and a secret
    reference to its value (``env_values``: ``Webhook.env_values``)."""

    __slots__ = ("_catalog", "_env_values", "_module", "_own_names", "_related")

    def __init__(
        self, module: str, catalog: ModuleCatalog, env_values: Mapping[str, str] | None = None
    ) -> None:
        self._catalog = catalog
        self._env_values = env_values or {}
        self._module = catalog.canonical(module) or module
        self._own_names = catalog.names_of(self._module) | {module, self._module}
        self._related: dict[str, Source] = {}

    def secret(self, ref: Reference) -> str:
        """The value the config resolved for ``ref``; TemplateError when it has none."""
        value = self._env_values.get(ref.key)
        if value is None:
            raise TemplateError(f"{ref.written} has no value (the config did not resolve it)")
        return value

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
