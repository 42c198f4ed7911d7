"""The config's raw shapes (SPEC §3, §3.2, §6, §12), declared for msgspec.

Each TOML table / JSON object is one Struct: unknown keys are refused, absent
keys take the defaults of crmhooks.settings, and ``Meta`` states the rules a
value obeys on its own (a number's range, a non-empty name). What depends on
other values (a rule's webhook exists, ``[limits]``, files, references) is
checked by named functions after decoding (crmhooks.config.sections, .webhooks,
.rules). The error message of each declared rule is derived from its type by
crmhooks.config.decoding.
"""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta, Struct

from crmhooks.settings import (
    BodyFormat,
    CompressionType,
    DeliverySettings,
    KafkaSettings,
    Limits,
    LogFormat,
    QuotaSettings,
    Repeat,
    SaslMechanism,
    SecurityProtocol,
    StoreSettings,
    Trigger,
)

# No duration crmhooks waits for is longer than ten years; a bound also keeps
# `inf` (valid TOML) out, and epoch-ms arithmetic far from overflow.
MAX_SECONDS = 10 * 365 * 86400.0

NON_EMPTY = r"\S"
TOPIC = r"^[A-Za-z0-9._-]{1,249}$"  # Kafka's own rule for topic names
OPTIONAL_TOPIC = r"^[A-Za-z0-9._-]{0,249}$"

NonEmpty = Annotated[str, Meta(pattern=NON_EMPTY)]
Topic = Annotated[str, Meta(pattern=TOPIC)]
OptionalTopic = Annotated[str, Meta(pattern=OPTIONAL_TOPIC)]
AtLeastOne = Annotated[int, Meta(ge=1)]
AtLeastZero = Annotated[int, Meta(ge=0)]
Seconds = Annotated[float, Meta(gt=0, le=MAX_SECONDS)]
SecondsOrZero = Annotated[float, Meta(ge=0, le=MAX_SECONDS)]

# The message for a string that does not match a declared pattern.
PATTERN_MESSAGES = {
    NON_EMPTY: "must be a non-empty string",
    TOPIC: "must be a non-empty Kafka topic name (up to 249 of A-Z a-z 0-9 . _ -)",
    OPTIONAL_TOPIC: 'must be a Kafka topic name (A-Z a-z 0-9 . _ -) or ""',
}

_K = KafkaSettings()
_S = StoreSettings()
_D = DeliverySettings()
_Q = QuotaSettings()
_L = Limits()


class Shape(Struct, forbid_unknown_fields=True):
    """A table of the config."""


class KafkaShape(Shape):
    bootstrap_servers: NonEmpty = _K.bootstrap_servers
    group_id: NonEmpty = _K.group_id
    events_topic: Topic = _K.events_topic
    results_topic: Topic = _K.results_topic
    dlq_topic: Topic = _K.dlq_topic
    partitions: AtLeastOne = _K.partitions
    max_event_bytes: AtLeastOne = _K.max_event_bytes
    # Below one second a member would be dropped from the group by any GC pause.
    session_timeout_ms: Annotated[int, Meta(ge=1000)] = _K.session_timeout_ms
    changelog_topic: OptionalTopic = _K.changelog_topic
    config_topic: OptionalTopic = _K.config_topic
    compression_type: CompressionType = _K.compression_type
    security_protocol: SecurityProtocol = _K.security_protocol
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_ca_file: str = ""
    ssl_cert_file: str = ""
    ssl_key_file: str = ""


class StoreShape(Shape):
    path: NonEmpty = _S.path
    finished_retention_s: Seconds = _S.finished_retention_s


class DeliveryShape(Shape):
    connect_timeout_s: Seconds = _D.connect_timeout_s
    total_timeout_s: Seconds = _D.total_timeout_s
    max_in_flight: AtLeastOne = _D.max_in_flight
    max_in_flight_per_host: AtLeastOne = _D.max_in_flight_per_host
    retry_delays_s: tuple[SecondsOrZero, ...] = _D.retry_delays_s
    suspend_after_failed_actions: AtLeastZero = _D.suspend_after_failed_actions
    allow_private_networks: bool = _D.allow_private_networks
    past_due_grace_s: SecondsOrZero = _D.past_due_grace_s
    shutdown_grace_s: SecondsOrZero = _D.shutdown_grace_s
    proxy: str = ""
    allowed_networks: tuple[str, ...] = ()


class QuotaShape(Shape):
    daily_limit: AtLeastZero = _Q.daily_limit
    per_user: AtLeastZero = _Q.per_user


class LimitsShape(Shape):
    name_chars: AtLeastOne = _L.name_chars
    description_chars: AtLeastOne = _L.description_chars
    url_chars: AtLeastOne = _L.url_chars
    entity_param_chars: AtLeastOne = _L.entity_param_chars
    crm_fields_per_webhook: AtLeastOne = _L.crm_fields_per_webhook
    scheduled_per_rule: AtLeastOne = _L.scheduled_per_rule


class AdminShape(Shape):
    listen: str = ""


class LogShape(Shape):
    format: LogFormat = "text"
    level: NonEmpty = "INFO"  # any case: "info" is what people write


class AlertsShape(Shape):
    webhook: str = ""


class OrgShape(Shape):
    id: NonEmpty
    users: AtLeastOne = 1
    time_zone: NonEmpty = "UTC"


class BodyShape(Shape):
    format: BodyFormat
    template: NonEmpty
    param: NonEmpty | None = None


class BasicAuthShape(Shape, tag_field="type", tag="basic"):
    username: NonEmpty
    password: str


class BearerAuthShape(Shape, tag_field="type", tag="bearer"):
    token: NonEmpty


class OAuth2AuthShape(Shape, tag_field="type", tag="oauth2"):
    token_url: NonEmpty
    client_id: NonEmpty
    client_secret: NonEmpty
    scope: str = ""
    audience: str = ""


AuthShape = BasicAuthShape | BearerAuthShape | OAuth2AuthShape


class TlsShape(Shape):
    client_cert_file: str = ""
    client_key_file: str = ""
    ca_file: str = ""


class WebhookShape(Shape):
    name: NonEmpty
    url: NonEmpty
    module: NonEmpty
    method: NonEmpty = "POST"  # any case
    description: str = ""
    org: NonEmpty | None = None
    secret: NonEmpty | None = None
    body: BodyShape | None = None
    entity_params: dict[str, str] = {}
    custom_params: dict[str, str] = {}
    headers: dict[str, str] = {}
    auth: AuthShape | None = None
    tls: TlsShape | None = None


class ScheduledShape(Shape):
    webhook: NonEmpty
    relative_to: NonEmpty = "trigger"
    offset: str | None = None
    at: Any = None  # "HH:MM", or a TOML local time (09:00:00)


class RuleShape(Shape):
    id: NonEmpty
    module: NonEmpty
    org: NonEmpty | None = None
    trigger: Trigger = "create_or_edit"
    fields: tuple[NonEmpty, ...] = ()
    repeat: Repeat = "every"
    criteria: Any = None  # a tree of all/any/not: crmhooks.config.criteria
    # A list is refused by a named check, with a message saying why.
    instant: NonEmpty | list[Any] | None = None
    scheduled: tuple[ScheduledShape, ...] = ()


# The top-level keys of the file, and those of a config-topic document.
FILE_KEYS = (
    "kafka",
    "store",
    "delivery",
    "quota",
    "limits",
    "admin",
    "log",
    "alerts",
    "orgs",
    "webhooks",
    "rules",
    "custom_modules",
)
DOCUMENT_KEYS = ("org", "webhooks", "rules")
