"""The TOML configuration: loaded from a mapping, validated, every error naming its item."""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from crmhooks.errors import ConfigError, TemplateError
from crmhooks.modules import UNSUPPORTED_MODULES, ModuleCatalog
from crmhooks.timers import parse_offset_ms, parse_time_of_day

Method = Literal["POST", "GET"]
BodyFormat = Literal["xml", "json"]
Trigger = Literal["create", "edit", "create_or_edit", "field_update", "delete"]
Repeat = Literal["once", "every"]

TRIGGERS: frozenset[str] = frozenset({"create", "edit", "create_or_edit", "field_update", "delete"})
REPEATS: frozenset[str] = frozenset({"once", "every"})

# Criteria operators (SPEC §3), grouped by the shape of their ``value``.
TEXT_OPS: frozenset[str] = frozenset({"contains", "not_contains", "starts_with", "ends_with"})
SCALAR_OPS: frozenset[str] = frozenset({"is", "is_not", "eq", "ne", "lt", "le", "gt", "ge"})
LIST_OPS: frozenset[str] = frozenset({"in", "not_in"})
NO_VALUE_OPS: frozenset[str] = frozenset({"is_empty", "is_not_empty", "changed"})
OPERATORS: frozenset[str] = (
    TEXT_OPS | SCALAR_OPS | LIST_OPS | NO_VALUE_OPS | frozenset({"between", "changed_to"})
)


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "crmhooks"
    events_topic: str = "crm.record-events"
    results_topic: str = "crm.webhook-results"
    dlq_topic: str = "crm.webhook-dlq"
    # Partition count used when crmhooks creates a missing topic (3: room to scale
    # out to three processes without re-partitioning; organisations are the key).
    partitions: int = 3
    max_event_bytes: int = 1 << 20
    # How long the group waits for a silent (crashed) member before handing its
    # partitions to the others: aiokafka's default, 10 s.
    session_timeout_ms: int = 10_000
    # Compacted topic holding the store's changes, so a partition's timers, quota
    # counts and rule state follow it to another machine. "" = "<group_id>.changelog".
    changelog_topic: str = ""
    # What crmhooks produces (results, dead letters, changelog): none | gzip | snappy |
    # lz4 | zstd. None by default: each delivery's records are produced on the hot
    # path (compressing costs CPU there); a topic or broker can compress on its own.
    compression_type: str = "none"
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str = ""  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)  # a secret: in no repr
    ssl_ca_file: str = ""  # PEM; "" = the system's CAs
    ssl_cert_file: str = ""  # PEM client certificate (mutual TLS)
    ssl_key_file: str = ""
    config_topic: str = ""

    @property
    def changelog(self) -> str:
        return self.changelog_topic or f"{self.group_id}.changelog"


@dataclass(frozen=True, slots=True)
class StoreSettings:
    path: str = "var/crmhooks.db"
    # How long a finished action's id is remembered, so that reprocessing or
    # replaying its event never sends it again: a week covers any replay an
    # operator makes after a night's incident.
    finished_retention_s: float = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    connect_timeout_s: float = 5.0
    total_timeout_s: float = 15.0
    max_in_flight: int = 512
    max_in_flight_per_host: int = 16
    retry_delays_s: tuple[float, ...] = (900.0,)
    suspend_after_failed_actions: int = 1
    allow_private_networks: bool = False
    # A newly computed due time further in the past than this is skipped (past_due).
    past_due_grace_s: float = 3600.0
    # SIGTERM: how long in-flight requests may take to finish before we stop anyway.
    shutdown_grace_s: float = 10.0


@dataclass(frozen=True, slots=True)
class QuotaSettings:
    daily_limit: int = 2500
    per_user: int = 50


@dataclass(frozen=True, slots=True)
class Limits:
    """The seed's limits on webhooks and rules; ``[limits]`` may change them.

    SPEC, the seed table: "limits are defaults that config may raise". Each default is
    the number the seed's help page states.
    """

    name_chars: int = 50
    description_chars: int = 200
    url_chars: int = 200
    entity_param_chars: int = 3000
    crm_fields_per_webhook: int = 10
    scheduled_per_rule: int = 5


@dataclass(frozen=True, slots=True)
class OrgSettings:
    id: str
    users: int = 1
    time_zone: str = "UTC"


@functools.lru_cache(maxsize=4096)
def _default_org(org_id: str) -> OrgSettings:
    """An organisation not in the config (asked for up to three times an action)."""
    return OrgSettings(id=org_id)


@dataclass(frozen=True, slots=True)
class BodySpec:
    """The user-defined parameter: an XML or JSON document with placeholders."""

    format: BodyFormat
    template: str
    param: str | None = None


@dataclass(frozen=True, slots=True)
class Webhook:
    name: str
    url: str
    module: str
    method: Method = "POST"
    description: str = ""
    org: str | None = None
    secret: str | None = None
    body: BodySpec | None = None
    entity_params: Mapping[str, str] = field(default_factory=dict)
    custom_params: Mapping[str, str] = field(default_factory=dict)
    # Names of custom params whose value came from ${env:...}: shown as *** everywhere.
    secret_params: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Condition:
    field: str
    op: str
    # A str, int, float or bool; a 2-tuple for ``between``, a tuple for ``in``/
    # ``not_in``; None for ``is_empty``/``is_not_empty``/``changed``. TOML dates
    # and datetimes are stored as ISO strings (compared as dates by crmhooks.rules).
    value: Any = None


@dataclass(frozen=True, slots=True)
class AllOf:
    items: tuple[Criteria, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    items: tuple[Criteria, ...]


@dataclass(frozen=True, slots=True)
class Not:
    item: Criteria


Criteria = Condition | AllOf | AnyOf | Not


@dataclass(frozen=True, slots=True)
class ScheduledSpec:
    webhook: str
    relative_to: str = "trigger"
    offset_ms: int = 0
    at: time | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """A workflow rule. ``repeat`` defaults to "every" (each matching event fires)."""

    id: str
    module: str
    trigger: Trigger = "create_or_edit"
    org: str | None = None
    fields: tuple[str, ...] = ()
    repeat: Repeat = "every"
    criteria: Criteria = AllOf(())
    instant: str | None = None
    scheduled: tuple[ScheduledSpec, ...] = ()

    @property
    def webhook_names(self) -> tuple[str, ...]:
        """The webhooks of the rule in config order: the instant one, then scheduled ones."""
        head = () if self.instant is None else (self.instant,)
        return head + tuple(s.webhook for s in self.scheduled)


@dataclass(frozen=True, slots=True)
class Config:
    kafka: KafkaSettings = KafkaSettings()
    store: StoreSettings = StoreSettings()
    delivery: DeliverySettings = DeliverySettings()
    quota: QuotaSettings = QuotaSettings()
    orgs: Mapping[str, OrgSettings] = field(default_factory=dict)
    webhooks: Mapping[str, Webhook] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    custom_modules: tuple[str, ...] = ()
    limits: Limits = Limits()

    def org(self, org_id: str) -> OrgSettings:
        """Settings of an organisation; one not in the config gets the defaults."""
        found = self.orgs.get(org_id)
        return found if found is not None else _default_org(org_id)

    @property
    def catalog(self) -> ModuleCatalog:
        """The modules this config knows: the standard ones and ``custom_modules``."""
        return ModuleCatalog(self.custom_modules)


# --- loading -------------------------------------------------------------------


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate a config file; ConfigError lists every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return config_from_mapping(raw, os.environ if env is None else env)


def config_from_mapping(raw: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    """Build and validate a Config from a parsed TOML mapping (see SPEC §3).

    Every problem is collected; ConfigError lists them all, each naming its item
    (``webhooks[CreatorCommission].url: longer than 200 characters``).
    ``CRMHOOKS_BOOTSTRAP_SERVERS`` and ``CRMHOOKS_STORE_PATH`` in ``env`` override
    the file; ``${env:NAME}`` in custom parameters and secrets is read from ``env``.
    """
    return _Loader(env).load(raw)


# --- validation helpers --------------------------------------------------------

_WEBHOOK_NAME_RE = re.compile(r"[A-Za-z0-9]+")
_RULE_ID_RE = re.compile(r"[A-Za-z0-9_.-]+")
_PARAM_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_REF_RE = re.compile(r"\$\{env:([^}]*)\}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_MARK = "${env:"
# Control characters would split headers or request lines (SPEC §6: CR/LF/NUL).
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_SECRET_PREFIX = "whsec_"
# A ${Module.Field} placeholder (anything but ${env:...}) written in a custom param.
_PLACEHOLDER_IN_LITERAL_RE = re.compile(r"\$\{(?!env:)[^}]*\}")
_TEMPLATE_PART_RE = re.compile(r"(url|body|entity_params|custom_params)[.:]")

_TOP_KEYS = (
    "kafka",
    "store",
    "delivery",
    "quota",
    "limits",
    "orgs",
    "webhooks",
    "rules",
    "custom_modules",
)
_WEBHOOK_KEYS = (
    "name",
    "description",
    "url",
    "method",
    "module",
    "org",
    "secret",
    "body",
    "entity_params",
    "custom_params",
)
_RULE_KEYS = (
    "id",
    "org",
    "module",
    "trigger",
    "fields",
    "repeat",
    "criteria",
    "instant",
    "scheduled",
)
_UNSET: Any = object()


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _field_names(cls: Any) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _is_number(value: Any) -> bool:
    # bool is an int subclass; `true` is never meant as 1 in this config.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _unsupported_module(name: str) -> bool:
    return name in UNSUPPORTED_MODULES or f"{name}s" in UNSUPPORTED_MODULES


class _Loader:
    """One validation pass; ``errors`` collects every problem found."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.errors: list[str] = []
        self.catalog = ModuleCatalog()

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    # -- primitives --

    def table(self, path: str, value: Any, keys: Sequence[str]) -> Mapping[str, Any]:
        """``value`` as a table with only ``keys``; {} (after an error) otherwise."""
        if not isinstance(value, Mapping):
            self.error(path or "config", "must be a table")
            return {}
        for key in value:
            if key not in keys:
                hint = difflib.get_close_matches(str(key), keys, n=1)
                suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
                self.error(_join(path, str(key)), f"unknown key{suffix}")
        return value

    def tables(self, path: str, value: Any) -> list[Mapping[str, Any]]:
        """An array of tables (``[[path]]``)."""
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            self.error(path, f"must be an array of tables ([[{path}]])")
            return []
        return value

    def string(
        self,
        path: str,
        t: Mapping[str, Any],
        key: str,
        default: Any = _UNSET,
        *,
        nonempty: bool = True,
        env_allowed: bool = False,
    ) -> Any:
        """A string value; ``default`` when absent (required when no default)."""
        p = _join(path, key)
        if key not in t:
            if default is _UNSET:
                self.error(p, "required")
                return None
            return default
        value = t[key]
        if not isinstance(value, str):
            self.error(p, "must be a string")
            return default if default is not _UNSET else None
        if nonempty and not value.strip():
            self.error(p, "must not be empty")
        if not env_allowed and _ENV_MARK in value:
            self.error(p, "${env:...} is only allowed in custom_params and secret")
        return value

    def integer(self, path: str, t: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
        if key not in t:
            return default
        value = t[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self.error(_join(path, key), f"must be an integer ≥ {minimum}")
            return default
        return value

    def number(
        self, path: str, t: Mapping[str, Any], key: str, default: float, *, positive: bool
    ) -> float:
        if key not in t:
            return default
        value = t[key]
        ok = _is_number(value) and math.isfinite(value) and (value > 0 if positive else value >= 0)
        if not ok:
            self.error(_join(path, key), f"must be a {'positive' if positive else '≥ 0'} number")
            return default
        return float(value)

    def boolean(self, path: str, t: Mapping[str, Any], key: str, default: bool) -> bool:
        if key not in t:
            return default
        value = t[key]
        if not isinstance(value, bool):
            self.error(_join(path, key), "must be true or false")
            return default
        return value

    def module(self, path: str, t: Mapping[str, Any]) -> str | None:
        """The canonical name of the supported module named by ``t["module"]``."""
        name = self.string(path, t, "module")
        if name is None:
            return None
        if _unsupported_module(name):
            self.error(_join(path, "module"), f"the CRM does not allow webhooks on {name} records")
            return None
        canonical = self.catalog.canonical(name)
        if canonical is None or not self.catalog.is_supported(canonical):
            self.error(_join(path, "module"), f"unknown module {name!r}")
            return None
        return canonical

    def org_ref(self, path: str, t: Mapping[str, Any], orgs: Mapping[str, Any]) -> str | None:
        org = self.string(path, t, "org", None)
        if org is not None and org not in orgs:
            self.error(_join(path, "org"), f"unknown organisation {org!r} (not in [[orgs]])")
        return org  # type: ignore[no-any-return]  # checked by self.string

    def resolve_env(self, path: str, value: str) -> tuple[str, bool]:
        """Replace every ``${env:NAME}`` in ``value``; True when there was one."""
        found = False

        def replace(match: re.Match[str]) -> str:
            nonlocal found
            found = True
            name = match.group(1)
            if not _ENV_NAME_RE.fullmatch(name):
                self.error(path, f"invalid environment variable name {name!r}")
                return ""
            if name not in self.env:
                self.error(path, f"environment variable {name} is not set")
                return ""
            return self.env[name]

        resolved = _ENV_REF_RE.sub(replace, value)
        if _ENV_MARK in resolved and not found:
            self.error(path, "unterminated ${env:...}")
        return resolved, found

    # -- sections --

    def load(self, raw: Mapping[str, Any]) -> Config:
        raw = self.table("", raw, _TOP_KEYS)
        self.catalog = ModuleCatalog(custom := self.custom_modules(raw))
        kafka = self.kafka(raw.get("kafka", {}))
        store = self.store(raw.get("store", {}))
        delivery = self.delivery(raw.get("delivery", {}))
        quota = self.quota(raw.get("quota", {}))
        limits = self.limits(raw.get("limits", {}))
        orgs = self.orgs(raw.get("orgs", []))
        webhooks, webhook_refs = self.webhooks(raw.get("webhooks", []), orgs, limits)
        rules = self.rules(raw.get("rules", []), orgs, webhook_refs, limits)
        if self.errors:
            raise ConfigError(self.errors)
        return Config(
            kafka=kafka,
            store=store,
            delivery=delivery,
            quota=quota,
            orgs=orgs,
            webhooks=webhooks,
            rules=rules,
            custom_modules=custom,
            limits=limits,
        )

    def custom_modules(self, raw: Mapping[str, Any]) -> tuple[str, ...]:
        value = raw.get("custom_modules", [])
        if not isinstance(value, list):
            self.error("custom_modules", "must be an array of module names")
            return ()
        standard = ModuleCatalog()
        names: list[str] = []
        for i, name in enumerate(value):
            p = f"custom_modules[{i}]"
            if not isinstance(name, str) or not name.strip():
                self.error(p, "must be a non-empty string")
            elif "." in name or "${" in name or "}" in name:
                self.error(p, "must not contain '.', '${' or '}' (it names a namespace)")
            elif standard.canonical(name) is not None or _unsupported_module(name):
                self.error(p, f"{name!r} is a standard CRM module")
            elif name in names:
                self.error(p, f"duplicate module {name!r}")
            else:
                names.append(name)
        return tuple(names)

    def kafka(self, value: Any) -> KafkaSettings:
        d = KafkaSettings()
        t = self.table("kafka", value, _field_names(KafkaSettings))
        servers = self.env.get("CRMHOOKS_BOOTSTRAP_SERVERS") or self.string(
            "kafka", t, "bootstrap_servers", d.bootstrap_servers
        )
        return KafkaSettings(
            bootstrap_servers=servers,
            group_id=self.string("kafka", t, "group_id", d.group_id),
            events_topic=self.string("kafka", t, "events_topic", d.events_topic),
            results_topic=self.string("kafka", t, "results_topic", d.results_topic),
            dlq_topic=self.string("kafka", t, "dlq_topic", d.dlq_topic),
            partitions=self.integer("kafka", t, "partitions", d.partitions, 1),
            max_event_bytes=self.integer("kafka", t, "max_event_bytes", d.max_event_bytes, 1),
            session_timeout_ms=self.integer(
                "kafka", t, "session_timeout_ms", d.session_timeout_ms, 1000
            ),
            changelog_topic=self.string("kafka", t, "changelog_topic", d.changelog_topic),
        )

    def store(self, value: Any) -> StoreSettings:
        t = self.table("store", value, _field_names(StoreSettings))
        path = self.env.get("CRMHOOKS_STORE_PATH") or self.string(
            "store", t, "path", StoreSettings().path
        )
        retention = self.number(
            "store", t, "finished_retention_s", StoreSettings().finished_retention_s, positive=True
        )
        return StoreSettings(path=path, finished_retention_s=retention)

    def delivery(self, value: Any) -> DeliverySettings:
        d = DeliverySettings()
        t = self.table("delivery", value, _field_names(DeliverySettings))
        delays = d.retry_delays_s
        if "retry_delays_s" in t:
            raw = t["retry_delays_s"]
            if not isinstance(raw, list):
                self.error("delivery.retry_delays_s", "must be an array of numbers ≥ 0")
            else:
                good: list[float] = []
                for i, delay in enumerate(raw):
                    if _is_number(delay) and math.isfinite(delay) and delay >= 0:
                        good.append(float(delay))
                    else:
                        self.error(f"delivery.retry_delays_s[{i}]", "must be a number ≥ 0")
                delays = tuple(good)
        return DeliverySettings(
            connect_timeout_s=self.number(
                "delivery", t, "connect_timeout_s", d.connect_timeout_s, positive=True
            ),
            total_timeout_s=self.number(
                "delivery", t, "total_timeout_s", d.total_timeout_s, positive=True
            ),
            max_in_flight=self.integer("delivery", t, "max_in_flight", d.max_in_flight, 1),
            max_in_flight_per_host=self.integer(
                "delivery", t, "max_in_flight_per_host", d.max_in_flight_per_host, 1
            ),
            retry_delays_s=delays,
            suspend_after_failed_actions=self.integer(
                "delivery", t, "suspend_after_failed_actions", d.suspend_after_failed_actions, 0
            ),
            allow_private_networks=self.boolean(
                "delivery", t, "allow_private_networks", d.allow_private_networks
            ),
            past_due_grace_s=self.number(
                "delivery", t, "past_due_grace_s", d.past_due_grace_s, positive=False
            ),
            shutdown_grace_s=self.number(
                "delivery", t, "shutdown_grace_s", d.shutdown_grace_s, positive=False
            ),
        )

    def quota(self, value: Any) -> QuotaSettings:
        d = QuotaSettings()
        t = self.table("quota", value, _field_names(QuotaSettings))
        return QuotaSettings(
            daily_limit=self.integer("quota", t, "daily_limit", d.daily_limit, 0),
            per_user=self.integer("quota", t, "per_user", d.per_user, 0),
        )

    def limits(self, value: Any) -> Limits:
        d = Limits()
        t = self.table("limits", value, _field_names(Limits))
        values = {
            key: self.integer("limits", t, key, getattr(d, key), 1) for key in _field_names(Limits)
        }
        return Limits(**values)

    def orgs(self, value: Any) -> dict[str, OrgSettings]:
        orgs: dict[str, OrgSettings] = {}
        for i, item in enumerate(self.tables("orgs", value)):
            org_id = item.get("id")
            label = f"orgs[{org_id}]" if isinstance(org_id, str) and org_id else f"orgs[{i}]"
            t = self.table(label, item, _field_names(OrgSettings))
            org_id = self.string(label, t, "id")
            users = self.integer(label, t, "users", 1, 1)
            zone = self.string(label, t, "time_zone", "UTC")
            if isinstance(zone, str) and zone.strip():
                try:
                    ZoneInfo(zone)
                except (ZoneInfoNotFoundError, ValueError):
                    self.error(_join(label, "time_zone"), f"unknown IANA time zone {zone!r}")
            if org_id is None:
                continue
            if org_id in orgs:
                self.error(_join(label, "id"), f"duplicate organisation {org_id!r}")
                continue
            orgs[org_id] = OrgSettings(id=org_id, users=users, time_zone=zone)
        return orgs

    # -- webhooks --

    def webhooks(
        self, value: Any, orgs: Mapping[str, OrgSettings], limits: Limits
    ) -> tuple[dict[str, Webhook], dict[str, tuple[str | None, str | None]]]:
        """Valid webhooks by name, and (module, org) of every named one for rule checks."""
        webhooks: dict[str, Webhook] = {}
        refs: dict[str, tuple[str | None, str | None]] = {}
        for i, item in enumerate(self.tables("webhooks", value)):
            name = item.get("name")
            label = f"webhooks[{name}]" if isinstance(name, str) and name else f"webhooks[{i}]"
            errors_before = len(self.errors)
            hook = self.webhook(label, item, orgs, limits)
            if isinstance(name, str) and name:
                if name in refs:
                    self.error(_join(label, "name"), f"duplicate webhook name {name!r}")
                    continue
                refs[name] = (self.catalog.canonical(str(item.get("module"))), item.get("org"))
            if hook is not None and len(self.errors) == errors_before:
                self.compile_check(label, hook, limits)
                webhooks[hook.name] = hook
        return webhooks, refs

    def webhook(
        self, label: str, item: Mapping[str, Any], orgs: Mapping[str, OrgSettings], limits: Limits
    ) -> Webhook | None:
        t = self.table(label, item, _WEBHOOK_KEYS)
        name = self.string(label, t, "name")
        if name is not None and (
            not _WEBHOOK_NAME_RE.fullmatch(name) or len(name) > limits.name_chars
        ):
            self.error(
                _join(label, "name"),
                f"must be 1 to {limits.name_chars} letters or digits (A-Z, a-z, 0-9)",
            )
        description = self.string(label, t, "description", "", nonempty=False)
        if isinstance(description, str) and len(description) > limits.description_chars:
            self.error(
                _join(label, "description"), f"longer than {limits.description_chars} characters"
            )
        url = self.string(label, t, "url")
        if url is not None:
            self.check_url(_join(label, "url"), url, limits)
        method = self.string(label, t, "method", "POST")
        if isinstance(method, str):
            method = method.upper()
            if method not in ("POST", "GET"):
                self.error(_join(label, "method"), "must be POST or GET")
        module = self.module(label, t)
        org = self.org_ref(label, t, orgs)
        secret = self.secret(label, t)
        body = self.body(_join(label, "body"), t["body"]) if "body" in t else None
        entity = self.params(_join(label, "entity_params"), t.get("entity_params", {}))
        for key, text in entity.items():
            p = f"{label}.entity_params.{key}"
            if _ENV_MARK in text:
                self.error(p, "${env:...} is only allowed in custom_params and secret")
            if len(text) > limits.entity_param_chars:
                self.error(p, f"longer than {limits.entity_param_chars} characters")
        custom: dict[str, str] = {}
        secret_params: set[str] = set()
        for key, text in self.params(
            _join(label, "custom_params"), t.get("custom_params", {})
        ).items():
            if _PLACEHOLDER_IN_LITERAL_RE.search(text):
                self.error(
                    f"{label}.custom_params.{key}",
                    "custom parameters are literals (or ${env:NAME}); "
                    "put CRM fields in entity_params",
                )
            resolved, from_env = self.resolve_env(f"{label}.custom_params.{key}", text)
            custom[key] = resolved
            if from_env:
                secret_params.add(key)
        names = list(entity) + list(custom) + ([body.param] if body and body.param else [])
        for dup in sorted({n for n in names if names.count(n) > 1}):
            self.error(label, f"parameter {dup!r} is defined more than once")
        if name is None or url is None or module is None:
            return None
        return Webhook(
            name=name,
            url=url,
            module=module,
            method=method,
            description=description,
            org=org,
            secret=secret,
            body=body,
            entity_params=entity,
            custom_params=custom,
            secret_params=frozenset(secret_params),
        )

    def check_url(self, path: str, url: str, limits: Limits) -> None:
        if len(url) > limits.url_chars:
            self.error(path, f"longer than {limits.url_chars} characters")
        if _CONTROL_RE.search(url):
            self.error(path, "contains control characters")
            return
        try:
            parts = urlsplit(url.strip())
            port = None if "${" in parts.netloc else parts.port
        except ValueError as exc:
            self.error(path, f"not a valid URL: {exc}")
            return
        del port  # parsed only to reject a malformed port
        if parts.scheme.lower() not in ("http", "https") or "${" in parts.scheme:
            self.error(path, "must be an absolute http:// or https:// URL")
        elif "${" in parts.netloc:
            self.error(path, "placeholders are not allowed in the scheme, host or port")
        elif not parts.hostname:
            self.error(path, "has no host")

    def secret(self, label: str, t: Mapping[str, Any]) -> str | None:
        raw = self.string(label, t, "secret", None, env_allowed=True)
        if raw is None:
            return None
        p = _join(label, "secret")
        errors_before = len(self.errors)
        secret, _ = self.resolve_env(p, raw)
        if len(self.errors) > errors_before:
            return None
        key = secret[len(_SECRET_PREFIX) :] if secret.startswith(_SECRET_PREFIX) else None
        try:
            # Standard Webhooks secrets are base64, often without padding.
            decoded = (
                None
                if key is None
                else base64.b64decode(key + "=" * (-len(key) % 4), validate=True)
            )
        except (binascii.Error, ValueError):
            decoded = None
        if not decoded:
            self.error(p, "must be a Standard Webhooks secret: 'whsec_' + base64")
            return None
        return secret

    def body(self, path: str, value: Any) -> BodySpec | None:
        t = self.table(path, value, ("format", "template", "param"))
        fmt = self.string(path, t, "format")
        if fmt is not None and fmt not in ("xml", "json"):
            self.error(_join(path, "format"), "must be xml or json")
            fmt = None
        template = self.string(path, t, "template")
        param = self.string(path, t, "param", None)
        if param is not None and not _PARAM_NAME_RE.fullmatch(param):
            self.error(_join(path, "param"), "must be an identifier (letters, digits, _)")
        if fmt is None or template is None:
            return None
        return BodySpec(format=fmt, template=template, param=param)

    def params(self, path: str, value: Any) -> dict[str, str]:
        if not isinstance(value, Mapping):
            self.error(path, "must be a table of name = string")
            return {}
        params: dict[str, str] = {}
        for key, text in value.items():
            if not key.strip():
                self.error(path, "parameter name must not be empty")
            elif _CONTROL_RE.search(key):
                self.error(_join(path, key), "name contains control characters")
            elif not isinstance(text, str):
                self.error(_join(path, key), "must be a string")
            else:
                params[key] = text
        return params

    def compile_check(self, label: str, hook: Webhook, limits: Limits) -> None:
        """Placeholders parse and name known namespaces; ≤ 10 distinct CRM fields."""
        # Imported here: templates imports this module (for Webhook).
        from crmhooks.templates import CompiledWebhook

        try:
            compiled = CompiledWebhook(hook, self.catalog)
        except TemplateError as exc:
            for message in exc.problems:
                # templates names the part first ("url: ...", "body.template: ...").
                if _TEMPLATE_PART_RE.match(message):
                    self.errors.append(f"{label}.{message}")
                else:
                    self.error(label, message)
            return
        count = len(compiled.crm_fields)
        if count > limits.crm_fields_per_webhook:
            self.error(
                label,
                f"sends {count} distinct CRM fields; at most {limits.crm_fields_per_webhook}",
            )

    # -- rules --

    def rules(
        self,
        value: Any,
        orgs: Mapping[str, OrgSettings],
        webhooks: Mapping[str, tuple[str | None, str | None]],
        limits: Limits,
    ) -> tuple[Rule, ...]:
        rules: list[Rule] = []
        seen: set[str] = set()
        for i, item in enumerate(self.tables("rules", value)):
            rule_id = item.get("id")
            label = f"rules[{rule_id}]" if isinstance(rule_id, str) and rule_id else f"rules[{i}]"
            errors_before = len(self.errors)
            rule = self.rule(label, item, orgs, webhooks, limits)
            if isinstance(rule_id, str) and rule_id:
                if rule_id in seen:
                    self.error(_join(label, "id"), f"duplicate rule id {rule_id!r}")
                seen.add(rule_id)
            if rule is not None and len(self.errors) == errors_before:
                rules.append(rule)
        return tuple(rules)

    def rule(
        self,
        label: str,
        item: Mapping[str, Any],
        orgs: Mapping[str, OrgSettings],
        webhooks: Mapping[str, tuple[str | None, str | None]],
        limits: Limits,
    ) -> Rule | None:
        t = self.table(label, item, _RULE_KEYS)
        rule_id = self.string(label, t, "id")
        if rule_id is not None and not _RULE_ID_RE.fullmatch(rule_id):
            self.error(_join(label, "id"), "must be letters, digits, '_', '.' or '-'")
        org = self.org_ref(label, t, orgs)
        module = self.module(label, t)
        trigger = self.string(label, t, "trigger", "create_or_edit")
        if trigger not in TRIGGERS:
            self.error(_join(label, "trigger"), f"must be one of {', '.join(sorted(TRIGGERS))}")
        fields = self.string_list(_join(label, "fields"), t.get("fields", []))
        if trigger == "field_update" and not fields:
            self.error(_join(label, "fields"), "field_update needs at least one field")
        elif trigger != "field_update" and fields:
            self.error(_join(label, "fields"), "only the field_update trigger takes fields")
        repeat = self.string(label, t, "repeat", "every")
        if repeat not in REPEATS:
            self.error(_join(label, "repeat"), "must be once or every")
        criteria = (
            self.criteria(_join(label, "criteria"), t["criteria"]) if "criteria" in t else AllOf(())
        )

        def check_ref(path: str, name: str) -> None:
            ref = webhooks.get(name)
            if ref is None:
                self.error(path, f"unknown webhook {name!r}")
                return
            hook_module, hook_org = ref
            if module is not None and hook_module is not None and hook_module != module:
                self.error(path, f"webhook {name!r} is for {hook_module}, the rule for {module}")
            if isinstance(hook_org, str) and hook_org != org:
                # An org-less rule fires for every organisation; an org's webhook
                # (its URL, its API keys) must never receive another org's records.
                self.error(path, f"webhook {name!r} belongs to organisation {hook_org!r}")

        instant = None
        if "instant" in t:
            if isinstance(t["instant"], list):
                self.error(_join(label, "instant"), "at most one instant action (a webhook name)")
            else:
                instant = self.string(label, t, "instant")
                if instant is not None:
                    check_ref(_join(label, "instant"), instant)
        scheduled = self.scheduled(_join(label, "scheduled"), t, check_ref, limits)
        if rule_id is None or module is None:
            return None
        return Rule(
            id=rule_id,
            module=module,
            trigger=trigger,
            org=org,
            fields=fields,
            repeat=repeat,
            criteria=criteria,
            instant=instant,
            scheduled=scheduled,
        )

    def string_list(self, path: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.error(path, "must be an array of strings")
            return ()
        out: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                self.error(f"{path}[{i}]", "must be a non-empty string")
            else:
                out.append(item)
        return tuple(out)

    def scheduled(
        self,
        path: str,
        t: Mapping[str, Any],
        check_ref: Callable[[str, str], None],
        limits: Limits,
    ) -> tuple[ScheduledSpec, ...]:
        specs: list[ScheduledSpec] = []
        items = self.tables(path, t["scheduled"]) if "scheduled" in t else []
        for i, item in enumerate(items):
            p = f"{path}[{i}]"
            if i >= limits.scheduled_per_rule:
                self.error(p, f"at most {limits.scheduled_per_rule} scheduled actions")
                continue
            st = self.table(p, item, ("webhook", "relative_to", "offset", "at"))
            webhook = self.string(p, st, "webhook")
            if webhook is not None:
                check_ref(_join(p, "webhook"), webhook)
            relative_to = self.string(p, st, "relative_to", "trigger")
            offset_ms = 0
            offset = self.string(p, st, "offset", None)
            if offset is not None:
                try:
                    offset_ms = parse_offset_ms(offset)
                except ValueError as exc:
                    self.error(_join(p, "offset"), str(exc))
            at = self.time_of_day(_join(p, "at"), st.get("at"))
            if webhook is not None and relative_to is not None:
                specs.append(ScheduledSpec(webhook, relative_to, offset_ms, at))
        return tuple(specs)

    def time_of_day(self, path: str, value: Any) -> time | None:
        if value is None:
            return None
        if isinstance(value, time):  # TOML local time: at = 09:00:00
            return value
        if isinstance(value, str):
            try:
                return parse_time_of_day(value)
            except ValueError as exc:
                self.error(path, str(exc))
                return None
        self.error(path, 'must be a time of day "HH:MM"')
        return None

    def criteria(self, path: str, node: Any) -> Criteria:
        if not isinstance(node, Mapping):
            self.error(
                path, "must be a table: {all=[...]}, {any=[...]}, {not={...}} or a condition"
            )
            return AllOf(())
        groups = [k for k in ("all", "any", "not") if k in node]
        if groups:
            if len(node) != 1:
                self.error(path, "a criteria group has exactly one key: all, any or not")
                return AllOf(())
            key = groups[0]
            p = _join(path, key)
            if key == "not":
                return Not(self.criteria(p, node[key]))
            items = node[key]
            if not isinstance(items, list) or not items:
                self.error(p, "must be a non-empty array")
                return AllOf(())
            parsed = tuple(self.criteria(f"{p}[{i}]", x) for i, x in enumerate(items))
            return AllOf(parsed) if key == "all" else AnyOf(parsed)
        t = self.table(path, node, ("field", "op", "value"))
        name = self.string(path, t, "field")
        op = self.string(path, t, "op")
        value = self.condition_value(path, op, t)
        if op is not None and op not in OPERATORS:
            self.error(_join(path, "op"), f"unknown operator {op!r}")
        return Condition(field=name or "", op=op or "is", value=value)

    def condition_value(self, path: str, op: str | None, t: Mapping[str, Any]) -> Any:
        p = _join(path, "value")
        if op is None or op not in OPERATORS:
            return None
        if op in NO_VALUE_OPS:
            if "value" in t:
                self.error(p, f"{op} takes no value")
            return None
        if "value" not in t:
            self.error(p, f"required for {op}")
            return None
        value = t["value"]
        if op in LIST_OPS or op == "between":
            if not isinstance(value, list) or (op == "between" and len(value) != 2) or not value:
                shape = "[low, high]" if op == "between" else "a non-empty array"
                self.error(p, f"{op} needs {shape}")
                return None
            return tuple(self.scalar(f"{p}[{i}]", v) for i, v in enumerate(value))
        scalar = self.scalar(p, value)
        if op in TEXT_OPS and not isinstance(scalar, str):
            self.error(p, f"{op} needs a string")
        return scalar

    def scalar(self, path: str, value: Any) -> Any:
        """A criteria constant: str, number or bool; TOML dates become ISO strings."""
        if isinstance(value, datetime):
            if value.tzinfo is None and not (value.second or value.microsecond):
                return value.strftime("%Y-%m-%d %H:%M")
            return value.isoformat(sep=" " if value.tzinfo is None else "T")
        if isinstance(value, date):
            return value.isoformat()
        if isinstance(value, str | bool) or (_is_number(value) and math.isfinite(value)):
            return value
        self.error(path, "must be a string, number, boolean or date")
        return None
