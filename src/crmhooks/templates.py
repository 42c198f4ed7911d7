"""Webhook templates: placeholders resolved from an event and escaped for where they land.

A template is compiled once (config time) into a tuple of segments: literal text,
already encoded for its destination, and *slots* — a placeholder together with
the function that encodes its value for the context it sits in (XML text, XML
attribute value, CDATA, JSON string, whole JSON value, URL component). Rendering
is a lookup per slot and one ``"".join``; no parsing happens per delivery.

Value formatting (SPEC §4):

* strings as they are, except an RFC 3339 date-time (``2026-12-05T01:30:00Z``),
  which renders ``yyyy-MM-dd HH:mm`` in the organisation time zone; ``yyyy-MM-dd``
  dates and ``yyyy-MM-dd HH:mm`` datetimes are already in CRM form and stay;
* integers as they are; floats in plain notation (``25000.0`` → ``25000``,
  ``1e-7`` → ``0.0000001``); NaN and infinities render as a missing value;
* booleans ``true`` / ``false``; null and missing fields ``""``;
* arrays (multi-select picklists) joined with ``;``, the CRM's multi-select
  separator — except as a whole JSON value, where they stay JSON arrays.

Escaping: a value can never add an XML element or attribute, a JSON key, a query
or form parameter, a path segment or a header. Characters illegal in XML 1.0 and
lone surrogates (anywhere) become U+FFFD.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from operator import attrgetter
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import quote
from xml.etree import ElementTree
from zoneinfo import ZoneInfo

import msgspec
import orjson

from crmhooks.errors import TemplateError
from crmhooks.modules import ORG_NAMESPACES, USER_NAMESPACES, ModuleCatalog
from crmhooks.settings import Webhook


@dataclass(frozen=True, slots=True)
class Placeholder:
    """``${Namespace.Field Name}`` as written in a template."""

    namespace: str
    field: str


class RenderContext(msgspec.Struct, frozen=True, gc=False):
    """What a template is rendered from: the latest version of a record and its neighbours."""

    module: str  # canonical module name of the record (e.g. "Potentials")
    record: Mapping[str, Any]
    related: Mapping[str, Mapping[str, Any]]  # canonical module name → record
    user: Mapping[str, Any] | None
    organization: Mapping[str, Any] | None
    time_zone: ZoneInfo


class RenderedRequest(msgspec.Struct, frozen=True, gc=False):
    """An HTTP request ready to send, and the same with secrets shown as ``***``.

    ``url`` is fully percent-encoded ASCII (send it as is, e.g. ``yarl.URL(url,
    encoded=True)``). ``redacted_body`` is the body with secret parameters shown as
    ``***`` when the body carries any (a form body); None when ``body`` has none.
    """

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    redacted_url: str
    redacted_body: bytes | None = None

    def __repr__(self) -> str:
        return f"RenderedRequest({self.method} {self.redacted_url}, {len(self.body)} bytes)"


# --------------------------------------------------------------------------- placeholders

_OPEN: Final = "${"
_ENV_PREFIX: Final = "env:"

# The canonical namespace of the owner and organisation in ``crm_fields``.
USER_NAMESPACE: Final = "User"
ORG_NAMESPACE: Final = "Organization"


def _scan(text: str) -> list[tuple[int, int, Placeholder]]:
    """Every placeholder of ``text`` with its span; TemplateError if one is malformed."""
    found: list[tuple[int, int, Placeholder]] = []
    start = text.find(_OPEN)
    while start != -1:
        close = text.find("}", start + 2)
        if close == -1:
            raise TemplateError(f"unterminated placeholder at {text[start : start + 40]!r}")
        inner = text[start + 2 : close]
        written = text[start : close + 1]
        if _OPEN in inner:
            raise TemplateError(f"nested placeholder in {written}")
        if inner.startswith(_ENV_PREFIX):
            raise TemplateError(
                f"{written}: ${{env:NAME}} is only allowed in custom parameters and secret"
            )
        namespace, dot, field = inner.partition(".")
        namespace, field = namespace.strip(), field.strip()
        if not dot or not namespace or not field:
            raise TemplateError(f"placeholder {written} must be ${{Module.Field Name}}")
        found.append((start, close + 1, Placeholder(namespace, field)))
        start = text.find(_OPEN, close + 1)
    return found


def parse_placeholders(text: str) -> list[Placeholder]:
    """The placeholders of ``text`` in order, as written; TemplateError if malformed."""
    return [p for _, _, p in _scan(text)]


# --------------------------------------------------------------------------- values

Source = Callable[[RenderContext], Mapping[str, Any] | None]
# An encoder turns a field value (None when missing) into text for one context.
Encoder = Callable[[Any, ZoneInfo], str]

_SURROGATES: Final = re.compile("[\ud800-\udfff]")
# Cheap pre-check before the exact RFC 3339 pattern: "yyyy-MM-ddT..." shapes only.
_RFC3339: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:[Zz]|[+-]\d{2}:\d{2})"
)
# Python's repr switches to exponent notation outside [1e-4, 1e16); below 2**53
# every integral float is exact, so int() is a safe fast path.
_EXACT_INT_FLOAT: Final = 2.0**53


def _fix_surrogates(text: str) -> str:
    """Lone surrogates (any surrogate code point in a str) → U+FFFD; they cannot be UTF-8."""
    return _SURROGATES.sub("\ufffd", text)


def _format_datetime(dt: datetime, tz: ZoneInfo) -> str:
    local = dt.astimezone(tz) if dt.tzinfo is not None else dt
    return f"{local.year:04d}-{local.month:02d}-{local.day:02d} {local.hour:02d}:{local.minute:02d}"


def _format_str(text: str, tz: ZoneInfo) -> str:
    # Only an RFC 3339 date-time with an offset changes: yyyy-MM-dd and
    # yyyy-MM-dd HH:mm are already the CRM forms (and carry no zone to convert).
    if len(text) >= 17 and text[4] == "-" and text[10] in "Tt " and _RFC3339.fullmatch(text):
        try:
            parsed = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
            return _format_datetime(parsed, tz)
        except (ValueError, OverflowError):
            return text  # e.g. month 13: not a date-time after all, send it as written
    return text


def format_number(value: float | Decimal) -> str:
    """A number in plain notation, never with an exponent (``1e21`` → ``1000…0``)."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < _EXACT_INT_FLOAT:
            return str(int(value))  # also turns -0.0 into "0"
        text = repr(value)
        if "e" not in text:
            return text
        value = Decimal(text)  # repr is the shortest round-tripping form
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def format_value(value: Any, tz: ZoneInfo) -> str:
    """A field value as text (SPEC §4): see the module docstring for the rules."""
    if type(value) is str:
        return _format_str(value, tz)
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_number(value) if math.isfinite(value) else ""
    if isinstance(value, Decimal):
        return format_number(value) if value.is_finite() else ""
    if isinstance(value, str):
        return _format_str(value, tz)
    if isinstance(value, list | tuple):
        # Multi-select picklists: the CRM joins the chosen options with ";".
        return ";".join([format_value(item, tz) for item in value])
    if isinstance(value, datetime):
        return _format_datetime(value, tz)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return json_value(value, tz)
    return str(value)


def _needs_json_escape(text: str) -> bool:
    """Whether ``_json_string`` must escape a character of ``text``: a quote, a
    backslash, or one ``isprintable`` rejects (control characters, U+2028/U+2029,
    surrogates...). Most field values have none, and go as they are."""
    return not text.isprintable() or '"' in text or "\\" in text


def _json_string(text: str) -> str:
    """``text`` as a quoted JSON string literal, safe to embed anywhere (also in JS)."""
    if not _needs_json_escape(text):
        return f'"{text}"'  # as orjson writes it (a property test compares them)
    try:
        out = orjson.dumps(text)
    except orjson.JSONEncodeError:  # lone surrogates are not valid UTF-8
        out = orjson.dumps(_fix_surrogates(text))
    result = out.decode()
    if "\u2028" in result or "\u2029" in result:
        result = result.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return result


def json_value(value: Any, tz: ZoneInfo) -> str:
    """A field value as a whole JSON value: its type is kept; missing/null → ``null``."""
    if type(value) is str:
        return _json_string(_format_str(value, tz))
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_number(value) if math.isfinite(value) else "null"
    if isinstance(value, Decimal):
        return format_number(value) if value.is_finite() else "null"
    if isinstance(value, list | tuple):
        return "[" + ",".join([json_value(item, tz) for item in value]) + "]"
    if isinstance(value, Mapping):
        items = [_json_string(str(k)) + ":" + json_value(v, tz) for k, v in value.items()]
        return "{" + ",".join(items) + "}"
    return _json_string(format_value(value, tz))


def _json_in_string(value: Any, tz: ZoneInfo) -> str:
    text = format_value(value, tz)
    return _json_string(text)[1:-1] if _needs_json_escape(text) else text


# XML 1.0 Char excludes C0 controls other than \t \n \r, surrogates, U+FFFE, U+FFFF.
_XML_ILLEGAL: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# \r is written as a character reference: a parser would turn a raw one into \n.
_XML_TEXT_SPECIAL: Final = re.compile("[&<>\r\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# In attribute values a parser also normalises raw \t and \n to spaces.
_XML_ATTR_SPECIAL: Final = re.compile(
    "[&<>\"'\t\n\r\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]"
)
_CDATA_SPECIAL: Final = re.compile("[\\]\r\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(value: Any, tz: ZoneInfo) -> str:
    """A value escaped as XML character data."""
    text = format_value(value, tz)
    if _XML_TEXT_SPECIAL.search(text) is None:
        return text
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _XML_ILLEGAL.sub("\ufffd", text.replace("\r", "&#13;"))


def xml_attribute(value: Any, tz: ZoneInfo) -> str:
    """A value escaped for a quoted XML attribute value (either quote)."""
    text = format_value(value, tz)
    if _XML_ATTR_SPECIAL.search(text) is None:
        return text
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = text.replace('"', "&quot;").replace("'", "&apos;")
    text = text.replace("\t", "&#9;").replace("\n", "&#10;").replace("\r", "&#13;")
    return _XML_ILLEGAL.sub("\ufffd", text)


def xml_cdata(value: Any, tz: ZoneInfo) -> str:
    """A value inside ``<![CDATA[ … ]]>``: ``]]>`` and \\r close the section around them."""
    text = format_value(value, tz)
    if _CDATA_SPECIAL.search(text) is None:
        return text
    text = text.replace("]]>", "]]]]><![CDATA[>").replace("\r", "]]>&#13;<![CDATA[")
    return _XML_ILLEGAL.sub("\ufffd", text)


def url_component(text: str) -> str:
    """Percent-encode every byte but unreserved ones: the text stays one value."""
    try:
        return quote(text, safe="")
    except UnicodeEncodeError:
        return quote(_fix_surrogates(text), safe="")


def _url_value(value: Any, tz: ZoneInfo) -> str:
    return url_component(format_value(value, tz))


def _then_url_encode(encoder: Encoder) -> Encoder:
    def encode(value: Any, tz: ZoneInfo) -> str:
        return url_component(encoder(value, tz))

    return encode


# --------------------------------------------------------------------------- compiled parts


@dataclass(frozen=True, slots=True)
class _Slot:
    source: Source
    field: str
    encode: Encoder


Segment = str | _Slot


@dataclass(frozen=True, slots=True)
class _Fill:
    """Segments made ready to render: the literals in place and a gap for each slot,
    filled by index (a copy and one store a slot, where a loop over the segments
    tested each; 1.74 -> 1.41 µs for the bench's JSON body)."""

    parts: tuple[str, ...]
    slots: tuple[tuple[int, Source, str, Encoder], ...]

    @classmethod
    def of(cls, segments: Sequence[Segment]) -> _Fill:
        return cls(
            tuple(seg if isinstance(seg, str) else "" for seg in segments),
            tuple(
                (i, seg.source, seg.field, seg.encode)
                for i, seg in enumerate(segments)
                if not isinstance(seg, str)
            ),
        )

    def render(self, ctx: RenderContext) -> str:
        if not self.slots:
            return "".join(self.parts)
        tz = ctx.time_zone
        parts = list(self.parts)
        for i, source, field_name, encode in self.slots:
            rec = source(ctx)
            parts[i] = encode(None if rec is None else rec.get(field_name), tz)
        return "".join(parts)


def _related_source(names: tuple[str, ...]) -> Source:
    """Finds the related record by its canonical name, then by any other name of it."""

    def source(ctx: RenderContext) -> Mapping[str, Any] | None:
        related = ctx.related
        for name in names:
            rec = related.get(name)
            if rec is not None:
                return rec
        return None

    return source


_RECORD: Final[Source] = attrgetter("record")
_USER: Final[Source] = attrgetter("user")
_ORG: Final[Source] = attrgetter("organization")


class _Resolver:
    """Maps a placeholder's namespace to where its value comes from."""

    __slots__ = ("_catalog", "_module", "_own_names", "_related")

    def __init__(self, module: str, catalog: ModuleCatalog) -> None:
        self._catalog = catalog
        self._module = catalog.canonical(module) or module
        self._own_names = catalog.names_of(self._module) | {module, self._module}
        self._related: dict[str, Source] = {}

    def resolve(self, ph: Placeholder) -> tuple[Placeholder, Source]:
        """(the placeholder with its canonical namespace, its value source)."""
        ns = ph.namespace
        if ns in self._own_names:
            return Placeholder(self._module, ph.field), _RECORD
        if ns in USER_NAMESPACES:
            return Placeholder(USER_NAMESPACE, ph.field), _USER
        if ns in ORG_NAMESPACES:
            return Placeholder(ORG_NAMESPACE, ph.field), _ORG
        canonical = self._catalog.canonical(ns)
        if canonical is None:
            raise TemplateError(f"unknown namespace {ns!r} in ${{{ns}.{ph.field}}}")
        source = self._related.get(canonical)
        if source is None:
            others = sorted(self._catalog.names_of(canonical) - {canonical})
            source = _related_source((canonical, *others))
            self._related[canonical] = source
        return Placeholder(canonical, ph.field), source


# --------------------------------------------------------------------------- context scanners

_TEXT, _TAG, _ATTR_DQ, _ATTR_SQ, _COMMENT, _CDATA, _PI, _DECL = range(8)
_XML_ENCODERS: Final[Mapping[int, Encoder]] = {
    _TEXT: xml_text,
    _ATTR_DQ: xml_attribute,
    _ATTR_SQ: xml_attribute,
    _CDATA: xml_cdata,
}
_XML_WHERE: Final[Mapping[int, str]] = {
    _TAG: "an XML tag (only quoted attribute values may hold one)",
    _COMMENT: "an XML comment",
    _PI: "an XML processing instruction",
    _DECL: "an XML declaration",
}


def _xml_contexts(text: str, spans: Sequence[tuple[int, int, Placeholder]]) -> list[Encoder]:
    """The encoder for each placeholder of an XML template, by where it sits."""
    encoders: list[Encoder] = []
    starts = {start: end for start, end, _ in spans}
    state = _TEXT
    i, n = 0, len(text)
    while i < n:
        end = starts.get(i)
        if end is not None:
            encoder = _XML_ENCODERS.get(state)
            if encoder is None:
                raise TemplateError(f"placeholder {text[i:end]} inside {_XML_WHERE[state]}")
            encoders.append(encoder)
            i = end
            continue
        ch = text[i]
        if state == _TEXT:
            if ch == "<":
                if text.startswith("<!--", i):
                    state, i = _COMMENT, i + 4
                    continue
                if text.startswith("<![CDATA[", i):
                    state, i = _CDATA, i + 9
                    continue
                state = (
                    _PI if text.startswith("<?", i) else _DECL if text.startswith("<!", i) else _TAG
                )
        elif state == _TAG:
            if ch == '"':
                state = _ATTR_DQ
            elif ch == "'":
                state = _ATTR_SQ
            elif ch == ">":
                state = _TEXT
        elif state == _ATTR_DQ:
            if ch == '"':
                state = _TAG
        elif state == _ATTR_SQ:
            if ch == "'":
                state = _TAG
        elif state == _COMMENT:
            if text.startswith("-->", i):
                state, i = _TEXT, i + 3
                continue
        elif state == _CDATA:
            if text.startswith("]]>", i):
                state, i = _TEXT, i + 3
                continue
        elif state == _PI:
            if text.startswith("?>", i):
                state, i = _TEXT, i + 2
                continue
        elif ch == ">":  # _DECL; a DOCTYPE internal subset cannot hold placeholders anyway
            state = _TEXT
        i += 1
    return encoders


_JSON_WS: Final = " \t\r\n"


def _json_contexts(text: str, spans: Sequence[tuple[int, int, Placeholder]]) -> list[Encoder]:
    """The encoder for each placeholder of a JSON template: inside a string or a whole value."""
    encoders: list[Encoder] = []
    starts = {start: end for start, end, _ in spans}
    stack: list[str] = []
    expect_key = False
    in_string = in_key = False
    # The last significant token outside strings: "" (start), a char, or "$" (a placeholder).
    last = ""
    i, n = 0, len(text)
    while i < n:
        end = starts.get(i)
        if end is not None:
            written = text[i:end]
            if in_string:
                if in_key:
                    raise TemplateError(f"placeholder {written} inside a JSON object key")
                encoders.append(_json_in_string)
            else:
                if expect_key and stack and stack[-1] == "{":
                    raise TemplateError(f"placeholder {written} as a JSON object key")
                j = end
                while j < n and text[j] in _JSON_WS:
                    j += 1
                if last not in ("", "[", ":", ",") or (j < n and text[j] not in ",]}"):
                    raise TemplateError(
                        f"placeholder {written} outside a JSON string must be a whole value"
                    )
                encoders.append(json_value)
                last = "$"
            i = end
            continue
        ch = text[i]
        if in_string:
            if ch == "\\":
                if i + 1 in starts:
                    raise TemplateError(
                        f"placeholder {text[i + 1 : starts[i + 1]]} after a backslash"
                    )
                i += 2
                continue
            if ch == '"':
                in_string = False
                last = '"'
        elif ch == '"':
            in_string = True
            in_key = expect_key and bool(stack) and stack[-1] == "{"
        elif ch not in _JSON_WS:
            if ch in "{[":
                stack.append(ch)
                expect_key = ch == "{"
            elif ch in "}]":
                if stack:
                    stack.pop()
                expect_key = False
            elif ch == ",":
                expect_key = bool(stack) and stack[-1] == "{"
            elif ch == ":":
                expect_key = False
            last = ch
        i += 1
    return encoders


# Stand-ins for values when a template is checked for well-formedness at compile time.
_PROBE_TEXT: Final = "x"
_PROBE_JSON: Final = "0"


def _compile_document(
    text: str, fmt: str, resolver: _Resolver, fields: set[Placeholder], url_encoded: bool
) -> tuple[Segment, ...]:
    """Compile a body template; literals are pre-percent-encoded when sent as a parameter."""
    spans = _scan(text)
    if fmt == "xml":
        encoders = _xml_contexts(text, spans)
    elif fmt == "json":
        encoders = _json_contexts(text, spans)
    else:
        raise TemplateError(f"unknown body format {fmt!r} (xml or json)")
    _check_well_formed(text, fmt, spans, encoders)
    return _segments(text, spans, encoders, resolver, fields, url_encoded)


def _check_well_formed(
    text: str, fmt: str, spans: Sequence[tuple[int, int, Placeholder]], encoders: list[Encoder]
) -> None:
    pieces: list[str] = []
    pos = 0
    for (start, end, _), encoder in zip(spans, encoders, strict=True):
        pieces.append(text[pos:start])
        pieces.append(_PROBE_JSON if encoder is json_value else _PROBE_TEXT)
        pos = end
    pieces.append(text[pos:])
    probe = "".join(pieces).encode("utf-8")
    try:
        if fmt == "xml":
            ElementTree.fromstring(probe)
        else:
            orjson.loads(probe)
    except (ElementTree.ParseError, orjson.JSONDecodeError) as exc:
        raise TemplateError(f"not well-formed {fmt.upper()}: {exc}") from None


def _segments(
    text: str,
    spans: Sequence[tuple[int, int, Placeholder]],
    encoders: Sequence[Encoder],
    resolver: _Resolver,
    fields: set[Placeholder],
    url_encoded: bool,
) -> tuple[Segment, ...]:
    segments: list[Segment] = []
    pos = 0
    for (start, end, ph), encoder in zip(spans, encoders, strict=True):
        if start > pos:
            literal = text[pos:start]
            segments.append(url_component(literal) if url_encoded else literal)
        canonical, source = resolver.resolve(ph)
        fields.add(canonical)
        segments.append(
            _Slot(source, ph.field, _then_url_encode(encoder) if url_encoded else encoder)
        )
        pos = end
    if pos < len(text):
        segments.append(url_component(text[pos:]) if url_encoded else text[pos:])
    return _merge_literals(segments)


def _merge_literals(segments: list[Segment]) -> tuple[Segment, ...]:
    merged: list[Segment] = []
    for seg in segments:
        last = merged[-1] if merged else None
        if isinstance(seg, str) and isinstance(last, str):
            merged[-1] = last + seg
        elif seg != "":
            merged.append(seg)
    return tuple(merged)


# Every printable ASCII character that may stand in a URL as written: the literal
# parts of a URL template keep their meaning ("/", "?", "&", "=", existing %XX)
# and only spaces, non-ASCII and other unsafe characters are percent-encoded.
_URL_LITERAL_SAFE: Final = "!$%&'()*+,/:;=?@[]~"
_FORBIDDEN_IN_HEADERS: Final = ("\r", "\n", "\x00")


def _compile_url(url: str, resolver: _Resolver, fields: set[Placeholder]) -> tuple[Segment, ...]:
    for bad in _FORBIDDEN_IN_HEADERS:
        if bad in url:
            raise TemplateError(f"url: contains {bad!r} (CR, LF and NUL are never allowed)")
    scheme_end = url.find("://")
    if scheme_end <= 0:
        raise TemplateError(f"url: {url!r} is not an absolute URL")
    authority_end = len(url)
    for sep in "/?#":
        found = url.find(sep, scheme_end + 3)
        if found != -1:
            authority_end = min(authority_end, found)
    spans = _scan(url)
    for start, end, _ in spans:
        if start < authority_end:
            raise TemplateError(
                f"url: placeholder {url[start:end]} in the scheme, host or port "
                "(only the path and query may hold placeholders)"
            )
    if "#" in url:
        raise TemplateError("url: has a fragment (#…), which is never sent to the server")
    segments: list[Segment] = [url[:authority_end]]
    pos = authority_end
    for start, end, ph in spans:
        segments.append(quote(url[pos:start], safe=_URL_LITERAL_SAFE))
        canonical, source = resolver.resolve(ph)
        fields.add(canonical)
        segments.append(_Slot(source, ph.field, _url_value))
        pos = end
    segments.append(quote(url[pos:], safe=_URL_LITERAL_SAFE))
    return _merge_literals(segments)


_FORM: Final = MappingProxyType({"Content-Type": "application/x-www-form-urlencoded"})
_RAW_CONTENT_TYPES: Final[Mapping[str, Mapping[str, str]]] = {
    "xml": MappingProxyType({"Content-Type": "application/xml; charset=utf-8"}),
    "json": MappingProxyType({"Content-Type": "application/json"}),
}
_NO_HEADERS: Final[Mapping[str, str]] = MappingProxyType({})
_REDACTED: Final = "***"


class CompiledWebhook:
    """A webhook whose templates are parsed once, at config time, and rendered per action.

    Request shape (SPEC §4): GET puts entity params, custom params and the
    ``param`` document (in that order) in the query string. POST sends them as an
    ``application/x-www-form-urlencoded`` body — unless the body has no ``param``:
    then the document is the raw body and the parameters go in the query string.
    """

    __slots__ = (
        "_body",
        "_body_fill",
        "_body_in_query",
        "_custom",
        "_custom_redacted",
        "_entity",
        "_entity_fill",
        "_fields",
        "_headers",
        "_method",
        "_name",
        "_param_prefix",
        "_raw_body",
        "_url",
        "_url_fill",
        "_url_sep",
    )

    def __init__(self, webhook: Webhook, catalog: ModuleCatalog) -> None:
        """Parse every template of ``webhook``; TemplateError (naming the part) if invalid."""
        self._name = webhook.name
        self._method = webhook.method
        resolver = _Resolver(webhook.module, catalog)
        fields: set[Placeholder] = set()
        problems: list[str] = []  # every part is checked: all problems named at once

        try:
            self._url = _compile_url(webhook.url, resolver, fields)
        except TemplateError as exc:
            message = str(exc)
            problems.append(message if message.startswith("url: ") else f"url: {message}")
            self._url = ()
        # Where the parameters join the URL; placeholders cannot add a "?" or "&".
        literal_url = "".join(s if type(s) is str else "x" for s in self._url)
        if "?" not in literal_url:
            self._url_sep = "?"
        else:
            self._url_sep = "" if literal_url.endswith(("?", "&")) else "&"

        entity: list[tuple[str, tuple[Segment, ...]]] = []
        for name, template in webhook.entity_params.items():
            try:
                spans = _scan(template)
                encoders: list[Encoder] = [_url_value] * len(spans)
                segs = _segments(template, spans, encoders, resolver, fields, url_encoded=False)
            except TemplateError as exc:
                problems.append(f"entity_params.{name}: {exc}")
                continue
            # Literals are encoded together with the values: the whole text is one value.
            entity.append((url_component(name) + "=", _url_encode_literals(segs)))
        self._entity = tuple(entity)

        custom = [(url_component(k), url_component(v)) for k, v in webhook.custom_params.items()]
        self._custom = "&".join(f"{k}={v}" for k, v in custom)
        secret_names = {url_component(n) for n in webhook.secret_params}
        self._custom_redacted = "&".join(
            f"{k}={_REDACTED if k in secret_names else v}" for k, v in custom
        )

        body = webhook.body
        self._body: tuple[Segment, ...] = ()
        self._param_prefix: str | None = None
        self._raw_body = False
        self._headers: Mapping[str, str] = _NO_HEADERS if self._method == "GET" else _FORM
        if body is not None:
            as_param = body.param is not None
            if not as_param and self._method == "GET":
                problems.append("body: GET cannot carry a raw body; set body.param")
            # Whitespace around the document carries nothing, and before an
            # <?xml ...?> declaration it would make the document ill-formed.
            try:
                self._body = _compile_document(
                    body.template.strip(), body.format, resolver, fields, url_encoded=as_param
                )
            except TemplateError as exc:
                problems.append(f"body.template: {exc}")
            if as_param:
                assert body.param is not None
                self._param_prefix = url_component(body.param) + "="
            else:
                self._raw_body = True
                self._headers = _RAW_CONTENT_TYPES[body.format]
        # Parameters travel in the URL for GET and beside a raw body.
        self._body_in_query = self._method == "GET" or self._raw_body
        self._fields = frozenset(fields)
        self._url_fill = _Fill.of(self._url)
        self._entity_fill = tuple((prefix, _Fill.of(segs)) for prefix, segs in self._entity)
        self._body_fill = _Fill.of(self._body)
        if problems:
            raise TemplateError(problems[0], problems)

    @property
    def crm_fields(self) -> frozenset[Placeholder]:
        """Distinct CRM fields the webhook sends (the seed allows at most 10).

        Namespaces are canonical: the module's plural name, ``User``, ``Organization``.
        """
        return self._fields

    def render(self, ctx: RenderContext) -> RenderedRequest:
        """The request for one action; TemplateError if a header or URL would break."""
        params = [prefix + fill.render(ctx) for prefix, fill in self._entity_fill]
        doc = self._body_fill.render(ctx) if self._body else ""
        doc_param = None if self._param_prefix is None else self._param_prefix + doc
        query = _join(params, self._custom, doc_param)
        base = self._url_fill.render(ctx)
        body = b""
        redacted_body: bytes | None = None
        if self._body_in_query:
            if query:
                url = base + self._url_sep + query
                redacted = base + self._url_sep + _join(params, self._custom_redacted, doc_param)
            else:  # a raw body and no parameters: most webhooks
                url = redacted = base
            if self._raw_body:
                body = _encode_utf8(doc)
        else:
            url = redacted = base
            body = query.encode("ascii")  # all percent-encoded
            if self._custom != self._custom_redacted:
                redacted_body = _join(params, self._custom_redacted, doc_param).encode("ascii")
        for bad in _FORBIDDEN_IN_HEADERS:
            if bad in url:  # values are percent-encoded; this guards against our own bugs
                raise TemplateError(f"webhook {self._name}: rendered URL contains {bad!r}")
        return RenderedRequest(
            method=self._method,
            url=url,
            headers=self._headers,
            body=body,
            redacted_url=redacted,
            redacted_body=redacted_body,
        )

    def __repr__(self) -> str:
        return f"CompiledWebhook({self._name!r}, {self._method}, {len(self._fields)} fields)"


def _url_encode_literals(segments: tuple[Segment, ...]) -> tuple[Segment, ...]:
    return tuple(url_component(s) if type(s) is str else s for s in segments)


def _join(params: list[str], custom: str, doc_param: str | None) -> str:
    parts = [*params]
    if custom:
        parts.append(custom)
    if doc_param is not None:
        parts.append(doc_param)
    return "&".join(parts)


def _encode_utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # every encoder replaces surrogates; this is a safety net
        return _fix_surrogates(text).encode("utf-8")
