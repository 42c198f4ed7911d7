"""``crmhooks config push / get / rm`` against the real broker (SPEC §3.2, §11)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import orjson
import pytest

from crmhooks import cli
from crmhooks.config import KafkaSettings
from crmhooks.kafka_documents import produce_document
from tests.support import bootstrap_servers, event

pytestmark = pytest.mark.kafka

DOCUMENT_TOML = """
[org]
id = "{org}"
users = 5
time_zone = "Asia/Shanghai"

[[webhooks]]
name = "CreatorCommission"
url = "https://creator.example.com/api/xml/write"
module = "Potentials"
  [webhooks.custom_params]
  apikey = "acme-api-key-123"
  [webhooks.auth]
  type = "bearer"
  token = "acme-bearer-token"

[[rules]]
id = "commission-on-close"
module = "Potentials"
criteria = {{ all = [ {{ field = "Stage", op = "is", value = "Closed Won" }} ] }}
instant = "CreatorCommission"
"""


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, str, str]:
    tag = uuid.uuid4().hex[:10]
    topic = f"test-{tag}.config"
    config = tmp_path / "crmhooks.toml"
    config.write_text(
        f'[kafka]\nbootstrap_servers = "{bootstrap_servers()}"\nconfig_topic = "{topic}"\n'
        f'[store]\npath = "{tmp_path / "s.db"}"\n',
        encoding="utf-8",
    )
    return config, topic, f"org-{tag}"


def run(*args: str) -> int:
    return cli.main(list(args))


def test_push_get_and_rm_an_organisations_document(
    setup: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, topic, org = setup
    doc = tmp_path / "org.toml"
    doc.write_text(DOCUMENT_TOML.format(org=org), encoding="utf-8")
    assert run("config", "push", "--config", str(config), "--org", org, "--file", str(doc)) == 0
    out = capsys.readouterr().out
    assert out == (
        f"{org}: document written to {topic} (partition 0, offset 0): 1 webhook, 1 rule\n"
    )
    assert run("config", "get", "--config", str(config), "--org", org) == 0
    shown = json.loads(capsys.readouterr().out)
    hook = shown["webhooks"][0]
    assert hook["custom_params"] == {"apikey": "***"}
    assert hook["auth"] == {"type": "bearer", "token": "***"}
    assert shown["org"] == {"id": org, "users": 5, "time_zone": "Asia/Shanghai"}
    # A newer document from another producer that does not validate: get shows the
    # one in force, and says why.
    bad = {"org": {"id": org}, "webhooks": [{"name": "X", "url": "ftp://x", "module": "Leads"}]}
    settings = KafkaSettings(bootstrap_servers=bootstrap_servers())
    asyncio.run(produce_document(settings, topic, org, orjson.dumps(bad)))
    assert run("config", "get", "--config", str(config), "--org", org) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["webhooks"][0]["name"] == "CreatorCommission"
    assert f"note: {org}'s document at 0/1 is refused (1 errors)" in captured.err
    assert run("config", "rm", "--config", str(config), "--org", org) == 0
    assert capsys.readouterr().out.startswith(f"{org}: tombstone written to {topic}")
    assert run("config", "get", "--config", str(config), "--org", org) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"crmhooks: {org}: no document in force on {topic}")


def test_push_checks_locally_and_lists_every_error(
    setup: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _topic, org = setup
    doc = tmp_path / "org.json"
    raw = {
        "org": {"id": "org-other", "users": 0},
        "webhooks": [{"name": "Hook", "url": "https://x.example.com/?k=${env:HOME}",
                      "module": "Leads"}],
        "rules": [{"id": "r", "module": "Leads", "instant": "Nope"}],
    }  # fmt: skip
    doc.write_bytes(orjson.dumps(raw))
    assert run("config", "push", "--config", str(config), "--org", org, "--file", str(doc)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{doc}: 4 error(s):"
    assert [line.split(": ")[0].strip() for line in err[1:]] == [
        "org.users",
        "org.id",
        "webhooks[Hook].url",
        "rules[r].instant",
    ]


def test_an_unreachable_broker_or_no_config_topic_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CRMHOOKS_BOOTSTRAP_SERVERS", raising=False)
    config = tmp_path / "crmhooks.toml"
    config.write_text(
        '[kafka]\nbootstrap_servers = "127.0.0.1:1"\nconfig_topic = "crm.workflow-config"\n',
        encoding="utf-8",
    )
    started = time.monotonic()
    assert run("config", "rm", "--config", str(config), "--org", "org-acme") == 1
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "127.0.0.1:1" in err
    config.write_text('[kafka]\nbootstrap_servers = "127.0.0.1:1"\n', encoding="utf-8")
    assert run("config", "get", "--config", str(config), "--org", "org-acme") == 1
    assert capsys.readouterr().err == (
        f"crmhooks: {config}: kafka.config_topic is not set: there is no config topic\n"
    )


def test_explain_and_preview_use_the_organisations_document(
    setup: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An organisation configured on the config topic: explain and preview look at its
    document, as the processors do, and say so; another organisation gets the file."""
    config, topic, org = setup
    doc = tmp_path / "org.toml"
    doc.write_text(DOCUMENT_TOML.format(org=org), encoding="utf-8")
    assert run("config", "push", "--config", str(config), "--org", org, "--file", str(doc)) == 0
    capsys.readouterr()
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(event(1, org_id=org)), encoding="utf-8")
    assert run("explain", "--config", str(config), "--event", str(mine)) == 0
    captured = capsys.readouterr()
    assert f"{org} is configured by its document on {topic} (partition 0, offset 0)" in (
        captured.err
    )
    assert "commission-on-close" in captured.out
    assert "matched" in captured.out
    assert run("preview", "--config", str(config), "--webhook", "CreatorCommission",
               "--event", str(mine)) == 0  # fmt: skip
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "POST https://creator.example.com/api/xml/write", captured.out
    assert "Authorization: Bearer ***" in lines  # the document's auth, masked
    assert lines[-1] == "apikey=***"  # its custom parameter, in the form body
    assert "acme-" not in captured.out
    # Another organisation: no document, the file (which has no rules) applies.
    other = tmp_path / "other.json"
    other.write_text(json.dumps(event(2, org_id=f"{org}-other")), encoding="utf-8")
    assert run("explain", "--config", str(config), "--event", str(other)) == 0
    captured = capsys.readouterr()
    assert f"{org}-other has no document on {topic}: the config file applies" in captured.err
    assert "commission-on-close" not in captured.out
    assert run("preview", "--config", str(config), "--webhook", "CreatorCommission",
               "--event", str(other)) == 2  # fmt: skip
    assert "no webhook named 'CreatorCommission'" in capsys.readouterr().err
