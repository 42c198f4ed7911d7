"""Secrets in the config (SPEC §3.1): ${env:} and ${file:} resolved, kept, never shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from crmhooks.config import (
    BasicAuth,
    BearerAuth,
    OAuth2Auth,
    Webhook,
    config_from_mapping,
)
from crmhooks.errors import ConfigError
from tests.test_config import ENV, SECRET, WH, Raw, base


def errors_of(raw: Raw, env: dict[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw, ENV if env is None else env)
    return info.value.errors


def lead_hook(raw: Raw) -> dict[str, Any]:
    hook: dict[str, Any] = raw["webhooks"][1]
    assert hook["name"] == "LeadHook"
    return hook


def test_references_in_template_strings_stay_as_written_with_their_values_beside() -> None:
    raw = base()
    hook = lead_hook(raw)
    hook["url"] = "https://hooks.example.com/lead/${env:PATH_KEY}?k=${env:QUERY_KEY}"
    hook["entity_params"] = {"who": "${Leads.Last Name} via ${env:ENTITY_KEY}"}
    hook["headers"] = {"X-Api-Key": "${env:HEADER_KEY}"}
    hook["body"] = {"format": "json", "param": "doc", "template": '{"k": "${env:BODY_KEY}"}'}
    env = {
        **ENV,
        "PATH_KEY": "p",
        "QUERY_KEY": "q",
        "ENTITY_KEY": "e",
        "HEADER_KEY": "h",
        "BODY_KEY": "b",
    }
    webhook = config_from_mapping(raw, env).webhooks["LeadHook"]
    assert webhook.url == hook["url"]
    assert webhook.entity_params == hook["entity_params"]
    assert webhook.headers == {"X-Api-Key": "${env:HEADER_KEY}"}
    assert webhook.body is not None
    assert webhook.body.template == '{"k": "${env:BODY_KEY}"}'
    assert webhook.env_values == {
        "env:PATH_KEY": "p",
        "env:QUERY_KEY": "q",
        "env:ENTITY_KEY": "e",
        "env:HEADER_KEY": "h",
        "env:BODY_KEY": "b",
    }


def test_file_reference_reads_the_file_without_one_trailing_newline(tmp_path: Path) -> None:
    key = tmp_path / "api-key"
    key.write_text("from-a-file\n", encoding="utf-8")
    crlf = tmp_path / "windows"
    crlf.write_bytes(b"crlf-secret\r\n")
    two = tmp_path / "two-newlines"
    two.write_text("kept\n\n", encoding="utf-8")
    raw = base()
    hook = lead_hook(raw)
    hook["custom_params"] = {"key": f"${{file:{key}}}", "crlf": f"${{file:{crlf}}}"}
    hook["url"] = f"https://hooks.example.com/lead?t=${{file:{two}}}"
    webhook = config_from_mapping(raw, ENV).webhooks["LeadHook"]
    assert webhook.custom_params == {"key": "from-a-file", "crlf": "crlf-secret"}
    assert webhook.secret_params == frozenset({"key", "crlf"})
    assert webhook.env_values == {f"file:{two}": "kept\n"}


def test_file_reference_for_the_signing_secret(tmp_path: Path) -> None:
    path = tmp_path / "signing"
    path.write_text(SECRET + "\n", encoding="utf-8")
    raw = base()
    raw["webhooks"][0]["secret"] = f"${{file:{path}}}"
    assert config_from_mapping(raw, ENV).webhooks["CreatorCommission"].secret == SECRET


def test_a_bad_file_is_named_by_item_and_path_never_by_value(tmp_path: Path) -> None:
    not_utf8 = tmp_path / "latin1"
    not_utf8.write_bytes(b"caf\xe9")
    raw = base()
    hook = lead_hook(raw)
    hook["custom_params"] = {
        "missing": f"${{file:{tmp_path / 'nope'}}}",
        "directory": f"${{file:{tmp_path}}}",
        "latin": f"${{file:{not_utf8}}}",
        "empty": "${file:}",
    }
    errors = errors_of(raw)
    prefix = "webhooks[LeadHook].custom_params"
    assert errors == (
        f"{prefix}.missing: file {tmp_path / 'nope'} cannot be read: No such file or directory",
        f"{prefix}.directory: file {tmp_path} cannot be read: Is a directory",
        f"{prefix}.latin: file {not_utf8} is not UTF-8 text",
        f"{prefix}.empty: ${{file:PATH}} needs a path",
    )


def test_a_secret_read_from_a_file_is_not_shown_in_its_error(tmp_path: Path) -> None:
    path = tmp_path / "signing"
    path.write_text("not-a-whsec-SECRET", encoding="utf-8")
    raw = base()
    raw["webhooks"][0]["secret"] = f"${{file:{path}}}"
    errors = errors_of(raw)
    assert errors == (f"{WH}.secret: must be a Standard Webhooks secret: 'whsec_' + base64",)
    assert "SECRET" not in "\n".join(errors)


def test_a_file_named_twice_is_read_once_and_reported_each_time(tmp_path: Path) -> None:
    raw = base()
    lead_hook(raw)["custom_params"] = {
        "a": f"${{file:{tmp_path / 'gone'}}}",
        "b": f"${{file:{tmp_path / 'gone'}}}",
    }
    errors = errors_of(raw)
    assert [e.split(": ")[0] for e in errors] == [
        "webhooks[LeadHook].custom_params.a",
        "webhooks[LeadHook].custom_params.b",
    ]


@pytest.mark.parametrize(
    ("where", "value", "item"),
    [
        ("url", "https://hooks.example.com/${env:UNTERMINATED", "url"),
        ("custom_params", {"k": "${file:/x"}, "custom_params.k"),
    ],
)
def test_an_unterminated_reference_is_an_error(where: str, value: Any, item: str) -> None:
    raw = base()
    lead_hook(raw)[where] = value
    errors = errors_of(raw)
    assert any(e.startswith(f"webhooks[LeadHook].{item}: unterminated $") for e in errors), errors


@pytest.mark.parametrize(
    ("section", "key", "item"),
    [
        ("webhooks[1]", "description", "webhooks[LeadHook].description"),
        ("store", "path", "store.path"),
        ("kafka", "group_id", "kafka.group_id"),
        ("kafka", "bootstrap_servers", "kafka.bootstrap_servers"),
    ],
)
def test_references_are_refused_where_nothing_is_sent(section: str, key: str, item: str) -> None:
    raw = base()
    table = raw["webhooks"][1] if section == "webhooks[1]" else raw.setdefault(section, {})
    table[key] = "${env:CREATOR_API_KEY}"
    errors = errors_of(raw)
    assert any(e.startswith(f"{item}: ${{env:...}} and ${{file:...}} are only") for e in errors)


@pytest.mark.parametrize(
    "url",
    ["https://${env:HOST}/a", "https://x.example:${env:PORT}/a", "https://u:${env:PW}@x.example/"],
)
def test_references_are_refused_in_the_scheme_host_port_and_userinfo(url: str) -> None:
    raw = base()
    lead_hook(raw)["url"] = url
    errors = errors_of(raw, {**ENV, "HOST": "x", "PORT": "1", "PW": "p"})
    assert errors == (
        "webhooks[LeadHook].url: placeholders are not allowed in the scheme, host or port "
        "(credentials: use [webhooks.auth] type = basic)",
    )


def test_auth_fields_are_resolved_in_place() -> None:
    raw = base()
    hook = lead_hook(raw)
    hook["auth"] = {
        "type": "oauth2",
        "token_url": "https://auth.example.com/token",
        "client_id": "${env:CLIENT_ID}",
        "client_secret": "${env:CLIENT_SECRET}",
    }
    env = {**ENV, "CLIENT_ID": "crmhooks", "CLIENT_SECRET": "s3cret"}
    webhook = config_from_mapping(raw, env).webhooks["LeadHook"]
    assert webhook.auth == OAuth2Auth("https://auth.example.com/token", "crmhooks", "s3cret")
    # A value from a reference is a secret, whatever the field.
    assert {"crmhooks", "s3cret"} <= webhook.secret_values()


def test_secret_values_of_a_webhook() -> None:
    webhook = Webhook(
        name="W",
        url="https://user:p%40ss@x.example/${env:A}",
        module="Leads",
        secret=SECRET,
        custom_params={"key": "k-from-env", "plain": "acme", "none": ""},
        headers={"X-Lit": "literal-header", "X-Rec": "${Leads.Email}", "X-Env": "${env:B}"},
        auth=BasicAuth("alice", "pw"),
        env_values={"env:A": "a-value", "env:B": "b-value"},
    )
    assert webhook.secret_values() == {
        SECRET,
        "k-from-env",
        "acme",
        "literal-header",
        "pw",
        "p@ss",
        "a-value",
        "b-value",
    }
    bearer = Webhook(name="B", url="https://x.example/", module="Leads", auth=BearerAuth("tok"))
    assert bearer.secret_values() == {"tok"}


def test_secret_values_of_a_config_include_the_kafka_password() -> None:
    raw = base()
    raw["kafka"] = {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_username": "crmhooks",
        "sasl_password": "${env:KAFKA_PASSWORD}",
    }
    config = config_from_mapping(raw, {**ENV, "KAFKA_PASSWORD": "kafka-pw"})
    assert config.kafka.sasl_password == "kafka-pw"
    assert "kafka-pw" not in repr(config.kafka)
    assert config.secret_values() >= {"kafka-pw", "key-123", SECRET}
    assert "crmhooks" not in config.secret_values()


def test_template_problems_of_headers_and_references_are_named() -> None:
    raw = base()
    hook = lead_hook(raw)
    hook["headers"] = {"X-Who": "${Foo.Bar}", "X-Key": "${env:MULTILINE}"}
    hook["body"] = {"format": "json", "param": "doc", "template": '{"k": ${env:KEY}'}
    errors = errors_of(raw, {**ENV, "MULTILINE": "a\nb", "KEY": "k"})
    lead = "webhooks[LeadHook]"
    assert errors[0].startswith(f"{lead}.body.template: not well-formed JSON")
    assert errors[1:] == (
        f"{lead}.headers.X-Who: unknown namespace 'Foo' in ${{Foo.Bar}}",
        f"{lead}.headers.X-Key: a value holds CR, LF or NUL, which would end the header",
    )


def test_references_are_not_crm_fields() -> None:
    raw = base()
    hook = lead_hook(raw)
    # Ten CRM fields, the most a webhook may send, and secrets beside them.
    hook["entity_params"] = {f"f{i}": f"${{Leads.Field {i}}}" for i in range(10)}
    hook["headers"] = {"X-Api-Key": "${env:K1}"}
    hook["url"] = "https://hooks.example.com/lead?k=${env:K2}"
    hook["body"] = {"format": "xml", "param": "x", "template": "<k>${env:K3}</k>"}
    config_from_mapping(raw, {**ENV, "K1": "1", "K2": "2", "K3": "3"})
    hook["headers"]["X-Eleventh"] = "${Leads.Email}"
    errors = errors_of(raw, {**ENV, "K1": "1", "K2": "2", "K3": "3"})
    assert errors == ("webhooks[LeadHook]: sends 11 distinct CRM fields; at most 10",)
