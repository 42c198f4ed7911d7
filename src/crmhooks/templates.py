"""Webhook templates: placeholders resolved from an event and escaped for where they land."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from crmhooks.config import Webhook
from crmhooks.modules import ModuleCatalog


@dataclass(frozen=True, slots=True)
class Placeholder:
    """``${Namespace.Field Name}`` as written in a template."""

    namespace: str
    field: str


@dataclass(frozen=True, slots=True)
class RenderContext:
    """What a template is rendered from: the latest version of a record and its neighbours."""

    module: str  # canonical module name of the record (e.g. "Potentials")
    record: Mapping[str, Any]
    related: Mapping[str, Mapping[str, Any]]  # canonical module name → record
    user: Mapping[str, Any] | None
    organization: Mapping[str, Any] | None
    time_zone: ZoneInfo


@dataclass(frozen=True, slots=True)
class RenderedRequest:
    """An HTTP request ready to send, and the same with secrets shown as ``***``."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    redacted_url: str

    def __repr__(self) -> str:
        return f"RenderedRequest({self.method} {self.redacted_url}, {len(self.body)} bytes)"


class CompiledWebhook:
    """A webhook whose templates are parsed once, at config time, and rendered per action."""

    def __init__(self, webhook: Webhook, catalog: ModuleCatalog) -> None:
        """Parse every template of ``webhook``; TemplateError (naming the part) if invalid."""
        raise NotImplementedError

    @property
    def crm_fields(self) -> frozenset[Placeholder]:
        """Distinct CRM fields the webhook sends (the seed allows at most 10)."""
        raise NotImplementedError

    def render(self, ctx: RenderContext) -> RenderedRequest:
        """The request for one action; TemplateError if a header or URL would break."""
        raise NotImplementedError
