"""Header templates (``[webhooks.headers]``): each value rendered on one line, and shown
with its secrets as ``***``.

A header value is a template like any other: ``${Module.Field}`` placeholders and
``${env:NAME}`` / ``${file:PATH}`` secrets. HTTP has no escaping for a header
value, so a value holding CR, LF or NUL (which would end the header and could add
another) is never sent: rendering it is a TemplateError, an internal process
error for its action (SPEC §6). The config refuses names crmhooks owns.

Header values are secrets (SPEC §3.1): one written in the config (an API key),
or holding a secret reference, is shown as ``***``. One made only of
placeholders carries record data, which the request shows anyway, and is shown
as rendered.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final
from zoneinfo import ZoneInfo

from crmhooks.errors import TemplateError
from crmhooks.templates.formatting import fix_surrogates, format_value
from crmhooks.templates.placeholders import Placeholder, RenderContext, Resolver, scan
from crmhooks.templates.segments import (
    REDACTED,
    Fill,
    SecretText,
    Segment,
    Slot,
    compile_segments,
)

# What would end a header line (and so could add a header), SPEC §6.
_LINE_BREAKERS: Final = ("\r", "\n", "\x00")


def header_value(value: Any, tz: ZoneInfo) -> str:
    """A value as (part of) a header value; TemplateError when it holds CR, LF or NUL.

    The message never holds the value: it may be a secret."""
    text = format_value(value, tz)
    for bad in _LINE_BREAKERS:
        if bad in text:
            raise TemplateError("a value holds CR, LF or NUL, which would end the header")
    return fix_surrogates(text)


class HeaderSet:
    """The headers of one webhook's requests: the request shape's own (``base``:
    Content-Type) and the template's, in config order. Constant values are made
    once; those with placeholders are rendered per request."""

    __slots__ = ("_items", "_name", "_secret", "const", "dynamic", "shown_const")

    def __init__(
        self,
        webhook_name: str,
        base: Mapping[str, str],
        templates: Mapping[str, str],
        resolver: Resolver,
        fields: set[Placeholder],
        problems: list[str],
    ) -> None:
        """Compile ``templates`` (name → template); each problem is added to ``problems``
        as ``headers.<name>: …``. A template header replaces a ``base`` one of the
        same name, in any case (the config allows that for Content-Type only)."""
        self._name = webhook_name
        overridden = {name.lower() for name in templates}
        items: list[tuple[str, str | Fill]] = [
            (name, value) for name, value in base.items() if name.lower() not in overridden
        ]
        secret: set[str] = set()
        for name, template in templates.items():
            try:
                if any(bad in template for bad in _LINE_BREAKERS):
                    raise TemplateError("holds CR, LF or NUL, which would end the header")
                spans = scan(template)
                segments = compile_segments(
                    template, spans, [header_value] * len(spans), resolver, fields
                )
            except TemplateError as exc:
                problems.append(f"headers.{name}: {exc}")
                continue
            if not all(isinstance(seg, Slot) for seg in segments):
                secret.add(name)  # written in the config, or holding a secret
            items.append(
                (name, _constant(segments) if _is_constant(segments) else Fill.of(segments))
            )
        self._items = tuple(items)
        self._secret = frozenset(secret)
        self.dynamic = any(not isinstance(value, str) for _, value in items)
        const: dict[str, str] = {}
        shown: dict[str, str] = {}
        for name, value in items:
            if isinstance(value, str):
                const[name] = value
                shown[name] = REDACTED if name in secret else value
            elif name in secret:
                shown[name] = REDACTED
        # Without placeholders (most webhooks): the same mappings for every request.
        self.const: Mapping[str, str] = MappingProxyType(const)
        self.shown_const: Mapping[str, str] | None = (
            MappingProxyType(shown) if secret and not self._dynamic_shown() else None
        )

    def _dynamic_shown(self) -> bool:
        return any(not isinstance(v, str) and n not in self._secret for n, v in self._items)

    def render(self, ctx: RenderContext) -> Mapping[str, str]:
        """The headers for one request; TemplateError naming a header that would break."""
        if not self.dynamic:
            return self.const
        out: dict[str, str] = {}
        for name, value in self._items:
            if isinstance(value, str):
                out[name] = value
                continue
            try:
                out[name] = value.render(ctx)
            except TemplateError as exc:
                raise TemplateError(f"webhook {self._name}: header {name}: {exc}") from None
        return out

    def shown(self, rendered: Mapping[str, str]) -> Mapping[str, str] | None:
        """``rendered`` with secret values as ``***``; None when none is secret."""
        if not self._secret:
            return None
        if self.shown_const is not None:
            return self.shown_const
        return {name: REDACTED if name in self._secret else v for name, v in rendered.items()}

    def __repr__(self) -> str:
        return f"HeaderSet({[name for name, _ in self._items]})"


def _is_constant(segments: tuple[Segment, ...]) -> bool:
    return not any(isinstance(seg, Slot) for seg in segments)


def _constant(segments: tuple[Segment, ...]) -> str:
    return "".join(seg.real if isinstance(seg, SecretText) else str(seg) for seg in segments)
