"""The command line: check-config and preview, in-process and through the console entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import pytest

from crmhooks import cli
from crmhooks.cli import main
from crmhooks.errors import CrmhooksError
from crmhooks.settings import KafkaSettings, LogSettings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "config").glob("*.toml"))
SEED_EVENT = ROOT / "config" / "events" / "closed-won.json"
PRODUCTION = ROOT / "config" / "crmhooks.toml"

# Secrets config/crmhooks.toml reads with ${env:...}. The API key holds characters
# that percent-encoding changes, so a leak in either form would be seen.
SIGNING_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CREATOR_KEY = "creator+key/SECRET=1&x"
SMS_KEY = "sms-key-SECRET-2"
HEADER_KEY = "header-key-SECRET-3"
CLIENT_SECRET = "client-SECRET-4"
DEMO_CLIENT_SECRET = "demo-client-SECRET-5"
CREATOR_TICKET = "creator-ticket-SECRET-6"
ENV = {
    "DEMO_CLIENT_SECRET": DEMO_CLIENT_SECRET,
    "CREATOR_API_TICKET": CREATOR_TICKET,
    "CREATOR_SIGNING_SECRET": SIGNING_SECRET,
    "CREATOR_API_KEY": CREATOR_KEY,
    "CREATOR_HEADER_KEY": HEADER_KEY,
    "CREATOR_CLIENT_SECRET": CLIENT_SECRET,
    "SMS_API_KEY": SMS_KEY,
}
SECRET_FORMS = [
    SIGNING_SECRET,
    SIGNING_SECRET.removeprefix("whsec_"),
    CREATOR_KEY,
    quote(CREATOR_KEY, safe=""),
    SMS_KEY,
    HEADER_KEY,
    CLIENT_SECRET,
    DEMO_CLIENT_SECRET,
    CREATOR_TICKET,
]


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def preview(
    capsys: pytest.CaptureFixture[str], webhook: str, event: str, *, config: str
) -> tuple[int, str, str]:
    return run(capsys, "preview", "--config", config, "--webhook", webhook, "--event", event)


def seed_event(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SEED_EVENT.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return data


def write_event(tmp_path: Path, data: dict[str, Any], name: str = "event.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def split_preview(out: str) -> tuple[str, dict[str, str], str]:
    """(first line, headers, body) of preview output."""
    head, blank, body = out.partition("\n\n")
    assert blank, f"no blank line between headers and body in {out!r}"
    first, *header_lines = head.splitlines()
    headers = dict(line.split(": ", 1) for line in header_lines)
    return first, headers, body.removesuffix("\n")


# --- check-config ----------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_check_config_accepts_every_shipped_config(
    capsys: pytest.CaptureFixture[str], path: Path
) -> None:
    code, out, err = run(capsys, "check-config", "--config", str(path))
    assert code == 0, err
    assert out.count("\n") == 1
    assert out.startswith(f"{path}: ok (")
    # Both seed scenarios everywhere; the demo adds a webhook behind OAuth2, a failing
    # webhook, each with a rule of its own, and the demo and compose configs an
    # organisation-less webhook for administrator alerts.
    summary = {
        "compose.toml": "3 webhooks, 1 rule: 1 instant, 1 scheduled",
        "demo.toml": "5 webhooks, 3 rules: 3 instant, 1 scheduled",
    }.get(path.name, "2 webhooks, 1 rule: 1 instant, 1 scheduled")
    assert summary in out


def test_shipped_configs_exist() -> None:
    # The parametrised test above must not pass by having nothing to check.
    assert {p.name for p in CONFIGS} >= {"crmhooks.toml", "demo.toml"}


BROKEN = """
[[orgs]]
id = "org-x"
users = 0
time_zone = "Mars/Olympus"

[[webhooks]]
name = "Bad Name!"
description = "ok"
url = "ftp://example.com/x"
method = "PUT"
module = "Notes"

[[webhooks]]
name = "Good"
url = "https://example.com/hook"
module = "Potentials"
  [webhooks.entity_params]
  who = "${Nowhere.Field}"

[[rules]]
id = "r1"
module = "Potentials"
trigger = "sometimes"
instant = "Missing"
criteria = { field = "Stage", op = "like", value = "x" }
  [[rules.scheduled]]
  webhook = "Good"
  offset = "tomorrow"
"""


def test_check_config_lists_every_error_naming_its_item(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN, encoding="utf-8")
    code, out, err = run(capsys, "check-config", "--config", str(path))
    assert code == 1
    assert out == ""
    header, *lines = err.splitlines()
    assert header == f"{path}: {len(lines)} error(s):"
    items = [line.strip().split(": ", 1)[0] for line in lines]
    assert items == [
        "orgs[org-x].users",
        "orgs[org-x].time_zone",
        "webhooks[Bad Name!].name",
        "webhooks[Bad Name!].url",
        "webhooks[Bad Name!].method",
        "webhooks[Bad Name!].module",
        "webhooks[Good].entity_params.who",
        "rules[r1].trigger",
        "rules[r1].criteria.op",
        "rules[r1].instant",
        "rules[r1].scheduled[0].offset",
    ]


def test_check_config_names_a_missing_secret_and_an_unreadable_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SMS_API_KEY")
    monkeypatch.setenv("CREATOR_SIGNING_SECRET", "not-a-whsec-secret")
    code, _, err = run(capsys, "check-config", "--config", str(PRODUCTION))
    assert code == 1
    assert "webhooks[PaymentDueSms].body.template: environment variable SMS_API_KEY" in err
    assert "webhooks[CreatorCommission].secret: must be a Standard Webhooks secret" in err
    assert "not-a-whsec-secret" not in err

    missing = tmp_path / "nope.toml"
    code, _, err = run(capsys, "check-config", "--config", str(missing))
    assert code == 1
    assert f"{missing}: cannot read" in err


def test_console_entry_point_runs_check_config(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "crmhooks"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "crmhooks.cli"]
    env = {**os.environ, **ENV}
    ok = subprocess.run(
        [*command, "check-config", "--config", str(PRODUCTION)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"{PRODUCTION}: ok (")
    broken = tmp_path / "broken.toml"
    broken.write_text(BROKEN, encoding="utf-8")
    bad = subprocess.run(
        [*command, "check-config", "--config", str(broken)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 1
    assert "11 error(s)" in bad.stderr


# --- preview ---------------------------------------------------------------------


def test_preview_of_the_commission_webhook_is_a_form_post_with_the_key_redacted(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # An RFC 3339 close date renders in the org's time zone (Asia/Shanghai, +08:00).
    event = write_event(tmp_path, seed_event(record={"Closing Date": "2026-11-30T16:30:00Z"}))
    code, out, err = preview(capsys, "CreatorCommission", event, config=str(PRODUCTION))
    assert code == 0, err
    first, headers, body = split_preview(out)
    # The seed's scenario 1: the Creator XML API, key, ticket and owner name.
    assert first == "POST https://creator.zoho.com/api/xml/write"
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert headers["User-Agent"].startswith("crmhooks/")
    assert headers["webhook-id"] == "evt-000123:commission-on-close:CreatorCommission"
    assert headers["webhook-signature"] == "v1,***"
    assert body.startswith("apikey=***&ticket=***&zc_ownername=***&XMLString=%3CZohoCreator")
    form = parse_qs(body, keep_blank_values=True)
    assert form["apikey"] == form["ticket"] == form["zc_ownername"] == ["***"]
    root = ET.fromstring(form["XMLString"][0])
    fields = {f.attrib["name"]: f.findtext("value") for f in root.iter("field")}
    assert fields == {
        "Name": "Big deal",
        "Closed_Amount": "25000",
        "Closing_Date": "2026-12-01 00:30",
        "Customer_Name": "Acme Corp",
        "Type_of_Business": "New Business",
        "Sales_Rep": "Ana Silva",
    }
    for secret in SECRET_FORMS:
        assert secret not in out + err


def test_preview_of_the_sms_webhook_is_the_raw_xml_with_escaped_values(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    event = write_event(
        tmp_path,
        seed_event(
            user={"Last Name": "O'Brien <Jr>", "Mobile": '+351 "900"'},
            related={
                "Accounts": {"Account Name": "Wong & Sons"},
                "Contacts": {"Last Name": "Wong"},
            },
        ),
    )
    code, out, err = preview(capsys, "PaymentDueSms", event, config=str(PRODUCTION))
    assert code == 0, err
    first, headers, body = split_preview(out)
    # The seed's gateway, on a private network; the key travels inside the document.
    assert first == "POST http://10.20.0.15/smsgateway/post"
    assert headers["Content-Type"] == "application/xml; charset=utf-8"
    assert "webhook-signature" not in headers  # PaymentDueSms has no signing secret
    assert body.startswith('<?xml version="1.0"?>\n<m:Library')
    assert "<apikey>***</apikey>" in body
    assert (
        '<message mobilenumber="+351 &quot;900&quot;">Hi O\'Brien &lt;Jr&gt;, Payment amount'
        " 25000 is due today from Wong &amp; Sons. Please contact Wong ASAP</message>"
    ) in body
    message = ET.fromstring(body.encode()).find("{http://www.defns.com}message")
    assert message is not None
    assert message.attrib["mobilenumber"] == '+351 "900"'
    for secret in SECRET_FORMS:
        assert secret not in out + err


def test_the_seed_event_previews_with_the_demo_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = str(ROOT / "config" / "demo.toml")
    code, out, _ = preview(capsys, "PaymentDueSms", str(SEED_EVENT), config=config)
    assert code == 0
    assert out.startswith("POST http://127.0.0.1:8765/smsgateway/post\n")
    assert "<apikey>***</apikey>" in out
    assert "Hi Silva, Payment amount 25000 is due today from Acme Corp." in out
    code, out, _ = preview(capsys, "PortalAccess", str(SEED_EVENT), config=config)
    assert code == 0
    _, headers, body = split_preview(out)
    assert headers["Authorization"] == (
        "Bearer *** (an OAuth2 token from http://127.0.0.1:8765/oauth/token)"
    )
    assert json.loads(body) == {
        "account": "Acme Corp",
        "contact": "Wong",
        "deal": "Big deal",
        "portal": True,
    }


def test_preview_of_an_unknown_webhook_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = preview(capsys, "Nope", str(SEED_EVENT), config=str(PRODUCTION))
    assert code == 2
    assert out == ""
    assert "no webhook named 'Nope'" in err
    assert "CreatorCommission, PaymentDueSms" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read event file"),
        ("{not json", "is not a valid record event: "),
        ('{"event_id": "e1"}', "is not a valid record event: missing required field 'org_id'"),
        ("[1, 2]", "is not a valid record event: "),
    ],
    ids=["missing", "not-json", "incomplete", "not-an-object"],
)
def test_preview_of_a_bad_event_file_names_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "event.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    code, out, err = preview(capsys, "PaymentDueSms", str(path), config=str(PRODUCTION))
    assert code == 2
    assert out == ""
    assert str(path) in err
    assert message in err


def test_preview_refuses_an_event_of_another_module(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    event = write_event(tmp_path, seed_event(module="Leads"))
    code, out, err = preview(capsys, "CreatorCommission", event, config=str(PRODUCTION))
    assert code == 2
    assert out == ""
    assert "is a Leads event; webhook CreatorCommission is for Potentials" in err


def test_preview_accepts_a_module_alias_and_notes_another_org(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    event = write_event(tmp_path, seed_event(module="Deals", org_id="org-other"))
    code, out, err = preview(capsys, "CreatorCommission", event, config=str(PRODUCTION))
    assert code == 0
    assert out.startswith("POST https://creator.zoho.com/api/xml/write\n")
    assert "belongs to org-acme; it is never sent for events of org-other" in err


def test_preview_with_an_invalid_config_lists_its_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN, encoding="utf-8")
    code, out, err = run(
        capsys, "preview", "--config", str(path), "--webhook", "Good", "--event", str(SEED_EVENT)
    )
    assert code == 1
    assert out == ""
    assert f"{path}: 11 error(s):" in err


def test_run_picks_uvloop_when_installed_and_asyncio_on_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvloop

    assert cli._loop_factory("auto") is uvloop.new_event_loop
    assert cli._loop_factory("uvloop") is uvloop.new_event_loop
    assert cli._loop_factory("asyncio") is None
    # Kafka over TLS: asyncio's loop unless uvloop is asked for by name (its TLS stalls).
    assert cli._loop_factory("auto", tls=True) is None
    assert cli._loop_factory("uvloop", tls=True) is uvloop.new_event_loop
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    assert cli._loop_factory("auto") is None
    with pytest.raises(CrmhooksError, match="uvloop is not installed"):
        cli._loop_factory("uvloop")


def test_run_names_an_unknown_event_loop(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CRMHOOKS_EVENT_LOOP", "tokio")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", str(ROOT / "config" / "demo.toml")])
    assert exit_info.value.code == 2
    assert "unknown event loop 'tokio'" in capsys.readouterr().err


def test_run_tunes_the_garbage_collector_for_a_long_running_server() -> None:
    import gc

    before = gc.get_threshold()
    try:
        cli._tune_gc()
        assert gc.get_threshold() == cli.GC_THRESHOLDS
        assert gc.get_freeze_count() > 0  # what exists at start is left out of collections
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


# --- logging -----------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Any:
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def fake_run(monkeypatch: pytest.MonkeyPatch, log_settings: Any) -> None:
    """`run` with a config holding ``log_settings`` as its [log], and a processor that logs."""
    import logging
    import types

    import crmhooks.runner

    async def run_processor(config: Any, config_path: Any = None) -> None:
        log = logging.getLogger("crmhooks.app")
        log.info("planned %s", "Stage\nforged")
        log.warning("receiver said %s", "Bad\x1b[2J Gateway")

    config = types.SimpleNamespace(log=log_settings, kafka=KafkaSettings())  # (run reads both)
    monkeypatch.setattr(cli, "_load", lambda path: config)
    monkeypatch.setattr(cli, "_tune_gc", lambda: None)
    monkeypatch.setattr(crmhooks.runner, "run_processor", run_processor)
    monkeypatch.delenv("CRMHOOKS_LOG_LEVEL", raising=False)


@pytest.mark.usefixtures("restore_logging")
def test_run_logs_as_the_configs_log_section_says(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:

    fake_run(monkeypatch, LogSettings(format="json", level="INFO"))
    code, _, err = run(capsys, "run", "--config", "x.toml", "--event-loop", "asyncio")
    assert code == 0
    lines = [json.loads(line) for line in err.splitlines()]
    assert [(r["level"], r["msg"]) for r in lines] == [
        ("INFO", "planned Stage\nforged"),
        ("WARNING", "receiver said Bad\x1b[2J Gateway"),
    ]
    assert "\x1b" not in err


@pytest.mark.usefixtures("restore_logging")
def test_the_log_level_flag_and_env_win_over_the_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import types

    fake_run(monkeypatch, types.SimpleNamespace(format="text", level="DEBUG"))
    monkeypatch.setenv("CRMHOOKS_LOG_LEVEL", "warning")
    code, _, err = run(capsys, "run", "--config", "x.toml", "--event-loop", "asyncio")
    assert code == 0
    assert err.count("\n") == 1
    assert "WARNING crmhooks.app: receiver said Bad\\x1b[2J" in err
    code, _, err = run(
        capsys, "--log-level", "error", "run", "--config", "x.toml", "--event-loop", "asyncio"
    )
    assert code == 0
    assert err == ""


@pytest.mark.usefixtures("restore_logging")
def test_without_a_log_section_run_logs_text_at_info(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_run(monkeypatch, LogSettings())  # the defaults of a config without [log]
    code, _, err = run(capsys, "run", "--config", "x.toml", "--event-loop", "asyncio")
    assert code == 0
    first, second = err.splitlines()
    assert first.endswith(" INFO crmhooks.app: planned Stage\\nforged")
    assert second.endswith(" WARNING crmhooks.app: receiver said Bad\\x1b[2J Gateway")


def test_a_bad_log_level_in_the_environment_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CRMHOOKS_LOG_LEVEL", "loud")
    code, _, err = run(capsys, "check-config", "--config", str(PRODUCTION))
    assert code == 1
    assert err == (
        "crmhooks: CRMHOOKS_LOG_LEVEL='loud': expected one of DEBUG, INFO, WARNING, ERROR\n"
    )
