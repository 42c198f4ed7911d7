"""docs/rules-and-webhooks.md stays true: each webhook example loads, and each request it
shows is what `crmhooks preview` prints for the seed event (SPEC §4's example)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from crmhooks.cli import main
from tests.net_support import make_pki

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "rules-and-webhooks.md"
EVENT = ROOT / "config" / "events" / "closed-won.json"
# What the examples read from the environment (any value: previews show ***).
ENV = {
    name: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" if name.endswith("SIGNING_SECRET") else "x1y2"
    for name in (
        "CREATOR_SIGNING_SECRET",
        "CREATOR_API_KEY",
        "CREATOR_API_TICKET",
        "SMS_API_KEY",
        "ERP_TOKEN",
        "BOOKS_ORG_ID",
        "BOOKS_TOKEN",
        "DESK_CLIENT_SECRET",
    )
}
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
COMMAND = re.compile(r"`(crmhooks preview [^`]+)`:\s*$")


def examples() -> list[tuple[str, str, str | None]]:
    """(the webhook's TOML, the request shown, the preview command named before it)."""
    text = DOC.read_text(encoding="utf-8")
    found: list[tuple[str, str, str | None]] = []
    toml = ""
    for match in BLOCK.finditer(text):
        lang, body = match.group(1), match.group(2)
        if lang == "toml" and "[[webhooks]]" in body:
            toml = body
        elif lang == "" and body.startswith(("GET ", "POST ")):
            before = text[: match.start()].rstrip().splitlines()[-1]
            command = COMMAND.search(before)
            found.append((toml, body, command.group(1) if command else None))
    return found


EXAMPLES = examples()


def test_the_page_has_its_examples() -> None:
    assert len(EXAMPLES) >= 6, "the examples this test reads were not found"


@pytest.mark.parametrize(("toml", "shown", "command"), EXAMPLES)
def test_each_request_shown_is_what_preview_prints(
    toml: str,
    shown: str,
    command: str | None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    if command is not None:
        args = shlex.split(command)[1:]
    else:
        path = tmp_path / "example.toml"
        head = '[[orgs]]\nid = "org-acme"\ntime_zone = "Asia/Shanghai"\n\n'
        path.write_text(head + toml, encoding="utf-8")
        webhook = re.search(r'^name = "(\w+)"', toml, re.M)
        assert webhook is not None
        args = ["preview", "--config", str(path), "--webhook", webhook.group(1)]
        args += ["--event", str(EVENT)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.rstrip("\n") == shown.rstrip("\n"), err


def test_every_webhook_example_is_a_valid_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    pki = make_pki(tmp_path)
    files = {
        "/etc/crmhooks/ledger-client.pem": pki.client_cert_file,
        "/etc/crmhooks/ledger-client.key": pki.client_key_file,
        "/etc/crmhooks/ledger-ca.pem": pki.ca_file,
    }
    text = DOC.read_text(encoding="utf-8")
    blocks = [b for lang, b in BLOCK.findall(text) if lang == "toml" and "[[webhooks]]" in b]
    assert len(blocks) >= 7
    for n, block in enumerate(blocks):
        for written, real in files.items():
            block = block.replace(written, real)
        path = tmp_path / f"block{n}.toml"
        path.write_text('[[orgs]]\nid = "org-acme"\n\n' + block, encoding="utf-8")
        assert main(["check-config", "--config", str(path)]) == 0, capsys.readouterr().err
