"""A compiled template: literal text and value slots, filled from a context per render."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, cast
from zoneinfo import ZoneInfo

from crmhooks.templates.formatting import Encoder, Verbatim
from crmhooks.templates.placeholders import (
    Placeholder,
    Reference,
    RenderContext,
    Resolver,
    Source,
    Span,
)

# What a secret is shown as (preview, results' request.url): SPEC §3.1.
REDACTED: Final = "***"
# Secrets are text: no date-time in them is converted, so any zone does.
_ANY_ZONE: Final = ZoneInfo("UTC")


@dataclass(frozen=True, slots=True)
class Slot:
    """Where a placeholder's value goes: read ``field`` from ``source``, encode it."""

    source: Source
    field: str
    encode: Encoder


@dataclass(frozen=True, slots=True)
class SecretText:
    """A secret reference's value, encoded once for where it sits (``real``), and
    what is shown in its place: ``***``, encoded the same way (``shown``).

    A secret is the same for every render of a config snapshot, so it is text
    made ready at compile time: rendering costs nothing more for it."""

    real: str
    shown: str = ""

    def __repr__(self) -> str:  # never the value
        return "SecretText(***)"


Segment = str | Slot | SecretText


def secret_text(ref: Reference, encoder: Encoder, resolver: Resolver) -> SecretText:
    """The secret ``ref`` stands for, escaped by ``encoder`` like any value of its
    context (XML text, JSON string, URL component, header value)."""
    value = resolver.secret(ref)
    return SecretText(encoder(Verbatim(value), _ANY_ZONE), encoder(Verbatim(REDACTED), _ANY_ZONE))


def compile_segments(
    text: str,
    spans: Sequence[Span],
    encoders: Sequence[Encoder],
    resolver: Resolver,
    fields: set[Placeholder],
    literal: Callable[[str], str] = str,
) -> tuple[Segment, ...]:
    """``text`` as segments: its literals through ``literal``, each placeholder a slot
    encoded by its encoder (its canonical name added to ``fields``), each secret
    reference its value encoded the same way."""
    segments: list[Segment] = []
    pos = 0
    for (start, end, ph), encoder in zip(spans, encoders, strict=True):
        if start > pos:
            segments.append(literal(text[pos:start]))
        if isinstance(ph, Reference):
            segments.append(secret_text(ph, encoder, resolver))
        else:
            canonical, source = resolver.resolve(ph)
            fields.add(canonical)
            segments.append(Slot(source, ph.field, encoder))
        pos = end
    if pos < len(text):
        segments.append(literal(text[pos:]))
    return merge_literals(segments)


def has_secrets(segments: Sequence[Segment]) -> bool:
    return any(isinstance(seg, SecretText) for seg in segments)


def as_literals(segments: Sequence[Segment], shown: bool) -> tuple[str | Slot, ...]:
    """Secrets as the literal text they are sent as, or (``shown``) shown as."""
    out: list[str | Slot] = [
        (seg.shown if shown else seg.real) if isinstance(seg, SecretText) else seg
        for seg in segments
    ]
    # merge_literals keeps the kinds it is given: no SecretText comes out.
    return cast(tuple[str | Slot, ...], merge_literals(out))


@dataclass(frozen=True, slots=True)
class Fill:
    """Segments made ready to render: the literals in place and a gap for each slot,
    filled by index (a copy and one store a slot, where a loop over the segments
    tested each; 1.74 -> 1.41 µs for the bench's JSON body)."""

    parts: tuple[str, ...]
    slots: tuple[tuple[int, Source, str, Encoder], ...]

    @classmethod
    def of(cls, segments: Sequence[Segment], *, shown: bool = False) -> Fill:
        """``segments`` ready to render as sent, or (``shown``) with secrets as ***."""
        plain = as_literals(segments, shown)
        return cls(
            tuple(seg if type(seg) is str else "" for seg in plain),
            tuple(
                (i, seg.source, seg.field, seg.encode)
                for i, seg in enumerate(plain)
                if isinstance(seg, Slot)
            ),
        )

    def render(self, ctx: RenderContext) -> str:
        if not self.slots:
            return "".join(self.parts)
        tz = ctx.time_zone
        parts = list(self.parts)
        for i, source, field_name, encode in self.slots:
            rec = source(ctx)
            parts[i] = encode(None if rec is None else rec.get(field_name), tz)
        return "".join(parts)


def merge_literals(segments: Sequence[Segment]) -> tuple[Segment, ...]:
    """Adjacent literals joined, empty ones dropped (secrets stay segments of their own)."""
    merged: list[Segment] = []
    for seg in segments:
        last = merged[-1] if merged else None
        if type(seg) is str and type(last) is str:
            merged[-1] = last + seg
        elif seg != "":
            merged.append(seg)
    return tuple(merged)
