"""Addresses in the config: URLs that can be sent, the proxy, allowed networks, the listener."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from crmhooks.cli import main
from crmhooks.config import AdminSettings, config_from_mapping, config_warnings
from crmhooks.errors import ConfigError
from tests.test_config import ENV, base

LEAD = "webhooks[LeadHook].url"


def url_errors(url: str) -> tuple[str, ...]:
    raw = base()
    raw["webhooks"][1]["url"] = url
    try:
        config_from_mapping(raw, ENV)
    except ConfigError as exc:
        return exc.errors
    return ()


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("https://hooks.example.com\\@evil.example/", "backslash"),
        ("https://a\\b@hooks.example.com/", "backslash"),
        ("https://hooks.exa\u00admple.com/lead", "not allowed in a DNS name"),  # soft hyphen
        ("https://hooks.exa mple.com/lead", "not a valid DNS name"),
        ("https://hooks.example!.com/lead", "not a valid DNS name"),
        ("https://hooks..example.com/lead", "not a valid DNS name"),
        ("https://%68ooks.example.com/lead", "not a valid DNS name"),
        ("https://" + "a" * 64 + ".example.com/", "not a valid DNS name"),
        ("https://" + ".".join(["a" * 60] * 5) + "/", "longer than 253"),
        ("https://0x7f.1/lead", "neither a dotted IPv4 address"),
        ("https://999.1.1.1/lead", "neither a dotted IPv4 address"),
        ("https://127.1/lead", "neither a dotted IPv4 address"),
        ("https://[::1%25eth0]/lead", "not an IPv6 address"),
        ("https://[fe80::zz]/lead", "not a valid URL"),
        ("https://hooks.example.com:0/lead", "port 0"),
        ("https://hooks.example.com:65536/lead", "out of range"),
        ("https://hooks.example.com:80a/lead", "not a valid URL"),
        ("https://us er:pw@hooks.example.com/lead", "percent-encoded"),
        ("https://user:p@ss@hooks.example.com/lead", "percent-encoded"),
        ("https://user:pw\x85@hooks.example.com/lead", "control characters"),
        ("https://hooks.example.com/lead\x9b", "control characters"),
        ("https:///lead", "has no host"),
    ],
)
def test_a_url_that_can_never_be_sent_is_refused(url: str, fragment: str) -> None:
    errors = url_errors(url)
    assert errors, f"{url!r} was accepted"
    assert all(e.startswith(f"{LEAD}: ") for e in errors), errors
    assert any(fragment in e for e in errors), errors


@pytest.mark.parametrize(
    "url",
    [
        "https://svc_hooks.internal/lead",  # underscores: real internal host names
        "https://bücher.example/lead",  # an internationalised name (IDNA)
        "https://HOOKS.Example.COM./lead",  # any case, a trailing dot
        "https://[2001:db8::1]:8443/lead",
        "http://192.0.2.10/lead",
        "https://user:p%40ss@hooks.example.com/lead",
        "https://-edge-.example.com/lead",  # resolvers and clients accept it
    ],
)
def test_a_url_that_can_be_sent_is_accepted(url: str) -> None:
    assert url_errors(url) == ()


def delivery_errors(**delivery: object) -> tuple[str, ...]:
    raw = base()
    raw["delivery"] = delivery
    try:
        config_from_mapping(raw, ENV)
    except ConfigError as exc:
        return exc.errors
    return ()


def test_proxy_is_an_http_url_with_host_and_port() -> None:
    raw = base()
    raw["delivery"] = {"proxy": "http://proxy.internal:3128"}
    assert config_from_mapping(raw, ENV).delivery.proxy == "http://proxy.internal:3128"
    assert config_from_mapping(base(), ENV).delivery.proxy == ""


@pytest.mark.parametrize(
    ("proxy", "fragment"),
    [
        ("https://proxy.internal:3128", "http:// URL"),
        ("proxy.internal:3128", "http:// URL"),
        ("http://proxy.internal", "needs a port"),
        ("http://proxy.internal:3128/path", "no path"),
        ("http://proxy.internal:3128?x=1", "no path"),
        ("http://user:pw@proxy.internal:3128", "credentials"),
        ("http://proxy_internal!:3128", "not a valid DNS name"),
        ("http://proxy.internal:99999", "out of range"),
    ],
)
def test_a_bad_proxy_is_refused(proxy: str, fragment: str) -> None:
    errors = delivery_errors(proxy=proxy)
    assert len(errors) == 1, errors
    assert errors[0].startswith("delivery.proxy: ")
    assert fragment in errors[0]


def test_allowed_networks_are_networks_and_each_one_is_warned_about() -> None:
    raw = base()
    raw["delivery"] = {"allowed_networks": ["10.20.0.0/16", "fd00:1::/64"]}
    config = config_from_mapping(raw, ENV)
    assert config.delivery.allowed_networks == (
        ipaddress.ip_network("10.20.0.0/16"),
        ipaddress.ip_network("fd00:1::/64"),
    )
    assert config_warnings(config) == (
        "delivery.allowed_networks[0]: 10.20.0.0/16 is let through the SSRF guard",
        "delivery.allowed_networks[1]: fd00:1::/64 is let through the SSRF guard",
    )
    assert config_warnings(config_from_mapping(base(), ENV)) == ()


def test_a_bad_allowed_network_is_named_by_its_index() -> None:
    errors = delivery_errors(allowed_networks=["10.20.0.0/16", "10.20.0.1/16", "lan", 7])
    assert [e.split(": ")[0] for e in errors] == ["delivery.allowed_networks[3]"]
    errors = delivery_errors(allowed_networks=["10.20.0.0/16", "10.20.0.1/16", "lan"])
    assert errors == (
        "delivery.allowed_networks[1]: not a CIDR network: 10.20.0.1/16 has host bits set",
        "delivery.allowed_networks[2]: not a CIDR network: 'lan' does not appear to be an "
        "IPv4 or IPv6 network",
    )


def test_check_config_prints_the_warnings_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "warned.toml"
    path.write_text('[delivery]\nallowed_networks = ["10.20.0.0/16"]\n', encoding="utf-8")
    assert main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: ok (")
    assert err == (
        f"{path}: warning: delivery.allowed_networks[0]: 10.20.0.0/16 is let through the "
        "SSRF guard\n"
    )


ISSUE_26_9 = """
[[orgs]]
id = "org-acme"
users = 1

[[webhooks]]
name = "Backslash"
url = "https://hooks.example.com\\\\@evil.example/lead"
module = "Leads"

[[webhooks]]
name = "SoftHyphen"
url = "https://hooks.exa\\u00admple.com/lead"
module = "Leads"

[[rules]]
id = "r"
module = "Leads"
instant = "Backslash"

  [[rules.scheduled]]
  webhook = "SoftHyphen"
  relative_to = "trigger"
  offset = "1h"
"""


def test_check_config_refuses_the_urls_of_issue_26_9_naming_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, both passed check-config and failed at send time with a traceback."""
    path = tmp_path / "unsendable.toml"
    path.write_text(ISSUE_26_9, encoding="utf-8")
    assert main(["check-config", "--config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}: 2 error(s):",
        "  webhooks[Backslash].url: a backslash in the host part (some clients read it as '/')",
        "  webhooks[SoftHyphen].url: host 'hooks.exa\\xadmple.com' has a character that is not "
        "allowed in a DNS name",
    ]


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("", None),
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:0", ("::1", 0)),
        ("metrics.internal:9100", ("metrics.internal", 9100)),
    ],
)
def test_admin_listen(listen: str, address: tuple[str, int] | None) -> None:
    raw = base()
    raw["admin"] = {"listen": listen}
    admin = config_from_mapping(raw, ENV).admin
    assert admin == AdminSettings(listen)
    assert admin.address == address


@pytest.mark.parametrize(
    ("listen", "fragment"),
    [
        ("9464", "host:port"),
        ("127.0.0.1:", "host:port"),
        ("127.0.0.1:99999", "out of range"),
        ("[::zz]:9464", "not an IPv6 address"),
        ("bad host:9464", "not a valid DNS name"),
    ],
)
def test_a_bad_admin_listen_is_refused(listen: str, fragment: str) -> None:
    raw = base()
    raw["admin"] = {"listen": listen}
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw, ENV)
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith("admin.listen: ")
    assert fragment in info.value.errors[0]


def test_admin_is_off_by_default() -> None:
    assert config_from_mapping({}, {}).admin.address is None
