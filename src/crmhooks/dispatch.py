"""Firing due actions: per-host queues, one attempt of an action, and what its outcome
does (delivered, a retry, failed; suspension counts).

Order of effects for one attempt (``Dispatcher._fire``): quota count stored (a
block of units at a time, the next block written while the current one is used)
→ request sent → result produced and acknowledged → action's new state stored
(finished, or moved for a retry), both in a report group (``reporter``). A crash
between the last two sends the request again after restart, with the same
``webhook-id``.

Endpoint isolation: at most ``max_in_flight_per_host`` actions of one host fire at
once; the others wait in that host's queue, so a hung host can take neither
tasks nor request slots from the healthy ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

from msgspec.structs import replace

from crmhooks.actions import Action
from crmhooks.alerts import Alerter
from crmhooks.checkpoint import Checkpoint, Unstored
from crmhooks.clock import Clock
from crmhooks.delivery import Outcome, Transport
from crmhooks.endpoints import scrub
from crmhooks.errors import TemplateError
from crmhooks.events import RecordEvent
from crmhooks.logs import about
from crmhooks.metrics import Metrics
from crmhooks.quota import QuotaLedger
from crmhooks.reporter import Reporter
from crmhooks.scheduler import Scheduler
from crmhooks.snapshot import LiveConfig, Target
from crmhooks.suspensions import Suspensions
from crmhooks.templates import RenderContext, RenderedRequest

log = logging.getLogger(__name__)

# An unexpected error while firing (a store or Kafka hiccup): the action is tried
# again this much later instead of waiting for a restart.
FIRE_ERROR_RETRY_MS = 5_000
# The queue of actions whose webhook is gone from the configuration: they are
# cancelled (SPEC §5, config_removed) without a request, through the same bounds.
_REMOVED_HOST = "(removed)"


class Dispatcher:
    """Owns the host queues and the tasks firing actions."""

    def __init__(
        self,
        config: LiveConfig,
        scheduler: Scheduler,
        quota: QuotaLedger,
        suspensions: Suspensions,
        reporter: Reporter,
        checkpoint: Checkpoint,
        transport: Transport,
        clock: Clock,
        owns: Callable[[int], bool],
        metrics: Metrics,
        alerts: Alerter | None = None,
    ) -> None:
        self._config = config
        self._alerts = alerts
        self._metrics = metrics
        self._scheduler = scheduler
        self._quota = quota
        self._suspensions = suspensions
        self._reporter = reporter
        self._checkpoint = checkpoint
        self._transport = transport
        self._clock = clock
        self._owns = owns
        self._tasks: set[asyncio.Task[None]] = set()
        self._host_active: dict[str, int] = {}
        self._host_waiting: dict[str, deque[Action]] = {}
        self._stopping = False
        reporter.attach_ended(self._reported)

    def __repr__(self) -> str:
        return f"Dispatcher(firing={len(self._tasks)}, hosts_waiting={len(self._host_waiting)})"

    @property
    def idle(self) -> bool:
        """No action being fired."""
        return not self._tasks

    def requests_in_flight(self) -> int:
        """Actions holding a slot of their host: being rendered, sent or answered."""
        return sum(self._host_active.values())

    def stop(self) -> None:
        """Fire nothing more: the loop ends, queued actions stay for the next start."""
        self._stopping = True
        self._scheduler.changed.set()

    async def loop(self) -> None:
        """Hand each due action to its host's queue, and wait for the next one."""
        scheduler = self._scheduler
        while not self._stopping:
            per_host = self._config.current.config.delivery.max_in_flight_per_host
            now_ms = self._clock.now_ms()
            lateness = self._metrics.timer_lateness
            for action in scheduler.due(now_ms):
                if action.kind == "scheduled" or action.attempt:  # timers, not instant sends
                    lateness.observe(max(0, now_ms - action.due_ms) / 1000)
                target = self._config.current.target(action.org_id, action.webhook)
                host = _REMOVED_HOST if target is None else target.host
                free = self._host_active.get(host, 0) < per_host
                if free and not self._host_waiting.get(host):
                    self._start(host, action)
                else:  # a task of the host takes it when a slot is free
                    self._host_waiting.setdefault(host, deque()).append(action)
            next_due = scheduler.next_due_ms()
            waits: list[asyncio.Task[Any]] = [asyncio.create_task(scheduler.changed.wait())]
            if next_due is not None:
                waits.append(asyncio.create_task(self._clock.sleep_until(next_due)))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            scheduler.changed.clear()

    async def drain(self, grace_s: float) -> None:
        """At a stop: requests in flight may finish within ``grace_s``; then their reports."""
        pending: set[asyncio.Task[None]] = set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=grace_s)
        if pending:
            log.warning(
                "%d requests still in flight after %.1f s: left for restart", len(pending), grace_s
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._reporter.drain()  # reports of cancelled ones: finished, not cut off

    def _start(self, host: str, action: Action) -> None:
        self._host_active[host] = self._host_active.get(host, 0) + 1
        task = asyncio.create_task(self._fire_host(host, action), name=f"fire {host}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fire_host(self, host: str, action: Action) -> None:
        """Fire ``action`` (it holds a slot of its host), then the host's waiting actions
        while a slot is free: a busy host's queue is served by as many tasks as it has
        slots, not by a task an action (~2 µs each). An attempt's report is written
        after it (``_settle``), so the next request goes as soon as an answer is in."""
        while True:
            await self._fire_guarded(host, action)
            waiting = self._host_waiting.get(host)
            limit = self._config.current.config.delivery.max_in_flight_per_host
            if not waiting or self._stopping or self._host_active[host] >= limit:
                break
            self._host_active[host] += 1
            action = waiting.popleft()
        if waiting is not None and not waiting:
            del self._host_waiting[host]

    async def _fire_guarded(self, host: str, action: Action) -> None:
        released = False

        def release_host() -> None:
            """The host's slot is free once its answer is in: reporting needs no slot."""
            nonlocal released
            if not released:
                released = True
                self._host_active[host] -= 1

        retry: Action | None = None
        settled = False
        try:
            settled = await self._fire(action, release_host)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Still pending in the store: try again shortly rather than wait for a restart.
            log.exception(
                "action %s: unexpected error while firing; again in %d ms",
                action.action_id,
                FIRE_ERROR_RETRY_MS,
                extra=about(action),
            )
            retry = replace(action, due_ms=self._clock.now_ms() + FIRE_ERROR_RETRY_MS)
        finally:
            if not settled:  # else once reported (_reported)
                self._scheduler.fired(action, retry, keep=not self._stopping)
            release_host()

    # -- one attempt ----------------------------------------------------------------

    async def _fire(self, action: Action, release_host: Callable[[], None]) -> bool:
        """One attempt of ``action``; True when it was handed to ``_settle`` (whose
        report ends it), False when it ended here."""
        if not self._owns(action.partition):
            return False  # revoked while it waited for its host: the new owner fires it
        target = self._config.current.live_target(action)
        if target is None:
            await self._reporter.final(action, "cancelled", reason="config_removed")
            return False
        event = await self._scheduler.record_of(action)
        if self._suspensions.is_suspended(action.org_id, action.rule_id, action.webhook):
            await self._reporter.final(action, "suspended", reason="webhook_suspended")
            return False
        if event is None:
            await self._reporter.internal_error(action, None, "no stored snapshot of the record")
            return False
        quota = self._quota
        day, limit = quota.today(action.org_id, self._clock.now_ms())
        used = quota.used(action.org_id, day)
        if used is None:
            used = await quota.load(action.org_id, day)
        if used >= limit:
            await self._over_quota(action, event, day, used, limit)
            return False
        try:
            request = self._render(target, action, event)
        except TemplateError as exc:
            # Its text names the part, never a value; scrubbed all the same (SPEC §3.1).
            message = scrub(f"template failed: {exc}", target.endpoint.secrets)
            await self._reporter.internal_error(action, event, message)
            return False
        storing = quota.take(action.org_id, day, action.partition, limit)
        if storing is not None:
            await asyncio.shield(storing)
        outcome = await self._transport.send(action.action_id, request, target.endpoint)
        release_host()
        if outcome.sent_at_ms is not None:
            self._metrics.delivery.observe(outcome.error_class or "none", outcome.latency_ms / 1000)
        if outcome.sent_at_ms is None:  # refused before sending: not counted, not retried
            await quota.give_back(action.org_id, day, action.partition)
            if outcome.error_class != "ssrf_blocked":  # a header or URL we could not send
                message = scrub(f"request not sent: {outcome.error}", target.endpoint.secrets)
                await self._reporter.internal_error(action, event, message)
                return False
        self._settle(action, request, outcome)
        return True

    def _render(self, target: Target, action: Action, event: RecordEvent) -> RenderedRequest:
        tz = ZoneInfo(self._config.current.org(action.org_id).time_zone)
        ctx = RenderContext(
            module=action.module,
            record=event.record,
            related=event.related,
            user=event.user,
            organization=event.organization,
            time_zone=tz,
        )
        return target.compiled.render(ctx)

    async def _over_quota(
        self, action: Action, event: RecordEvent, day: str, used: int, limit: int
    ) -> None:
        message = f"{action.org_id} used {used} of {limit} notifications on {day}"
        first = self._quota.first_over(action.org_id, day)
        if first:
            log.warning("daily limit reached: %s", message, extra=about(action))
        letters = self._reporter.action_letter(action, event, "daily_limit_reached", message)
        await self._reporter.final(
            action, "quota_exceeded", reason="daily_limit_reached", extra=letters
        )
        if first and self._alerts is not None:
            self._alerts.daily_limit(action, day, message)

    def _settle(self, action: Action, request: RenderedRequest, outcome: Outcome) -> None:
        """Report an attempt's outcome, then store what follows: done, or a retry.

        Both go into the open report group; ``_reported`` ends the attempt once
        the group is written. Nothing here awaits: the task that fired the action
        goes on with the next one of its host meanwhile."""
        attempt = action.attempt + 1
        shown = {"method": request.method, "url": request.redacted_url}
        delivery = self._config.current.config.delivery
        delays = delivery.retry_delays_s
        # Written straight into the changes of this group: a WriteBatch of its own
        # and its merge cost ~2 µs a delivery.
        group = self._reporter.group()
        batch = group.batch
        retry: Action | None = None
        if outcome.delivered:
            status = "delivered"
            # DEBUG: one line per delivery costs ~5% CPU; results carry every delivery.
            log.debug("action %s delivered (HTTP %s)", action.action_id, outcome.http_status)
            self._suspensions.count_success(action, batch)
        elif action.attempt < len(delays) and outcome.sent_at_ms is not None:
            status = "retrying"
            delay_s = delays[action.attempt]
            if outcome.retry_after_s is not None and outcome.http_status in (429, 503):
                delay_s = max(delay_s, outcome.retry_after_s)
            retry = action.retried(self._clock.now_ms() + int(delay_s * 1000))
            log.info(
                "action %s attempt %d failed (%s), retry at %d",
                action.action_id,
                attempt,
                outcome.error_class,
                retry.due_ms,
                extra=about(action),
            )
        else:
            status = "failed"
            log.warning(
                "action %s failed on attempt %d: %s",
                action.action_id,
                attempt,
                outcome.error,
                extra=about(action),
            )
            threshold = delivery.suspend_after_failed_actions
            suspends = self._suspensions.count_failure(action, batch, threshold)
            if suspends and self._alerts is not None:
                alerts = self._alerts  # told once the suspension is stored
                group.after_written(lambda: alerts.suspended(action, threshold, outcome.error))
        unstored = self._checkpoint.take_unstored(action.action_id)  # stored here now
        now_ms = self._clock.now_ms()
        if retry is not None and unstored is not None:
            batch.new_actions.append(retry)  # stored for the first time, for its retry
            # With its own event: the retry renders what the first attempt did (SPEC §5).
            batch.action_events.append((action.action_id, action.partition, unstored[2]))
        elif retry is not None:
            batch.moved.append((action.action_id, retry.due_ms, retry.attempt))
        elif unstored is not None:  # stored for the first time, finished
            batch.done.append((action, status, now_ms))
            if status != "delivered":  # rare: kept so that `crmhooks redeliver` renders it
                batch.action_events.append((action.action_id, action.partition, unstored[2]))
        else:
            batch.finished.append((action.action_id, status, now_ms))
        group.results.append(
            self._reporter.attempt_result(
                action, status, attempt, outcome, retry.due_ms if retry else None, shown
            )
        )
        group.reporters.append((action, unstored, retry))

    def _reported(
        self,
        action: Action,
        unstored: Unstored | None,
        retry: Action | None,
        error: BaseException | None,
    ) -> None:
        """An attempt's report is written (``error`` None), or failed to be: its end."""
        if error is None:
            if unstored is not None:
                self._checkpoint.settled(action, unstored[0])
            if retry is not None:
                self._scheduler.fired(action, retry, keep=True)
            else:
                self._scheduler.fired(action, None)
            return
        # A stop, or a failure no retry mends (the store): the process is ending. The
        # request is not sent again here; an instant action is stored as pending at the
        # stop if it can be, and the next start sends it again (same webhook-id).
        if unstored is not None:
            self._checkpoint.give_back(action.action_id, unstored)
        self._scheduler.fired(action, None, keep=False)
