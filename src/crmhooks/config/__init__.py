"""The configuration: a TOML file (or an organisation's document) decoded and validated.

    load_config(path, env)            read + config_from_mapping
    config_from_mapping(raw, env)     decode → named checks → template check → Config
    decode_org_document(raw, base)    the same for one config-topic document (SPEC §3.2)
    org_document_in_part(raw, base)   its valid part and every error
    parse_document(raw)               a document's JSON (or TOML) text as data
    config_warnings(config)           what check-config warns about (valid, but risky)

Every error names its item (``webhooks[CreatorCommission].url: longer than 200
characters``) and ConfigError lists them all. The values are the frozen
dataclasses of crmhooks.settings, re-exported here.

Modules: ``shapes`` (the raw shapes, declared for msgspec), ``decoding`` (one
table at a time, every error named), ``sections`` / ``webhooks`` / ``rules`` /
``criteria`` (the checks no type can express), ``references`` (``${env:}`` and
``${file:}``), ``network`` (URLs, hosts, CIDRs), ``files`` (TLS files),
``loader`` (one pass over a file or a document), ``compile_check`` (templates).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

import msgspec

from crmhooks.config.compile_check import check_templates
from crmhooks.config.context import Context
from crmhooks.config.criteria import LIST_OPS, NO_VALUE_OPS, OPERATORS, SCALAR_OPS, TEXT_OPS
from crmhooks.config.files import FileChecks
from crmhooks.config.loader import validate_document, validate_file
from crmhooks.config.problems import Problems
from crmhooks.config.references import References
from crmhooks.errors import ConfigError
from crmhooks.settings import (
    AdminSettings,
    AlertSettings,
    AllOf,
    AnyOf,
    AuthSpec,
    BasicAuth,
    BearerAuth,
    BodyFormat,
    BodySpec,
    CompressionType,
    Condition,
    Config,
    Criteria,
    DeliverySettings,
    KafkaSettings,
    Limits,
    LogFormat,
    LogLevel,
    LogSettings,
    Method,
    Network,
    Not,
    OAuth2Auth,
    OrgDocument,
    OrgSettings,
    QuotaSettings,
    Repeat,
    Rule,
    SaslMechanism,
    ScheduledSpec,
    SecurityProtocol,
    StoreSettings,
    TlsSpec,
    Trigger,
    Webhook,
)

__all__ = [
    "LIST_OPS",
    "NO_VALUE_OPS",
    "OPERATORS",
    "REPEATS",
    "SCALAR_OPS",
    "TEXT_OPS",
    "TRIGGERS",
    "AdminSettings",
    "AlertSettings",
    "AllOf",
    "AnyOf",
    "AuthSpec",
    "BasicAuth",
    "BearerAuth",
    "BodyFormat",
    "BodySpec",
    "CompressionType",
    "Condition",
    "Config",
    "ConfigError",
    "Criteria",
    "DeliverySettings",
    "KafkaSettings",
    "Limits",
    "LogFormat",
    "LogLevel",
    "LogSettings",
    "Method",
    "Network",
    "Not",
    "OAuth2Auth",
    "OrgDocument",
    "OrgSettings",
    "QuotaSettings",
    "Repeat",
    "Rule",
    "SaslMechanism",
    "ScheduledSpec",
    "SecurityProtocol",
    "StoreSettings",
    "TlsSpec",
    "Trigger",
    "Webhook",
    "config_from_mapping",
    "config_warnings",
    "decode_org_document",
    "load_config",
    "org_document_in_part",
    "parse_document",
]

TRIGGERS: frozenset[str] = frozenset(get_args(Trigger))
REPEATS: frozenset[str] = frozenset(get_args(Repeat))


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate a config file; ConfigError lists every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return config_from_mapping(raw, os.environ if env is None else env)


def config_from_mapping(raw: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    """Build and validate a Config from a parsed TOML mapping (see SPEC §3).

    Every problem is collected; ConfigError lists them all, each naming its item.
    ``CRMHOOKS_BOOTSTRAP_SERVERS`` and ``CRMHOOKS_STORE_PATH`` in ``env`` override
    the file; ``${env:NAME}`` is read from ``env``, ``${file:PATH}`` from the file.
    """
    ctx = _context(env)
    draft = validate_file(raw, env, ctx)
    config = draft.config
    check_templates(
        ((config.webhooks[name], *where) for name, where in draft.webhook_labels.items()),
        config.catalog,
        config.limits,
        ctx.problems,
    )
    if ctx.problems:
        raise ConfigError(ctx.problems.listed())
    return config


def decode_org_document(
    raw: Mapping[str, Any] | bytes | str,
    base: Config | None = None,
    org_id: str | None = None,
) -> OrgDocument:
    """One organisation's config-topic document (SPEC §3.2), validated as the file's items.

    ``raw``: a parsed mapping, or the document as JSON (or TOML) text or bytes.
    ``base``: the file's config (its custom modules, limits, and organisation-less
    webhooks, which the document's rules may use). ``org_id``: the record's key;
    the document's ``org.id`` must equal it. Every webhook and rule belongs to
    the document's organisation: one naming another is an error. ``${env:}`` and
    ``${file:}`` are errors in a document (``references.NOT_IN_DOCUMENTS``).
    ConfigError lists every problem.
    """
    document, errors = org_document_in_part(raw, base, org_id)
    if errors or document is None:
        raise ConfigError(list(errors) or ["org: required"])
    return document


def org_document_in_part(
    raw: Mapping[str, Any] | bytes | str,
    base: Config | None = None,
    org_id: str | None = None,
) -> tuple[OrgDocument | None, tuple[str, ...]]:
    """``decode_org_document``'s checks, returning what is valid and every error.

    The valid part: the organisation (None when it is not valid: nothing is), the
    webhooks that pass every check, and the rules that pass and whose webhooks all
    do. For a document accepted under an earlier config file that the file in force
    no longer fully accepts (a custom module or an organisation-less webhook gone,
    lower limits): the processor keeps what still holds rather than nothing.
    """
    problems = Problems()
    try:
        mapping = _parse_document(raw) if isinstance(raw, bytes | str) else raw
    except ConfigError as exc:
        return None, exc.errors
    ctx = Context(problems, References({}, problems, readable=False), FileChecks(problems))
    base = base or Config()
    draft = validate_document(mapping, base, org_id, ctx)
    webhooks = dict(draft.webhooks)
    for name, (label, position) in draft.webhook_labels.items():
        hook = webhooks.get(name)
        if hook is None:
            continue
        before = len(problems)
        check_templates([(hook, label, position)], ctx.catalog, ctx.limits, problems)
        if len(problems) > before:
            del webhooks[name]
    if draft.org is None:
        return None, tuple(problems.listed() or ["org: required"])
    shared = {n for n, w in base.webhooks.items() if w.org is None}
    rules = tuple(
        r for r in draft.rules if all(n in webhooks or n in shared for n in r.webhook_names)
    )
    return OrgDocument(org=draft.org, webhooks=webhooks, rules=rules), tuple(problems.listed())


def parse_document(raw: bytes | str) -> Any:
    """A document's text (JSON, or TOML for ``config push``) as data; ConfigError if not."""
    return _parse_document(raw)


def _parse_document(raw: bytes | str) -> Any:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise ConfigError(["document: not UTF-8 text"]) from None
    if text.lstrip().startswith("{"):
        try:
            return msgspec.json.decode(text)
        except msgspec.DecodeError as exc:
            raise ConfigError([f"document: not valid JSON: {exc}"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"document: not valid JSON or TOML: {exc}"]) from None


def _context(env: Mapping[str, str], problems: Problems | None = None) -> Context:
    if problems is None:
        problems = Problems()
    return Context(problems, References(env, problems), FileChecks(problems))


def config_warnings(config: Config) -> tuple[str, ...]:
    """What a valid config does that an operator should know about (check-config prints it)."""
    return tuple(
        f"delivery.allowed_networks[{i}]: {net} is let through the SSRF guard"
        for i, net in enumerate(config.delivery.allowed_networks)
    )
