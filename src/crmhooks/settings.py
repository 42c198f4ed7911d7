"""The configuration's values: frozen dataclasses built and validated by crmhooks.config."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import time
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from crmhooks.modules import ModuleCatalog

Method = Literal["POST", "GET"]
BodyFormat = Literal["xml", "json"]
Trigger = Literal["create", "edit", "create_or_edit", "field_update", "delete"]
Repeat = Literal["once", "every"]
CompressionType = Literal["none", "gzip", "snappy", "lz4", "zstd"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
Network = IPv4Network | IPv6Network


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
    # Live per-organisation configuration (SPEC §3.2); "" = the file only.
    config_topic: str = ""
    # What crmhooks produces with. "none", not SPEC's example zstd: it is what
    # crmhooks has always produced, it needs no codec library (aiokafka compresses
    # snappy, lz4 and zstd only with cramjam installed), and with no linger the
    # batches are a few small records, which compress little.
    compression_type: CompressionType = "none"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_ca_file: str = ""  # "" = the system's trusted CAs
    ssl_cert_file: str = ""  # client certificate (mutual TLS), PEM; with ssl_key_file
    ssl_key_file: str = ""

    @property
    def changelog(self) -> str:
        return self.changelog_topic or f"{self.group_id}.changelog"

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")


@dataclass(frozen=True, slots=True)
class StoreSettings:
    path: str = "var/crmhooks.db"
    # How long a finished action is remembered: its id, so that reprocessing or
    # replaying its event never sends it again, and what `crmhooks redeliver`
    # needs to send it again (one window for both: an action that can be
    # redelivered must also be known as done). A week covers any replay or
    # redelivery an operator makes after a night's incident.
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
    # The egress proxy ("http://host:port"); "" = connect directly. Never taken
    # from the environment (SPEC §6).
    proxy: str = ""
    # Private ranges the SSRF guard lets through even when it is on.
    allowed_networks: tuple[Network, ...] = ()


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
class AdminSettings:
    """The HTTP endpoint for /metrics, /healthz and /readyz (SPEC §12)."""

    # "" = no endpoint. Off by default so that every process a test or a
    # benchmark starts does not fight over one port; the shipped configs set it.
    listen: str = ""

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to bind (an IPv6 host without brackets), or None when off."""
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.removeprefix("[").removesuffix("]"), int(port)


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: LogFormat = "text"
    level: LogLevel = "INFO"


@dataclass(frozen=True, slots=True)
class AlertSettings:
    # The organisation-less webhook administrator alerts are sent to; None = no alerts.
    webhook: str | None = None


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
class BasicAuth:
    """``Authorization: Basic`` from a username and a password (resolved values)."""

    username: str
    password: str


@dataclass(frozen=True, slots=True)
class BearerAuth:
    """``Authorization: Bearer <token>`` (the resolved token)."""

    token: str


@dataclass(frozen=True, slots=True)
class OAuth2Auth:
    """A token from ``token_url`` by the client-credentials grant (RFC 6749 §4.4)."""

    token_url: str
    client_id: str
    client_secret: str
    scope: str = ""  # "" = not sent
    audience: str = ""  # "" = not sent


AuthSpec = BasicAuth | BearerAuth | OAuth2Auth


@dataclass(frozen=True, slots=True)
class TlsSpec:
    """TLS towards one receiver; "" = not set (the system's CAs, no client certificate)."""

    client_cert_file: str = ""
    client_key_file: str = ""
    ca_file: str = ""


@dataclass(frozen=True, slots=True)
class Webhook:
    """One webhook. Secrets (SPEC §3.1) are resolved when the config is loaded:

    * ``custom_params``, ``secret`` and every ``auth`` field hold resolved values
      (``secret_params`` names the custom params that came from a reference);
    * the template strings (``url``, ``entity_params`` values, ``headers`` values,
      ``body.template``) keep ``${env:NAME}`` / ``${file:PATH}`` as written, and
      ``env_values`` maps the text inside the braces (``"env:NAME"``) to its value,
      for every reference of the webhook.

    The repr shows resolved secrets: never log a Webhook.
    """

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
    # Names of custom params whose value came from ${env:...} or ${file:...}.
    secret_params: frozenset[str] = frozenset()
    # Header name → template (placeholders, secret references), in config order.
    headers: Mapping[str, str] = field(default_factory=dict)
    auth: AuthSpec | None = None
    tls: TlsSpec | None = None
    env_values: Mapping[str, str] = field(default_factory=dict)

    def secret_values(self) -> frozenset[str]:
        """Every secret value this webhook knows, for scrubbing text crmhooks writes.

        Values of references, custom parameters (SPEC §3.1: all of them), header
        values without placeholders, the auth password / token / client secret,
        the URL's password and the signing secret. Empty strings are left out.
        """
        values: list[str] = [*self.env_values.values(), *self.custom_params.values()]
        values += [v for v in self.headers.values() if "${" not in v]
        if isinstance(self.auth, BasicAuth):
            values.append(self.auth.password)
        elif isinstance(self.auth, BearerAuth):
            values.append(self.auth.token)
        elif isinstance(self.auth, OAuth2Auth):
            values.append(self.auth.client_secret)
        if self.secret is not None:
            values.append(self.secret)
        password = _url_password(self.url)
        if password:
            values.append(password)
        return frozenset(v for v in values if v)


def _url_password(url: str) -> str | None:
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return None if password is None else unquote(password)


@dataclass(frozen=True, slots=True)
class Condition:
    field: str
    op: str
    # A str, int, float or bool; a 2-tuple for ``between``, a tuple for ``in``/
    # ``not_in``; None for ``is_empty``/``is_not_empty``/``changed``. TOML dates
    # and datetimes are stored as ISO strings (compared as dates by crmhooks.comparisons).
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


def _union_of_secrets(webhooks: Iterable[Webhook]) -> frozenset[str]:
    return frozenset().union(*(w.secret_values() for w in webhooks))


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
    admin: AdminSettings = AdminSettings()
    log: LogSettings = LogSettings()
    alerts: AlertSettings = AlertSettings()

    def org(self, org_id: str) -> OrgSettings:
        """Settings of an organisation; one not in the config gets the defaults."""
        found = self.orgs.get(org_id)
        return found if found is not None else _default_org(org_id)

    @property
    def catalog(self) -> ModuleCatalog:
        """The modules this config knows: the standard ones and ``custom_modules``."""
        return ModuleCatalog(self.custom_modules)

    def secret_values(self) -> frozenset[str]:
        """Every secret value of the config: its webhooks' and the Kafka SASL password."""
        kafka = {self.kafka.sasl_password} if self.kafka.sasl_password else set()
        return _union_of_secrets(self.webhooks.values()) | kafka


@dataclass(frozen=True, slots=True)
class OrgDocument:
    """One organisation's configuration from the config topic (SPEC §3.2).

    Every webhook and rule belongs to ``org`` (their ``org`` is ``org.id``).
    """

    org: OrgSettings
    webhooks: Mapping[str, Webhook] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()

    def secret_values(self) -> frozenset[str]:
        return _union_of_secrets(self.webhooks.values())
