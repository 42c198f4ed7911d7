"""The configuration in force: the file compiled, and the organisations' own documents.

A ``ConfigSnapshot`` is everything the processor looks up in the configuration
(rules by organisation and module, compiled webhooks and the endpoint their
requests share, organisation settings). It is the config file compiled once
(``CompiledFile``, never changed) and, with a config topic, the organisations'
documents (``orgconfig.OrgConfigs``): an organisation with a document in force is
looked up in its compiled document (``CompiledOrg``: its own rules, webhooks and
settings, and the file's organisation-less ones), every other in the file (SPEC
§3.2). ``LiveConfig`` holds the one in force: a reload puts a new snapshot in its
place in one assignment, and so does every document applied (a new version; the
organisation's compiled document is itself a value swapped whole). Nothing copies
what it needs out of a snapshot: every lookup goes through ``LiveConfig.current``
at the moment of use, so an action that fires after a change is sent as the
webhook is *now*, and one whose rule or webhook is gone is found gone (SPEC §5,
"Config changes"). A request being sent holds its ``Target``: it finishes as it
started.

An action keeps only names (its ``org_id``, ``rule_id`` and ``webhook``); every
lookup takes the organisation, as organisations' documents may use the same names
for other things.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from crmhooks import settings
from crmhooks.actions import Action
from crmhooks.auth import Auth, BasicAuth, BearerAuth, OAuth2ClientCredentials
from crmhooks.config import Config, OrgSettings, Rule, Webhook
from crmhooks.endpoints import ClientTls, Endpoint
from crmhooks.events import RecordEvent
from crmhooks.modules import ModuleCatalog
from crmhooks.record_event import EventView
from crmhooks.rules import RuleIndex
from crmhooks.templates import CompiledWebhook

if TYPE_CHECKING:
    from crmhooks.orgconfig import OrgConfigs


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


class CompiledFile:
    """The config file compiled: what organisations without a document use, and the
    organisation-less rules and webhooks that every organisation shares. Immutable."""

    __slots__ = ("catalog", "config", "index", "pairs", "rules", "shared_index", "targets")

    def __init__(self, config: Config) -> None:
        self.config = config
        self.catalog = ModuleCatalog(config.custom_modules)
        self.index = RuleIndex(config.rules, self.catalog)
        self.rules = {r.id: r for r in config.rules}
        self.targets = {name: Target.of(w, self.catalog) for name, w in config.webhooks.items()}
        # (rule id, webhook) → the rule and the webhook's target, for every webhook a
        # rule names that exists: what an action firing asks (``live_target``).
        self.pairs = {
            (rule.id, name): (rule, self.targets[name])
            for rule in config.rules
            for name in rule.webhook_names
            if name in self.targets
        }
        shared = [r for r in config.rules if r.org is None]
        # The organisation-less rules alone, for organisations with a document (None:
        # there are none, the common case: nothing to ask per event).
        self.shared_index = RuleIndex(shared, self.catalog) if shared else None

    def __repr__(self) -> str:
        return f"CompiledFile(rules={len(self.rules)}, webhooks={len(self.targets)})"

    def rule(self, org_id: str, rule_id: str) -> Rule | None:
        rule = self.rules.get(rule_id)
        if rule is None or (rule.org is not None and rule.org != org_id):
            return None
        return rule

    def target(self, org_id: str, webhook: str) -> Target | None:
        found = self.targets.get(webhook)
        if found is None or (found.webhook.org is not None and found.webhook.org != org_id):
            return None
        return found

    def live_target(self, org_id: str, rule_id: str, webhook: str) -> Target | None:
        """``target``, when the rule still exists for ``org_id`` and still names the
        webhook; else None (one dict get: asked at every attempt)."""
        pair = self.pairs.get((rule_id, webhook))
        if pair is None:
            return None
        rule, found = pair
        if (rule.org is not None and rule.org != org_id) or (
            found.webhook.org is not None and found.webhook.org != org_id
        ):
            return None
        return found


Criteria = Callable[[Rule, RecordEvent], bool]


class ConfigSnapshot:
    """One version of the configuration: the file compiled, and the organisations'
    documents (``orgs``; None without a config topic). Swap, never change."""

    __slots__ = ("catalog", "config", "file", "index", "needs_planning", "orgs", "version")

    def __init__(
        self, config: Config | CompiledFile, version: int = 1, orgs: OrgConfigs | None = None
    ) -> None:
        self.file = config if isinstance(config, CompiledFile) else CompiledFile(config)
        self.config = self.file.config
        self.catalog = self.file.catalog
        self.index = self.file.index
        self.version = version
        self.orgs = orgs
        # Asked for every event read (intake): without documents, the file's own index
        # answers, with no look-up of the organisation's document first.
        self.needs_planning: Callable[[EventView], bool] = (
            self.file.index.needs_planning if orgs is None else self._needs_planning
        )

    def __repr__(self) -> str:
        documents = "" if self.orgs is None else f", documents={len(self.orgs)}"
        return (
            f"ConfigSnapshot(version={self.version}, rules={len(self.file.rules)}, "
            f"webhooks={len(self.file.targets)}{documents})"
        )

    def org(self, org_id: str) -> OrgSettings:
        compiled = None if self.orgs is None else self.orgs.get(org_id)
        return self.config.org(org_id) if compiled is None else compiled.document.org

    def rule(self, org_id: str, rule_id: str) -> Rule | None:
        """The rule as it applies to ``org_id`` now; None when there is none."""
        compiled = None if self.orgs is None else self.orgs.get(org_id)
        if compiled is None:
            return self.file.rule(org_id, rule_id)
        return compiled.rule(rule_id)

    def target(self, org_id: str, webhook: str) -> Target | None:
        """The webhook as ``org_id`` sends it now; None when there is none."""
        orgs = self.orgs
        compiled = None if orgs is None else orgs.get(org_id)
        if compiled is None:
            return self.file.target(org_id, webhook)
        assert orgs is not None
        return orgs.target(compiled, webhook)

    def gone(self, org_id: str, rule_id: str, webhook: str) -> bool:
        """Whether the rule, or the webhook in that rule, no longer exists for ``org_id``."""
        rule = self.rule(org_id, rule_id)
        return (
            rule is None
            or webhook not in rule.webhook_names
            or self.target(org_id, webhook) is None
        )

    def removed(self, action: Action) -> bool:
        """Whether the action's rule, or its webhook in that rule, no longer exists."""
        return self.gone(action.org_id, action.rule_id, action.webhook)

    def live_target(self, action: Action) -> Target | None:
        """The webhook the action sends to now; None when its rule, or its webhook in
        that rule, no longer exists (``removed``)."""
        orgs = self.orgs
        compiled = None if orgs is None else orgs.get(action.org_id)
        if compiled is None:
            return self.file.live_target(action.org_id, action.rule_id, action.webhook)
        if self.gone(action.org_id, action.rule_id, action.webhook):
            return None
        assert orgs is not None
        return orgs.target(compiled, action.webhook)

    def candidates(self, org_id: str, module: str) -> Sequence[Rule]:
        """The rules of the organisation for events of ``module``, in config order (the
        file's organisation-less ones first when the organisation has a document)."""
        compiled = None if self.orgs is None else self.orgs.get(org_id)
        if compiled is None:
            return self.file.index.candidates(org_id, module)
        return compiled.candidates(module)

    def criteria(self, org_id: str) -> Criteria:
        """Whether an event meets a rule's criteria, with the rules of ``org_id`` compiled."""
        compiled = None if self.orgs is None else self.orgs.get(org_id)
        return self.file.index.criteria_met if compiled is None else compiled.criteria_met

    def _needs_planning(self, event: EventView) -> bool:
        """Asked for every event read: a hit in the organisations' cache is one dict get
        and one mark (``orgconfig``); a miss reads and compiles the document, or finds
        that the organisation has none (the file's rules)."""
        orgs = self.orgs
        assert orgs is not None
        compiled = orgs.cached(event.org_id)
        if compiled is None:
            compiled = orgs.get(event.org_id)
            if compiled is None:
                return self.file.index.needs_planning(event)
        else:
            compiled.seen = True
        return compiled.needs_planning(event)


class LiveConfig:
    """The snapshot in force. Parts read ``current`` each time they need it."""

    __slots__ = ("current",)

    def __init__(self, snapshot: ConfigSnapshot) -> None:
        self.current = snapshot

    @classmethod
    def of(cls, config: Config) -> LiveConfig:
        return cls(ConfigSnapshot(config))

    def swap(self, config: Config | CompiledFile) -> ConfigSnapshot:
        """Put a new snapshot of ``config`` (the file) in force; the organisations'
        documents are compiled again against it as they are needed. The one before goes
        on serving whoever holds it (a request being sent finishes as it started).
        Compiled before anything changes: a config that does not compile (it raises)
        is never in force."""
        file = config if isinstance(config, CompiledFile) else CompiledFile(config)
        orgs = self.current.orgs
        self.current = ConfigSnapshot(
            file, self.current.version + 1, None if orgs is None else orgs.rebased(file)
        )
        return self.current

    def with_documents(self, orgs: OrgConfigs) -> ConfigSnapshot:
        """Organisations' documents from now on (a config topic)."""
        self.current = ConfigSnapshot(self.current.file, self.current.version + 1, orgs)
        return self.current

    def documents_changed(self) -> ConfigSnapshot:
        """An organisation's document was applied: a new version (suspensions' config
        fingerprints are counted again under it)."""
        now = self.current
        self.current = ConfigSnapshot(now.file, now.version + 1, now.orgs)
        return self.current

    def __repr__(self) -> str:
        return f"LiveConfig({self.current!r})"
