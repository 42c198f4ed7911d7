"""The single tables — [kafka], [store], [delivery], [quota], [limits], [admin], [log] —
and ``custom_modules``: their checks beyond the declared shapes, and their settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from crmhooks.config.context import Context
from crmhooks.config.network import listen_problem, network, proxy_problems
from crmhooks.config.problems import Problems, join
from crmhooks.config.references import NOT_HERE, has_reference
from crmhooks.config.shapes import (
    AdminShape,
    DeliveryShape,
    KafkaShape,
    LimitsShape,
    LogShape,
    QuotaShape,
    StoreShape,
)
from crmhooks.modules import UNSUPPORTED_MODULES, ModuleCatalog
from crmhooks.settings import (
    AdminSettings,
    DeliverySettings,
    KafkaSettings,
    Limits,
    LogLevel,
    LogSettings,
    Network,
    QuotaSettings,
    StoreSettings,
)

# Environment variables that override the file (SPEC §3): where a process runs
# decides how it reaches the broker and where its store lives.
BOOTSTRAP_SERVERS_ENV = "CRMHOOKS_BOOTSTRAP_SERVERS"
STORE_PATH_ENV = "CRMHOOKS_STORE_PATH"
_LOG_LEVELS: tuple[LogLevel, ...] = ("DEBUG", "INFO", "WARNING", "ERROR")


def custom_modules(value: Any, problems: Problems) -> tuple[str, ...]:
    if not isinstance(value, list):
        problems.add("custom_modules", "must be an array of module names")
        return ()
    standard = ModuleCatalog()
    names: list[str] = []
    for i, name in enumerate(value):
        p = f"custom_modules[{i}]"
        if not isinstance(name, str) or not name.strip():
            problems.add(p, "must be a non-empty string")
        elif "." in name or "${" in name or "}" in name:
            problems.add(p, "must not contain '.', '${' or '}' (it names a namespace)")
        elif standard.canonical(name) is not None or _unsupported_module(name):
            problems.add(p, f"{name!r} is a standard CRM module")
        elif name in names:
            problems.add(p, f"duplicate module {name!r}")
        else:
            names.append(name)
    return tuple(names)


def _unsupported_module(name: str) -> bool:
    return name in UNSUPPORTED_MODULES or f"{name}s" in UNSUPPORTED_MODULES


def kafka(shape: KafkaShape, env: Mapping[str, str], ctx: Context) -> KafkaSettings:
    """[kafka]; SASL and SSL settings may hold references (resolved here)."""
    add = ctx.problems.add
    for key in ("bootstrap_servers", "group_id"):
        if has_reference(getattr(shape, key)):
            add(join("kafka", key), NOT_HERE)
    resolved = {
        key: ctx.references.resolve(join("kafka", key), getattr(shape, key))[0]
        for key in (
            "sasl_username",
            "sasl_password",
            "ssl_ca_file",
            "ssl_cert_file",
            "ssl_key_file",
        )
    }
    settings = KafkaSettings(
        bootstrap_servers=env.get(BOOTSTRAP_SERVERS_ENV) or shape.bootstrap_servers,
        group_id=shape.group_id,
        events_topic=shape.events_topic,
        results_topic=shape.results_topic,
        dlq_topic=shape.dlq_topic,
        partitions=shape.partitions,
        max_event_bytes=shape.max_event_bytes,
        session_timeout_ms=shape.session_timeout_ms,
        changelog_topic=shape.changelog_topic,
        config_topic=shape.config_topic,
        compression_type=shape.compression_type,
        security_protocol=shape.security_protocol,
        sasl_mechanism=shape.sasl_mechanism,
        **resolved,
    )
    check_kafka_topics_differ(settings, ctx.problems)
    check_kafka_security(settings, ctx)
    return settings


def check_kafka_topics_differ(settings: KafkaSettings, problems: Problems) -> None:
    """Each topic has one purpose: results written to the events topic would loop."""
    seen: dict[str, str] = {}
    for key in ("events_topic", "results_topic", "dlq_topic", "config_topic", "changelog_topic"):
        topic = settings.changelog if key == "changelog_topic" else getattr(settings, key)
        if not topic:
            continue
        if topic in seen:
            problems.add(join("kafka", key), f"{topic!r} is already the {seen[topic]}")
        seen.setdefault(topic, key)


def check_kafka_security(settings: KafkaSettings, ctx: Context) -> None:
    """SASL needs its three settings, SSL files must parse; neither is set in vain."""
    add = ctx.problems.add
    protocol = settings.security_protocol
    sasl = {
        "sasl_mechanism": settings.sasl_mechanism or "",
        "sasl_username": settings.sasl_username,
        "sasl_password": settings.sasl_password,
    }
    for key, value in sasl.items():
        if settings.uses_sasl and not value:
            add(join("kafka", key), f"required with security_protocol {protocol}")
        elif not settings.uses_sasl and value:
            add(join("kafka", key), f"not used with security_protocol {protocol} (SASL_* is)")
    ssl_files = ("ssl_ca_file", "ssl_cert_file", "ssl_key_file")
    if not settings.uses_ssl:
        for key in ssl_files:
            if getattr(settings, key):
                add(join("kafka", key), f"not used with security_protocol {protocol} (SSL is)")
        return
    if settings.ssl_ca_file:
        ctx.files.ca_file("kafka.ssl_ca_file", settings.ssl_ca_file)
    ctx.files.cert_and_key(
        "kafka", "ssl_cert_file", settings.ssl_cert_file, "ssl_key_file", settings.ssl_key_file
    )


def store(shape: StoreShape, env: Mapping[str, str], problems: Problems) -> StoreSettings:
    if has_reference(shape.path):
        problems.add("store.path", NOT_HERE)
    return StoreSettings(
        path=env.get(STORE_PATH_ENV) or shape.path,
        finished_retention_s=shape.finished_retention_s,
    )


def delivery(shape: DeliveryShape, problems: Problems) -> DeliverySettings:
    for message in proxy_problems(shape.proxy):
        problems.add("delivery.proxy", message)
    networks: list[Network] = []
    for i, text in enumerate(shape.allowed_networks):
        found = network(text)
        if isinstance(found, str):
            problems.add(f"delivery.allowed_networks[{i}]", found)
        else:
            networks.append(found)
    return DeliverySettings(
        connect_timeout_s=shape.connect_timeout_s,
        total_timeout_s=shape.total_timeout_s,
        max_in_flight=shape.max_in_flight,
        max_in_flight_per_host=shape.max_in_flight_per_host,
        retry_delays_s=shape.retry_delays_s,
        suspend_after_failed_actions=shape.suspend_after_failed_actions,
        allow_private_networks=shape.allow_private_networks,
        past_due_grace_s=shape.past_due_grace_s,
        shutdown_grace_s=shape.shutdown_grace_s,
        proxy=shape.proxy,
        allowed_networks=tuple(networks),
    )


def quota(shape: QuotaShape) -> QuotaSettings:
    return QuotaSettings(daily_limit=shape.daily_limit, per_user=shape.per_user)


def limits(shape: LimitsShape) -> Limits:
    return Limits(
        name_chars=shape.name_chars,
        description_chars=shape.description_chars,
        url_chars=shape.url_chars,
        entity_param_chars=shape.entity_param_chars,
        crm_fields_per_webhook=shape.crm_fields_per_webhook,
        scheduled_per_rule=shape.scheduled_per_rule,
    )


def admin(shape: AdminShape, problems: Problems) -> AdminSettings:
    problem = listen_problem(shape.listen)
    if problem is not None:
        problems.add("admin.listen", problem)
        return AdminSettings()
    return AdminSettings(listen=shape.listen)


def log(shape: LogShape, problems: Problems) -> LogSettings:
    level = shape.level.upper()
    for known in _LOG_LEVELS:
        if level == known:
            return LogSettings(format=shape.format, level=known)
    problems.add("log.level", f"must be one of {', '.join(_LOG_LEVELS)}")
    return LogSettings(format=shape.format)
