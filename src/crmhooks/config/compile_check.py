"""The template check, run after validation: every valid webhook compiles, ≤ N CRM fields.

The only part of crmhooks.config that uses crmhooks.templates (which imports
crmhooks.settings, never crmhooks.config: no import cycle).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from crmhooks.config.problems import Position, Problems
from crmhooks.errors import TemplateError
from crmhooks.modules import ModuleCatalog
from crmhooks.settings import Limits, Webhook
from crmhooks.templates import CompiledWebhook

# templates names the part of a webhook first ("url: ...", "body.template: ...",
# "headers.X-Api-Key: ...").
_PART_RE = re.compile(r"(url|body|entity_params|custom_params|headers)[.:]")


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
        compiled = CompiledWebhook(hook, catalog)
    except TemplateError as exc:
        for message in exc.problems:
            if _PART_RE.match(message):
                part, _, rest = message.partition(": ")
                problems.add(f"{label}.{part}", rest, position)
            else:
                problems.add(label, message, position)
        return
    # Secret references are not CRM fields: templates does not count them.
    fields = len(compiled.crm_fields)
    if fields > limits.crm_fields_per_webhook:
        problems.add(
            label,
            f"sends {fields} distinct CRM fields; at most {limits.crm_fields_per_webhook}",
            position,
        )
