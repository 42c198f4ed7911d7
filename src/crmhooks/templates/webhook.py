"""A webhook compiled once from its templates, rendered into an HTTP request per action."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Final
from xml.etree import ElementTree

import msgspec
import orjson

from crmhooks.errors import TemplateError
from crmhooks.modules import ModuleCatalog
from crmhooks.settings import Webhook
from crmhooks.templates.formatting import Encoder, fix_surrogates, json_value
from crmhooks.templates.headers import HeaderSet
from crmhooks.templates.jsondoc import json_contexts
from crmhooks.templates.placeholders import Placeholder, RenderContext, Resolver, Span, scan
from crmhooks.templates.segments import (
    REDACTED,
    Fill,
    Segment,
    compile_segments,
    has_secrets,
)
from crmhooks.templates.url import (
    FORBIDDEN_IN_HEADERS,
    PathCheck,
    compile_url,
    then_url_encode,
    url_component,
    url_value,
)
from crmhooks.templates.xmldoc import separate_slots, xml_contexts


class RenderedRequest(msgspec.Struct, frozen=True, gc=False):
    """An HTTP request ready to send, and what of it may be shown (SPEC §3.1).

    ``url`` is fully percent-encoded ASCII (send it as is, e.g. ``yarl.URL(url,
    encoded=True)``). ``redacted_url`` is the URL with every secret (the URL's
    password, custom parameters, ``${env:}``/``${file:}`` values) shown as ``***``:
    what results and logs show. ``redacted_body`` and ``redacted_headers`` are the
    body and headers shown so; None when they hold no secret (show ``body`` and
    ``headers`` as they are).
    """

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    redacted_url: str
    redacted_body: bytes | None = None
    redacted_headers: Mapping[str, str] | None = None

    def __repr__(self) -> str:
        return f"RenderedRequest({self.method} {self.redacted_url}, {len(self.body)} bytes)"

    @property
    def shown_body(self) -> bytes:
        """The body as preview shows it: secrets as ``***``."""
        return self.body if self.redacted_body is None else self.redacted_body

    @property
    def shown_headers(self) -> Mapping[str, str]:
        """The template's headers as preview shows them: secrets as ``***``."""
        return self.headers if self.redacted_headers is None else self.redacted_headers


# Stand-ins for values when a template is checked for well-formedness at compile time.
_PROBE_TEXT: Final = "x"
_PROBE_JSON: Final = "0"


def _compile_document(
    text: str, fmt: str, resolver: Resolver, fields: set[Placeholder], url_encoded: bool
) -> tuple[Segment, ...]:
    """Compile a body template; literals are pre-percent-encoded when sent as a parameter."""
    spans = scan(text)
    if fmt == "xml":
        encoders = xml_contexts(text, spans)
    elif fmt == "json":
        encoders = json_contexts(text, spans)
    else:
        raise TemplateError(f"unknown body format {fmt!r} (xml or json)")
    _check_well_formed(text, fmt, spans, encoders)
    if fmt == "xml":
        separated = separate_slots(text, spans, encoders)
        if separated is not text:  # literals changed, and with them every span after
            text, spans = separated, scan(separated)
            encoders = xml_contexts(text, spans)
    return _segments(text, spans, encoders, resolver, fields, url_encoded)


def _check_well_formed(text: str, fmt: str, spans: Sequence[Span], encoders: list[Encoder]) -> None:
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
    spans: Sequence[Span],
    encoders: Sequence[Encoder],
    resolver: Resolver,
    fields: set[Placeholder],
    url_encoded: bool,
) -> tuple[Segment, ...]:
    if not url_encoded:
        return compile_segments(text, spans, encoders, resolver, fields)
    return compile_segments(
        text, spans, [then_url_encode(e) for e in encoders], resolver, fields, url_component
    )


_FORM: Final = MappingProxyType({"Content-Type": "application/x-www-form-urlencoded"})
_RAW_CONTENT_TYPES: Final[Mapping[str, Mapping[str, str]]] = {
    "xml": MappingProxyType({"Content-Type": "application/xml; charset=utf-8"}),
    "json": MappingProxyType({"Content-Type": "application/json"}),
}
_NO_HEADERS: Final[Mapping[str, str]] = MappingProxyType({})


class CompiledWebhook:
    """A webhook whose templates are parsed once, at config time, and rendered per action.

    Request shape (SPEC §4): GET puts entity params, custom params and the
    ``param`` document (in that order) in the query string. POST sends them as an
    ``application/x-www-form-urlencoded`` body — unless the body has no ``param``:
    then the document is the raw body and the parameters go in the query string.
    ``[webhooks.headers]`` are sent after the shape's own Content-Type (a raw
    body's may be replaced by the template's).

    Secrets (``${env:NAME}``, ``${file:PATH}``; ``Webhook.env_values`` holds their
    values) are escaped for where they stand, as values are, and are never CRM
    fields; custom parameters, the URL's password and header values written in the
    config are secrets too. Each part with a secret has a second fill showing them
    as ``***``, rendered only for that part.
    """

    __slots__ = (
        "_body",
        "_body_fill",
        "_body_in_query",
        "_body_shown",
        "_custom",
        "_custom_redacted",
        "_entity",
        "_entity_fill",
        "_entity_shown",
        "_fields",
        "_headers",
        "_method",
        "_name",
        "_param_prefix",
        "_query_secret",
        "_raw_body",
        "_url",
        "_url_fill",
        "_url_path",
        "_url_sep",
        "_url_shown",
    )

    def __init__(self, webhook: Webhook, catalog: ModuleCatalog) -> None:
        """Parse every template of ``webhook``; TemplateError (naming the part) if invalid."""
        self._name = webhook.name
        self._method = webhook.method
        resolver = Resolver(webhook.module, catalog, webhook.env_values)
        fields: set[Placeholder] = set()
        problems: list[str] = []  # every part is checked: all problems named at once

        self._url_path: PathCheck | None = None
        try:
            self._url, self._url_path = compile_url(webhook.url, resolver, fields)
        except TemplateError as exc:
            message = str(exc)
            problems.append(message if message.startswith("url: ") else f"url: {message}")
            self._url = ()
        # Where the parameters join the URL; placeholders cannot add a "?" or "&".
        literal_url = "".join(s if type(s) is str else "x" for s in self._url)
        query_at = literal_url.find("?")
        if query_at == -1:
            self._url_sep = "?"
        elif query_at == len(literal_url) - 1 or literal_url.endswith("&"):
            self._url_sep = ""  # "…/p?" or "…/p?a=1&": the parameters follow as they are
        else:
            self._url_sep = "&"  # also after "…/p?a=?": that "?" is a's value

        entity: list[tuple[str, tuple[Segment, ...]]] = []
        for name, template in webhook.entity_params.items():
            try:
                spans = scan(template)
                encoders: list[Encoder] = [url_value] * len(spans)
                # Literals are encoded together with the values: the whole text is one value.
                segs = _segments(template, spans, encoders, resolver, fields, url_encoded=False)
            except TemplateError as exc:
                problems.append(f"entity_params.{name}: {exc}")
                continue
            entity.append((url_component(name) + "=", _url_encode_literals(segs)))
        self._entity = tuple(entity)

        # Custom parameters hold auth tokens and API keys: all are secrets (SPEC §3.1).
        custom = [(url_component(k), url_component(v)) for k, v in webhook.custom_params.items()]
        self._custom = "&".join(f"{k}={v}" for k, v in custom)
        self._custom_redacted = "&".join(f"{k}={REDACTED}" for k, _ in custom)

        body = webhook.body
        self._body: tuple[Segment, ...] = ()
        self._param_prefix: str | None = None
        self._raw_body = False
        base_headers: Mapping[str, str] = _NO_HEADERS if self._method == "GET" else _FORM
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
                base_headers = _RAW_CONTENT_TYPES[body.format]
        self._headers = HeaderSet(
            webhook.name, base_headers, webhook.headers, resolver, fields, problems
        )
        # Parameters travel in the URL for GET and beside a raw body.
        self._body_in_query = self._method == "GET" or self._raw_body
        self._fields = frozenset(fields)
        self._url_fill = Fill.of(self._url)
        self._entity_fill = tuple((prefix, Fill.of(segs)) for prefix, segs in self._entity)
        self._body_fill = Fill.of(self._body)
        # The fills showing secrets as ***, for the parts that hold any.
        self._url_shown = Fill.of(self._url, shown=True) if has_secrets(self._url) else None
        self._entity_shown = (
            tuple((prefix, Fill.of(segs, shown=True)) for prefix, segs in self._entity)
            if any(has_secrets(segs) for _, segs in self._entity)
            else None
        )
        self._body_shown = Fill.of(self._body, shown=True) if has_secrets(self._body) else None
        # Whether the parameters (query string or form body) show differently.
        self._query_secret = bool(
            self._custom
            or self._entity_shown is not None
            or (self._param_prefix is not None and self._body_shown is not None)
        )
        if problems:
            raise TemplateError(problems[0], problems)

    @property
    def crm_fields(self) -> frozenset[Placeholder]:
        """Distinct CRM fields the webhook sends (the seed allows at most 10).

        Namespaces are canonical: the module's plural name, ``User``, ``Organization``.
        Secret references are not CRM fields.
        """
        return self._fields

    def render(self, ctx: RenderContext) -> RenderedRequest:
        """The request for one action; TemplateError if a header or URL would break."""
        params = [prefix + fill.render(ctx) for prefix, fill in self._entity_fill]
        doc = self._body_fill.render(ctx) if self._body else ""
        doc_param = None if self._param_prefix is None else self._param_prefix + doc
        query = _join(params, self._custom, doc_param)
        base = self._url_fill.render(ctx)
        if self._url_path is not None:
            dots = self._url_path.dot_segment(base)
            if dots is not None:
                raise TemplateError(
                    f"webhook {self._name}: a URL path segment renders as {dots!r}, which "
                    "servers resolve to another path (a dot segment is never sent)"
                )
        shown_base = base if self._url_shown is None else self._url_shown.render(ctx)
        body = b""
        redacted_body: bytes | None = None
        if self._body_in_query:
            if query:
                url = base + self._url_sep + query
                if self._query_secret:
                    redacted = (
                        shown_base + self._url_sep + self._shown_query(ctx, params, doc_param)
                    )
                elif shown_base is not base:
                    redacted = shown_base + self._url_sep + query
                else:
                    redacted = url
            else:  # a raw body and no parameters: most webhooks
                url, redacted = base, shown_base
            if self._raw_body:
                body = _encode_utf8(doc)
                if self._body_shown is not None:
                    redacted_body = _encode_utf8(self._body_shown.render(ctx))
        else:
            url, redacted = base, shown_base
            body = query.encode("ascii")  # all percent-encoded
            if self._query_secret:
                redacted_body = self._shown_query(ctx, params, doc_param).encode("ascii")
        for bad in FORBIDDEN_IN_HEADERS:
            if bad in url:  # values are percent-encoded; this guards against our own bugs
                raise TemplateError(f"webhook {self._name}: rendered URL contains {bad!r}")
        header_set = self._headers
        if header_set.dynamic:
            headers = header_set.render(ctx)
            shown_headers = header_set.shown(headers)
        else:
            headers, shown_headers = header_set.const, header_set.shown_const
        return RenderedRequest(
            method=self._method,
            url=url,
            headers=headers,
            body=body,
            redacted_url=redacted,
            redacted_body=redacted_body,
            redacted_headers=shown_headers,
        )

    def _shown_query(self, ctx: RenderContext, params: list[str], doc_param: str | None) -> str:
        """The parameters with every secret as ***: only the parts holding one are
        rendered again."""
        if self._entity_shown is not None:
            params = [prefix + fill.render(ctx) for prefix, fill in self._entity_shown]
        if self._param_prefix is not None and self._body_shown is not None:
            doc_param = self._param_prefix + self._body_shown.render(ctx)
        return _join(params, self._custom_redacted, doc_param)

    def __repr__(self) -> str:
        return f"CompiledWebhook({self._name!r}, {self._method}, {len(self._fields)} fields)"


def _url_encode_literals(segments: tuple[Segment, ...]) -> tuple[Segment, ...]:
    # Secrets are encoded already, by their slot's encoder.
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
        return fix_surrogates(text).encode("utf-8")
