"""``[[rules]]``: the checks of one decoded rule, and the Rule value it becomes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import time
from typing import Any

from crmhooks.config.context import Context
from crmhooks.config.criteria import parse_criteria
from crmhooks.config.problems import join
from crmhooks.config.shapes import RuleShape, ScheduledShape
from crmhooks.config.webhooks import check_module, check_org
from crmhooks.settings import AllOf, Rule, ScheduledSpec
from crmhooks.timers import parse_offset_ms, parse_time_of_day

_RULE_ID_RE = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True, slots=True)
class WebhookRef:
    """What a rule needs to know of a webhook it names (valid or not)."""

    module: str | None  # canonical; None when the webhook's module is wrong
    org: str | None


def build_rule(
    label: str,
    shape: RuleShape,
    bad_keys: set[str],
    webhooks: Mapping[str, WebhookRef],
    ctx: Context,
) -> Rule | None:
    """Every check of one rule; None if any failed. ``bad_keys`` failed decoding already."""
    before = len(ctx.problems)
    if not _RULE_ID_RE.fullmatch(shape.id):
        ctx.problems.add(join(label, "id"), "must be letters, digits, '_', '.' or '-'")
    org = check_org(label, shape.org, ctx)
    module = check_module(join(label, "module"), shape.module, ctx)
    if "trigger" not in bad_keys:
        check_fields_for_trigger(label, shape, ctx)
    criteria = (
        AllOf(())
        if shape.criteria is None
        else parse_criteria(join(label, "criteria"), shape.criteria, ctx.problems)
    )
    instant = None
    if isinstance(shape.instant, list):
        ctx.problems.add(join(label, "instant"), "at most one instant action (a webhook name)")
    elif shape.instant is not None:
        instant = shape.instant
        check_webhook_ref(join(label, "instant"), instant, module, org, webhooks, ctx)
    scheduled = _scheduled(label, shape.scheduled, module, org, webhooks, ctx)
    if len(ctx.problems) > before or module is None:
        return None
    return Rule(
        id=shape.id,
        module=module,
        trigger=shape.trigger,
        org=org,
        fields=shape.fields,
        repeat=shape.repeat,
        criteria=criteria,
        instant=instant,
        scheduled=scheduled,
    )


def check_fields_for_trigger(label: str, shape: RuleShape, ctx: Context) -> None:
    """field_update needs the fields it watches; no other trigger takes any."""
    path = join(label, "fields")
    if shape.trigger == "field_update" and not shape.fields:
        ctx.problems.add(path, "field_update needs at least one field")
    elif shape.trigger != "field_update" and shape.fields:
        ctx.problems.add(path, "only the field_update trigger takes fields")


def check_webhook_ref(
    path: str,
    name: str,
    module: str | None,
    org: str | None,
    webhooks: Mapping[str, WebhookRef],
    ctx: Context,
) -> None:
    """The webhook exists, is for the rule's module, and may receive the rule's records."""
    ref = webhooks.get(name)
    if ref is None:
        ctx.problems.add(path, f"unknown webhook {name!r}")
        return
    if module is not None and ref.module is not None and ref.module != module:
        ctx.problems.add(path, f"webhook {name!r} is for {ref.module}, the rule for {module}")
    if ref.org is not None and ref.org != org:
        # An org-less rule fires for every organisation; an org's webhook (its
        # URL, its API keys) must never receive another org's records.
        ctx.problems.add(path, f"webhook {name!r} belongs to organisation {ref.org!r}")


def _scheduled(
    label: str,
    shapes: tuple[ScheduledShape, ...],
    module: str | None,
    org: str | None,
    webhooks: Mapping[str, WebhookRef],
    ctx: Context,
) -> tuple[ScheduledSpec, ...]:
    specs: list[ScheduledSpec] = []
    limit = ctx.limits.scheduled_per_rule
    for i, shape in enumerate(shapes):
        p = f"{join(label, 'scheduled')}[{i}]"
        if i >= limit:
            ctx.problems.add(p, f"at most {limit} scheduled actions")
            continue
        check_webhook_ref(join(p, "webhook"), shape.webhook, module, org, webhooks, ctx)
        offset_ms = 0
        if shape.offset is not None:
            try:
                offset_ms = parse_offset_ms(shape.offset)
            except ValueError as exc:
                ctx.problems.add(join(p, "offset"), str(exc))
        at = _time_of_day(join(p, "at"), shape.at, ctx)
        specs.append(ScheduledSpec(shape.webhook, shape.relative_to, offset_ms, at))
    return tuple(specs)


def _time_of_day(path: str, value: Any, ctx: Context) -> time | None:
    if value is None:
        return None
    if isinstance(value, time):  # TOML local time: at = 09:00:00
        return value
    if isinstance(value, str):
        try:
            return parse_time_of_day(value)
        except ValueError as exc:
            ctx.problems.add(path, str(exc))
            return None
    ctx.problems.add(path, 'must be a time of day "HH:MM"')
    return None
