"""The suspension's config fingerprint: changes with the config, never with a secret."""

from __future__ import annotations

import base64
import dataclasses
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from crmhooks.config import config_from_mapping
from crmhooks.kafka_clients import read_topic
from crmhooks.settings import BasicAuth, BearerAuth, BodySpec, OAuth2Auth, Rule, Webhook
from crmhooks.store import fingerprint
from crmhooks.store.suspensions import _canonical
from tests.support import event, produce, receiver, running, unique_kafka, wait_for_records

SECRET = "whsec_" + "A" * 43
HOOK = Webhook(
    name="Hook",
    url="https://crm:url-pass-1@hooks.example.com/crm/${env:HOOK_PATH}",
    module="Potentials",
    secret=SECRET,
    body=BodySpec(format="json", template='{"deal": "${Potentials.Potential Name}"}'),
    entity_params={"id": "${Potentials.Potential Id}"},
    custom_params={"api_key": "k-123", "region": "eu"},
    secret_params=frozenset({"api_key", "region", "zone"}),
    headers={"X-Api-Key": "literal-key-1", "X-Deal": "${Potentials.Potential Name}"},
    auth=BasicAuth(username="crm", password="basic-pass-1"),
    env_values={"env:HOOK_PATH": "path-secret-1"},
)
RULE = Rule(id="rule", module="Potentials", instant="Hook")


def rotated(hook: Webhook, n: int) -> Webhook:
    """``hook`` with every secret value changed (the n-th rotation)."""
    return dataclasses.replace(
        hook,
        url=hook.url.replace("url-pass-1", f"url-pass-{n}"),
        secret="whsec_" + chr(ord("A") + n) * 43,
        custom_params={"api_key": f"k-{n}", "region": f"region-{n}"},
        headers={**hook.headers, "X-Api-Key": f"literal-key-{n}"},
        auth=BasicAuth(username="crm", password=f"basic-pass-{n}"),
        env_values={"env:HOOK_PATH": f"path-secret-{n}"},
    )


def test_no_secret_value_is_in_what_is_hashed() -> None:
    """Every value ``Webhook.secret_values`` names (what crmhooks scrubs from its
    output) is masked, wherever it stands: here in the URL, a header, the auth, a
    custom parameter, a reference's value, the signing secret."""
    secrets = tuple(sorted(HOOK.secret_values(), key=len, reverse=True))
    assert len(secrets) == 7
    text = orjson.dumps([_canonical(RULE, secrets), _canonical(HOOK, secrets)]).decode()
    assert [s for s in secrets if s in text] == []
    assert "https://crm:***@hooks.example.com/crm/${env:HOOK_PATH}" in text


def test_secrets_do_not_change_it_and_every_other_part_does() -> None:
    base = fingerprint(RULE, HOOK)
    assert len(base) == 32  # a 16-digit fingerprint of an older version never equals one
    assert fingerprint(RULE, rotated(HOOK, 2)) == base
    for token_auth in (
        BearerAuth(token="token-1"),
        OAuth2Auth(token_url="https://auth.example.com/t", client_id="c", client_secret="s-1"),
    ):
        with_token = dataclasses.replace(HOOK, auth=token_auth)
        renewed = dataclasses.replace(
            HOOK,
            auth=dataclasses.replace(token_auth, token="token-2")
            if isinstance(token_auth, BearerAuth)
            else dataclasses.replace(token_auth, client_secret="s-2"),
        )
        assert fingerprint(RULE, renewed) == fingerprint(RULE, with_token) != base
    for changed in (
        dataclasses.replace(HOOK, url=HOOK.url.replace("/crm/", "/other/")),
        dataclasses.replace(HOOK, method="GET"),
        dataclasses.replace(HOOK, secret=None),  # having a secret at all counts
        dataclasses.replace(HOOK, entity_params={"id": "${Potentials.Amount}"}),
        dataclasses.replace(HOOK, headers={**HOOK.headers, "X-Deal": "${Potentials.Stage}"}),
        dataclasses.replace(HOOK, secret_params=frozenset({"api_key"})),
        dataclasses.replace(HOOK, auth=None),
    ):
        assert fingerprint(RULE, changed) != base, changed
    assert fingerprint(dataclasses.replace(RULE, fields=("Stage",)), HOOK) != base
    assert fingerprint(None, HOOK) != base
    assert fingerprint(RULE, None) != base


def test_it_is_the_same_in_every_process(tmp_path: Path) -> None:
    """Not ``repr``: a frozenset's order (``secret_params``) follows the string hash,
    which changes from one process to the next."""
    script = tmp_path / "fp.py"
    script.write_text(
        "from tests.test_fingerprint import HOOK, RULE\n"
        "from crmhooks.store import fingerprint\n"
        "print(fingerprint(RULE, HOOK))\n",
        encoding="utf-8",
    )
    root = Path(__file__).resolve().parent.parent
    found = set()
    for seed in ("1", "2", "3", "4"):
        env = {
            **os.environ,
            "PYTHONHASHSEED": seed,
            "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)]),
        }
        ran = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=env, check=True
        )
        found.add(ran.stdout.strip())
    assert found == {fingerprint(RULE, HOOK)}


@pytest.mark.kafka
async def test_a_suspension_leaves_no_secret_in_the_store_files_or_the_changelog(
    tmp_path: Path,
) -> None:
    """Issue 26.8 on real parts: a webhook with secrets everywhere (a custom parameter,
    a header, basic auth, the signing secret) fails and is suspended by a running
    processor. The fingerprint stored is the
    secret-free one, and no secret value is in the SQLite files nor the changelog."""
    secrets = {
        "API_KEY": "api-key-e2e-1",
        "BASIC_PASS": "basic-pass-e2e-1",
    }
    header = "header-key-e2e-1"  # a header value without placeholders is a secret too
    signing = "whsec_" + base64.b64encode(b"fingerprint end to end 32 bytes!").decode()
    async with receiver(lambda path, n: 500) as rx:
        raw: dict[str, Any] = {
            "store": {"path": str(tmp_path / "store" / "crmhooks.db")},
            "delivery": {"allow_private_networks": True, "retry_delays_s": []},
            "orgs": [{"id": "org-acme", "users": 10}],
            "webhooks": [
                {
                    "name": "Hook",
                    "url": rx.url + "/crm",
                    "module": "Potentials",
                    "secret": signing,
                    "custom_params": {"apikey": "${env:API_KEY}"},
                    "headers": {"X-Api-Key": header},
                    "auth": {
                        "type": "basic",
                        "username": "crm",
                        "password": "${env:BASIC_PASS}",
                    },
                }
            ],
            "rules": [
                {
                    "id": "won",
                    "module": "Potentials",
                    "criteria": {"all": [{"field": "Stage", "op": "is", "value": "Closed Won"}]},
                    "instant": "Hook",
                }
            ],
        }
        config = dataclasses.replace(config_from_mapping(raw, secrets), kafka=unique_kafka())
        hook = config.webhooks["Hook"]
        assert set(hook.secret_values()) == {*secrets.values(), header, signing}
        async with running(config):
            await produce(config, event(1))
            await wait_for_records(config, config.kafka.results_topic, lambda rs: len(rs) >= 1)
            await produce(config, event(2))
            results = await wait_for_records(
                config, config.kafka.results_topic, lambda rs: len(rs) >= 2
            )
        assert [r["status"] for r in results] == ["failed", "suspended"]
        assert len(rx.requests) == 1
    store_files = sorted((tmp_path / "store").iterdir())
    assert store_files  # the database at least
    written = b"".join(p.read_bytes() for p in store_files)
    changelog = [
        (rec.key or b"") + (rec.value or b"")
        async for rec in read_topic(config.kafka, config.kafka.changelog, idle_timeout_s=1.0)
    ]
    assert changelog  # the suspension went there
    for value in [*secrets.values(), header, signing]:
        assert value.encode() not in written, value
        assert all(value.encode() not in record for record in changelog), value
    db = sqlite3.connect(tmp_path / "store" / "crmhooks.db")
    try:
        stored = db.execute("SELECT fingerprint FROM suspensions").fetchall()
    finally:
        db.close()
    assert stored == [(fingerprint(config.rules[0], hook),)]
    # Nothing to test guesses against: other secrets give the same fingerprint.
    raw["webhooks"][0] |= {"secret": "whsec_" + base64.b64encode(b"x" * 32).decode()}
    raw["webhooks"][0]["headers"] = {"X-Api-Key": "another-header-value"}
    other = config_from_mapping(raw, {"API_KEY": "guess-1", "BASIC_PASS": "guess-2"})
    assert stored == [(fingerprint(other.rules[0], other.webhooks["Hook"]),)]
