"""URLs and form fields: percent-encoding of values, and the webhook's URL template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote
from zoneinfo import ZoneInfo

from crmhooks.errors import TemplateError
from crmhooks.templates.formatting import Encoder, fix_surrogates, format_value
from crmhooks.templates.placeholders import Placeholder, Reference, Resolver, scan
from crmhooks.templates.segments import (
    REDACTED,
    SecretText,
    Segment,
    Slot,
    merge_literals,
    secret_text,
)


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


# Segments a server resolves ("/a/../b" is "/b"), also percent-encoded (RFC 3986 §6.2.2.2).
_DOT_SEGMENTS: Final = frozenset((".", ".."))
_LONGEST_DOT_SEGMENT: Final = len("%2e%2e")
# Stands for a slot while the template's path is split: never in a URL (refused).
_SLOT_MARK: Final = "\x00"


@dataclass(frozen=True, slots=True)
class PathCheck:
    """The path segments of a rendered URL that hold a value: none may be a dot segment.

    Values cannot add a "/" or "?" (they are percent-encoded), so the rendered
    path has the template's segments, at the same places.
    """

    path_start: int  # where the path starts in every rendered URL (the origin is literal)
    segments: tuple[int, ...]  # indices in path.split("/") of the segments with a slot

    def dot_segment(self, url: str) -> str | None:
        """The first segment of ``url`` holding a value that is ``.`` or ``..``, or None."""
        tail = url[self.path_start :]
        # Most paths and queries have no dot at all: three "in" tests, where the
        # split and the loop below cost ~0.25 µs more a render.
        if "." not in tail and "%2e" not in tail and "%2E" not in tail:
            return None
        parts = tail.partition("?")[0].split("/")
        for i in self.segments:
            seg = parts[i]
            if (
                len(seg) <= _LONGEST_DOT_SEGMENT
                and seg.lower().replace("%2e", ".") in _DOT_SEGMENTS
            ):
                return seg
        return None


# Every printable ASCII character that may stand in a URL as written: the literal
# parts of a URL template keep their meaning ("/", "?", "&", "=", existing %XX)
# and only spaces, non-ASCII and other unsafe characters are percent-encoded.
_URL_LITERAL_SAFE: Final = "!$%&'()*+,/:;=?@[]~"
FORBIDDEN_IN_HEADERS: Final = ("\r", "\n", "\x00")


def _origin_segment(origin: str) -> Segment:
    """``scheme://user:password@host:port``: a password is a secret (SPEC §3.1), shown
    as ***; the rest is literal."""
    scheme_end = origin.find("://") + 3
    userinfo, at, hostport = origin[scheme_end:].rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not at or not colon or not password:
        return origin
    return SecretText(origin, f"{origin[:scheme_end]}{user}:{REDACTED}@{hostport}")


def compile_url(
    url: str, resolver: Resolver, fields: set[Placeholder]
) -> tuple[tuple[Segment, ...], PathCheck | None]:
    """The URL template's segments (placeholders only in the path and query), and
    the check of its path's segments with a value (None: no value in the path)."""
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
    segments: list[Segment] = [_origin_segment(url[:authority_end])]
    marked: list[str] = []  # the template from the path on, a mark for each value
    pos = authority_end
    for start, end, ph in spans:
        literal = quote(url[pos:start], safe=_URL_LITERAL_SAFE)
        value: Segment
        if isinstance(ph, Reference):
            value = secret_text(ph, url_value, resolver)
        else:
            canonical, source = resolver.resolve(ph)
            fields.add(canonical)
            value = Slot(source, ph.field, url_value)
        segments += (literal, value)
        marked += (literal, _SLOT_MARK)
        pos = end
    segments.append(quote(url[pos:], safe=_URL_LITERAL_SAFE))
    path = "".join(marked).partition("?")[0].split("/")
    in_path = tuple(i for i, seg in enumerate(path) if _SLOT_MARK in seg)
    return merge_literals(segments), PathCheck(authority_end, in_path) if in_path else None
