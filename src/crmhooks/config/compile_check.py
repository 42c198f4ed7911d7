"""The template check, run after validation: every valid webhook compiles, ≤ N CRM fields.

The only part of crmhooks.config that uses crmhooks.templates (which imports
crmhooks.settings, never crmhooks.config: no import cycle).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace

from crmhooks.config.problems import Position, Problems
from crmhooks.config.references import REFERENCE_RE
from crmhooks.errors import TemplateError
from crmhooks.modules import ModuleCatalog
from crmhooks.settings import Limits, Webhook
from crmhooks.templates import CompiledWebhook

# templates names the part of a webhook first ("url: ...", "body.template: ...").
_PART_RE = re.compile(r"(url|body|entity_params|custom_params|headers)[.:]")
# Bridges until crmhooks.templates compiles secret references and headers itself:
# a reference is checked as an organisation placeholder in its place (escaped
# for its context, as a secret value will be, and not counted as a CRM field),
# and each header value as one more entity parameter.
_SECRET_FIELD = "crmhooks secret reference "
_HEADER_PARAM = "crmhooks header:"
_ORG = "Organization"  # the canonical organisation namespace of crm_fields


def check_templates(
    webhooks: Iterable[tuple[Webhook, str, Position]],
    catalog: ModuleCatalog,
    limits: Limits,
    problems: Problems,
) -> None:
    """Name every template problem of each (webhook, its item label, its position)."""
    for hook, label, position in webhooks:
        _check(hook, label, position, catalog, limits, problems)


def _check(
    hook: Webhook,
    label: str,
    position: Position,
    catalog: ModuleCatalog,
    limits: Limits,
    problems: Problems,
) -> None:
    try:
        compiled = CompiledWebhook(_checkable(hook), catalog)
    except TemplateError as exc:
        for message in exc.problems:
            message = message.replace(f"entity_params.{_HEADER_PARAM}", "headers.")
            if _PART_RE.match(message):
                part, _, rest = message.partition(": ")
                problems.add(f"{label}.{part}", rest, position)
            else:
                problems.add(label, message, position)
        return
    fields = [
        f
        for f in compiled.crm_fields
        if not (f.namespace == _ORG and f.field.startswith(_SECRET_FIELD))
    ]
    if len(fields) > limits.crm_fields_per_webhook:
        problems.add(
            label,
            f"sends {len(fields)} distinct CRM fields; at most {limits.crm_fields_per_webhook}",
            position,
        )


def _checkable(hook: Webhook) -> Webhook:
    """``hook`` as crmhooks.templates compiles today: references masked, headers as params."""

    def mask(text: str) -> str:
        return REFERENCE_RE.sub(lambda m: f"${{{_ORG}.{_SECRET_FIELD}{m.group(0)[2:-1]}}}", text)

    entity = {name: mask(text) for name, text in hook.entity_params.items()}
    entity.update({f"{_HEADER_PARAM}{n}": mask(v) for n, v in hook.headers.items()})
    body = hook.body and replace(hook.body, template=mask(hook.body.template))
    return replace(hook, url=mask(hook.url), entity_params=entity, body=body)
