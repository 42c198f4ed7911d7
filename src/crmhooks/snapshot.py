"""The configuration in force: one compiled, immutable snapshot, swapped whole.

A ``ConfigSnapshot`` is everything the processor looks up in the configuration
(rules by organisation and module, compiled webhooks and the endpoint their
requests share, organisation settings), built once from a ``Config`` and never
changed. ``LiveConfig`` holds the one in force; a new configuration (a restart
with another file, a reload, later an organisation's document) is a new snapshot
put in its place in one assignment. Nothing copies what it needs out of a
snapshot: every lookup goes through ``LiveConfig.current`` at the moment of use,
so an action that fires after a change is sent as the webhook is *now*, and one
whose rule or webhook is gone is found gone (SPEC §5, "Config changes").

An action keeps only names (its ``org_id``, ``rule_id`` and ``webhook``); lookups
take the organisation too, so that organisations may later have configurations
of their own in which the same names mean other things.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from crmhooks import settings
from crmhooks.actions import Action
from crmhooks.auth import Auth, BasicAuth, BearerAuth, OAuth2ClientCredentials
from crmhooks.config import Config, OrgSettings, Rule, Webhook
from crmhooks.endpoints import ClientTls, Endpoint
from crmhooks.events import RecordEvent
from crmhooks.modules import ModuleCatalog
from crmhooks.rules import RuleIndex
from crmhooks.templates import CompiledWebhook


@dataclass(frozen=True, slots=True)
class Target:
    """A webhook as it is sent: its definition, its compiled templates, what the
    transport needs besides the request (signing, auth, TLS, secrets to scrub), and
    the host (``scheme://host:port``) whose in-flight bound its requests share."""

    webhook: Webhook
    compiled: CompiledWebhook
    endpoint: Endpoint
    host: str

    @classmethod
    def of(cls, webhook: Webhook, catalog: ModuleCatalog) -> Target:
        return cls(
            webhook,
            CompiledWebhook(webhook, catalog),
            endpoint_of(webhook),
            host_key(webhook.url),
        )


def endpoint_of(webhook: Webhook) -> Endpoint:
    """The transport's view of a webhook: its auth and TLS as the transport's values
    (an ``Authorization`` made once, an ``SSLContext`` built once), its secrets."""
    auth: Auth | None = None
    spec = webhook.auth
    if isinstance(spec, settings.BasicAuth):
        auth = BasicAuth(spec.username, spec.password)
    elif isinstance(spec, settings.BearerAuth):
        auth = BearerAuth(spec.token)
    elif isinstance(spec, settings.OAuth2Auth):
        auth = OAuth2ClientCredentials(
            spec.token_url,
            spec.client_id,
            spec.client_secret,
            scope=spec.scope or None,
            audience=spec.audience or None,
        )
    tls = None
    if webhook.tls is not None and (webhook.tls.client_cert_file or webhook.tls.ca_file):
        tls = ClientTls(
            webhook.tls.client_cert_file or None,
            webhook.tls.client_key_file or None,
            webhook.tls.ca_file or None,
        )
    return Endpoint(webhook.secret, auth, tls, webhook.secret_values())


def host_key(url: str) -> str:
    """The endpoint a webhook's requests share (URL hosts never hold placeholders)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"


class ConfigSnapshot:
    """One version of the configuration, compiled. Immutable: swap, never change."""

    __slots__ = ("_rules", "_targets", "catalog", "config", "index", "version")

    def __init__(self, config: Config, version: int = 1) -> None:
        self.config = config
        self.version = version
        self.catalog = ModuleCatalog(config.custom_modules)
        self.index = RuleIndex(config.rules, self.catalog)
        self._rules = {r.id: r for r in config.rules}
        self._targets = {name: Target.of(w, self.catalog) for name, w in config.webhooks.items()}

    def __repr__(self) -> str:
        return (
            f"ConfigSnapshot(version={self.version}, rules={len(self._rules)}, "
            f"webhooks={len(self._targets)})"
        )

    def org(self, org_id: str) -> OrgSettings:
        return self.config.org(org_id)

    def rule(self, org_id: str, rule_id: str) -> Rule | None:
        """The rule as it applies to ``org_id`` now; None when there is none."""
        rule = self._rules.get(rule_id)
        if rule is None or (rule.org is not None and rule.org != org_id):
            return None
        return rule

    def target(self, org_id: str, webhook: str) -> Target | None:
        """The webhook as ``org_id`` sends it now; None when there is none."""
        found = self._targets.get(webhook)
        if found is None or (found.webhook.org is not None and found.webhook.org != org_id):
            return None
        return found

    def removed(self, action: Action) -> bool:
        """Whether the action's rule, or its webhook in that rule, no longer exists."""
        rule = self.rule(action.org_id, action.rule_id)
        return (
            rule is None
            or action.webhook not in rule.webhook_names
            or self.target(action.org_id, action.webhook) is None
        )

    def candidates(self, org_id: str, module: str) -> Sequence[Rule]:
        """The rules of the organisation for events of ``module``, in config order."""
        return self.index.candidates(org_id, module)

    def needs_planning(self, event: RecordEvent) -> bool:
        return self.index.needs_planning(event)


class LiveConfig:
    """The snapshot in force. Parts read ``current`` each time they need it."""

    __slots__ = ("current",)

    def __init__(self, snapshot: ConfigSnapshot) -> None:
        self.current = snapshot

    @classmethod
    def of(cls, config: Config) -> LiveConfig:
        return cls(ConfigSnapshot(config))

    def swap(self, config: Config) -> ConfigSnapshot:
        """Put a new snapshot of ``config`` in force; the one before goes on serving
        whoever holds it (a request being sent finishes as it started)."""
        self.current = ConfigSnapshot(config, self.current.version + 1)
        return self.current

    def __repr__(self) -> str:
        return f"LiveConfig({self.current!r})"
