"""Templates: secret references (${env:}, ${file:}) and [webhooks.headers] (SPEC §3.1, §4, §6)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit
from xml.etree import ElementTree
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crmhooks.config import BodySpec, Webhook
from crmhooks.errors import TemplateError
from crmhooks.modules import ModuleCatalog
from crmhooks.templates import CompiledWebhook, Placeholder, RenderContext

CATALOG = ModuleCatalog()

# The seed's business scenario 2 as the seed writes it: the API key inside the XML body.
SMS_TEMPLATE = """<?xml version="1.0"?>
<m:Library xmlns:m="http://www.screen-magic.com" xmlns="http://www.defns.com">
<username>xxxx@xxxxx.com</username>
<senderid>SMS-Provider</senderid>
<accountid>XXXXXXX</accountid>
<apikey>${env:SMS_API_KEY}</apikey>
<message mobilenumber="${User.Mobile}">Hi ${User.Last Name}, Payment amount \
${Potential.Amount} is due today from ${Account.Account Name}. Please contact \
${Contact.Last Name} ASAP</message>
</m:Library>"""


def ctx(record: dict[str, Any] | None = None, **kwargs: Any) -> RenderContext:
    return RenderContext(
        module="Potentials",
        record=record or {},
        related=kwargs.get("related", {}),
        user=kwargs.get("user"),
        organization=None,
        time_zone=ZoneInfo("Asia/Shanghai"),
    )


def compile_(env: dict[str, str] | None = None, **kwargs: Any) -> CompiledWebhook:
    kwargs.setdefault("name", "Hook")
    kwargs.setdefault("url", "https://hooks.example.com/in")
    kwargs.setdefault("module", "Potentials")
    return CompiledWebhook(Webhook(env_values=env or {}, **kwargs), CATALOG)


def test_seed_sms_scenario_key_inside_the_xml_body() -> None:
    key = "k3y&<'\"]]>"
    compiled = compile_(
        {"env:SMS_API_KEY": key},
        url="http://10.20.0.15/smsgateway/post",
        body=BodySpec(format="xml", template=SMS_TEMPLATE),
    )
    req = compiled.render(
        ctx(
            {"Amount": 25000},
            related={"Accounts": {"Account Name": "Acme"}, "Contacts": {"Last Name": "Wong"}},
            user={"Mobile": "+351900000000", "Last Name": "Silva"},
        )
    )
    ns = "{http://www.defns.com}"
    root = ElementTree.fromstring(req.body)
    assert root.findtext(f"{ns}apikey") == key  # escaped as XML text, read back as it is
    assert b"k3y&amp;&lt;'\"]]&gt;" in req.body
    shown = ElementTree.fromstring(req.shown_body)
    assert shown.findtext(f"{ns}apikey") == "***"
    assert key.encode() not in req.shown_body
    assert b"k3y" not in req.shown_body
    assert req.url == req.redacted_url == "http://10.20.0.15/smsgateway/post"
    # The key is not a CRM field: 5 fields, as the seed's own template has.
    assert len(compiled.crm_fields) == 5
    assert Placeholder("Organization", "env:SMS_API_KEY") not in compiled.crm_fields


@pytest.mark.parametrize(
    ("template", "expected", "shown"),
    [
        ("<a k='${env:K}'/>", "<a k='a&amp;&lt;&quot;&apos;&#10;b'/>", "<a k='***'/>"),
        ("<a><![CDATA[${env:K}]]></a>", None, "<a><![CDATA[***]]></a>"),
    ],
)
def test_xml_attribute_and_cdata(template: str, expected: str | None, shown: str) -> None:
    key = "a&<\"'\nb" if expected else "x]]><evil/>"
    compiled = compile_({"env:K": key}, body=BodySpec(format="xml", template=template))
    req = compiled.render(ctx())
    if expected is not None:
        assert req.body.decode() == expected
        assert ElementTree.fromstring(req.body).get("k") == key
    else:
        root = ElementTree.fromstring(req.body)
        assert root.text == key
        assert len(root) == 0
    assert req.shown_body.decode() == shown


def test_json_string_and_whole_value() -> None:
    compiled = compile_(
        {"env:K": 'a"b\\c', "file:/run/t": "2026-11-30T09:00:00Z"},
        body=BodySpec(format="json", template='{"key": "Bearer ${env:K}", "t": ${file:/run/t}}'),
    )
    req = compiled.render(ctx())
    # A secret is text, sent as written: never read as a date-time, a number or JSON.
    assert orjson.loads(req.body) == {"key": 'Bearer a"b\\c', "t": "2026-11-30T09:00:00Z"}
    assert orjson.loads(req.shown_body) == {"key": "Bearer ***", "t": "***"}


def test_url_query_and_path_references() -> None:
    compiled = compile_(
        {"env:TENANT": "t/1?", "env:KEY": "a b&c"},
        method="GET",
        url="https://h.example/api/${env:TENANT}/in?key=${env:KEY}&d=${Potentials.Name}",
    )
    req = compiled.render(ctx({"Name": "x"}))
    assert req.url == "https://h.example/api/t%2F1%3F/in?key=a%20b%26c&d=x"
    assert req.redacted_url == "https://h.example/api/%2A%2A%2A/in?key=%2A%2A%2A&d=x"
    assert len(compiled.crm_fields) == 1


def test_url_password_is_shown_as_stars() -> None:
    compiled = compile_(url="https://ops:p%40ss@h.example/in", custom_params={"k": "v"})
    req = compiled.render(ctx())
    assert req.url == "https://ops:p%40ss@h.example/in"
    assert req.redacted_url == "https://ops:***@h.example/in"
    get = compile_(method="GET", url="https://ops:pw@h.example/in?a=1").render(ctx())
    assert get.redacted_url == "https://ops:***@h.example/in?a=1"
    # A user without a password has no secret.
    plain = compile_(url="https://ops@h.example/in").render(ctx())
    assert plain.redacted_url == plain.url


def test_entity_param_and_form_document_with_references() -> None:
    compiled = compile_(
        {"env:T": "tok=1&x"},
        entity_params={"auth": "Bearer ${env:T}", "deal": "${Potentials.Name}"},
        body=BodySpec(format="xml", template="<k>${env:T}</k>", param="XMLString"),
    )
    req = compiled.render(ctx({"Name": "D&1"}))
    assert parse_qsl(req.body.decode()) == [
        ("auth", "Bearer tok=1&x"),
        ("deal", "D&1"),
        ("XMLString", "<k>tok=1&amp;x</k>"),
    ]
    assert parse_qsl(req.shown_body.decode()) == [
        ("auth", "Bearer ***"),
        ("deal", "D&1"),
        ("XMLString", "<k>***</k>"),
    ]
    get = compile_(
        {"env:T": "tok"},
        method="GET",
        body=BodySpec(format="json", template='{"k": "${env:T}"}', param="doc"),
    ).render(ctx())
    assert dict(parse_qsl(urlsplit(get.url).query)) == {"doc": '{"k": "tok"}'}
    assert dict(parse_qsl(urlsplit(get.redacted_url).query)) == {"doc": '{"k": "***"}'}


def test_no_secret_no_second_render() -> None:
    req = compile_(
        body=BodySpec(format="json", template='{"n": "${Potentials.Name}"}'),
    ).render(ctx({"Name": "x"}))
    assert req.redacted_body is None
    assert req.redacted_headers is None
    assert req.redacted_url is req.url


# -- headers ---------------------------------------------------------------------------


def test_headers_sent_and_shown() -> None:
    compiled = compile_(
        {"env:KEY": "s3cr3t"},
        body=BodySpec(format="json", template="{}"),
        headers={
            "X-Api-Key": "${env:KEY}",
            "X-Static": "literal-token",
            "X-Deal-Name": "${Potentials.Potential Name}",
            "X-Mixed": "deal ${Potentials.Id}",
            "Content-Type": "application/vnd.acme+json",
            "User-Agent": "acme-crm/1",
        },
    )
    req = compiled.render(ctx({"Potential Name": "Big 大单", "Id": 7}))
    assert list(req.headers.items()) == [
        ("X-Api-Key", "s3cr3t"),
        ("X-Static", "literal-token"),
        ("X-Deal-Name", "Big 大单"),
        ("X-Mixed", "deal 7"),
        ("Content-Type", "application/vnd.acme+json"),  # replaces the raw body's own
        ("User-Agent", "acme-crm/1"),
    ]
    assert dict(req.shown_headers) == {
        "X-Api-Key": "***",
        "X-Static": "***",
        "X-Deal-Name": "Big 大单",  # record data: shown as the body shows it
        "X-Mixed": "***",
        "Content-Type": "***",
        "User-Agent": "***",
    }
    assert compiled.crm_fields == {
        Placeholder("Potentials", "Potential Name"),
        Placeholder("Potentials", "Id"),
    }


def test_constant_headers_are_made_once() -> None:
    compiled = compile_({"env:KEY": "k"}, headers={"X-Api-Key": "${env:KEY}"})
    one, two = compiled.render(ctx()), compiled.render(ctx())
    assert one.headers is two.headers
    assert one.redacted_headers is two.redacted_headers
    assert dict(one.headers) == {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Api-Key": "k",
    }


@pytest.mark.parametrize("value", ["a\r\nX-Evil: 1", "a\nb", "a\x00b"])
def test_header_value_with_a_line_break_is_a_template_error(value: str) -> None:
    compiled = compile_(headers={"X-Deal": "${Potentials.Name}"})
    with pytest.raises(TemplateError) as info:
        compiled.render(ctx({"Name": value}))
    message = str(info.value)
    assert message == (
        "webhook Hook: header X-Deal: a value holds CR, LF or NUL, which would end the header"
    )
    assert value not in message


def test_secret_with_a_line_break_is_refused_at_compile_time() -> None:
    with pytest.raises(TemplateError) as info:
        compile_({"env:KEY": "abc\ndef"}, headers={"X-Api-Key": "${env:KEY}"})
    assert info.value.problems == (
        "headers.X-Api-Key: a value holds CR, LF or NUL, which would end the header",
    )
    assert "abc" not in str(info.value)


def test_header_problems_are_named() -> None:
    with pytest.raises(TemplateError) as info:
        compile_(headers={"X-A": "${Foo.Bar}", "X-B": "${Potentials}", "X-C": "${env:NOPE}"})
    assert info.value.problems == (
        "headers.X-A: unknown namespace 'Foo' in ${Foo.Bar}",
        "headers.X-B: placeholder ${Potentials} must be ${Module.Field Name}",
        "headers.X-C: ${env:NOPE} has no value (the config did not resolve it)",
    )


# -- properties --------------------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=4, max_size=40)


@given(key=_TEXT)
def test_any_secret_stays_one_xml_text_node(key: str) -> None:
    req = compile_(
        {"env:K": key}, body=BodySpec(format="xml", template="<a><k>${env:K}</k><b/></a>")
    ).render(ctx())
    root = ElementTree.fromstring(req.body)
    assert [child.tag for child in root] == ["k", "b"]
    legal = "".join(
        c if c in "\t\n\r" or (c >= " " and c not in "\ufffe\uffff") else "\ufffd" for c in key
    )
    assert (root.findtext("k") or "") == legal  # \r written as &#13;: read back as \r


@given(key=_TEXT)
def test_any_secret_stays_one_json_string_and_one_query_value(key: str) -> None:
    compiled = compile_(
        {"env:K": key},
        method="GET",
        url="https://h.example/in?k=${env:K}",
        body=BodySpec(format="json", template='{"k": "${env:K}", "n": 1}', param="doc"),
    )
    req = compiled.render(ctx())
    query = parse_qsl(urlsplit(req.url).query, keep_blank_values=True)
    assert [name for name, _ in query] == ["k", "doc"]
    assert unquote(urlsplit(req.url).query.split("&")[0][2:]) == key
    assert orjson.loads(query[1][1]) == {"k": key, "n": 1}
    assert key not in req.redacted_url
