"""XML body templates: values escaped as text, attribute value or CDATA, by where each sits."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final
from zoneinfo import ZoneInfo

from crmhooks.errors import TemplateError
from crmhooks.templates.formatting import Encoder, format_value
from crmhooks.templates.placeholders import Span

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


# Ends a CDATA section and opens the next: a parser reads the same character data.
_CDATA_BREAK: Final = "]]><![CDATA["


def xml_cdata(value: Any, tz: ZoneInfo) -> str:
    """A value inside ``<![CDATA[ … ]]>``: ``]]>`` and \\r close the section around
    them, and a value ending in ``]`` closes it after itself (see ``separate_slots``)."""
    text = format_value(value, tz)
    if _CDATA_SPECIAL.search(text) is None:
        return text
    text = text.replace("]]>", "]]]]><![CDATA[>").replace("\r", "]]>&#13;<![CDATA[")
    if text[-1] == "]":
        text += _CDATA_BREAK
    return _XML_ILLEGAL.sub("\ufffd", text)


def separate_slots(text: str, spans: Sequence[Span], encoders: Sequence[Encoder]) -> str:
    """``text`` with the literals beside its slots changed so that no ``]]>`` can
    form across a slot, whatever the values (empty ones too); the same ``text`` when
    none needs it. Run on a template already checked as well-formed.

    A ``]]>`` split across pieces needs one that ends in ``]`` right before one
    that starts with ``>`` or ``]>`` (pieces: literals and values). In a CDATA
    section it would end the section early and the rest would be markup; in text
    it makes the document ill-formed. In CDATA, a value ending in ``]`` closes
    its section after itself (``xml_cdata``) and a literal ``]`` right before a
    slot gets the same break here: then no piece ends in ``]`` at a slot's edge.
    In text, values never hold ``>`` (it is ``&gt;``), so a literal ``>`` or
    ``]>`` right after a slot has its ``>`` written ``&gt;``. Both keep the
    character data a parser reads.
    """
    pieces: list[str] = []
    pos = 0
    for (start, end, _), encoder in zip(spans, encoders, strict=True):
        if encoder is xml_cdata and text[start - 1] == "]":
            pieces += (text[pos:start], _CDATA_BREAK)
            pos = start
        elif encoder is xml_text:
            gt = end + 1 if text.startswith("]", end) else end
            if text.startswith(">", gt):
                pieces += (text[pos:gt], "&gt;")
                pos = gt + 1
    if not pieces:
        return text
    pieces.append(text[pos:])
    return "".join(pieces)


# --------------------------------------------------------------------------- context scanner

_TEXT, _TAG, _ATTR_DQ, _ATTR_SQ, _COMMENT, _CDATA, _PI, _DECL = range(8)
_XML_ENCODERS: Final[Mapping[int, Encoder]] = {
    _TEXT: xml_text,
    _ATTR_DQ: xml_attribute,
    _ATTR_SQ: xml_attribute,
    _CDATA: xml_cdata,
}
# Where "&" starts an entity or character reference.
_ESCAPED: Final = frozenset((_TEXT, _ATTR_DQ, _ATTR_SQ))
_XML_WHERE: Final[Mapping[int, str]] = {
    _TAG: "an XML tag (only quoted attribute values may hold one)",
    _COMMENT: "an XML comment",
    _PI: "an XML processing instruction",
    _DECL: "an XML declaration (<!DOCTYPE ...>)",
}


def xml_contexts(text: str, spans: Sequence[Span]) -> list[Encoder]:
    """The encoder for each placeholder of an XML template, by where it sits."""
    encoders: list[Encoder] = []
    starts = {start: end for start, end, _ in spans}
    state = _TEXT
    # Inside "&name;" or "&#N;" in text or an attribute value: a value there could
    # name another reference, such as an entity the template's DOCTYPE declares.
    in_reference = False
    # In a declaration: the quote of the literal we are in, and "[" depth (a
    # DOCTYPE's internal subset holds declarations, quoted ">" and comments).
    decl_quote, decl_depth = "", 0
    i, n = 0, len(text)
    while i < n:
        end = starts.get(i)
        if end is not None:
            encoder = _XML_ENCODERS.get(state)
            if encoder is None:
                raise TemplateError(f"placeholder {text[i:end]} inside {_XML_WHERE[state]}")
            if in_reference and state in _ESCAPED:
                raise TemplateError(
                    f"placeholder {text[i:end]} inside an XML entity or character reference"
                )
            encoders.append(encoder)
            i = end
            continue
        ch = text[i]
        if state in _ESCAPED:
            if ch == "&":
                in_reference = True
            elif ch == ";":
                in_reference = False
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
                decl_quote, decl_depth = "", 0
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
        elif decl_quote:  # _DECL from here on
            if ch == decl_quote:
                decl_quote = ""
        elif ch in "\"'":
            decl_quote = ch
        elif decl_depth and text.startswith(("<!--", "<?"), i):
            close = "-->" if text.startswith("<!--", i) else "?>"
            found = text.find(close, i + 2)
            skip_to = n if found == -1 else found + len(close)
            for start, end in starts.items():
                if i <= start < skip_to:
                    raise TemplateError(f"placeholder {text[start:end]} inside {_XML_WHERE[_DECL]}")
            i = skip_to
            continue
        elif ch == "[":
            decl_depth += 1
        elif ch == "]":
            decl_depth -= 1
        elif ch == ">" and decl_depth <= 0:
            state = _TEXT
        i += 1
    return encoders
