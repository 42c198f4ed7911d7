"""The settings SPEC §3, §6 and §12 add: headers, auth, TLS, Kafka security, admin, log, alerts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from crmhooks.config import (
    AlertSettings,
    BasicAuth,
    BearerAuth,
    Config,
    KafkaSettings,
    LogSettings,
    OAuth2Auth,
    TlsSpec,
    config_from_mapping,
)
from crmhooks.errors import ConfigError
from tests.test_config import ENV, Raw, base

LEAD = "webhooks[LeadHook]"


def errors_of(raw: Raw, env: dict[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw, ENV if env is None else env)
    return info.value.errors


def with_lead(**fields: Any) -> Raw:
    raw = base()
    raw["webhooks"][1].update(fields)
    return raw


@dataclass(frozen=True)
class Pem:
    ca: Path
    cert: Path
    key: Path
    other_key: Path  # the key of another certificate
    encrypted_key: Path
    junk: Path


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Pem:
    d = tmp_path_factory.mktemp("pem")
    ca = trustme.CA()
    leaf = ca.issue_cert("client.example")
    other = ca.issue_cert("other.example")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(d / "key.pem"))
    other.private_key_pem.write_to_path(str(d / "other-key.pem"))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    (d / "encrypted-key.pem").write_bytes(encrypted)
    (d / "junk.pem").write_text("not a certificate\n", encoding="utf-8")
    return Pem(
        d / "ca.pem",
        d / "cert.pem",
        d / "key.pem",
        d / "other-key.pem",
        d / "encrypted-key.pem",
        d / "junk.pem",
    )


# --- headers ---------------------------------------------------------------------


def test_headers_keep_their_templates_in_order() -> None:
    headers = {"X-Deal": "${Leads.Last Name}", "X-Static": "v1", "User-Agent": "acme-bot"}
    webhook = config_from_mapping(with_lead(headers=headers), ENV).webhooks["LeadHook"]
    assert list(webhook.headers.items()) == list(headers.items())


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("Host", "sets it from the URL"),
        ("content-LENGTH", "sets it from the body"),
        ("Transfer-Encoding", "known length"),
        ("Connection", "manages its connections"),
        ("Keep-Alive", "manages its connections"),
        ("Accept-Encoding", "uncompressed"),
        ("Expect", "at once"),
        ("Proxy-Authorization", "proxy"),
        ("webhook-id", "webhook-* headers"),
        ("Webhook-Signature", "webhook-* headers"),
        ("X Space", "RFC 7230 token"),
        ("X-Ümlaut", "RFC 7230 token"),
        ("X:Colon", "RFC 7230 token"),
        ("", "RFC 7230 token"),
    ],
)
def test_a_header_crmhooks_owns_or_a_bad_name_is_refused(name: str, fragment: str) -> None:
    errors = errors_of(with_lead(headers={name: "v"}))
    assert errors == (f"{LEAD}.headers.{name}: {errors[0].split(': ', 1)[1]}",)
    assert fragment in errors[0]


def test_header_value_checks() -> None:
    errors = errors_of(
        with_lead(headers={"X-A": "a\r\nX-Injected: 1", "x-b": "1", "X-B": "2", "X-Tab": "a\tb"})
    )
    assert errors == (
        f"{LEAD}.headers.X-A: contains control characters",
        f"{LEAD}.headers.X-B: header set more than once (names ignore case)",
    )


def test_authorization_header_only_without_auth() -> None:
    token = "Bearer literal-token"
    assert config_from_mapping(with_lead(headers={"Authorization": token}), ENV)
    errors = errors_of(
        with_lead(headers={"authorization": token}, auth={"type": "bearer", "token": "t"})
    )
    assert errors == (
        f"{LEAD}.headers.authorization: may not be set together with [webhooks.auth]",
    )


def test_content_type_only_for_a_raw_body() -> None:
    raw_body = {"format": "xml", "template": "<a>${Leads.Last Name}</a>"}
    raw = with_lead(method="POST", body=raw_body, headers={"Content-Type": "text/xml"})
    assert config_from_mapping(raw, ENV).webhooks["LeadHook"].headers["Content-Type"] == "text/xml"
    for body in (None, {**raw_body, "param": "doc"}):
        raw = with_lead(method="POST", headers={"Content-Type": "text/xml"})
        if body is not None:
            raw["webhooks"][1]["body"] = body
        assert errors_of(raw) == (
            f"{LEAD}.headers.Content-Type: may be set only for a raw body (a body without param)",
        )


def test_header_placeholders_are_checked_and_counted_as_crm_fields() -> None:
    errors = errors_of(with_lead(headers={"X-A": "${Nowhere.Field}"}))
    assert errors == (f"{LEAD}.headers.X-A: unknown namespace 'Nowhere' in ${{Nowhere.Field}}",)
    headers = {f"X-{i}": f"${{Leads.F{i}}}" for i in range(11)}
    assert errors_of(with_lead(headers=headers)) == (
        f"{LEAD}: sends 11 distinct CRM fields; at most 10",
    )


# --- auth ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"type": "basic", "username": "alice", "password": "pw"}, BasicAuth("alice", "pw")),
        ({"type": "basic", "username": "alice", "password": ""}, BasicAuth("alice", "")),
        ({"type": "bearer", "token": "${env:TOKEN}"}, BearerAuth("t0k")),
        (
            {
                "type": "oauth2",
                "token_url": "https://auth.example.com/oauth/token",
                "client_id": "crmhooks",
                "client_secret": "${env:TOKEN}",
                "scope": "write",
                "audience": "https://api.example.com",
            },
            OAuth2Auth(
                "https://auth.example.com/oauth/token",
                "crmhooks",
                "t0k",
                scope="write",
                audience="https://api.example.com",
            ),
        ),
    ],
)
def test_auth(auth: dict[str, str], expected: object) -> None:
    config = config_from_mapping(with_lead(auth=auth), {**ENV, "TOKEN": "t0k"})
    assert config.webhooks["LeadHook"].auth == expected


@pytest.mark.parametrize(
    ("auth", "item", "message"),
    [
        ({"username": "a"}, "auth.type", "required: one of basic, bearer, oauth2"),
        ({"type": "digest"}, "auth.type", "must be one of basic, bearer, oauth2"),
        ({"type": "basic", "username": "a"}, "auth.password", "required"),
        ({"type": "basic", "username": "a:b", "password": "p"}, "auth.username", "':'"),
        ({"type": "bearer", "token": "t", "scope": "x"}, "auth.scope", "unknown key"),
        ({"type": "bearer", "token": ""}, "auth.token", "must be a non-empty string"),
        ({"type": "bearer", "token": "a\nb"}, "auth.token", "control characters"),
        (
            {
                "type": "oauth2",
                "token_url": "ftp://x.example",
                "client_id": "c",
                "client_secret": "s",
            },
            "auth.token_url",
            "http:// or https://",
        ),
        (
            {"type": "oauth2", "token_url": "https://x.example/", "client_id": "c"},
            "auth.client_secret",
            "required",
        ),
        ("bearer", "auth", "must be a table"),
    ],
)
def test_bad_auth_is_named(auth: Any, item: str, message: str) -> None:
    errors = errors_of(with_lead(auth=auth))
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{LEAD}.{item}: ")
    assert message in errors[0]


# --- TLS files -------------------------------------------------------------------


def test_webhook_tls(pem: Pem) -> None:
    tls = {
        "client_cert_file": str(pem.cert),
        "client_key_file": str(pem.key),
        "ca_file": str(pem.ca),
    }
    webhook = config_from_mapping(with_lead(tls=tls), ENV).webhooks["LeadHook"]
    assert webhook.tls == TlsSpec(str(pem.cert), str(pem.key), str(pem.ca))
    only_ca = config_from_mapping(with_lead(tls={"ca_file": str(pem.ca)}), ENV)
    assert only_ca.webhooks["LeadHook"].tls == TlsSpec(ca_file=str(pem.ca))


@pytest.mark.parametrize(
    ("tls", "item", "fragment"),
    [
        ({"client_cert_file": "{cert}"}, "client_key_file", "required with client_cert_file"),
        ({"client_key_file": "{key}"}, "client_cert_file", "required with client_key_file"),
        ({"ca_file": "{missing}"}, "ca_file", "cannot read {missing}: No such file"),
        ({"ca_file": "{junk}"}, "ca_file", "{junk} holds no PEM CA certificate"),
        (
            {"client_cert_file": "{junk}", "client_key_file": "{key}"},
            "client_cert_file",
            "{junk} holds no PEM certificate",
        ),
        (
            {"client_cert_file": "{cert}", "client_key_file": "{junk}"},
            "client_key_file",
            "{junk} holds no PEM private key",
        ),
        (
            {"client_cert_file": "{cert}", "client_key_file": "{other_key}"},
            "client_key_file",
            "{other_key} is not the key of the certificate in {cert}",
        ),
        (
            {"client_cert_file": "{cert}", "client_key_file": "{encrypted_key}"},
            "client_key_file",
            "{encrypted_key} is encrypted",
        ),
        (
            {"client_cert_file": "{missing}", "client_key_file": "{key}"},
            "client_cert_file",
            "cannot read {missing}",
        ),
        ({"cafile": "{ca}"}, "cafile", "did you mean 'ca_file'"),
    ],
)
def test_bad_tls_files_are_named_with_their_path(
    pem: Pem, tls: dict[str, str], item: str, fragment: str
) -> None:
    paths = {
        "cert": pem.cert,
        "key": pem.key,
        "ca": pem.ca,
        "junk": pem.junk,
        "other_key": pem.other_key,
        "encrypted_key": pem.encrypted_key,
        "missing": pem.ca.parent / "missing.pem",
    }
    tls = {k: v.format(**paths) for k, v in tls.items()}
    errors = errors_of(with_lead(tls=tls))
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{LEAD}.tls.{item}: ")
    assert fragment.format(**paths) in errors[0]


# --- [kafka] ---------------------------------------------------------------------


def kafka_errors(env: dict[str, str] | None = None, **kafka: Any) -> tuple[str, ...]:
    raw = base()
    raw["kafka"] = kafka
    try:
        config_from_mapping(raw, env or ENV)
    except ConfigError as exc:
        return exc.errors
    return ()


def test_kafka_defaults_keep_todays_behaviour() -> None:
    kafka = config_from_mapping({}, {}).kafka
    assert kafka == KafkaSettings()
    assert (kafka.security_protocol, kafka.compression_type, kafka.config_topic) == (
        "PLAINTEXT",
        "none",
        "",
    )
    assert not kafka.uses_sasl
    assert not kafka.uses_ssl


def test_kafka_sasl_ssl(pem: Pem) -> None:
    raw = base()
    raw["kafka"] = {
        "config_topic": "crm.workflow-config",
        "compression_type": "zstd",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "${env:KAFKA_USERNAME}",
        "sasl_password": "${file:" + str(pem.ca.parent / "kafka-password") + "}",
        "ssl_ca_file": str(pem.ca),
        "ssl_cert_file": str(pem.cert),
        "ssl_key_file": str(pem.key),
    }
    (pem.ca.parent / "kafka-password").write_text("pw\n", encoding="utf-8")
    kafka = config_from_mapping(raw, {**ENV, "KAFKA_USERNAME": "crmhooks"}).kafka
    assert (kafka.sasl_mechanism, kafka.sasl_username, kafka.sasl_password) == (
        "SCRAM-SHA-512",
        "crmhooks",
        "pw",
    )
    assert kafka.uses_sasl
    assert kafka.uses_ssl
    assert (kafka.ssl_ca_file, kafka.config_topic, kafka.compression_type) == (
        str(pem.ca),
        "crm.workflow-config",
        "zstd",
    )


def test_kafka_sasl_needs_mechanism_user_and_password() -> None:
    assert kafka_errors(security_protocol="SASL_PLAINTEXT", sasl_password="pw") == (
        "kafka.sasl_mechanism: required with security_protocol SASL_PLAINTEXT",
        "kafka.sasl_username: required with security_protocol SASL_PLAINTEXT",
    )


def test_kafka_settings_used_by_no_protocol_are_refused(pem: Pem) -> None:
    assert kafka_errors(sasl_username="u", ssl_ca_file=str(pem.ca)) == (
        "kafka.sasl_username: not used with security_protocol PLAINTEXT (SASL_* is)",
        "kafka.ssl_ca_file: not used with security_protocol PLAINTEXT (SSL is)",
    )


def test_kafka_ssl_files_are_checked_and_no_password_is_shown(pem: Pem) -> None:
    errors = kafka_errors(
        {**ENV, "PW": "kafka-SECRET"},
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password="${env:PW}",
        ssl_ca_file=str(pem.junk),
        ssl_cert_file=str(pem.cert),
    )
    assert errors == (
        f"kafka.ssl_ca_file: {pem.junk} holds no PEM CA certificate (NO_CERTIFICATE_OR_CRL_FOUND)",
        "kafka.ssl_key_file: required with ssl_cert_file",
    )
    assert "kafka-SECRET" not in "\n".join(errors)


@pytest.mark.parametrize(
    ("kafka", "item", "fragment"),
    [
        ({"compression_type": "brotli"}, "compression_type", "none, gzip, snappy, lz4, zstd"),
        ({"security_protocol": "TLS"}, "security_protocol", "PLAINTEXT, SSL, SASL_PLAINTEXT"),
        ({"sasl_mechanism": "GSSAPI"}, "sasl_mechanism", "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
        ({"config_topic": "crm config"}, "config_topic", "Kafka topic name"),
        ({"results_topic": "crm.record-events"}, "results_topic", "already the events_topic"),
        ({"config_topic": "crm.webhook-dlq"}, "config_topic", "already the dlq_topic"),
        ({"session_timeout_ms": 999}, "session_timeout_ms", "≥ 1000"),
    ],
)
def test_bad_kafka_settings_are_named(kafka: dict[str, Any], item: str, fragment: str) -> None:
    errors = kafka_errors(**kafka)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"kafka.{item}: ")
    assert fragment in errors[0]


# --- [log], [alerts], [store] ----------------------------------------------------------


def test_log_settings() -> None:
    assert config_from_mapping({}, {}).log == LogSettings("text", "INFO")
    raw = base()
    raw["log"] = {"format": "json", "level": "debug"}
    assert config_from_mapping(raw, ENV).log == LogSettings("json", "DEBUG")
    raw["log"] = {"format": "yaml", "level": "loud"}
    assert errors_of(raw) == (
        "log.format: must be text or json",
        "log.level: must be one of DEBUG, INFO, WARNING, ERROR",
    )


def test_alerts_go_to_an_organisation_less_webhook() -> None:
    raw = base()
    raw["alerts"] = {"webhook": "LeadHook"}
    assert config_from_mapping(raw, ENV).alerts == AlertSettings("LeadHook")
    assert config_from_mapping(base(), ENV).alerts == AlertSettings(None)
    raw["alerts"] = {"webhook": "CreatorCommission"}
    assert errors_of(raw) == (
        "alerts.webhook: webhook 'CreatorCommission' belongs to organisation 'org-acme'; "
        "alerts need a webhook without org",
    )
    raw["alerts"] = {"webhook": "Nope"}
    assert errors_of(raw) == ("alerts.webhook: unknown webhook 'Nope'",)


def test_redeliver_window_is_the_finished_retention() -> None:
    raw = base()
    raw["store"] = {"finished_retention_s": 86400}
    assert config_from_mapping(raw, ENV).store.finished_retention_s == 86400.0
    raw["store"] = {"redeliver_retention_s": 86400}
    assert errors_of(raw) == (
        "store.redeliver_retention_s: unknown key (did you mean 'finished_retention_s'?)",
    )


def test_defaults_of_the_new_sections() -> None:
    config = Config()
    assert config.delivery.proxy == ""
    assert config.delivery.allowed_networks == ()
    assert config.admin.listen == ""
    assert config.alerts.webhook is None
