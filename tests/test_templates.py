"""Templates: placeholders, formatting, escaping per context and request shapes (SPEC §4)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlsplit
from xml.etree import ElementTree
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from crmhooks.config import BodySpec, Webhook
from crmhooks.errors import TemplateError
from crmhooks.modules import ModuleCatalog
from crmhooks.templates import (
    CompiledWebhook,
    Placeholder,
    RenderContext,
    _json_in_string,
    _json_string,
    format_number,
    format_value,
    parse_placeholders,
)

CATALOG = ModuleCatalog()
SHANGHAI = ZoneInfo("Asia/Shanghai")
UTC = ZoneInfo("UTC")

# SPEC §3 example: Zoho Creator, XML document sent as the XMLString parameter.
CREATOR_TEMPLATE = """
<ZohoCreator><applicationlist><application name='sales-commissions'><formlist>
<form name='Commissions'><add>
  <field name='Name'><value>${Potentials.Potential Name}</value></field>
  <field name='Closed_Amount'><value>${Potentials.Amount}</value></field>
  <field name='Closing_Date'><value>${Potentials.Closing Date}</value></field>
  <field name='Customer_Name'><value>${Accounts.Account Name}</value></field>
</add></form></formlist></application></applicationlist></ZohoCreator>
"""

# The seed's business scenario 2: the SMS gateway document, sent as the raw body.
SMS_TEMPLATE = """<?xml version="1.0"?>
<m:Library xmlns:m="http://www.screen-magic.com" xmlns="http://www.defns.com">
<username>xxxx@xxxxx.com</username>
<senderid>SMS-Provider</senderid>
<accountid>XXXXXXX</accountid>
<apikey>XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX</apikey>
<message mobilenumber="${User.Mobile}">Hi ${User.Last Name}, Payment amount \
${Potential.Amount} is due today from ${Account.Name}. Please contact \
${Contact.Last Name} ASAP</message>
</m:Library>"""


def ctx(
    record: Mapping[str, Any] | None = None,
    related: Mapping[str, Mapping[str, Any]] | None = None,
    user: Mapping[str, Any] | None = None,
    organization: Mapping[str, Any] | None = None,
    tz: ZoneInfo = SHANGHAI,
) -> RenderContext:
    return RenderContext(
        module="Potentials",
        record=record or {},
        related=related or {},
        user=user,
        organization=organization,
        time_zone=tz,
    )


def webhook(**kwargs: Any) -> Webhook:
    base: dict[str, Any] = {
        "name": "Hook",
        "url": "https://hooks.example.com/in",
        "module": "Potentials",
    }
    base.update(kwargs)
    return Webhook(**base)


def compile_(**kwargs: Any) -> CompiledWebhook:
    return CompiledWebhook(webhook(**kwargs), CATALOG)


def creator_webhook() -> Webhook:
    return webhook(
        name="CreatorCommission",
        url="https://creator.example.com/api/xml/write",
        body=BodySpec(format="xml", template=CREATOR_TEMPLATE, param="XMLString"),
        entity_params={"deal": "${Potentials.Potential Name}"},
        custom_params={"apikey": "k3y&=/+", "zc_ownername": "acme"},
        secret_params=frozenset({"apikey"}),
    )


# --------------------------------------------------------------------------- scenario 1


def test_creator_xml_string_form_body_is_exact() -> None:
    compiled = CompiledWebhook(creator_webhook(), CATALOG)
    name = 'Big "deal" & <co> 大单'
    req = compiled.render(
        ctx(
            record={"Potential Name": name, "Amount": 25000.0, "Closing Date": "2026-11-30"},
            related={"Accounts": {"Account Name": "O'Neil & Sons"}},
        )
    )
    expected_xml = (
        "<ZohoCreator><applicationlist><application name='sales-commissions'><formlist>\n"
        "<form name='Commissions'><add>\n"
        "  <field name='Name'><value>Big \"deal\" &amp; &lt;co&gt; 大单</value></field>\n"
        "  <field name='Closed_Amount'><value>25000</value></field>\n"
        "  <field name='Closing_Date'><value>2026-11-30</value></field>\n"
        "  <field name='Customer_Name'><value>O'Neil &amp; Sons</value></field>\n"
        "</add></form></formlist></application></applicationlist></ZohoCreator>"
    )
    assert req.method == "POST"
    assert req.url == "https://creator.example.com/api/xml/write"
    assert req.redacted_url == req.url
    assert dict(req.headers) == {"Content-Type": "application/x-www-form-urlencoded"}
    assert req.body == (
        f"deal={quote(name, safe='')}&apikey=k3y%26%3D%2F%2B&zc_ownername=acme"
        f"&XMLString={quote(expected_xml, safe='')}"
    ).encode("ascii")
    assert req.redacted_body == (
        f"deal={quote(name, safe='')}&apikey=***&zc_ownername=***"
        f"&XMLString={quote(expected_xml, safe='')}"
    ).encode("ascii")

    form = parse_qs(req.body.decode("ascii"), keep_blank_values=True)
    assert list(form) == ["deal", "apikey", "zc_ownername", "XMLString"]
    assert form["deal"] == [name]
    assert form["apikey"] == ["k3y&=/+"]
    root = ElementTree.fromstring(form["XMLString"][0])
    values = {f.get("name"): f.findtext("value") for f in root.iter("field")}
    assert values == {
        "Name": name,
        "Closed_Amount": "25000",
        "Closing_Date": "2026-11-30",
        "Customer_Name": "O'Neil & Sons",
    }


def test_creator_crm_fields_are_distinct_and_canonical() -> None:
    compiled = CompiledWebhook(creator_webhook(), CATALOG)
    assert compiled.crm_fields == {
        Placeholder("Potentials", "Potential Name"),
        Placeholder("Potentials", "Amount"),
        Placeholder("Potentials", "Closing Date"),
        Placeholder("Accounts", "Account Name"),
    }


# --------------------------------------------------------------------------- scenario 2


def sms_webhook(**kwargs: Any) -> CompiledWebhook:
    return compile_(
        name="PaymentDueSms",
        url="http://203.0.113.7/smsgateway/post",
        body=BodySpec(format="xml", template=SMS_TEMPLATE),
        **kwargs,
    )


def test_sms_raw_xml_body_attribute_and_text() -> None:
    compiled = sms_webhook(custom_params={"token": "s3cret"}, secret_params=frozenset({"token"}))
    req = compiled.render(
        ctx(
            record={"Amount": 25000.0},
            related={
                "Accounts": {"Name": "Acme <Corp> & Co"},
                "Contacts": {"Last Name": "Wong"},
            },
            user={"Mobile": "+351 \"900\" '000'\n", "Last Name": "O'Brien"},
        )
    )
    assert req.method == "POST"
    assert dict(req.headers) == {"Content-Type": "application/xml; charset=utf-8"}
    assert req.url == "http://203.0.113.7/smsgateway/post?token=s3cret"
    assert req.redacted_url == "http://203.0.113.7/smsgateway/post?token=***"
    assert req.redacted_body is None
    root = ElementTree.fromstring(req.body)
    assert root.tag == "{http://www.screen-magic.com}Library"
    message = root.find("{http://www.defns.com}message")
    assert message is not None
    assert message.attrib == {"mobilenumber": "+351 \"900\" '000'\n"}
    assert message.text == (
        "Hi O'Brien, Payment amount 25000 is due today from Acme <Corp> & Co. "
        "Please contact Wong ASAP"
    )
    assert [c.tag.split("}")[1] for c in root] == [
        "username",
        "senderid",
        "accountid",
        "apikey",
        "message",
    ]


def test_sms_missing_fields_render_empty() -> None:
    req = sms_webhook().render(ctx())
    message = ElementTree.fromstring(req.body).find("{http://www.defns.com}message")
    assert message is not None
    assert message.get("mobilenumber") == ""
    assert message.text == "Hi , Payment amount  is due today from . Please contact  ASAP"
    assert req.url == "http://203.0.113.7/smsgateway/post"


def test_sms_crm_fields() -> None:
    assert sms_webhook().crm_fields == {
        Placeholder("User", "Mobile"),
        Placeholder("User", "Last Name"),
        Placeholder("Potentials", "Amount"),
        Placeholder("Accounts", "Name"),
        Placeholder("Contacts", "Last Name"),
    }


def test_related_records_found_under_any_module_name() -> None:
    compiled = compile_(entity_params={"a": "${Account.Name}", "d": "${Deal.Stage}"})
    req = compiled.render(ctx(record={"Stage": "Won"}, related={"Account": {"Name": "Acme"}}))
    assert req.body == b"a=Acme&d=Won"


# --------------------------------------------------------------------------- JSON


JSON_TEMPLATE = """{
  "amount": ${Potentials.Amount}, "won": ${Deal.Won}, "name": ${Potentials.Potential Name},
  "missing": ${Potentials.Nope}, "tags": ${Potentials.Tags}, "none": ${Potentials.Null},
  "note": "Deal ${Potentials.Potential Name} for ${Accounts.Account Name}\\n",
  "due": ${Potentials.Payment Due}, "list": [${Potentials.Amount}, ${Org.Company Name}]
}"""


def test_json_whole_values_keep_their_type() -> None:
    compiled = compile_(body=BodySpec(format="json", template=JSON_TEMPLATE))
    req = compiled.render(
        ctx(
            record={
                "Amount": 1e21,
                "Won": True,
                "Potential Name": 'A "big" one\u2028',
                "Tags": ["a", 2, None, 0.5],
                "Null": None,
                "Payment Due": "2026-12-05T01:30:00Z",
            },
            related={"Accounts": {"Account Name": "Acme"}},
            organization={"Company Name": "Acme Ltd"},
        )
    )
    assert dict(req.headers) == {"Content-Type": "application/json"}
    assert b"\\u2028" in req.body
    assert b"1000000000000000000000" in req.body  # not 1e21
    assert orjson.loads(req.body) == {
        "amount": 10**21,
        "won": True,
        "name": 'A "big" one\u2028',
        "missing": None,
        "tags": ["a", 2, None, 0.5],
        "none": None,
        "note": 'Deal A "big" one\u2028 for Acme\n',
        "due": "2026-12-05 09:30",
        "list": [10**21, "Acme Ltd"],
    }


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ('{"${Potentials.Name}": 1}', "object key"),
        ('{"a": 1, ${Potentials.Name}: 1}', "object key"),
        ('{"a": 1${Potentials.Name}}', "whole value"),
        ('{"a": ${Potentials.Name}${Potentials.Name}}', "whole value"),
        ('{"a": "x" ${Potentials.Name}}', "whole value"),
        ('{"a": }', "not well-formed JSON"),
        ('{"a": "\\${Potentials.Name}"}', "backslash"),
    ],
)
def test_json_template_errors(template: str, message: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(message)) as info:
        compile_(body=BodySpec(format="json", template=template))
    assert str(info.value).startswith("body.template: ")


def test_json_top_level_placeholder() -> None:
    compiled = compile_(body=BodySpec(format="json", template=" ${Potentials.Tags} "))
    assert compiled.render(ctx(record={"Tags": ["x", "y"]})).body == b'["x","y"]'


# --------------------------------------------------------------------------- XML contexts


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("<${Potentials.Tag}/>", "inside an XML tag"),
        ("<a ${Potentials.Attr}='1'/>", "inside an XML tag"),
        ("<a b=${Potentials.V}/>", "inside an XML tag"),
        ("<a><!-- ${Potentials.V} --></a>", "inside an XML comment"),
        ("<a><?pi ${Potentials.V}?></a>", "processing instruction"),
        ("<a><b></a>", "not well-formed XML"),
        ("${Potentials.V}<a/>", "not well-formed XML"),
        # A value must not name a reference: here an entity the template declares.
        ('<!DOCTYPE a [<!ENTITY xe "<b/>">]><a>&${Potentials.V}e;</a>', "entity or character"),
        ('<a k="&#${Potentials.V};"/>', "entity or character reference"),
        # The internal subset is one declaration, whatever ">" it holds.
        ('<!DOCTYPE a [<!ENTITY e SYSTEM "http://x/>${Potentials.V}">]><a/>', "declaration"),
        ("<!DOCTYPE a [<!ENTITY e 'x'><!-- > ${Potentials.V} -->]><a/>", "declaration"),
    ],
)
def test_xml_template_errors(template: str, message: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(message)):
        compile_(body=BodySpec(format="xml", template=template))


def test_xml_references_and_doctype_beside_placeholders() -> None:
    template = (
        '<!DOCTYPE a [<!-- it\'s > here --><!ENTITY co "Acme Co ">]>'
        '<a k="&amp;${Potentials.V}&#59;">&co;${Potentials.V}&lt;</a>'
    )
    _, root = render_xml(template, V="&lt;")
    assert root.attrib == {"k": "&&lt;;"}
    assert root.text == "Acme Co &lt;<"


def test_xml_cdata_section_cannot_be_closed_by_a_value() -> None:
    compiled = compile_(body=BodySpec(format="xml", template="<a><![CDATA[${Potentials.V}]]></a>"))
    value = "x]]><evil/>\r\x01"
    root = ElementTree.fromstring(compiled.render(ctx(record={"V": value})).body)
    assert list(root) == []
    assert root.text == "x]]><evil/>\r\ufffd"


def render_xml(template: str, **record: Any) -> tuple[bytes, ElementTree.Element]:
    """The body of an XML webhook for ``record``, and the document it parses to."""
    body = compile_(body=BodySpec(format="xml", template=template)).render(ctx(record=record)).body
    return body, ElementTree.fromstring(body)


def test_xml_cdata_adjacent_values_cannot_close_the_section() -> None:
    # Issue 26.5: "]]" and "><inj/><![CDATA[" side by side made an element.
    _, root = render_xml("<a><![CDATA[${Potentials.A}${Potentials.B}]]></a>", A="]]", B="><inj/>")
    assert list(root) == []
    assert root.text == "]]><inj/>"


@pytest.mark.parametrize(
    ("template", "values", "text"),
    [
        # value | value, one "]" or two on the left, ">" or "]>" on the right
        ("<a><![CDATA[${A}${B}]]></a>", {"A": "]", "B": "]>x"}, "]]>x"),
        ("<a><![CDATA[${A}${B}]]></a>", {"A": "]]", "B": ">x"}, "]]>x"),
        # with empty values between them
        ("<a><![CDATA[${A}${B}${C}${D}]]></a>", {"A": "]", "B": "", "C": "]", "D": ">"}, "]]>"),
        ("<a><![CDATA[${A}${B}${C}]]></a>", {"A": "]", "B": "]", "C": ">"}, "]]>"),
        # literal | value
        ("<a><![CDATA[x]]${A}]]></a>", {"A": "><b/>"}, "x]]><b/>"),
        ("<a><![CDATA[x]${A}]]></a>", {"A": "]><b/>"}, "x]]><b/>"),
        ("<a><![CDATA[x]${A}${B}]]></a>", {"A": "", "B": "]>"}, "x]]>"),
        # value | literal
        ("<a><![CDATA[${A}>y]]></a>", {"A": "x]]"}, "x]]>y"),
        ("<a><![CDATA[${A}]>y]]></a>", {"A": "x]"}, "x]]>y"),
        # literal | empty value | literal: the template alone would close it
        ("<a><![CDATA[x]]${A}>y]]></a>", {"A": ""}, "x]]>y"),
        ("<a><![CDATA[x]${A}]>y]]></a>", {"A": ""}, "x]]>y"),
        # the section's own end right after a value ending in "]"
        ("<a><![CDATA[${A}]]></a>", {"A": "x]"}, "x]"),
        ("<a><![CDATA[${A}]]></a>", {"A": "]]]>]]"}, "]]]>]]"),
        # a value starting with ">" after the section's start
        ("<a><![CDATA[${A}]]></a>", {"A": ">]]>"}, ">]]>"),
        # text: "]]>" is not allowed there; an empty value must not make it
        ("<a>x]]${A}>y</a>", {"A": ""}, "x]]>y"),
        ("<a>x]${A}]>y</a>", {"A": "]"}, "x]]]>y"),
        ("<a>${A}${B}>y</a>", {"A": "]", "B": "]"}, "]]>y"),
    ],
)
def test_xml_adjacent_pieces_never_form_a_cdata_end(
    template: str, values: dict[str, str], text: str
) -> None:
    _, root = render_xml(template.replace("${", "${Potentials."), **values)
    assert list(root) == []
    assert root.text == text


def test_xml_cdata_plain_values_render_as_before() -> None:
    # Section breaks only where a "]" meets a slot: most documents are unchanged.
    body, _ = render_xml("<a><![CDATA[${Potentials.A} [${Potentials.B}]]]></a>", A="x>", B="y")
    assert body == b"<a><![CDATA[x> [y]]]></a>"


# --------------------------------------------------------------------------- request shapes


def test_get_sends_everything_in_the_query_string() -> None:
    compiled = compile_(
        method="GET",
        url="https://h.example.com/api?v=2",
        entity_params={"deal": "${Potentials.Potential Name}", "amt": "${Potentials.Amount}"},
        custom_params={"apikey": "abc", "owner": "acme"},
        secret_params=frozenset({"apikey"}),
        body=BodySpec(format="json", template='{"n": "${Potentials.Potential Name}"}', param="doc"),
    )
    req = compiled.render(ctx(record={"Potential Name": "A&B=c", "Amount": 10}))
    assert req.method == "GET"
    assert req.body == b""
    assert dict(req.headers) == {}
    assert req.url == (
        "https://h.example.com/api?v=2&deal=A%26B%3Dc&amt=10&apikey=abc&owner=acme"
        "&doc=%7B%22n%22%3A%20%22A%26B%3Dc%22%7D"
    )
    # Every custom parameter is a secret (SPEC §3.1), from a reference or not.
    assert req.redacted_url == req.url.replace("apikey=abc", "apikey=***").replace(
        "owner=acme", "owner=***"
    )
    assert parse_qsl(urlsplit(req.url).query) == [
        ("v", "2"),
        ("deal", "A&B=c"),
        ("amt", "10"),
        ("apikey", "abc"),
        ("owner", "acme"),
        ("doc", '{"n": "A&B=c"}'),
    ]


def test_get_without_parameters_has_no_question_mark() -> None:
    req = compile_(method="GET").render(ctx())
    assert req.url == req.redacted_url == "https://hooks.example.com/in"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://h.example/p?", "https://h.example/p?k=v"),
        ("https://h.example/p?a=1&", "https://h.example/p?a=1&k=v"),
        ("https://h.example/p", "https://h.example/p?k=v"),
        ("https://h.example/p?a=?", "https://h.example/p?a=?&k=v"),
    ],
)
def test_query_separator(url: str, expected: str) -> None:
    req = compile_(method="GET", url=url, custom_params={"k": "v"}).render(ctx())
    assert req.url == expected


def test_post_params_only_is_a_form() -> None:
    compiled = compile_(
        entity_params={"name": "Deal: ${Potentials.Potential Name}!"},
        custom_params={"x": "a b"},
    )
    req = compiled.render(ctx(record={"Potential Name": "大单 & co"}))
    assert req.url == req.redacted_url == "https://hooks.example.com/in"
    assert parse_qsl(req.body.decode("ascii")) == [("name", "Deal: 大单 & co!"), ("x", "a b")]
    assert parse_qsl(req.shown_body.decode("ascii")) == [("name", "Deal: 大单 & co!"), ("x", "***")]


def test_raw_get_body_is_refused() -> None:
    with pytest.raises(TemplateError, match="GET cannot carry a raw body"):
        compile_(method="GET", body=BodySpec(format="xml", template="<a/>"))


def test_url_placeholders_in_path_and_query_are_encoded() -> None:
    compiled = compile_(
        method="GET", url="https://h.example.com/deals/${Potentials.Id}/x?q=${Potentials.Q}"
    )
    req = compiled.render(ctx(record={"Id": "../a/b?c#d", "Q": "1&admin=1"}))
    parts = urlsplit(req.url)
    assert parts.path == "/deals/..%2Fa%2Fb%3Fc%23d/x"
    assert parse_qsl(parts.query) == [("q", "1&admin=1")]
    assert Placeholder("Potentials", "Id") in compiled.crm_fields


def render_url(url: str, **record: Any) -> str:
    return compile_(method="GET", url=url).render(ctx(record=record)).url


@pytest.mark.parametrize(
    ("url", "values"),
    [
        ("https://h.example.com/ok/${A}/end", {"A": "."}),
        ("https://h.example.com/ok/${A}/end", {"A": ".."}),
        ("https://h.example.com/${A}", {"A": ".."}),
        ("https://h.example.com/ok/${A}", {"A": "."}),
        ("https://h.example.com/ok/${A}?q=1", {"A": ".."}),
        ("https://h.example.com/ok/${A}/", {"A": ".."}),
        # several placeholders, empty ones too, and literals beside them
        ("https://h.example.com/ok/${A}${B}/end", {"A": ".", "B": "."}),
        ("https://h.example.com/ok/${A}${B}${C}/end", {"A": "", "B": "..", "C": ""}),
        ("https://h.example.com/ok/.${A}/end", {"A": "."}),
        ("https://h.example.com/ok/${A}./end", {"A": ""}),
        # percent-encoded dots in the template's text, in either case
        ("https://h.example.com/ok/%2e${A}/end", {"A": "."}),
        ("https://h.example.com/ok/${A}%2E/end", {"A": "."}),
        ("https://h.example.com/ok/%2E%2e${A}/end", {"A": ""}),
    ],
)
def test_url_dot_segment_from_a_value_is_refused(url: str, values: dict[str, str]) -> None:
    # Issue 26.6: "/ok/path/../end" would be normalised to "/ok/end" by the server.
    with pytest.raises(TemplateError, match=r"^webhook Hook: .*dot segment"):
        render_url(url.replace("${", "${Potentials."), **values)


@pytest.mark.parametrize(
    ("value", "segment"),
    [
        ("...", "..."),
        (".a", ".a"),
        ("a..", "a.."),
        ("", ""),
        ("%2e", "%252e"),  # a value's "%" is a character, not an escape
        ("../x", "..%2Fx"),  # "/" cannot split the segment
        ("..?x#y", "..%3Fx%23y"),
        (". .", ".%20."),
    ],
)
def test_url_values_that_are_not_dot_segments_are_sent(value: str, segment: str) -> None:
    url = render_url("https://h.example.com/ok/${Potentials.A}/end?q=${Potentials.A}", A=value)
    assert url == f"https://h.example.com/ok/{segment}/end?q={quote(value, safe='')}"


def test_url_dot_segments_are_checked_only_where_a_value_is() -> None:
    # The template's own text is the administrator's; a dot value in the query is a value.
    url = "https://h.example.com/a/../b/${Potentials.A}?q=${Potentials.B}&r=.."
    assert render_url(url, A="x", B="..") == "https://h.example.com/a/../b/x?q=..&r=.."


def test_url_literal_non_ascii_is_encoded() -> None:
    req = compile_(method="GET", url="https://h.example.com/中 文?a=b c").render(ctx())
    assert req.url == "https://h.example.com/%E4%B8%AD%20%E6%96%87?a=b%20c"


@pytest.mark.parametrize(
    "url",
    [
        "https://${Potentials.Host}/x",
        "https://h.example.com:${Potentials.Port}/x",
        "${Potentials.Scheme}://h.example.com/x",
        "https://user:${Potentials.P}@h.example.com/x",
    ],
)
def test_url_placeholder_in_host_is_refused(url: str) -> None:
    with pytest.raises(TemplateError, match=r"scheme, host or port|not an absolute URL"):
        compile_(url=url)


@pytest.mark.parametrize("bad", ["\r\n", "\n", "\r", "\x00"])
def test_cr_lf_nul_in_url_is_refused(bad: str) -> None:
    with pytest.raises(TemplateError, match="url: contains"):
        compile_(url=f"https://h.example.com/x{bad}Injected: 1")


def test_url_fragment_is_refused() -> None:
    with pytest.raises(TemplateError, match="fragment"):
        compile_(url="https://h.example.com/x#frag")


# --------------------------------------------------------------------------- placeholders


def test_parse_placeholders() -> None:
    assert parse_placeholders("a ${Potentials.Potential Name} b ${User.Last Name}$ {x}") == [
        Placeholder("Potentials", "Potential Name"),
        Placeholder("User", "Last Name"),
    ]
    assert parse_placeholders("${Accounts.Parent.Name}") == [Placeholder("Accounts", "Parent.Name")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${Potentials.Name", "unterminated"),
        ("${Potentials}", "must be ${Module.Field Name}"),
        ("${.Name}", "must be ${Module.Field Name}"),
        ("${A.${B.C}}", "nested"),
    ],
)
def test_malformed_placeholders(text: str, message: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(message)):
        parse_placeholders(text)


def test_unknown_namespace_names_it() -> None:
    with pytest.raises(TemplateError) as info:
        compile_(entity_params={"x": "${Foo.Bar}"})
    assert str(info.value) == "entity_params.x: unknown namespace 'Foo' in ${Foo.Bar}"
    with pytest.raises(TemplateError, match="unknown namespace 'Calls'"):
        compile_(body=BodySpec(format="xml", template="<a>${Calls.Subject}</a>"))


def test_reference_without_a_value_is_refused() -> None:
    with pytest.raises(TemplateError) as info:
        compile_(entity_params={"k": "${env:SECRET}"})
    assert str(info.value) == (
        "entity_params.k: ${env:SECRET} has no value (the config did not resolve it)"
    )


def test_custom_params_are_literal() -> None:
    req = compile_(custom_params={"k": "${Potentials.Amount}"}).render(ctx(record={"Amount": 1}))
    assert parse_qsl(req.body.decode()) == [("k", "${Potentials.Amount}")]


def test_user_and_org_namespaces() -> None:
    compiled = compile_(
        entity_params={"u": "${Users.Email}", "o": "${Organization.Company Name}"},
    )
    req = compiled.render(ctx(user={"Email": "a@b.c"}, organization={"Company Name": "Acme"}))
    assert req.body == b"u=a%40b.c&o=Acme"
    assert compiled.crm_fields == {
        Placeholder("User", "Email"),
        Placeholder("Organization", "Company Name"),
    }


# --------------------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (25000.0, "25000"),
        (1e-7, "0.0000001"),
        (1e21, "1000000000000000000000"),
        (-2.5e-5, "-0.000025"),
        (1234.5, "1234.5"),
        (0.1, "0.1"),
        (-0.0, "0"),
        (1.5e300, "15" + "0" * 299),
        (12345678901234567.0, "12345678901234568"),
    ],
)
def test_numbers_never_use_exponents(value: float, expected: str) -> None:
    assert format_number(value) == expected


@pytest.mark.parametrize(
    ("value", "tz", "expected"),
    [
        ("2026-11-30", SHANGHAI, "2026-11-30"),
        ("2026-12-05 09:30", UTC, "2026-12-05 09:30"),
        ("2026-12-05T01:30:00Z", SHANGHAI, "2026-12-05 09:30"),
        ("2026-12-05T01:30:00Z", UTC, "2026-12-05 01:30"),
        ("2026-12-04T20:30:59.999+03:00", ZoneInfo("America/New_York"), "2026-12-04 12:30"),
        ("2026-12-31t23:30:00z", SHANGHAI, "2027-01-01 07:30"),
        ("2026-12-05T01:30:00", SHANGHAI, "2026-12-05T01:30:00"),  # no offset: as written
        ("2026-13-05T01:30:00Z", SHANGHAI, "2026-13-05T01:30:00Z"),  # not a date: as written
        (True, UTC, "true"),
        (False, UTC, "false"),
        (None, UTC, ""),
        (42, UTC, "42"),
        (float("nan"), UTC, ""),
        (["Red", "Blue", 3, 2.0], UTC, "Red;Blue;3;2"),
        (["2026-12-05T01:30:00Z"], SHANGHAI, "2026-12-05 09:30"),
    ],
)
def test_format_value(value: Any, tz: ZoneInfo, expected: str) -> None:
    assert format_value(value, tz) == expected


def test_datetime_in_time_zone_in_a_template() -> None:
    compiled = compile_(entity_params={"due": "${Potentials.Payment Due}"})
    req = compiled.render(
        ctx(record={"Payment Due": "2026-12-05T01:30:00Z"}, tz=ZoneInfo("America/Sao_Paulo"))
    )
    assert parse_qsl(req.body.decode()) == [("due", "2026-12-04 22:30")]


def test_repr_shows_no_secret() -> None:
    compiled = CompiledWebhook(creator_webhook(), CATALOG)
    req = compiled.render(ctx())
    assert "k3y" not in repr(req)
    assert repr(compiled) == "CompiledWebhook('CreatorCommission', POST, 4 fields)"


# --------------------------------------------------------------------------- properties

NASTY = [
    "",
    "\x00\x01\x08\x0b\x0c\x1f\x7f",
    "\t\n\r",
    "]]>",
    "'\"",
    "</x><admin>1</admin>",
    '","admin":true,"',
    "&admin=1",
    "a+b c%20d",
    "\u2028\u2029",
    "\ud800",
    "x\udfffy\ud83d\ude00",
    "\ufffe\uffff",
    "2026-12-05",
    ".",
    "..",
]
_SURROGATES = re.compile("[\ud800-\udfff]")
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_RFC3339_LIKE = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def plain(value: str) -> None:
    """Strings that look like date-times are reformatted on purpose; keep them out."""
    assume(_RFC3339_LIKE.match(value) is None)


XML_PROP = compile_(
    body=BodySpec(
        format="xml",
        template="<r><a k=\"${Potentials.V}\" j='${Potentials.V}'>${Potentials.V}</a><b>z</b></r>",
    )
)


def with_examples(test: Any) -> Any:
    for value in NASTY:
        test = example(value)(test)
    return test


@settings(max_examples=300, deadline=None)
@with_examples
@given(st.text())
def test_xml_value_stays_text(value: str) -> None:
    plain(value)
    root = ElementTree.fromstring(XML_PROP.render(ctx(record={"V": value})).body)
    expected = _XML_ILLEGAL.sub("\ufffd", value)
    assert [c.tag for c in root] == ["a", "b"]
    a = root[0]
    assert list(a) == []
    assert a.attrib == {"k": expected, "j": expected}
    assert (a.text or "") == expected
    assert root[1].text == "z"


# Adversarial values: what could close, open or escape markup, a quote, a path.
# No digits, so that nothing looks like a date-time (reformatted on purpose).
NASTY_ALPHABET = "]>[<!&;./%'\"?=#+ \\-a\r\n\t\x00\x01\x1f\x7f\ud800\udfff\ufffe\uffff\u2028"
NASTY_TOKENS = ["]", "]]", ">", "]>", "]]>", "<![CDATA[", "<i/>", "&amp;", "&", ";", ".", "..", "/"]
nasty_values = st.text(alphabet=NASTY_ALPHABET, max_size=6) | st.lists(
    st.sampled_from(NASTY_TOKENS), max_size=4
).map("".join)
FIELD_NAMES = ("A", "B", "C", "D")

# A template piece: ("$", field name) for a placeholder, ("", text) for a literal.
Piece = tuple[str, str]


def pieces(literal_alphabet: str) -> st.SearchStrategy[list[Piece]]:
    """Runs of placeholders (often side by side) and short literals, half of them "]"."""
    slot = st.sampled_from(FIELD_NAMES).map(lambda name: ("$", name))
    chars = st.sampled_from(literal_alphabet) | st.just("]")
    literal = st.lists(chars, min_size=1, max_size=3).map(lambda t: ("", "".join(t)))
    return st.lists(slot | slot | literal, max_size=6)


def written(run: list[Piece], escape: Mapping[str, str]) -> str:
    """A run as written in a template, its literals escaped for their context."""
    out = []
    for kind, text in run:
        if kind == "$":
            out.append("${Potentials." + text + "}")
        else:
            out.append("".join(escape.get(c, c) for c in text))
    return "".join(out)


def meant(run: list[Piece], values: Mapping[str, str]) -> str:
    """The character data a run stands for: literals as they are, values as sent."""
    return "".join(_XML_ILLEGAL.sub("\ufffd", values[t]) if k == "$" else t for k, t in run)


def literal_runs(run: list[Piece]) -> list[str]:
    """The literal text between placeholders (adjacent literals joined)."""
    return "".join("\x00" if k == "$" else t for k, t in run).split("\x00")


XML_TEXT_ESCAPES = {"&": "&amp;", "<": "&lt;"}
# Elements of an XML property template: text, a CDATA section, an attribute, or
# text around a CDATA section; literals with "]" and ">" to meet the values.
xml_elements = st.lists(
    st.one_of(
        st.tuples(st.just("text"), pieces("]>[!&<;a")),
        st.tuples(st.just("cdata"), pieces("]>[<!&a")),
        st.tuples(st.just("attr"), pieces("]>[<&'a")),
        st.tuples(st.just("mixed"), pieces("]>a"), pieces("]>[a"), pieces("]>a")),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(
    xml_elements,
    st.fixed_dictionaries({name: nasty_values for name in FIELD_NAMES}),
    st.booleans(),
)
def test_xml_adjacent_values_keep_the_template_structure(
    elements: list[tuple[Any, ...]], values: dict[str, str], as_param: bool
) -> None:
    parts: list[str] = []
    expected: list[tuple[str, dict[str, str], str]] = []
    for i, (kind, *runs) in enumerate(elements):
        # A "]]>" in the template's own text ends its CDATA section (or is not
        # well-formed in text): such templates are not what is tested here.
        if kind in ("text", "cdata", "mixed"):
            assume(not any("]]>" in lit for run in runs for lit in literal_runs(run)))
        tag = f"e{i}"
        if kind == "text":
            parts.append(f"<{tag}>{written(runs[0], XML_TEXT_ESCAPES)}</{tag}>")
            expected.append((tag, {}, meant(runs[0], values)))
        elif kind == "cdata":
            parts.append(f"<{tag}><![CDATA[{written(runs[0], {})}]]></{tag}>")
            expected.append((tag, {}, meant(runs[0], values)))
        elif kind == "attr":
            parts.append(f'<{tag} v="{written(runs[0], XML_TEXT_ESCAPES)}"/>')
            expected.append((tag, {"v": meant(runs[0], values)}, ""))
        else:
            before, after = written(runs[0], XML_TEXT_ESCAPES), written(runs[2], XML_TEXT_ESCAPES)
            inside = written(runs[1], {})
            parts.append(f"<{tag}>{before}<![CDATA[{inside}]]>{after}</{tag}>")
            expected.append((tag, {}, "".join(meant(run, values) for run in runs)))
    template = "<r>" + "".join(parts) + "</r>"
    compiled = compile_(
        body=BodySpec(format="xml", template=template, param="X" if as_param else None)
    )
    body = compiled.render(ctx(record=values)).body
    if as_param:
        body = parse_qs(body.decode("ascii"), keep_blank_values=True)["X"][0].encode()
    root = ElementTree.fromstring(body)
    assert (root.text or "") == ""
    got = [(c.tag, c.attrib, c.text or "") for c in root]
    assert got == expected
    assert all(len(c) == 0 and (c.tail or "") == "" for c in root)


JSON_PROP = compile_(
    body=BodySpec(
        format="json",
        template='{"a": "pre ${Potentials.V} post", "b": ${Potentials.V}, '
        '"c": [${Potentials.V}], "d": 1}',
    )
)


@settings(max_examples=300, deadline=None)
@with_examples
@given(st.text())
def test_json_value_stays_one_string(value: str) -> None:
    plain(value)
    doc = orjson.loads(JSON_PROP.render(ctx(record={"V": value})).body)
    expected = _SURROGATES.sub("\ufffd", value)
    assert doc == {"a": f"pre {expected} post", "b": expected, "c": [expected], "d": 1}


# Integers within what a JSON reader keeps exact (orjson reads 64-bit integers;
# beyond that it reads a float, which says nothing about our rendering).
@settings(max_examples=100, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.lists(
            st.one_of(
                st.integers(min_value=-(2**63), max_value=2**64 - 1),
                st.booleans(),
                st.text(max_size=5),
            ),
            max_size=4,
        ),
    )
)
def test_json_whole_value_keeps_type(value: Any) -> None:
    doc = orjson.loads(JSON_PROP.render(ctx(record={"V": value})).body)
    if isinstance(value, list):
        value = [_SURROGATES.sub("\ufffd", v) if isinstance(v, str) else v for v in value]
    if isinstance(value, float):
        # Plain notation of a large float reads back as an int: compare as numbers.
        assert float(doc["b"]) == value
    else:
        assert doc["b"] == value
    assert set(doc) == {"a", "b", "c", "d"}


# Members of a JSON property template: a string of placeholders and literals, a
# whole value, or an array of whole values side by side.
json_members = st.lists(
    st.one_of(
        st.tuples(st.just("string"), pieces('"\\/<>]&a\u2028')),
        st.tuples(st.just("whole"), st.sampled_from((*FIELD_NAMES, "T"))),
        st.tuples(st.just("array"), st.lists(st.sampled_from((*FIELD_NAMES, "T")), max_size=3)),
    ),
    max_size=5,
)
json_typed = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.lists(nasty_values, max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(
    json_members,
    st.fixed_dictionaries({name: nasty_values for name in FIELD_NAMES}),
    json_typed,
    st.booleans(),
)
def test_json_adjacent_values_keep_the_template_keys(
    members: list[tuple[Any, ...]], values: dict[str, str], typed: Any, as_param: bool
) -> None:
    def fixed(name: str) -> Any:
        if name != "T":
            return _SURROGATES.sub("\ufffd", values[name])
        if isinstance(typed, list):
            return [_SURROGATES.sub("\ufffd", v) for v in typed]
        return typed

    def slot(name: str) -> str:
        return "${Potentials." + name + "}"

    written_members: list[str] = []
    expected: dict[str, Any] = {}
    for i, (kind, what) in enumerate(members):
        if kind == "string":
            # The template's literals are JSON-escaped as an author writes them.
            text = "".join(slot(t) if k == "$" else orjson.dumps(t).decode()[1:-1] for k, t in what)
            written_members.append(f'"m{i}": "{text}"')
            expected[f"m{i}"] = "".join(fixed(t) if k == "$" else t for k, t in what)
        elif kind == "whole":
            written_members.append(f'"m{i}": {slot(what)}')
            expected[f"m{i}"] = fixed(what)
        else:
            written_members.append(f'"m{i}": [{", ".join(slot(n) for n in what)}]')
            expected[f"m{i}"] = [fixed(n) for n in what]
    template = "{" + ", ".join(written_members) + "}"
    compiled = compile_(
        body=BodySpec(format="json", template=template, param="J" if as_param else None)
    )
    body = compiled.render(ctx(record={**values, "T": typed})).body
    if as_param:
        body = parse_qs(body.decode("ascii"), keep_blank_values=True)["J"][0].encode()
    assert orjson.loads(body) == expected


QUERY_PROP = compile_(
    method="GET",
    url="https://h.example.com/p/${Potentials.V}/q?a=1&v=${Potentials.V}",
    entity_params={"x": "${Potentials.V}", "y": "lit"},
    custom_params={"k": "v"},
)
FORM_PROP = compile_(
    entity_params={"x": "${Potentials.V}", "y": "<${Potentials.V}>"},
    custom_params={"k": "v"},
)


@settings(max_examples=300, deadline=None)
@with_examples
@given(st.text())
def test_query_value_stays_one_parameter(value: str) -> None:
    plain(value)
    expected = _SURROGATES.sub("\ufffd", value)
    form = FORM_PROP.render(ctx(record={"V": value})).body.decode("ascii")
    assert parse_qsl(form, keep_blank_values=True) == [
        ("x", expected),
        ("y", f"<{expected}>"),
        ("k", "v"),
    ]
    if value in (".", ".."):  # a whole path segment: refused (issue 26.6)
        with pytest.raises(TemplateError, match="dot segment"):
            QUERY_PROP.render(ctx(record={"V": value}))
        return
    req = QUERY_PROP.render(ctx(record={"V": value}))
    assert req.url.isascii()
    assert not any(c in req.url for c in "\r\n\x00 ")
    parts = urlsplit(req.url)
    assert parts.netloc == "h.example.com"
    segments = parts.path.split("/")
    assert len(segments) == 4
    assert unquote(segments[2], errors="strict") == expected
    assert parse_qsl(parts.query, keep_blank_values=True) == [
        ("a", "1"),
        ("v", expected),
        ("x", expected),
        ("y", "lit"),
        ("k", "v"),
    ]


# Literals of URL templates: dots, percent-encoded ones, and what a path may hold.
PATH_LITERALS = "a.-~:@!$'()*,;"
QUERY_LITERALS = "a.-~:/?@!$'()*,;"
SHOWN_DOTS = ["%2e", "%2E", "%20"]  # escapes written in the template


# Values that make or complete a dot segment, often.
url_values = st.sampled_from(["", ".", ".."]) | nasty_values


def url_pieces(alphabet: str) -> st.SearchStrategy[list[Piece]]:
    """Placeholders (often side by side) and literals, among them written escapes."""
    slot = st.sampled_from(FIELD_NAMES).map(lambda name: ("$", name))
    chars = st.sampled_from(alphabet) | st.sampled_from(SHOWN_DOTS) | st.just(".")
    literal = st.lists(chars, min_size=1, max_size=3).map(lambda t: ("", "".join(t)))
    return st.lists(slot | slot | literal, max_size=4)


def as_sent(run: list[Piece], values: Mapping[str, str], in_url: bool = True) -> str:
    """What a run stands for once decoded: the values as they are, the literals of a
    URL template decoded (the text of an entity parameter is a value as a whole)."""
    return "".join(
        _SURROGATES.sub("\ufffd", values[t] if k == "$" else unquote(t) if in_url else t)
        for k, t in run
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(url_pieces(PATH_LITERALS), min_size=1, max_size=4),
    st.lists(url_pieces(QUERY_LITERALS), max_size=2),
    st.lists(url_pieces(NASTY_ALPHABET), max_size=2),
    st.fixed_dictionaries({name: url_values for name in FIELD_NAMES}),
    st.booleans(),
)
def test_url_values_keep_the_template_segments_and_parameters(
    path: list[list[Piece]],
    query: list[list[Piece]],
    entity: list[list[Piece]],
    values: dict[str, str],
    get: bool,
) -> None:
    url = "https://h.example.com/" + "/".join(written(run, {}) for run in path)
    if query:
        url += "?" + "&".join(f"q{i}={written(run, {})}" for i, run in enumerate(query))
    compiled = compile_(
        method="GET" if get else "POST",
        url=url,
        entity_params={f"e{i}": written(run, {}) for i, run in enumerate(entity)},
        custom_params={"k": "v"},
    )
    segments = [as_sent(run, values) for run in path]
    with_values = [i for i, run in enumerate(path) if any(k == "$" for k, _ in run)]
    if any(segments[i] in (".", "..") for i in with_values):
        with pytest.raises(TemplateError, match="dot segment"):
            compiled.render(ctx(record=values))
        return
    req = compiled.render(ctx(record=values))
    assert req.url.isascii()
    assert not any(c in req.url for c in "\r\n\x00 #")
    parts = urlsplit(req.url)
    assert parts.netloc == "h.example.com"
    assert [unquote(seg, errors="strict") for seg in parts.path.split("/")[1:]] == segments
    params = [(f"q{i}", as_sent(run, values)) for i, run in enumerate(query)]
    entities = [(f"e{i}", as_sent(run, values, in_url=False)) for i, run in enumerate(entity)]
    if get:
        params += [*entities, ("k", "v")]
    else:
        form = req.body.decode("ascii")
        assert parse_qsl(form, keep_blank_values=True, errors="strict") == [*entities, ("k", "v")]
    assert parse_qsl(parts.query, keep_blank_values=True, errors="strict") == params


def _escaped_by_orjson(text: str) -> str:
    """What ``_json_string`` wrote before it passed plain text through unescaped."""
    out = orjson.dumps(_SURROGATES.sub("\ufffd", text)).decode()
    return out.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


@settings(max_examples=500, deadline=None)
@given(
    st.text()
    | st.text(alphabet=st.sampled_from('ab "\\/\x00\x1f\x7f\u2028\u2029\ud800é中\U0001f600'))
)
def test_a_json_string_is_what_orjson_writes(text: str) -> None:
    assert _json_string(text) == _escaped_by_orjson(text)
    shown = format_value(text, UTC)  # (an RFC 3339 date-time is shown in the zone)
    assert _json_in_string(text, UTC) == _escaped_by_orjson(shown)[1:-1]
