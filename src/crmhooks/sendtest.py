"""``crmhooks send-test``: one real request for one webhook and event, sent now (SPEC §11).

The request is rendered and sent exactly as the processor would send it: the
real transport, with the SSRF guard, auth (an OAuth2 token is fetched), TLS and
the proxy as configured. Nothing else happens: no action is created, no quota
counted, nothing written to Kafka or the store. Its ``webhook-id`` is
``send-test-<random>``, never an action's id, so that a receiver which
deduplicates by it does not drop the real notification later.

Printed: the request as sent (secrets as ``***``, with the signature's real time
stamp), then the outcome: status, error class, latency, the response's first
bytes (scrubbed of every secret the webhook knows, control characters escaped).
"""

from __future__ import annotations

import sys
import uuid
from typing import TextIO

from crmhooks.clock import SystemClock
from crmhooks.config import Config, Webhook
from crmhooks.delivery import HttpTransport
from crmhooks.errors import TemplateError
from crmhooks.logs import escape_controls
from crmhooks.outcomes import Outcome
from crmhooks.showing import shown_request
from crmhooks.snapshot import endpoint_of
from crmhooks.templates import CompiledWebhook, RenderContext

# Exit statuses: the request was delivered (2xx), or it was not (any other outcome).
DELIVERED = 0
NOT_DELIVERED = 1


def send_test_id() -> str:
    """A ``webhook-id`` of its own: never an action's, which a receiver may deduplicate."""
    return f"send-test-{uuid.uuid4().hex[:16]}"


async def send_test(config: Config, webhook: Webhook, ctx: RenderContext, out: TextIO) -> int:
    """Send one request for ``webhook`` rendered from ``ctx`` (an event's record and
    its neighbours); print it and its outcome; the exit status."""
    try:
        request = CompiledWebhook(webhook, config.catalog).render(ctx)
    except TemplateError as exc:
        print(f"send-test: not sent: {exc}", file=sys.stderr)
        return NOT_DELIVERED
    delivery = config.delivery
    action_id = send_test_id()
    async with HttpTransport(
        delivery,
        SystemClock(),
        proxy=delivery.proxy or None,
        allowed_networks=delivery.allowed_networks,
    ) as transport:
        outcome = await transport.send(action_id, request, endpoint_of(webhook))
    stamp = "(not sent)" if outcome.sent_at_ms is None else str(outcome.sent_at_ms // 1000)
    print("\n".join(shown_request(request, webhook, action_id, stamp)), file=out)
    print("", file=out)
    print("\n".join(outcome_lines(outcome)), file=out)
    return DELIVERED if outcome.delivered else NOT_DELIVERED


def outcome_lines(outcome: Outcome) -> list[str]:
    """The outcome, one fact a line (``---`` first: the request ends above it)."""
    status = "delivered" if outcome.delivered else "not delivered"
    if outcome.sent_at_ms is None:
        status += " (nothing was sent)"
    lines = [
        "--- outcome",
        f"status: {status}",
        f"http_status: {outcome.http_status if outcome.http_status is not None else '-'}",
        f"error_class: {outcome.error_class or '-'}",
    ]
    if outcome.error:
        lines.append(f"error: {escape_controls(outcome.error)}")
    lines.append(f"latency_ms: {outcome.latency_ms:.1f}")
    if outcome.response_excerpt is not None:
        more = " (cut at 64 KiB)" if outcome.response_truncated else ""
        lines.append(f"response ({outcome.response_bytes} bytes{more}), first characters:")
        lines.append(escape_controls(outcome.response_excerpt))
    return lines
