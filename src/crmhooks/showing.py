"""A request as an operator sees it (``preview``, ``send-test``): the headers crmhooks
sends, in the order it sends them, with every secret shown as ``***`` (SPEC §3.1).

The transport builds the real head (``request_head._static_head``); this mirrors it
for display: the template's headers, then ``User-Agent`` (unless the template
sets one), ``Accept-Encoding``, the ``webhook-*`` headers, ``Authorization``
(from ``[webhooks.auth]``, or the URL's ``user:password``), ``Accept``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from crmhooks import __version__
from crmhooks.settings import BasicAuth, BearerAuth, OAuth2Auth, Webhook
from crmhooks.templates import RenderedRequest

REDACTED = "***"
# Headers the transport never takes from a template (the config refuses them too).
_NEVER_FROM_TEMPLATE = ("host", "accept-encoding", "content-length", "transfer-encoding")


def shown_request(
    request: RenderedRequest, webhook: Webhook, action_id: str, timestamp: str
) -> list[str]:
    """``METHOD URL``, the header lines, a blank line and the body, secrets as ***."""
    lines = [f"{request.method} {request.redacted_url}"]
    given: set[str] = set()
    for name, value in request.shown_headers.items():
        lower = name.lower()
        if lower.startswith("webhook-") or lower in _NEVER_FROM_TEMPLATE:
            continue
        given.add(lower)
        lines.append(f"{name}: {value}")
    if "user-agent" not in given:
        lines.append(f"User-Agent: crmhooks/{__version__}")
    lines += [
        "Accept-Encoding: identity",
        f"webhook-id: {action_id}",
        f"webhook-timestamp: {timestamp}",
    ]
    if webhook.secret is not None:
        lines.append("webhook-signature: v1,***")
    authorization = _authorization(webhook)
    if authorization is not None and (webhook.auth is not None or "authorization" not in given):
        lines.append(f"Authorization: {authorization}")
    if "accept" not in given:
        lines.append("Accept: */*")
    lines += ["", request.shown_body.decode("utf-8", "replace")]
    return lines


def _authorization(webhook: Webhook) -> str | None:
    auth = webhook.auth
    if isinstance(auth, BasicAuth):
        return f"Basic {REDACTED}"
    if isinstance(auth, BearerAuth):
        return f"Bearer {REDACTED}"
    if isinstance(auth, OAuth2Auth):
        return f"Bearer {REDACTED} (an OAuth2 token from {auth.token_url})"
    try:
        parts = urlsplit(webhook.url)
        has_user = parts.username is not None or parts.password is not None
    except ValueError:
        return None
    return f"Basic {REDACTED}" if has_user else None
