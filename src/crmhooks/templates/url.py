"""URLs and form fields: percent-encoding of values, and the webhook's URL template."""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import quote
from zoneinfo import ZoneInfo

from crmhooks.errors import TemplateError
from crmhooks.templates.formatting import Encoder, fix_surrogates, format_value
from crmhooks.templates.placeholders import Placeholder, Resolver, scan
from crmhooks.templates.segments import Segment, Slot, merge_literals


def url_component(text: str) -> str:
    """Percent-encode every byte but unreserved ones: the text stays one value."""
    try:
        return quote(text, safe="")
    except UnicodeEncodeError:
        return quote(fix_surrogates(text), safe="")


def url_value(value: Any, tz: ZoneInfo) -> str:
    """A field value as one URL component (a path segment, a query or form value)."""
    return url_component(format_value(value, tz))


def then_url_encode(encoder: Encoder) -> Encoder:
    """``encoder``, its output percent-encoded: a document sent as a parameter."""

    def encode(value: Any, tz: ZoneInfo) -> str:
        return url_component(encoder(value, tz))

    return encode


# Every printable ASCII character that may stand in a URL as written: the literal
# parts of a URL template keep their meaning ("/", "?", "&", "=", existing %XX)
# and only spaces, non-ASCII and other unsafe characters are percent-encoded.
_URL_LITERAL_SAFE: Final = "!$%&'()*+,/:;=?@[]~"
FORBIDDEN_IN_HEADERS: Final = ("\r", "\n", "\x00")


def compile_url(url: str, resolver: Resolver, fields: set[Placeholder]) -> tuple[Segment, ...]:
    """The URL template's segments; placeholders only in the path and query."""
    for bad in FORBIDDEN_IN_HEADERS:
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
    spans = scan(url)
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
        segments.append(Slot(source, ph.field, url_value))
        pos = end
    segments.append(quote(url[pos:], safe=_URL_LITERAL_SAFE))
    return merge_literals(segments)
