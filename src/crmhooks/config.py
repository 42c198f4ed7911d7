"""The TOML configuration: loaded from a mapping, validated, every error naming its item."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time
from pathlib import Path
from typing import Any, Literal

from crmhooks.errors import ConfigError

Method = Literal["POST", "GET"]
BodyFormat = Literal["xml", "json"]
Trigger = Literal["create", "edit", "create_or_edit", "field_update", "delete"]
Repeat = Literal["once", "every"]


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


@dataclass(frozen=True, slots=True)
class StoreSettings:
    path: str = "var/crmhooks.db"


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
class OrgSettings:
    id: str
    users: int = 1
    time_zone: str = "UTC"


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
    id: str
    module: str
    trigger: Trigger = "create_or_edit"
    org: str | None = None
    fields: tuple[str, ...] = ()
    repeat: Repeat = "every"
    criteria: Criteria = AllOf(())
    instant: str | None = None
    scheduled: tuple[ScheduledSpec, ...] = ()


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

    def org(self, org_id: str) -> OrgSettings:
        """Settings of an organisation; one not in the config gets the defaults."""
        found = self.orgs.get(org_id)
        return found if found is not None else OrgSettings(id=org_id)


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
    """Build and validate a Config from a parsed TOML mapping (see SPEC §3)."""
    raise NotImplementedError  # TODO(config helper)
