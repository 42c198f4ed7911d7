"""Administrator alerts (SPEC §12): a suspension, an organisation's first daily limit of
a day, sent as JSON to the ``[alerts] webhook`` from a small queue of their own.

What is sent: ``POST`` to the alert webhook's URL, body (``application/json``)
``{"type", "org_id", "rule_id", "webhook", "message", "at"}``, built here, never
from the webhook's templates: its body template, entity and custom parameters
and method are not used (an alert is always a JSON ``POST``). What does apply is
how the webhook reaches its receiver: its URL, headers (``${env:}``/``${file:}``
references resolved; record placeholders render empty, an alert has no record),
auth, TLS and signing secret (Standard Webhooks headers, as every request), all
through the same transport (SSRF guard, timeouts, in-flight bounds, scrubbing).
The ``webhook-id`` is ``alert:<type>:…``: a daily limit's is the same for the
organisation's whole day, so a receiver can drop the repeat a restart sends.

Alerts never touch the delivery path: ``suspended`` and ``daily_limit`` only add
to a bounded queue (``ALERT_QUEUE_MAX``; past it an alert is dropped, logged and
counted); one task sends them one at a time. They count no quota, and they are
never recursive: an alert that fails is retried a bounded number of times
(``ALERT_RETRY_DELAYS_S``), then logged and counted (``crmhooks_alerts_total``
``outcome="failed"``), never alerted, and it counts no failure towards any
suspension. They are kept in memory only: a crash loses the alerts not yet sent
(the suspension itself is stored; ``crmhooks_suspended_webhooks`` shows it).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

import orjson

from crmhooks.actions import Action
from crmhooks.clock import Clock
from crmhooks.config import Webhook
from crmhooks.delivery import Transport
from crmhooks.endpoints import scrub
from crmhooks.metrics import Metrics
from crmhooks.outcomes import Outcome
from crmhooks.results import rfc3339_ms
from crmhooks.snapshot import LiveConfig
from crmhooks.templates import RenderedRequest

log = logging.getLogger(__name__)

# Alerts waiting to be sent, at most. Alerts are rare (one per suspension, one per
# organisation and day), so 100 hold any burst of real ones (a receiver going down
# under every rule at once) while a dead alert receiver, costing up to three
# total_timeout_s per alert, cannot make the queue grow without end.
ALERT_QUEUE_MAX: Final = 100
# Waits before the second and third attempt of an alert: a receiver's restart or a
# blip is bridged, a dead receiver costs three requests per alert, never more.
ALERT_RETRY_DELAYS_S: Final = (2.0, 10.0)
# Outcomes worth another attempt: the receiver may be back in a moment. A 4xx,
# a redirect or a refusal of the SSRF guard will be the same next time.
_RETRIED: Final = frozenset({"server_error", "timeout", "connection_error", "auth_error"})
# At a stop, alerts still queued get this long to go out (a suspension at the
# last moment is still told); a dead receiver delays the stop by no more.
ALERT_DRAIN_S: Final = 5.0
# The organisation a look-up of the alert webhook names: none, so only an
# organisation-less webhook is found (never one an organisation defined).
NO_ORG: Final = ""

_REFERENCE_RE: Final = re.compile(r"\$\{((?:env|file):[^}]*)\}")
_PLACEHOLDER_RE: Final = re.compile(r"\$\{[^}]*\}")
_JSON: Final = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert: its body's fields, and the ``webhook-id`` it is sent with."""

    type: str  # webhook_suspended | daily_limit_reached
    org_id: str
    rule_id: str
    webhook: str
    message: str
    at_ms: int
    alert_id: str

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "type": self.type,
                "org_id": self.org_id,
                "rule_id": self.rule_id,
                "webhook": self.webhook,
                "message": self.message,
                "at": rfc3339_ms(self.at_ms),
            }
        )


class Alerter:
    """Owns the queue of alerts not yet sent and the task sending them."""

    def __init__(
        self,
        config: LiveConfig,
        transport: Transport,
        clock: Clock,
        metrics: Metrics,
        *,
        retry_delays_s: tuple[float, ...] = ALERT_RETRY_DELAYS_S,
    ) -> None:
        self._config = config
        self._transport = transport
        self._clock = clock
        self._metrics = metrics
        self._retry_delays_s = retry_delays_s
        self._queue: deque[Alert] = deque()
        self._task: asyncio.Task[None] | None = None  # sending; made when one is queued

    def __repr__(self) -> str:
        return f"Alerter(queued={len(self._queue)}, sending={not self.idle})"

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being sent."""
        return not self._queue and (self._task is None or self._task.done())

    # -- what the processor tells ---------------------------------------------------

    def suspended(self, action: Action, threshold: int, error: str | None) -> None:
        """``action``'s (rule, webhook) was just suspended, and that is stored.
        ``threshold``: suspend_after_failed_actions; ``error``: the last attempt's."""
        message = (
            f"webhook {action.webhook} of rule {action.rule_id} suspended for {action.org_id} "
            f"(suspend_after_failed_actions = {threshold}); the last failed action: "
            f"{action.action_id}: {error or 'failed'}. Later triggers send nothing until "
            f"`crmhooks resume --rule {action.rule_id} --webhook {action.webhook}` "
            "or a change of the rule or the webhook"
        )
        alert_id = f"alert:webhook_suspended:{action.action_id}"
        self._add("webhook_suspended", action, message, alert_id)

    def daily_limit(self, action: Action, day: str, message: str) -> None:
        """``action``'s organisation reached its daily limit, the first time on ``day``."""
        alert_id = f"alert:daily_limit_reached:{action.org_id}:{day}"
        self._add("daily_limit_reached", action, message, alert_id)

    def _add(self, kind: str, action: Action, message: str, alert_id: str) -> None:
        if self._config.current.config.alerts.webhook is None:
            return  # no [alerts] webhook: nothing to tell
        alert = Alert(
            kind,
            action.org_id,
            action.rule_id,
            action.webhook,
            message,
            self._clock.now_ms(),
            alert_id,
        )
        if len(self._queue) >= ALERT_QUEUE_MAX:
            self._metrics.alert(kind, "dropped")
            log.warning(
                "alert %s not sent: %d alerts already waiting (%s)",
                kind,
                len(self._queue),
                message,
                extra=_ids(alert),
            )
            return
        self._queue.append(alert)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._send_queued(), name="alerts")

    async def drain(self, timeout_s: float = ALERT_DRAIN_S) -> None:
        """At a stop: alerts queued get ``timeout_s`` to go out; the rest are dropped."""
        task = self._task
        if task is None or task.done():
            return
        _, pending = await asyncio.wait((task,), timeout=timeout_s)
        if pending:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for alert in self._queue:
            self._metrics.alert(alert.type, "dropped")
            log.warning("alert %s not sent: stopping", alert.type, extra=_ids(alert))
        self._queue.clear()

    # -- sending ---------------------------------------------------------------------

    async def _send_queued(self) -> None:
        while self._queue:
            alert = self._queue[0]
            try:
                sent, error = await self._send(alert)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let one alert stop the others
                log.exception("alert %s: unexpected error", alert.type, extra=_ids(alert))
                sent, error = False, f"unexpected {type(exc).__name__}"
            self._queue.popleft()
            if sent:
                self._metrics.alert(alert.type, "sent")
                log.info("alert %s sent: %s", alert.type, alert.message, extra=_ids(alert))
            else:
                self._metrics.alert(alert.type, "failed")
                log.warning(
                    "alert %s not sent (%s): %s",
                    alert.type,
                    error,
                    alert.message,
                    extra=_ids(alert),
                )

    async def _send(self, alert: Alert) -> tuple[bool, str | None]:
        """Up to 1 + len(retry delays) attempts; (sent, the last error)."""
        error: str | None = None
        for attempt in range(len(self._retry_delays_s) + 1):
            if attempt:
                delay_ms = int(self._retry_delays_s[attempt - 1] * 1000)
                await self._clock.sleep_until(self._clock.now_ms() + delay_ms)
            # Looked up at each attempt: the webhook as it is now (a reload may change it).
            snapshot = self._config.current
            name = snapshot.config.alerts.webhook
            target = None if name is None else snapshot.target(NO_ORG, name)
            if target is None or target.webhook.org is not None:
                return False, f"alert webhook {name!r} is not configured"
            request = alert_request(target.webhook, alert.body(), target.endpoint.secrets)
            outcome: Outcome = await self._transport.send(alert.alert_id, request, target.endpoint)
            if outcome.delivered:
                return True, None
            error = outcome.error or outcome.error_class
            if outcome.error_class not in _RETRIED:
                break
        return False, error


def alert_request(webhook: Webhook, body: bytes, secrets: tuple[str, ...]) -> RenderedRequest:
    """The alert's POST to ``webhook``: its URL and headers, our JSON ``body``."""
    values = webhook.env_values
    url = _REFERENCE_RE.sub(lambda m: quote(values.get(m.group(1), ""), safe=""), webhook.url)
    url = _PLACEHOLDER_RE.sub("", url)
    headers: dict[str, str] = {}
    for header, template in webhook.headers.items():
        if header.lower() == "content-type":  # the body is ours: JSON
            continue
        value = _REFERENCE_RE.sub(lambda m: values.get(m.group(1), ""), template)
        headers[header] = _PLACEHOLDER_RE.sub("", value)
    headers.update(_JSON)
    return RenderedRequest(
        method="POST",
        url=url,
        headers=headers,
        body=body,
        redacted_url=scrub(url, secrets),
    )


def _ids(alert: Alert) -> dict[str, object]:
    return {"org_id": alert.org_id, "rule_id": alert.rule_id, "webhook": alert.webhook}
