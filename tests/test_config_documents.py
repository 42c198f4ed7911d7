"""Config-topic documents (SPEC §3.2), every error of a file listed, and the module layers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from crmhooks.config import (
    Config,
    OrgDocument,
    OrgSettings,
    config_from_mapping,
    decode_org_document,
)
from crmhooks.errors import ConfigError
from tests.test_config import SECRET

SRC = Path(__file__).resolve().parents[1] / "src" / "crmhooks"

# The file: an organisation-less webhook and rule that every organisation shares.
FILE = config_from_mapping(
    {
        "custom_modules": ["Shipments"],
        "limits": {"scheduled_per_rule": 1},
        "webhooks": [{"name": "Audit", "url": "https://audit.example.com/", "module": "Leads"}],
        "rules": [{"id": "audit-all", "module": "Leads", "instant": "Audit"}],
    },
    {},
)


def document(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "org": {"id": "org-acme", "users": 12, "time_zone": "Asia/Shanghai"},
        "webhooks": [
            {
                "name": "CreatorCommission",
                "url": "https://creator.example.com/api/xml/write",
                "module": "Potentials",
                "secret": SECRET,
                "custom_params": {"k": "key-123"},
                "body": {"format": "json", "template": '{"deal": "${Potentials.Potential Name}"}'},
            },
            {"name": "ShipHook", "url": "https://ship.example.com/", "module": "Shipments"},
        ],
        "rules": [
            {
                "id": "commission-on-close",
                "module": "Potentials",
                "criteria": {"field": "Stage", "op": "is", "value": "Closed Won"},
                "instant": "CreatorCommission",
                "scheduled": [{"webhook": "CreatorCommission", "offset": "1d", "at": "09:00"}],
            },
            {"id": "leads-audit", "module": "Leads", "trigger": "create", "instant": "Audit"},
        ],
    }
    doc.update(changes)
    return doc


def errors_of(raw: Any, org_id: str | None = "org-acme") -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        decode_org_document(raw, FILE, org_id)
    return info.value.errors


def test_a_json_document_is_decoded_and_belongs_to_its_organisation() -> None:
    doc = decode_org_document(json.dumps(document()).encode(), FILE, "org-acme")
    assert isinstance(doc, OrgDocument)
    assert doc.org == OrgSettings("org-acme", 12, "Asia/Shanghai")
    assert set(doc.webhooks) == {"CreatorCommission", "ShipHook"}
    assert {w.org for w in doc.webhooks.values()} == {"org-acme"}
    assert [(r.id, r.org) for r in doc.rules] == [
        ("commission-on-close", "org-acme"),
        ("leads-audit", "org-acme"),
    ]
    hook = doc.webhooks["CreatorCommission"]
    assert hook.custom_params == {"k": "key-123"}
    assert hook.secret == SECRET
    assert doc.secret_values() >= {"key-123", SECRET}


def test_a_document_reads_neither_the_environment_nor_files(tmp_path: Path) -> None:
    """Whoever writes the topic must not get this process's environment or files sent
    to a URL of theirs: every reference is an error naming its item, and no value of
    the environment or of the file appears in any error."""
    secret_file = tmp_path / "kafka-password"
    secret_file.write_text("file-secret-value\n")
    doc = document()
    hook = doc["webhooks"][0]
    hook["url"] = "https://creator.example.com/?k=${env:CREATOR_API_KEY}&j=${env:SIGNING}"
    hook["custom_params"] = {"k": f"${{file:{secret_file}}}"}
    hook["headers"] = {"X-Key": "${env:CREATOR_API_KEY}"}
    errors = errors_of(doc)
    assert [e.split(": ")[0] for e in errors] == [
        "webhooks[CreatorCommission].url",
        "webhooks[CreatorCommission].custom_params.k",
        "webhooks[CreatorCommission].headers.X-Key",
    ]
    assert all("not read in a config-topic document" in e for e in errors)
    assert not any("file-secret-value" in e or "key-123" in e for e in errors)


def test_a_toml_document_and_a_mapping_give_the_same_result() -> None:
    toml = """
    [org]
    id = "org-beta"
    [[webhooks]]
    name = "BetaHook"
    url = "https://beta.example.com/"
    module = "Leads"
    [[rules]]
    id = "beta"
    module = "Leads"
    instant = "BetaHook"
    """
    from_toml = decode_org_document(toml, FILE, "org-beta")
    as_mapping = {
        "org": {"id": "org-beta"},
        "webhooks": [{"name": "BetaHook", "url": "https://beta.example.com/", "module": "Leads"}],
        "rules": [{"id": "beta", "module": "Leads", "instant": "BetaHook"}],
    }
    assert from_toml == decode_org_document(as_mapping, FILE, "org-beta")
    assert from_toml.rules[0].org == "org-beta"


def test_an_item_of_another_organisation_is_refused() -> None:
    doc = document()
    doc["webhooks"][1]["org"] = "org-beta"
    doc["rules"][0]["org"] = "org-acme"  # its own organisation, written out: fine
    doc["rules"][1]["org"] = "org-beta"
    assert errors_of(doc) == (
        "webhooks[ShipHook].org: the document is organisation 'org-acme'",
        "rules[leads-audit].org: the document is organisation 'org-acme'",
    )


def test_the_document_must_be_the_one_its_key_names() -> None:
    assert errors_of(document(), org_id="org-beta")[0] == "org.id: the document is keyed 'org-beta'"
    assert decode_org_document(document(), FILE).org.id == "org-acme"  # no key given


def test_names_shared_with_the_files_organisation_less_items_are_refused() -> None:
    doc = document()
    doc["webhooks"].append({"name": "Audit", "url": "https://mine.example.com/", "module": "Leads"})
    doc["rules"].append({"id": "audit-all", "module": "Leads"})
    assert errors_of(doc) == (
        "webhooks[Audit].name: the config file has an organisation-less webhook so named",
        "rules[audit-all].id: duplicate rule id 'audit-all'",
    )


def test_the_files_limits_and_custom_modules_apply() -> None:
    doc = document()
    doc["rules"][0]["scheduled"].append({"webhook": "CreatorCommission", "offset": "2d"})
    assert errors_of(doc) == (
        "rules[commission-on-close].scheduled[1]: at most 1 scheduled actions",
    )
    with pytest.raises(ConfigError) as info:
        decode_org_document(document(), Config(), "org-acme")  # no Shipments, no Audit
    assert info.value.errors == (
        "webhooks[ShipHook].module: unknown module 'Shipments'",
        "rules[leads-audit].instant: unknown webhook 'Audit'",
    )


def test_every_error_of_a_document_is_listed() -> None:
    doc = document(extra=1)
    doc["org"]["users"] = 0
    doc["webhooks"][0]["url"] = "ftp://creator.example.com/"
    doc["webhooks"][0]["method"] = "PUT"
    doc["webhooks"][1]["module"] = 7
    doc["rules"][0]["trigger"] = "sometimes"
    doc["rules"][0]["instant"] = "Nope"
    doc["rules"][1]["scheduled"] = [{"webhook": "Audit", "offset": "soon"}]
    assert [e.split(": ")[0] for e in errors_of(doc)] == [
        "extra",
        "org.users",
        "webhooks[CreatorCommission].url",
        "webhooks[CreatorCommission].method",
        "webhooks[ShipHook].module",
        "rules[commission-on-close].trigger",
        "rules[commission-on-close].instant",
        "rules[leads-audit].scheduled[0].offset",
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"org": ', "document: not valid JSON"),
        (b"\xff{}", "document: not UTF-8 text"),
        ("org = ", "document: not valid JSON or TOML"),
        ({"webhooks": []}, "org: required"),
        ({"org": "org-acme"}, "org: must be a table"),
        ([1, 2], "document: must be an object with org, webhooks and rules"),
    ],
)
def test_a_broken_document_is_one_clear_error(raw: Any, message: str) -> None:
    errors = errors_of(raw, org_id=None)
    assert errors[0].startswith(message), errors


def test_a_file_lists_at_least_one_error_per_bad_item() -> None:
    raw: dict[str, Any] = {
        "kafka": {"partitions": "3", "group_id": ""},
        "delivery": {"retry_delays_s": [1, -1, "x"]},
        "orgs": [{"id": "a", "users": 0, "time_zone": "Nowhere"}, "b", {"users": 1}],
        "webhooks": [
            {"name": "A", "url": "ftp://x", "module": "Leads", "entity_params": {"p": 1}},
            {"name": "B", "url": "https://x.example/", "module": "Calls", "bogus": True},
        ],
        "rules": [
            {"id": "r1", "module": "Leads", "repeat": "twice", "instant": "A"},
            {"id": "r2", "module": "Leads", "scheduled": [{"webhook": "B", "at": "25:00"}]},
        ],
    }
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw, {})
    assert [e.split(": ")[0] for e in info.value.errors] == [
        "kafka.group_id",
        "kafka.partitions",
        "delivery.retry_delays_s[1]",
        "delivery.retry_delays_s[2]",
        "orgs[a].users",
        "orgs[a].time_zone",
        "orgs[1]",
        "orgs[2].id",
        "webhooks[A].entity_params.p",
        "webhooks[A].url",
        "webhooks[B].bogus",
        "webhooks[B].module",
        "rules[r1].repeat",
        "rules[r2].scheduled[0].at",
    ]


def test_no_module_below_config_imports_it() -> None:
    """settings, templates and timers come before config: no import cycle through them."""
    importer = re.compile(r"^\s*(from crmhooks\.config\b|from crmhooks import config\b)", re.M)
    below = [SRC / "settings.py", SRC / "timers.py", SRC / "modules.py", SRC / "errors.py"]
    templates = SRC / "templates"
    below += sorted(templates.rglob("*.py")) if templates.is_dir() else [SRC / "templates.py"]
    offenders = [p.name for p in below if importer.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_a_document_is_shown_with_every_secret_masked_even_when_invalid() -> None:
    from crmhooks.config.masking import masked_document

    doc = document()
    hook = doc["webhooks"][0]
    hook["url"] = "https://user:p%40ss@creator.example.com/x"
    hook["headers"] = {"X-Key": "hdr-secret", "X-Deal": "${Potentials.Potential Name}"}
    hook["auth"] = {"type": "bearer", "token": "tok-secret"}
    hook["body"]["template"] = '{"k": "key-123", "d": "${Potentials.Potential Name}"}'
    hook["bogus"] = True  # invalid: masked all the same
    shown = masked_document(doc)
    text = json.dumps(shown)
    for secret in ("key-123", SECRET, "p%40ss", "hdr-secret", "tok-secret"):
        assert secret not in text
    shown_hook = shown["webhooks"][0]
    assert shown_hook["url"] == "https://user:***@creator.example.com/x"
    assert shown_hook["headers"] == {"X-Key": "***", "X-Deal": "${Potentials.Potential Name}"}
    assert shown_hook["body"]["template"] == '{"k": "***", "d": "${Potentials.Potential Name}"}'
    assert doc["webhooks"][0]["custom_params"] == {"k": "key-123"}  # the original untouched


def test_names_are_shown_even_when_a_secret_is_part_of_one() -> None:
    """A custom parameter "globex" must not turn the organisation org-globex into
    org-***, nor a webhook or rule name; a parameter named like a structural key is
    still masked."""
    from crmhooks.config.masking import masked_document

    doc = document()
    doc["org"]["id"] = "org-globex"
    hook = doc["webhooks"][0]
    hook["name"] = "GlobexHook"
    hook["custom_params"] = {"zc_ownername": "globex", "name": "top-secret-name"}
    hook["description"] = "for globex"
    doc["rules"][0]["id"] = "globex-rule"
    shown = masked_document(doc)
    assert shown["org"]["id"] == "org-globex"
    assert shown["webhooks"][0]["name"] == "GlobexHook"
    assert shown["rules"][0]["id"] == "globex-rule"
    assert shown["webhooks"][0]["custom_params"] == {"zc_ownername": "***", "name": "***"}
    assert shown["webhooks"][0]["description"] == "for ***"
