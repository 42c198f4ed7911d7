"""Config loading and validation: every rule of SPEC §3, each error naming its item."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from datetime import time
from pathlib import Path
from typing import Any

import pytest

from crmhooks.config import (
    AllOf,
    AnyOf,
    Condition,
    Config,
    Not,
    OAuth2Auth,
    config_from_mapping,
    load_config,
)
from crmhooks.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ENV = {"CREATOR_API_KEY": "key-123", "SIGNING": SECRET}

Raw = dict[str, Any]


def base() -> Raw:
    """A small valid config; each case breaks one thing in a fresh copy."""
    return copy.deepcopy(
        {
            "orgs": [
                {"id": "org-acme", "users": 12, "time_zone": "Asia/Shanghai"},
                {"id": "org-beta"},
            ],
            "webhooks": [
                {
                    "name": "CreatorCommission",
                    "url": "https://creator.example.com/api/xml/write",
                    "module": "Potentials",
                    "org": "org-acme",
                    "secret": "${env:SIGNING}",
                    "body": {
                        "format": "xml",
                        "param": "XMLString",
                        "template": "<a><b>${Potentials.Potential Name}</b>"
                        "<c>${Accounts.Account Name}</c></a>",
                    },
                    "entity_params": {"deal": "${Potentials.Potential Name}"},
                    "custom_params": {"apikey": "${env:CREATOR_API_KEY}", "zc_ownername": "acme"},
                },
                {
                    "name": "LeadHook",
                    "url": "https://hooks.example.com/lead",
                    "module": "Leads",
                    "method": "GET",
                },
                {
                    "name": "BetaHook",
                    "url": "https://hooks.example.com/beta",
                    "module": "Potentials",
                    "org": "org-beta",
                },
            ],
            "rules": [
                {
                    "id": "commission-on-close",
                    "org": "org-acme",
                    "module": "Potentials",
                    "trigger": "create_or_edit",
                    "criteria": {
                        "all": [
                            {"field": "Type", "op": "is", "value": "New Business"},
                            {"field": "Stage", "op": "is", "value": "Closed Won"},
                        ]
                    },
                    "instant": "CreatorCommission",
                    "scheduled": [
                        {
                            "webhook": "CreatorCommission",
                            "relative_to": "Payment Due",
                            "offset": "-1d",
                            "at": "09:00",
                        }
                    ],
                }
            ],
        }
    )


def _set(path: str, value: Any) -> Callable[[Raw], None]:
    """A mutation setting ``a.b[0].c`` (``value is DELETE`` removes the key)."""

    def mutate(raw: Raw) -> None:
        node: Any = raw
        parts = path.replace("]", "").replace("[", ".").split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        last = parts[-1]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


DELETE = object()
WH = "webhooks[CreatorCommission]"
RULE = "rules[commission-on-close]"
CRIT = f"{RULE}.criteria"


def _crit(node: Any) -> Callable[[Raw], None]:
    return _set("rules[0].criteria", node)


def _scheduled(n: int) -> Callable[[Raw], None]:
    return _set(
        "rules[0].scheduled",
        [{"webhook": "CreatorCommission", "offset": f"{i}h"} for i in range(n)],
    )


def _add_webhook(**fields: Any) -> Callable[[Raw], None]:
    def mutate(raw: Raw) -> None:
        raw["webhooks"].append(fields)

    return mutate


def _add_org(**fields: Any) -> Callable[[Raw], None]:
    def mutate(raw: Raw) -> None:
        raw["orgs"].append(fields)

    return mutate


def _add_rule(**fields: Any) -> Callable[[Raw], None]:
    def mutate(raw: Raw) -> None:
        raw["rules"].append({"module": "Potentials", **fields})

    return mutate


def _many_fields(n: int) -> Callable[[Raw], None]:
    """A body with ``n`` distinct fields, besides the entity param's Potential Name."""
    template = "<a>" + "".join(f"<f>${{Potentials.F{i}}}</f>" for i in range(n)) + "</a>"
    return _set("webhooks[0].body.template", template)


# (mutation, the exact item the error must name, a fragment of its message)
INVALID: list[tuple[str, Callable[[Raw], None], str, str]] = [
    ("top-unknown", _set("webhook", []), "webhook", "did you mean 'webhooks'"),
    ("custom-module-standard", _set("custom_modules", ["Leads"]), "custom_modules[0]", "standard"),
    ("custom-module-dup", _set("custom_modules", ["Ships", "Ships"]), "custom_modules[1]", "dupl"),
    ("custom-modules-type", _set("custom_modules", "Ships"), "custom_modules", "array"),
    # [kafka]
    ("kafka-unknown", _set("kafka.bootstrap_server", "x"), "kafka.bootstrap_server", "unknown"),
    ("kafka-type", _set("kafka.group_id", 5), "kafka.group_id", "string"),
    ("kafka-empty", _set("kafka.events_topic", ""), "kafka.events_topic", "empty"),
    ("kafka-partitions", _set("kafka.partitions", 0), "kafka.partitions", "≥ 1"),
    ("kafka-max-bytes", _set("kafka.max_event_bytes", -5), "kafka.max_event_bytes", "≥ 1"),
    ("kafka-not-table", _set("kafka", "x"), "kafka", "table"),
    # [store]
    ("store-path", _set("store.path", ""), "store.path", "empty"),
    ("store-unknown", _set("store.file", "x"), "store.file", "unknown"),
    # [delivery]
    ("connect-timeout", _set("delivery.connect_timeout_s", 0), "delivery.connect_timeout_s", "pos"),
    ("total-timeout", _set("delivery.total_timeout_s", -1), "delivery.total_timeout_s", "pos"),
    ("timeout-bool", _set("delivery.total_timeout_s", True), "delivery.total_timeout_s", "pos"),
    ("in-flight", _set("delivery.max_in_flight", 0), "delivery.max_in_flight", "≥ 1"),
    (
        "in-flight-host",
        _set("delivery.max_in_flight_per_host", 1.5),
        "delivery.max_in_flight_per_host",
        "integer",
    ),
    ("retry-type", _set("delivery.retry_delays_s", 900), "delivery.retry_delays_s", "array"),
    ("retry-item", _set("delivery.retry_delays_s", [900, -1]), "delivery.retry_delays_s[1]", "≥ 0"),
    (
        "suspend",
        _set("delivery.suspend_after_failed_actions", -1),
        "delivery.suspend_after_failed_actions",
        "≥ 0",
    ),
    (
        "private-nets",
        _set("delivery.allow_private_networks", "yes"),
        "delivery.allow_private_networks",
        "true or false",
    ),
    ("past-due", _set("delivery.past_due_grace_s", -1), "delivery.past_due_grace_s", "≥ 0"),
    ("shutdown", _set("delivery.shutdown_grace_s", "10"), "delivery.shutdown_grace_s", "≥ 0"),
    ("delivery-unknown", _set("delivery.retries", 1), "delivery.retries", "unknown"),
    # [quota] and [limits]
    ("quota-daily", _set("quota.daily_limit", -1), "quota.daily_limit", "≥ 0"),
    ("quota-user", _set("quota.per_user", 2.5), "quota.per_user", "integer"),
    ("limits", _set("limits.url_chars", 0), "limits.url_chars", "≥ 1"),
    # [[orgs]]
    ("orgs-not-array", _set("orgs", {"id": "x"}), "orgs", "[[orgs]]"),
    ("org-dup", _add_org(id="org-acme"), "orgs[org-acme].id", "duplicate"),
    ("org-no-id", _add_org(users=3), "orgs[2].id", "required"),
    ("org-users", _set("orgs[0].users", 0), "orgs[org-acme].users", "≥ 1"),
    ("org-tz", _set("orgs[0].time_zone", "Mars/Olympus"), "orgs[org-acme].time_zone", "IANA"),
    ("org-tz-path", _set("orgs[0].time_zone", "../etc"), "orgs[org-acme].time_zone", "IANA"),
    ("org-unknown-key", _set("orgs[0].timezone", "UTC"), "orgs[org-acme].timezone", "time_zone"),
    # [[webhooks]]
    (
        "wh-no-name",
        _add_webhook(url="https://x.example", module="Leads"),
        "webhooks[3].name",
        "req",
    ),
    (
        "wh-name-chars",
        _set("webhooks[1].name", "Lead Hook"),
        "webhooks[Lead Hook].name",
        "letters or digits",
    ),
    ("wh-name-long", _set("webhooks[1].name", "A" * 51), f"webhooks[{'A' * 51}].name", "1 to 50"),
    (
        "wh-name-dup",
        _add_webhook(name="LeadHook", url="https://x.example", module="Leads"),
        "webhooks[LeadHook].name",
        "duplicate",
    ),
    ("wh-desc", _set("webhooks[0].description", "d" * 201), f"{WH}.description", "200 char"),
    (
        "wh-url-long",
        _set("webhooks[0].url", "https://creator.example.com/" + "a" * 180),
        f"{WH}.url",
        "longer than 200 characters",
    ),
    ("wh-url-scheme", _set("webhooks[0].url", "ftp://x.example/a"), f"{WH}.url", "http"),
    ("wh-url-relative", _set("webhooks[0].url", "/api/xml/write"), f"{WH}.url", "absolute"),
    (
        "wh-url-host-placeholder",
        _set("webhooks[0].url", "https://${Potentials.Host}/a"),
        f"{WH}.url",
        "placeholders",
    ),
    (
        "wh-url-port-placeholder",
        _set("webhooks[0].url", "https://x.example:${Potentials.Port}/a"),
        f"{WH}.url",
        "placeholders",
    ),
    ("wh-url-port", _set("webhooks[0].url", "https://x.example:99999/a"), f"{WH}.url", "valid"),
    ("wh-url-crlf", _set("webhooks[0].url", "https://x.example/a\r\nX: y"), f"{WH}.url", "control"),
    (
        "wh-url-env",
        _set("webhooks[0].url", "https://x.example/${env:K}"),
        f"{WH}.url",
        "environment variable K is not set",
    ),
    ("wh-url-missing", _set("webhooks[0].url", DELETE), f"{WH}.url", "required"),
    ("wh-method", _set("webhooks[0].method", "PUT"), f"{WH}.method", "POST or GET"),
    ("wh-calls", _set("webhooks[0].module", "Calls"), f"{WH}.module", "does not allow webhooks"),
    ("wh-notes", _set("webhooks[0].module", "Notes"), f"{WH}.module", "does not allow webhooks"),
    (
        "wh-custom-placeholder",
        _set("webhooks[0].custom_params.zc_ownername", "${Potentials.Potential Owner}"),
        f"{WH}.custom_params.zc_ownername",
        "put CRM fields in entity_params",
    ),
    ("wh-module", _set("webhooks[0].module", "Widgets"), f"{WH}.module", "unknown module"),
    ("wh-org", _set("webhooks[0].org", "org-nope"), f"{WH}.org", "unknown organisation"),
    ("wh-unknown-key", _set("webhooks[0].urll", "x"), f"{WH}.urll", "did you mean 'url'"),
    ("body-format", _set("webhooks[0].body.format", "yaml"), f"{WH}.body.format", "xml or json"),
    ("body-template", _set("webhooks[0].body.template", DELETE), f"{WH}.body.template", "required"),
    ("body-param", _set("webhooks[0].body.param", "XML String"), f"{WH}.body.param", "identifier"),
    ("body-unknown", _set("webhooks[0].body.params", "x"), f"{WH}.body.params", "unknown"),
    (
        "body-env",
        _set("webhooks[0].body.template", "<a>${env:NOPE_KEY}</a>"),
        f"{WH}.body.template",
        "environment variable NOPE_KEY is not set",
    ),
    (
        "entity-long",
        _set("webhooks[0].entity_params.deal", "x" * 3001),
        f"{WH}.entity_params.deal",
        "3000",
    ),
    ("entity-type", _set("webhooks[0].entity_params.deal", 5), f"{WH}.entity_params.deal", "str"),
    (
        "entity-env",
        _set("webhooks[0].entity_params.deal", "${env:NOPE_KEY}"),
        f"{WH}.entity_params.deal",
        "environment variable NOPE_KEY is not set",
    ),
    ("params-table", _set("webhooks[0].custom_params", ["a"]), f"{WH}.custom_params", "table"),
    ("param-dup", _set("webhooks[0].custom_params.deal", "x"), WH, "'deal' is defined more"),
    (
        "custom-env-missing",
        _set("webhooks[0].custom_params.apikey", "${env:NOPE_KEY}"),
        f"{WH}.custom_params.apikey",
        "environment variable NOPE_KEY is not set",
    ),
    (
        "custom-env-name",
        _set("webhooks[0].custom_params.apikey", "${env:1BAD}"),
        f"{WH}.custom_params.apikey",
        "invalid environment variable name",
    ),
    (
        "secret-env-missing",
        _set("webhooks[0].secret", "${env:NOPE_SECRET}"),
        f"{WH}.secret",
        "environment variable NOPE_SECRET is not set",
    ),
    ("secret-prefix", _set("webhooks[0].secret", "MfKQ9r8GKYqrTwjU"), f"{WH}.secret", "whsec_"),
    ("secret-base64", _set("webhooks[0].secret", "whsec_not base64!"), f"{WH}.secret", "base64"),
    ("secret-empty", _set("webhooks[0].secret", "whsec_"), f"{WH}.secret", "whsec_"),
    ("crm-fields", _many_fields(10), WH, "11 distinct CRM fields; at most 10"),
    (
        "namespace",
        _set("webhooks[0].entity_params.deal", "${Widgets.Size}"),
        f"{WH}.entity_params.deal",
        "unknown namespace",
    ),
    # [[rules]]
    ("rules-not-array", _set("rules", {}), "rules", "[[rules]]"),
    ("rule-no-id", _add_rule(), "rules[1].id", "required"),
    ("rule-id-chars", _add_rule(id="bad id!"), "rules[bad id!].id", "letters, digits"),
    ("rule-id-dup", _add_rule(id="commission-on-close"), f"{RULE}.id", "duplicate"),
    ("rule-module", _set("rules[0].module", "Widgets"), f"{RULE}.module", "unknown module"),
    ("rule-module-missing", _set("rules[0].module", DELETE), f"{RULE}.module", "required"),
    ("rule-calls", _set("rules[0].module", "Calls"), f"{RULE}.module", "does not allow webhooks"),
    ("rule-org", _set("rules[0].org", "org-zeta"), f"{RULE}.org", "unknown organisation"),
    ("rule-unknown-key", _set("rules[0].trigers", "edit"), f"{RULE}.trigers", "trigger"),
    ("instant-unknown", _set("rules[0].instant", "Nope"), f"{RULE}.instant", "unknown webhook"),
    ("instant-list", _set("rules[0].instant", ["A", "B"]), f"{RULE}.instant", "at most one"),
    ("instant-module", _set("rules[0].instant", "LeadHook"), f"{RULE}.instant", "for Leads"),
    ("instant-org", _set("rules[0].instant", "BetaHook"), f"{RULE}.instant", "org-beta"),
    (
        "orgless-rule-org-webhook",
        _set("rules[0].org", DELETE),
        f"{RULE}.instant",
        "belongs to organisation 'org-acme'",
    ),
    ("trigger", _set("rules[0].trigger", "update"), f"{RULE}.trigger", "must be one of"),
    ("fields-missing", _set("rules[0].trigger", "field_update"), f"{RULE}.fields", "at least one"),
    ("fields-extra", _set("rules[0].fields", ["Stage"]), f"{RULE}.fields", "only the field_update"),
    ("fields-item", _set("rules[0].fields", ["Stage", ""]), f"{RULE}.fields[1]", "non-empty"),
    ("repeat", _set("rules[0].repeat", "twice"), f"{RULE}.repeat", "once or every"),
    ("crit-table", _crit("Stage is Closed Won"), CRIT, "must be a table"),
    (
        "crit-op",
        _crit({"all": [{"field": "Stage", "op": "iss", "value": "x"}]}),
        f"{CRIT}.all[0].op",
        "unknown operator 'iss'",
    ),
    ("crit-no-field", _crit({"op": "is", "value": "x"}), f"{CRIT}.field", "required"),
    (
        "crit-unknown-key",
        _crit({"field": "Stage", "op": "is", "valeu": "x"}),
        f"{CRIT}.valeu",
        "did you mean 'value'",
    ),
    ("crit-two-groups", _crit({"all": [], "any": []}), CRIT, "exactly one key"),
    ("crit-empty-group", _crit({"any": []}), f"{CRIT}.any", "non-empty array"),
    (
        "crit-not",
        _crit({"not": {"field": "Stage", "op": "between", "value": [1, 2, 3]}}),
        f"{CRIT}.not.value",
        "[low, high]",
    ),
    ("crit-in", _crit({"field": "Stage", "op": "in", "value": "x"}), f"{CRIT}.value", "array"),
    ("crit-no-value", _crit({"field": "Stage", "op": "is"}), f"{CRIT}.value", "required for is"),
    (
        "crit-extra-value",
        _crit({"field": "Stage", "op": "is_empty", "value": "x"}),
        f"{CRIT}.value",
        "takes no value",
    ),
    (
        "crit-changed-value",
        _crit({"field": "Stage", "op": "changed", "value": "x"}),
        f"{CRIT}.value",
        "takes no value",
    ),
    ("crit-contains", _crit({"field": "S", "op": "contains", "value": 5}), f"{CRIT}.value", "str"),
    (
        "crit-value-table",
        _crit({"field": "S", "op": "is", "value": {"a": 1}}),
        f"{CRIT}.value",
        "string, number",
    ),
    ("scheduled-6", _scheduled(6), f"{RULE}.scheduled[5]", "at most 5 scheduled actions"),
    ("scheduled-type", _set("rules[0].scheduled", {"a": 1}), f"{RULE}.scheduled", "array"),
    (
        "scheduled-webhook",
        _set("rules[0].scheduled[0].webhook", "Nope"),
        f"{RULE}.scheduled[0].webhook",
        "unknown webhook",
    ),
    (
        "scheduled-module",
        _set("rules[0].scheduled[0].webhook", "LeadHook"),
        f"{RULE}.scheduled[0].webhook",
        "for Leads",
    ),
    (
        "offset",
        _set("rules[0].scheduled[0].offset", "1 day"),
        f"{RULE}.scheduled[0].offset",
        "such as '-1d'",
    ),
    ("at", _set("rules[0].scheduled[0].at", "25:00"), f"{RULE}.scheduled[0].at", "time of day"),
    ("at-type", _set("rules[0].scheduled[0].at", 9), f"{RULE}.scheduled[0].at", "HH:MM"),
    (
        "relative-to",
        _set("rules[0].scheduled[0].relative_to", ""),
        f"{RULE}.scheduled[0].relative_to",
        "empty",
    ),
    (
        "scheduled-key",
        _set("rules[0].scheduled[0].delay", "1h"),
        f"{RULE}.scheduled[0].delay",
        "unknown",
    ),
]


def test_base_config_is_valid() -> None:
    config = config_from_mapping(base(), ENV)
    assert set(config.webhooks) == {"CreatorCommission", "LeadHook", "BetaHook"}
    assert [r.id for r in config.rules] == ["commission-on-close"]


@pytest.mark.parametrize(
    ("mutate", "item", "fragment"),
    [pytest.param(m, item, frag, id=case) for case, m, item, frag in INVALID],
)
def test_invalid_config_names_the_item(
    mutate: Callable[[Raw], None], item: str, fragment: str
) -> None:
    raw = base()
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw, ENV)
    named = [e for e in info.value.errors if e.startswith(f"{item}: ")]
    assert named, f"no error names {item!r}: {info.value.errors}"
    assert any(fragment in e for e in named), info.value.errors


def test_ten_crm_fields_are_allowed() -> None:
    raw = base()
    _many_fields(9)(raw)
    assert "CreatorCommission" in config_from_mapping(raw, ENV).webhooks


def test_url_error_message_is_exact() -> None:
    raw = base()
    raw["webhooks"][0]["url"] = "https://creator.example.com/" + "a" * 180
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw, ENV)
    assert info.value.errors == ("webhooks[CreatorCommission].url: longer than 200 characters",)


def test_every_error_is_collected() -> None:
    raw = base()
    raw["kafka"] = {"partitions": 0}
    raw["orgs"][0]["time_zone"] = "Nowhere/Land"
    raw["webhooks"][1]["method"] = "PATCH"
    raw["rules"][0]["trigger"] = "sometimes"
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw, {})
    assert [e.split(":")[0] for e in info.value.errors] == [
        "kafka.partitions",
        "orgs[org-acme].time_zone",
        "webhooks[CreatorCommission].secret",
        "webhooks[CreatorCommission].custom_params.apikey",
        "webhooks[LeadHook].method",
        "rules[commission-on-close].trigger",
    ]
    assert str(info.value) == "\n".join(info.value.errors)


def test_valid_config_builds_values() -> None:
    config = config_from_mapping(base(), ENV)
    hook = config.webhooks["CreatorCommission"]
    assert hook.custom_params == {"apikey": "key-123", "zc_ownername": "acme"}
    assert hook.secret_params == frozenset({"apikey"})
    assert hook.secret == SECRET
    assert hook.method == "POST"
    assert config.webhooks["LeadHook"].method == "GET"
    rule = config.rules[0]
    assert rule.repeat == "every"  # the documented default
    assert rule.criteria == AllOf(
        (Condition("Type", "is", "New Business"), Condition("Stage", "is", "Closed Won"))
    )
    assert rule.scheduled[0].offset_ms == -86_400_000
    assert rule.scheduled[0].at == time(9, 0)
    assert rule.webhook_names == ("CreatorCommission", "CreatorCommission")
    assert config.org("org-acme").users == 12
    assert config.org("org-unknown").time_zone == "UTC"


def test_env_embedded_in_a_value_is_resolved_and_secret() -> None:
    raw = base()
    raw["webhooks"][1]["custom_params"] = {"auth": "Bearer ${env:TOKEN}", "plain": "x"}
    config = config_from_mapping(raw, {**ENV, "TOKEN": "t0k"})
    hook = config.webhooks["LeadHook"]
    assert hook.custom_params == {"auth": "Bearer t0k", "plain": "x"}
    assert hook.secret_params == frozenset({"auth"})


def test_unpadded_secret_is_accepted() -> None:
    raw = base()
    raw["webhooks"][0]["secret"] = "whsec_dGVzdA"  # base64 of "test" without padding
    assert config_from_mapping(raw, ENV).webhooks["CreatorCommission"].secret == "whsec_dGVzdA"


def test_defaults_of_an_empty_config() -> None:
    assert config_from_mapping({}, {}) == Config()


def test_environment_overrides_connection_settings() -> None:
    raw = base()
    raw["kafka"] = {"bootstrap_servers": "file:9092"}
    raw["store"] = {"path": "file.db"}
    config = config_from_mapping(
        raw, {**ENV, "CRMHOOKS_BOOTSTRAP_SERVERS": "env:19092", "CRMHOOKS_STORE_PATH": "env.db"}
    )
    assert config.kafka.bootstrap_servers == "env:19092"
    assert config.store.path == "env.db"
    assert config_from_mapping(raw, ENV).kafka.bootstrap_servers == "file:9092"


def test_module_names_are_stored_canonical() -> None:
    raw = base()
    raw["webhooks"][0]["module"] = "Deals"
    raw["rules"][0]["module"] = "Deal"
    config = config_from_mapping(raw, ENV)
    assert config.webhooks["CreatorCommission"].module == "Potentials"
    assert config.rules[0].module == "Potentials"


def test_custom_modules_are_known() -> None:
    raw = base()
    raw["custom_modules"] = ["Shipments"]
    raw["webhooks"][1] = {"name": "Ship", "url": "https://x.example/s", "module": "Shipments"}
    raw["rules"].append({"id": "ship", "module": "Shipments", "instant": "Ship"})
    config = config_from_mapping(raw, ENV)
    assert config.webhooks["Ship"].module == "Shipments"
    assert config.catalog.canonical("Shipments") == "Shipments"


def test_criteria_from_toml() -> None:
    text = """
    [[rules]]
    id = "r"
    module = "Leads"
    trigger = "field_update"
    fields = ["Lead Status"]
    criteria = { any = [
      { field = "Annual Revenue", op = "between", value = [1000, 5000.5] },
      { field = "Created", op = "ge", value = 2026-11-30 },
      { field = "Seen", op = "lt", value = 2026-11-30T09:30:00 },
      { not = { field = "Accounts.Industry", op = "in", value = ["Retail", "Food"] } },
      { field = "Email", op = "is_empty" },
    ] }
    """
    rule = config_from_mapping(tomllib.loads(text), {}).rules[0]
    assert rule.fields == ("Lead Status",)
    assert rule.criteria == AnyOf(
        (
            Condition("Annual Revenue", "between", (1000, 5000.5)),
            Condition("Created", "ge", "2026-11-30"),
            Condition("Seen", "lt", "2026-11-30 09:30"),
            Not(Condition("Accounts.Industry", "in", ("Retail", "Food"))),
            Condition("Email", "is_empty", None),
        )
    )
    hash(rule)  # values are tuples: rules can key caches


def test_toml_local_time_for_at() -> None:
    raw = base()
    raw["rules"][0]["scheduled"][0]["at"] = time(9, 30)
    assert config_from_mapping(raw, ENV).rules[0].scheduled[0].at == time(9, 30)


def test_limits_may_be_raised() -> None:
    raw = base()
    raw["webhooks"][1]["url"] = "https://x.example/" + "a" * 250
    with pytest.raises(ConfigError):
        config_from_mapping(raw, ENV)
    raw["limits"] = {"url_chars": 300}
    assert config_from_mapping(raw, ENV).limits.url_chars == 300


def test_load_config_reports_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", env={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[kafka\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken, env={})


EXAMPLE_ENV = {
    "CREATOR_SIGNING_SECRET": SECRET,
    "CREATOR_API_KEY": "creator-key",
    "CREATOR_API_TICKET": "creator-ticket",
    "CREATOR_HEADER_KEY": "header-key",
    "CREATOR_CLIENT_SECRET": "client-secret",
    "SMS_API_KEY": "sms-key",
    "DEMO_CLIENT_SECRET": "demo-client-secret",
}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_load(path: Path) -> None:
    config = load_config(path, env=EXAMPLE_ENV)
    assert {"CreatorCommission", "PaymentDueSms"} <= set(config.webhooks)
    rule = config.rules[0]
    assert rule.instant == "CreatorCommission"
    assert rule.scheduled[0].webhook == "PaymentDueSms"


def test_example_configs_exist() -> None:
    assert {p.name for p in CONFIG_DIR.glob("*.toml")} >= {"crmhooks.toml", "demo.toml"}


def test_main_example_needs_its_secrets() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG_DIR / "crmhooks.toml", env={})
    assert info.value.errors == (
        "webhooks[CreatorCommission].secret: environment variable CREATOR_SIGNING_SECRET "
        "is not set",
        "webhooks[CreatorCommission].custom_params.apikey: environment variable CREATOR_API_KEY "
        "is not set",
        "webhooks[CreatorCommission].custom_params.ticket: environment variable "
        "CREATOR_API_TICKET is not set",
        "webhooks[PaymentDueSms].body.template: environment variable SMS_API_KEY is not set",
    )


def test_demo_config_settings() -> None:
    config = load_config(CONFIG_DIR / "demo.toml", env=EXAMPLE_ENV)
    assert config.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert config.store.path == "var/demo.db"
    assert config.delivery.allow_private_networks is True
    assert config.delivery.retry_delays_s == (2.0,)
    assert config.org("org-acme").time_zone == "Asia/Shanghai"
    spec = config.rules[0].scheduled[0]
    assert (spec.relative_to, spec.offset_ms, spec.at) == ("trigger", 5000, None)
    assert all(r.repeat == "every" for r in config.rules)
    # The seed's SMS document, its key inside it; a webhook behind OAuth2.
    sms = config.webhooks["PaymentDueSms"]
    assert sms.body is not None
    assert "<apikey>${env:SMS_API_KEY}</apikey>" in sms.body.template
    assert sms.env_values == {"env:SMS_API_KEY": "sms-key"}
    assert isinstance(config.webhooks["PortalAccess"].auth, OAuth2Auth)


def test_every_template_problem_of_one_webhook_is_named() -> None:
    raw = base()
    raw["webhooks"][0]["url"] = "https://x.example/${Potentials.Host"
    raw["webhooks"][0]["entity_params"]["deal"] = "${Nowhere.Field}"
    raw["webhooks"][0]["body"]["template"] = "<a>${Potentials.}</a>"
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw, ENV)
    named = sorted(e.split(":")[0] for e in info.value.errors if e.startswith(WH))
    assert named == [f"{WH}.body.template", f"{WH}.entity_params.deal", f"{WH}.url"], (
        info.value.errors
    )
