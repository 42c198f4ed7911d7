"""One validation pass over a config file's mapping, or over one organisation's document.

Each table and each array item is decoded on its own (crmhooks.config.decoding),
so one bad item never hides the errors of the others; then the named checks
of crmhooks.config.sections, .webhooks and .rules run on what decoded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from crmhooks.config import sections
from crmhooks.config.context import Context
from crmhooks.config.decoding import decode, unknown_key
from crmhooks.config.problems import Position, Problems, join
from crmhooks.config.rules import WebhookRef, build_rule
from crmhooks.config.shapes import (
    DOCUMENT_KEYS,
    FILE_KEYS,
    AdminShape,
    AlertsShape,
    DeliveryShape,
    KafkaShape,
    LimitsShape,
    LogShape,
    OrgShape,
    QuotaShape,
    RuleShape,
    StoreShape,
    WebhookShape,
)
from crmhooks.config.webhooks import build_webhook
from crmhooks.modules import ModuleCatalog
from crmhooks.settings import (
    AdminSettings,
    AlertSettings,
    Config,
    DeliverySettings,
    KafkaSettings,
    Limits,
    LogSettings,
    OrgSettings,
    QuotaSettings,
    Rule,
    StoreSettings,
    Webhook,
)

S = TypeVar("S", bound=msgspec.Struct)
T = TypeVar("T")

# Errors are listed in this order of sections (then of items within one).
_SECTIONS = (
    "config",
    "custom_modules",
    "kafka",
    "store",
    "delivery",
    "quota",
    "limits",
    "admin",
    "log",
    "org",
    "orgs",
    "webhooks",
    "rules",
    "alerts",
)
_RANK = {name: i for i, name in enumerate(_SECTIONS)}


@dataclass(slots=True)
class Draft:
    """What a pass produced: valid values, and where each valid webhook is named."""

    config: Config
    # name → (item label, position): the template check names its errors so.
    webhook_labels: dict[str, tuple[str, Position]] = field(default_factory=dict)


def validate_file(raw: Any, env: Mapping[str, str], ctx: Context) -> Draft:
    """Check a whole config file; ``ctx.problems`` gets every error."""
    problems = ctx.problems
    if not isinstance(raw, Mapping):
        problems.add("config", "must be a table")
        return Draft(Config())
    for key in raw:
        if key not in FILE_KEYS:
            unknown_key(problems, "", str(key), FILE_KEYS)
    problems.position = (_RANK["custom_modules"], 0)
    custom = sections.custom_modules(raw.get("custom_modules", []), problems)
    ctx.catalog = ModuleCatalog(custom)
    ctx.limits = _table(raw, "limits", LimitsShape, ctx, sections.limits, Limits)
    kafka = _table(
        raw, "kafka", KafkaShape, ctx, lambda s: sections.kafka(s, env, ctx), KafkaSettings
    )
    store = _table(
        raw, "store", StoreShape, ctx, lambda s: sections.store(s, env, problems), StoreSettings
    )
    delivery = _table(
        raw,
        "delivery",
        DeliveryShape,
        ctx,
        lambda s: sections.delivery(s, problems),
        DeliverySettings,
    )
    quota = _table(raw, "quota", QuotaShape, ctx, sections.quota, QuotaSettings)
    admin = _table(
        raw, "admin", AdminShape, ctx, lambda s: sections.admin(s, problems), AdminSettings
    )
    log = _table(raw, "log", LogShape, ctx, lambda s: sections.log(s, problems), LogSettings)
    orgs = _orgs(raw.get("orgs", []), ctx)
    refs: dict[str, WebhookRef] = {}
    draft = Draft(Config())
    webhooks = _webhooks(raw.get("webhooks", []), refs, draft, ctx)
    rules = _rules(raw.get("rules", []), refs, set(), ctx)
    alerts = _alerts(raw, refs, ctx)
    draft.config = Config(
        kafka=kafka,
        store=store,
        delivery=delivery,
        quota=quota,
        orgs=orgs,
        webhooks=webhooks,
        rules=rules,
        custom_modules=custom,
        limits=ctx.limits,
        admin=admin,
        log=log,
        alerts=alerts,
    )
    return draft


def _table(
    raw: Mapping[str, Any],
    key: str,
    shape: type[S],
    ctx: Context,
    build: Callable[[S], T],
    default: Callable[[], T],
) -> T:
    """A single table: decoded, checked and built; its defaults when it cannot be."""
    ctx.problems.position = (_RANK[key], 0)
    decoded, _ = decode(raw.get(key, {}), shape, key, ctx.problems)
    return default() if decoded is None else build(decoded)


def items(value: Any, key: str, problems: Problems) -> list[tuple[int, Mapping[str, Any]]]:
    """The tables of an array of tables (``[[key]]``), with their indexes."""
    problems.position = (_RANK[key], 0)
    if not isinstance(value, list):
        problems.add(key, f"must be an array of tables ([[{key}]])")
        return []
    found: list[tuple[int, Mapping[str, Any]]] = []
    for i, item in enumerate(value):
        if isinstance(item, Mapping):
            found.append((i, item))
        else:
            problems.position = (_RANK[key], i)
            problems.add(f"{key}[{i}]", "must be a table")
    return found


def label_of(key: str, i: int, item: Mapping[str, Any], name_key: str) -> str:
    """``webhooks[CreatorCommission]`` when the item has a usable name, else ``webhooks[2]``."""
    name = item.get(name_key)
    return f"{key}[{name}]" if isinstance(name, str) and name else f"{key}[{i}]"


def _orgs(value: Any, ctx: Context) -> dict[str, OrgSettings]:
    """Valid organisations by id; ``ctx.org_ids`` gets every declared id (valid or not)."""
    orgs: dict[str, OrgSettings] = {}
    declared: dict[str, object] = {}
    for i, item in items(value, "orgs", ctx.problems):
        ctx.problems.position = (_RANK["orgs"], i)
        label = label_of("orgs", i, item, "id")
        org_id = item.get("id")
        if isinstance(org_id, str) and org_id:
            if org_id in declared:
                ctx.problems.add(join(label, "id"), f"duplicate organisation {org_id!r}")
                continue
            declared[org_id] = item
        org = org_settings(label, item, ctx)
        if org is not None:
            orgs[org.id] = org
    ctx.org_ids = declared
    return orgs


def org_settings(label: str, item: Any, ctx: Context) -> OrgSettings | None:
    """One organisation; None when it has errors (each named)."""
    before = len(ctx.problems)
    shape, bad = decode(item, OrgShape, label, ctx.problems)
    if shape is None:
        return None
    if "time_zone" not in bad:
        check_time_zone(join(label, "time_zone"), shape.time_zone, ctx.problems)
    if len(ctx.problems) > before:
        return None
    return OrgSettings(id=shape.id, users=shape.users, time_zone=shape.time_zone)


def check_time_zone(path: str, zone: str, problems: Problems) -> None:
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        problems.add(path, f"unknown IANA time zone {zone!r}")


def _webhooks(
    value: Any, refs: dict[str, WebhookRef], draft: Draft, ctx: Context
) -> dict[str, Webhook]:
    """Valid webhooks by name; ``refs`` gets every named one, valid or not, for rule checks."""
    webhooks: dict[str, Webhook] = {}
    for i, item in items(value, "webhooks", ctx.problems):
        position = (_RANK["webhooks"], i)
        ctx.problems.position = position
        label = label_of("webhooks", i, item, "name")
        name = item.get("name")
        if isinstance(name, str) and name:
            if name in refs:
                ctx.problems.add(join(label, "name"), f"duplicate webhook name {name!r}")
                continue
            module = item.get("module")
            org = item.get("org")
            refs[name] = WebhookRef(
                module=ctx.catalog.canonical(module) if isinstance(module, str) else None,
                org=ctx.document_org or (org if isinstance(org, str) else None),
            )
        before = len(ctx.problems)
        shape, _ = decode(item, WebhookShape, label, ctx.problems)
        if shape is None:
            continue
        hook = build_webhook(label, shape, ctx)
        if hook is not None and len(ctx.problems) == before:
            webhooks[hook.name] = hook
            draft.webhook_labels[hook.name] = (label, position)
    return webhooks


def _rules(
    value: Any, refs: Mapping[str, WebhookRef], taken: set[str], ctx: Context
) -> tuple[Rule, ...]:
    """Valid rules in config order; ``taken``: ids already used elsewhere (the file's)."""
    rules: list[Rule] = []
    seen = set(taken)
    for i, item in items(value, "rules", ctx.problems):
        ctx.problems.position = (_RANK["rules"], i)
        label = label_of("rules", i, item, "id")
        before = len(ctx.problems)
        shape, bad = decode(item, RuleShape, label, ctx.problems)
        rule = None if shape is None else build_rule(label, shape, bad, refs, ctx)
        rule_id = item.get("id")
        if isinstance(rule_id, str) and rule_id:
            if rule_id in seen:
                ctx.problems.add(join(label, "id"), f"duplicate rule id {rule_id!r}")
            seen.add(rule_id)
        if rule is not None and len(ctx.problems) == before:
            rules.append(rule)
    return tuple(rules)


def _alerts(raw: Mapping[str, Any], refs: Mapping[str, WebhookRef], ctx: Context) -> AlertSettings:
    return _table(
        raw, "alerts", AlertsShape, ctx, lambda s: check_alerts(s.webhook, refs, ctx), AlertSettings
    )


def check_alerts(webhook: str, refs: Mapping[str, WebhookRef], ctx: Context) -> AlertSettings:
    """Alerts go to a declared webhook without organisation ("" = no alerts)."""
    if not webhook:
        return AlertSettings()
    ref = refs.get(webhook)
    if ref is None:
        ctx.problems.add("alerts.webhook", f"unknown webhook {webhook!r}")
    elif ref.org is not None:
        # Alerts tell the operator about every organisation: never to one org's receiver.
        ctx.problems.add(
            "alerts.webhook",
            f"webhook {webhook!r} belongs to organisation {ref.org!r}; "
            "alerts need a webhook without org",
        )
    return AlertSettings(webhook=webhook)


@dataclass(slots=True)
class DocumentDraft:
    org: OrgSettings | None
    webhooks: dict[str, Webhook]
    rules: tuple[Rule, ...]
    webhook_labels: dict[str, tuple[str, Position]]


def validate_document(raw: Any, base: Config, org_id: str | None, ctx: Context) -> DocumentDraft:
    """Check one organisation's document against the file's config ``base`` (SPEC §3.2)."""
    problems = ctx.problems
    ctx.catalog = base.catalog
    ctx.limits = base.limits
    empty = DocumentDraft(None, {}, (), {})
    if not isinstance(raw, Mapping):
        problems.add("document", "must be an object with org, webhooks and rules")
        return empty
    for key in raw:
        if key not in DOCUMENT_KEYS:
            unknown_key(problems, "", str(key), DOCUMENT_KEYS)
    problems.position = (_RANK["org"], 0)
    if "org" not in raw:
        problems.add("org", "required")
        return empty
    org = org_settings("org", raw["org"], ctx)
    written = raw["org"].get("id") if isinstance(raw["org"], Mapping) else None
    if isinstance(written, str) and written and org_id is not None and written != org_id:
        problems.add("org.id", f"the document is keyed {org_id!r}")
    document_org = org_id or (written if isinstance(written, str) and written else None)
    if document_org is None:
        return empty
    ctx.document_org = document_org
    # The file's organisation-less webhooks and rules still apply (SPEC §3.2):
    # the document's rules may use those webhooks, and may not reuse their names.
    shared = {n: w for n, w in base.webhooks.items() if w.org is None}
    refs: dict[str, WebhookRef] = {}
    draft = Draft(Config())
    webhooks = _webhooks(raw.get("webhooks", []), refs, draft, ctx)
    for name in [n for n in refs if n in shared]:
        label, position = draft.webhook_labels.get(name, (f"webhooks[{name}]", None))
        problems.add(
            join(label, "name"),
            "the config file has an organisation-less webhook so named",
            position,
        )
        webhooks.pop(name, None)
    for name, hook in shared.items():
        refs.setdefault(name, WebhookRef(hook.module, None))
    taken = {r.id for r in base.rules if r.org is None}
    rules = _rules(raw.get("rules", []), refs, taken, ctx)
    return DocumentDraft(org, webhooks, rules, draft.webhook_labels)
