"""Organisations' documents in the configuration in force (SPEC §3.2): looked up per
organisation, the file's organisation-less items shared, compiled in bounded caches."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest

from crmhooks.actions import Action
from crmhooks.config import config_from_mapping, decode_org_document, org_document_in_part
from crmhooks.events import event_from_json
from crmhooks.orgconfig import OrgConfigs
from crmhooks.snapshot import CompiledFile, ConfigSnapshot, LiveConfig
from crmhooks.store import DocumentChange, Store, WriteBatch
from crmhooks.store.documents import DocumentTable
from tests.support import event

FILE: dict[str, Any] = {
    "orgs": [{"id": "org-acme", "users": 3, "time_zone": "Europe/Lisbon"}],
    "webhooks": [
        {"name": "Audit", "url": "https://audit.example.com/", "module": "Potentials"},
        {"name": "AcmeHook", "url": "https://acme.example.com/", "module": "Potentials",
         "org": "org-acme"},
    ],
    "rules": [
        {"id": "audit", "module": "Potentials", "repeat": "once", "instant": "Audit"},
        {"id": "acme", "module": "Potentials", "org": "org-acme", "instant": "AcmeHook",
         "criteria": {"field": "Stage", "op": "is", "value": "Closed Won"}},
    ],
}  # fmt: skip


def document(org: str = "org-acme", url: str = "https://mine.example.com/") -> dict[str, Any]:
    return {
        "org": {"id": org, "users": 7, "time_zone": "Asia/Shanghai"},
        "webhooks": [{"name": "Mine", "url": url, "module": "Potentials", "secret": "whsec_"
                      "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}],
        "rules": [
            {"id": "mine", "module": "Deals", "instant": "Mine",
             "criteria": {"field": "Stage", "op": "is", "value": "Negotiation"}},
            {"id": "shared", "module": "Potentials", "instant": "Audit",
             "criteria": {"field": "Stage", "op": "is", "value": "Lost"}},
        ],
    }  # fmt: skip


async def stored(store: Store, *docs: dict[str, Any]) -> None:
    changes = [
        DocumentChange(d["org"]["id"], 0, i, document=json.dumps(d).encode())
        for i, d in enumerate(docs)
    ]
    await store.write(WriteBatch(steps=[DocumentTable.read_step(changes, {0: len(docs)})]))


async def test_an_organisation_with_a_document_is_configured_by_it_alone(tmp_path: Path) -> None:
    """The document replaces what the file says of its organisation; the file's
    organisation-less webhooks and rules still apply, first."""
    async with Store(tmp_path / "s.db") as store:
        await stored(store, document())
        live = LiveConfig.of(config_from_mapping(FILE, {}))
        file = live.current.file
        live.with_documents(OrgConfigs(file, store.documents, ["org-acme"]))
        now = live.current
        assert now.org("org-acme").time_zone == "Asia/Shanghai"  # the file said Lisbon
        assert [r.id for r in now.candidates("org-acme", "Potentials")] == [
            "audit",
            "mine",
            "shared",
        ]
        assert now.rule("org-acme", "acme") is None  # the file's rule of the organisation
        assert now.target("org-acme", "AcmeHook") is None
        target = now.target("org-acme", "Mine")
        assert target is not None
        assert target.host == "https://mine.example.com:"
        assert now.target("org-acme", "Audit") is file.targets["Audit"]
        assert now.gone("org-acme", "acme", "AcmeHook")
        assert not now.gone("org-acme", "mine", "Mine")
        # Another organisation: the file, as before.
        assert [r.id for r in now.candidates("org-beta", "Potentials")] == ["audit"]
        assert now.org("org-beta").time_zone == "UTC"


def test_needs_planning_asks_the_organisations_rules() -> None:
    file = CompiledFile(config_from_mapping({**FILE, "rules": FILE["rules"][1:]}, {}))
    orgs = OrgConfigs(file, None)
    compiled = orgs.compile(decode_org_document(document(), file.config, "org-acme"))
    orgs.apply("org-acme", compiled)
    orgs._cache["org-acme"] = compiled  # (seen lately)
    snapshot = ConfigSnapshot(file, orgs=orgs)
    negotiation = event_from_json(event(1, record={"Stage": "Negotiation"}))
    won = event_from_json(event(2, record={"Stage": "Closed Won"}))
    assert snapshot.needs_planning(negotiation)  # the document's rule
    assert not snapshot.needs_planning(won)  # the file's rule of org-acme is replaced
    assert ConfigSnapshot(file).needs_planning(won)


async def test_documents_are_read_once_and_kept_in_a_bounded_cache(tmp_path: Path) -> None:
    """Read and compiled at the first look-up; kept while looked up lately (the clock:
    an entry seen since it was last passed over gets a second chance)."""
    async with Store(tmp_path / "s.db") as store:
        docs = [document(f"org-{i}") for i in range(5)]
        await stored(store, *docs)
        file = CompiledFile(config_from_mapping(FILE, {}))
        orgs = OrgConfigs(file, store.documents, await store.documents.org_ids(), size=3)
        for org in ("org-0", "org-1", "org-2", "org-0", "org-1"):
            found = orgs.get(org)
            assert found is not None
            assert found.settings.id == org
        assert (orgs.loads, orgs.compiled) == (3, 3)
        assert orgs.get("org-x") is None
        assert orgs.loads == 3
        for compiled in orgs._cache.values():
            compiled.seen = False
        assert orgs.get("org-0") is not None  # the oldest, but seen again: kept
        assert orgs.get("org-3") is not None
        assert list(orgs._cache) == ["org-2", "org-3", "org-0"]  # org-1 went
        assert orgs.loads == 4
        assert orgs.cached("org-1") is None
        assert orgs.get("org-1") is not None
        assert orgs.loads == 5
        assert orgs.compiled == 3


def test_compiled_webhooks_are_bounded_and_follow_the_document() -> None:
    file = CompiledFile(config_from_mapping(FILE, {}))
    orgs = OrgConfigs(file, None, target_size=1)
    first = orgs.compile(decode_org_document(document(), file.config, "org-acme"))
    a = orgs.target(first, "Mine")
    assert a is not None
    assert orgs.target(first, "Mine") is a
    changed = orgs.compile(
        decode_org_document(document(url="https://new.example.com/"), file.config, "org-acme")
    )
    b = orgs.target(changed, "Mine")
    assert b is not None
    assert b.webhook.url == "https://new.example.com/"
    assert len(orgs._targets) == 1


async def test_a_document_the_reloaded_file_breaks_keeps_what_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The file lost the organisation-less webhook a rule of the document used: that
    rule goes (its pending actions are then swept), the rest stays, with a warning."""
    async with Store(tmp_path / "s.db") as store:
        await stored(store, document())
        live = LiveConfig.of(config_from_mapping(FILE, {}))
        live.with_documents(OrgConfigs(live.current.file, store.documents, ["org-acme"]))
        without_audit = {
            **FILE,
            "webhooks": FILE["webhooks"][1:],
            "rules": FILE["rules"][1:],
        }
        with caplog.at_level(logging.WARNING):
            now = live.swap(config_from_mapping(without_audit, {}))
            assert now.rule("org-acme", "shared") is None
            assert now.rule("org-acme", "mine") is not None
            assert now.gone("org-acme", "shared", "Audit")
        assert "rules[shared].instant: unknown webhook 'Audit'" in caplog.text
        assert "org-acme" in caplog.text


def test_the_valid_part_of_a_document() -> None:
    doc = document()
    doc["webhooks"].append({"name": "Bad", "url": "ftp://x", "module": "Potentials"})
    doc["rules"].append({"id": "bad", "module": "Potentials", "instant": "Bad"})
    part, errors = org_document_in_part(orjson.dumps(doc), config_from_mapping(FILE, {}))
    assert part is not None
    assert set(part.webhooks) == {"Mine"}
    assert [r.id for r in part.rules] == ["mine", "shared"]
    assert [e.split(": ")[0] for e in errors] == ["webhooks[Bad].url"]


async def test_live_target_is_the_target_unless_the_rule_or_its_webhook_is_gone(
    tmp_path: Path,
) -> None:
    """What an attempt asks (one look-up) answers as ``target`` and ``gone`` together,
    for organisations with a document and without, and for every pair, named or not."""
    async with Store(tmp_path / "s.db") as store:
        await stored(store, document())
        live = LiveConfig.of(config_from_mapping(FILE, {}))
        live.with_documents(OrgConfigs(live.current.file, store.documents, ["org-acme"]))
        now = live.current
        seen = 0
        for org in ("org-acme", "org-beta"):
            for rule in ("audit", "acme", "mine", "shared", "nope"):
                for webhook in ("Audit", "AcmeHook", "Mine", "Nope"):
                    a = Action(f"e:{rule}:{webhook}", "e", org, "Potentials", "1", rule,
                               webhook, "instant", 0, 0, 0, 0)  # fmt: skip
                    want = None if now.gone(org, rule, webhook) else now.target(org, webhook)
                    assert now.live_target(a) is want, (org, rule, webhook)
                    seen += want is not None
        # audit/Audit for both organisations; mine/Mine and shared/Audit for org-acme
        # (its document replaced the file's acme/AcmeHook, which org-beta never had).
        assert seen == 4
