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
or form parameter, a path segment or a header — alone, or side by side with
other values and the template's text (``xmldoc.separate_slots``). Characters
illegal in XML 1.0 and lone surrogates (anywhere) become U+FFFD.

Secrets (``${env:NAME}``, ``${file:PATH}``, whose values the config resolved into
``Webhook.env_values``) stand anywhere a placeholder may: each is escaped by its
context's encoder once, at compile time, into literal text of its own
(``segments.SecretText``), never counted as a CRM field. Every part holding a
secret (or a custom parameter, a URL password, a header value written in the
config) has a second fill that shows it as ``***``: ``RenderedRequest``'s
``redacted_url`` (results, logs), ``redacted_body`` and ``redacted_headers``
(preview, send-test).

Modules, each one job:

* ``placeholders`` — scanning ``${Namespace.Field}``, the render context, and
  the resolver from a namespace to the record a value is read from;
* ``formatting`` — a value as text (dates, numbers, arrays) or as a whole JSON value;
* ``xmldoc`` / ``jsondoc`` — escaping for each context of an XML / JSON document,
  and the scanner that tells which context each placeholder sits in;
* ``url`` — percent-encoding, and the webhook's URL template;
* ``segments`` — a compiled template (literals, slots, secrets) and how it is filled;
* ``headers`` — ``[webhooks.headers]``: values on one line, shown with secrets as ***;
* ``webhook`` — ``CompiledWebhook``: the request shape, and ``RenderedRequest``.
"""

from crmhooks.templates.formatting import format_number, format_value, json_value
from crmhooks.templates.formatting import json_string as _json_string
from crmhooks.templates.jsondoc import json_in_string as _json_in_string
from crmhooks.templates.placeholders import (
    ORG_NAMESPACE,
    USER_NAMESPACE,
    Placeholder,
    RenderContext,
    parse_placeholders,
)
from crmhooks.templates.url import url_component
from crmhooks.templates.webhook import CompiledWebhook, RenderedRequest
from crmhooks.templates.xmldoc import xml_attribute, xml_cdata, xml_text

__all__ = [
    "ORG_NAMESPACE",
    "USER_NAMESPACE",
    "CompiledWebhook",
    "Placeholder",
    "RenderContext",
    "RenderedRequest",
    "_json_in_string",
    "_json_string",
    "format_number",
    "format_value",
    "json_value",
    "parse_placeholders",
    "url_component",
    "xml_attribute",
    "xml_cdata",
    "xml_text",
]
