"""Administrator alerts (SPEC §12): one per suspension, one per organisation and day over
its limit, signed, sent off the delivery path, never recursive.

The processor runs on a real SQLite store and the real HTTP transport, towards real
receivers on 127.0.0.1; Kafka is the fake of the other part tests (tests/fakes.py),
time a FakeClock (the alert's retries wait on it). test_alerts_e2e.py runs the same
on the real broker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook as Verifier

from crmhooks.actions import Action
from crmhooks.alerts import ALERT_QUEUE_MAX, ALERT_RETRY_DELAYS_S, Alerter
from crmhooks.app import Processor
from crmhooks.clock import FakeClock
from crmhooks.config import Config, config_from_mapping
from crmhooks.delivery import HttpTransport, Outcome
from crmhooks.endpoints import Endpoint
from crmhooks.metrics import Metrics
from crmhooks.snapshot import LiveConfig
from crmhooks.store import Store
from crmhooks.templates import RenderedRequest
from tests.fakes import NOW_MS, FakeKafka, GatedTransport, fetched, rec, until
from tests.support import receiver

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
DAY_MS = 86_400_000


def config(
    hook_url: str,
    alerts_url: str,
    *,
    instant: str = "Hook",
    quota: dict[str, int] | None = None,
    alerts: bool = True,
) -> Config:
    return config_from_mapping(
        {
            "delivery": {
                "allow_private_networks": True,
                "retry_delays_s": [],  # the first failed attempt fails the action
                "suspend_after_failed_actions": 1,
                "total_timeout_s": 5,
            },
            **({"quota": quota} if quota else {}),
            **({"alerts": {"webhook": "OpsAlerts"}} if alerts else {}),
            "orgs": [
                {"id": "org-acme", "users": 100, "time_zone": "UTC"},
                {"id": "org-beta", "users": 100, "time_zone": "UTC"},
            ],
            "webhooks": [
                {"name": "Hook", "url": hook_url, "module": "Potentials"},
                {
                    "name": "OpsAlerts",
                    "url": alerts_url,
                    "module": "Potentials",
                    "secret": SECRET,
                    "headers": {"X-Ops-Token": "${env:OPS_TOKEN}", "Content-Type": "text/xml"},
                    "body": {"format": "xml", "template": "<never>${Potentials.Amount}</never>"},
                    "custom_params": {"never": "sent"},
                },
            ],
            "rules": [
                {
                    "id": "won",
                    "module": "Potentials",
                    "criteria": {"all": [{"field": "Stage", "op": "is", "value": "Closed Won"}]},
                    "instant": instant,
                }
            ],
        },
        {"OPS_TOKEN": "t0ken-for-ops"},
    )


@contextlib.asynccontextmanager
async def processor(
    tmp_path: Path, cfg: Config, clock: FakeClock
) -> AsyncIterator[tuple[Processor, FakeKafka, CountingTransport]]:
    kafka = FakeKafka()
    async with (
        Store(tmp_path / "s.db") as store,
        HttpTransport(cfg.delivery, clock) as http,
    ):
        transport = CountingTransport(http)
        p = Processor(cfg, store, transport, clock)
        p.attach(kafka, {0, 1})
        loop = asyncio.create_task(p.dispatcher.loop())
        try:
            yield p, kafka, transport
        finally:
            p.dispatcher.stop()
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
            await p.dispatcher.drain(5.0)
            await p.alerts.drain(1.0)


class CountingTransport:
    """The real transport, every request counted by its webhook-id."""

    def __init__(self, inner: HttpTransport) -> None:
        self.inner = inner
        self.sent: list[str] = []

    async def send(self, action_id: str, request: RenderedRequest, endpoint: Endpoint) -> Outcome:
        self.sent.append(action_id)
        return await self.inner.send(action_id, request, endpoint)

    def alerts(self) -> list[str]:
        return [i for i in self.sent if i.startswith("alert:")]


async def next_attempt(clock: FakeClock, delay_s: float) -> None:
    """Once the alert waits ``delay_s`` for its next attempt, that time passes."""
    due_ms = clock.now_ms() + int(delay_s * 1000)
    await until(lambda: any(w == due_ms for w, _ in clock._waiters), "the alert waits to retry")
    clock.advance(due_ms - clock.now_ms())


def statuses(kafka: FakeKafka) -> list[tuple[str, str]]:
    return [(r["action_id"], r["status"]) for r in kafka.results if "status" in r]


def real_now_ms() -> int:
    """standardwebhooks refuses a webhook-timestamp more than 5 minutes off real time."""
    return time.time_ns() // 1_000_000


async def test_a_suspension_sends_exactly_one_signed_alert_once_it_is_stored(
    tmp_path: Path,
) -> None:
    stored_when_alerted: list[Any] = []
    async with receiver(lambda path, n: 500 if path == "/hook" else 204) as rx:
        clock = FakeClock(real_now_ms())
        cfg = config(f"{rx.url}/hook", f"{rx.url}/alerts?team=ops")
        async with processor(tmp_path, cfg, clock) as (p, kafka, _):

            async def look_at_the_store() -> None:
                if rx.requests[-1].path == "/alerts":
                    stored_when_alerted.append(await p.store.suspension_table())

            rx.on_request = look_at_the_store
            await p._process_batch(fetched([rec(1, 10)]))
            await until(lambda: rx.on("/alerts"), "the alert arrives")
            await p._process_batch(fetched([rec(2, 11)]))  # suspended: no request, no alert
            await until(lambda: len(statuses(kafka)) == 2, "both actions end")
            await until(lambda: p.alerts.idle, "nothing left to send")
            metrics = p.metrics

    assert statuses(kafka) == [("evt-1:won:Hook", "failed"), ("evt-2:won:Hook", "suspended")]
    [alert] = rx.on("/alerts")
    assert [r.path for r in rx.requests] == ["/hook", "/alerts"]
    # Sent after the group holding the suspension was stored.
    [table] = stored_when_alerted
    assert table[("org-acme", "won", "Hook")][:2] == (1, True)

    body = Verifier(SECRET).verify(alert.body, alert.headers)  # raises if not signed right
    assert body == orjson.loads(alert.body)
    assert set(body) == {"type", "org_id", "rule_id", "webhook", "message", "at"}
    assert (body["type"], body["org_id"], body["rule_id"], body["webhook"]) == (
        "webhook_suspended",
        "org-acme",
        "won",
        "Hook",
    )
    assert "evt-1:won:Hook" in body["message"]
    assert "HTTP 500" in body["message"]
    assert "crmhooks resume --rule won --webhook Hook" in body["message"]
    assert body["at"].endswith("Z")
    # The webhook's URL, headers (references resolved) and secret; not its method's
    # body template, custom parameters or content type: the body is crmhooks's JSON.
    assert alert.method == "POST"
    assert alert.query == {"team": "ops"}
    assert alert.headers["X-Ops-Token"] == "t0ken-for-ops"
    assert alert.headers["Content-Type"] == "application/json"
    assert alert.headers["webhook-id"] == "alert:webhook_suspended:evt-1:won:Hook"
    assert b"never" not in alert.body
    assert metrics.alerts["webhook_suspended:sent"] == 1
    assert metrics.alerts["webhook_suspended:failed"] == 0


async def test_quota_reached_alerts_once_per_organisation_and_day(tmp_path: Path) -> None:
    async with receiver() as rx:
        clock = FakeClock(NOW_MS)
        cfg = config(f"{rx.url}/hook", f"{rx.url}/alerts", quota={"daily_limit": 1})
        async with processor(tmp_path, cfg, clock) as (p, kafka, _):

            async def batch(*records: Any) -> None:
                ended = len(statuses(kafka)) + len(records)
                await p._process_batch(fetched(list(records)))
                await until(lambda: len(statuses(kafka)) == ended, "the actions end")
                await until(lambda: p.alerts.idle, "alerts sent")

            # acme: delivered, over (alert), over again (none); beta: delivered, over (alert).
            await batch(rec(1, 10))
            await batch(rec(2, 11), rec(3, 12))
            await batch(rec(4, 20, partition=1, org_id="org-beta"))
            await batch(rec(5, 21, partition=1, org_id="org-beta"))
            first_day = [orjson.loads(r.body) for r in rx.on("/alerts")]
            # The next day: a new count, and its first over-quota action alerts again.
            clock.advance(DAY_MS)
            p.scheduler.start(clock.now_ms())  # the heap's window, as its refill loop would
            await batch(rec(6, 13), rec(7, 14))
            metrics = p.metrics

    ended = [s for _, s in statuses(kafka)]
    assert ended[:5] == [
        "delivered",
        "quota_exceeded",
        "quota_exceeded",
        "delivered",
        "quota_exceeded",
    ]
    assert sorted(ended[5:]) == ["delivered", "quota_exceeded"]  # sent together: either first
    assert [(a["type"], a["org_id"], a["rule_id"], a["webhook"]) for a in first_day] == [
        ("daily_limit_reached", "org-acme", "won", "Hook"),
        ("daily_limit_reached", "org-beta", "won", "Hook"),
    ]
    assert first_day[0]["message"] == "org-acme used 1 of 1 notifications on 2025-11-28"
    alerts = rx.on("/alerts")
    assert len(alerts) == 3
    assert orjson.loads(alerts[2].body)["message"] == (
        "org-acme used 1 of 1 notifications on 2025-11-29"
    )
    # One id per organisation and day: a receiver drops what a restart sends again.
    assert [a.headers["webhook-id"] for a in alerts] == [
        "alert:daily_limit_reached:org-acme:2025-11-28",
        "alert:daily_limit_reached:org-beta:2025-11-28",
        "alert:daily_limit_reached:org-acme:2025-11-29",
    ]
    # Alerts count no quota: each organisation's day holds its one delivery.
    assert [r.path for r in rx.requests].count("/hook") == 3
    assert metrics.alerts["daily_limit_reached:sent"] == 3


async def test_an_alert_webhook_answering_500_is_tried_three_times_and_never_alerts(
    tmp_path: Path,
) -> None:
    """The rule's own webhook is the alert webhook: it fails, is suspended, and the
    alert about it fails too. That ends there: no suspension of the alert, no alert
    of the alert, a bounded number of requests."""
    async with receiver(lambda path, n: 500) as rx:
        clock = FakeClock(NOW_MS)
        cfg = config(f"{rx.url}/hook", f"{rx.url}/alerts", instant="OpsAlerts")
        async with processor(tmp_path, cfg, clock) as (p, kafka, transport):
            await p._process_batch(fetched([rec(1, 10)]))
            await until(lambda: len(transport.alerts()) == 1, "the first attempt")
            for delay_s in ALERT_RETRY_DELAYS_S:
                await next_attempt(clock, delay_s)
            await until(lambda: p.alerts.idle, "the alert given up")
            clock.advance(DAY_MS)  # nothing is waiting to try again
            await p._process_batch(fetched([rec(2, 11)]))  # suspended: nothing sent
            await until(lambda: len(statuses(kafka)) == 2, "the second action ends")
            await asyncio.sleep(0.05)
            metrics = p.metrics

    alert_id = "alert:webhook_suspended:evt-1:won:OpsAlerts"
    assert transport.sent == ["evt-1:won:OpsAlerts", alert_id, alert_id, alert_id]
    assert statuses(kafka) == [
        ("evt-1:won:OpsAlerts", "failed"),
        ("evt-2:won:OpsAlerts", "suspended"),
    ]
    assert metrics.alerts["webhook_suspended:failed"] == 1
    assert metrics.alerts["webhook_suspended:sent"] == 0
    assert all(not r.get("action_id", "").startswith("alert:") for r in kafka.results)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_an_unreachable_alert_webhook_costs_a_bounded_number_of_attempts(
    tmp_path: Path,
) -> None:
    async with receiver(lambda path, n: 500) as rx:
        clock = FakeClock(NOW_MS)
        cfg = config(f"{rx.url}/hook", f"http://127.0.0.1:{closed_port()}/alerts")
        async with processor(tmp_path, cfg, clock) as (p, kafka, transport):
            await p._process_batch(fetched([rec(1, 10)]))
            for delay_s in ALERT_RETRY_DELAYS_S:
                await next_attempt(clock, delay_s)
            await until(lambda: p.alerts.idle, "the alert given up")
            metrics = p.metrics

    assert len(transport.alerts()) == 1 + len(ALERT_RETRY_DELAYS_S)
    assert [r.path for r in rx.requests] == ["/hook"]
    assert metrics.alerts["webhook_suspended:failed"] == 1
    assert statuses(kafka) == [("evt-1:won:Hook", "failed")]


async def test_without_an_alerts_webhook_nothing_is_sent(tmp_path: Path) -> None:
    async with receiver(lambda path, n: 500) as rx:
        cfg = config(f"{rx.url}/hook", f"{rx.url}/alerts", alerts=False)
        async with processor(tmp_path, cfg, FakeClock(NOW_MS)) as (p, kafka, transport):
            await p._process_batch(fetched([rec(1, 10)]))
            await until(lambda: statuses(kafka), "the action ends")
            await asyncio.sleep(0.05)
            assert p.alerts.idle
    assert transport.sent == ["evt-1:won:Hook"]


def action(n: int) -> Action:
    return Action(
        action_id=f"evt-{n}:won:Hook",
        event_id=f"evt-{n}",
        org_id="org-acme",
        module="Potentials",
        record_id=f"rec-{n}",
        rule_id="won",
        webhook="Hook",
        kind="instant",
        slot=0,
        due_ms=NOW_MS,
        partition=0,
        source_offset=n,
    )


async def test_a_full_queue_drops_alerts_and_counts_them_never_blocking() -> None:
    """Alerts wait behind a hung alert receiver: past ALERT_QUEUE_MAX they are dropped
    (counted), and telling one never waits."""
    metrics = Metrics(process_metrics=False)
    hung = GatedTransport(open_now=False)
    cfg = config("http://receiver.test/hook", "http://receiver.test/alerts")
    alerter = Alerter(LiveConfig.of(cfg), hung, FakeClock(NOW_MS), metrics)
    for n in range(ALERT_QUEUE_MAX + 3):
        alerter.suspended(action(n), 1, "HTTP 500")  # returns at once, every time
    await until(lambda: hung.sent, "the first alert is being sent")
    assert metrics.alerts["webhook_suspended:dropped"] == 3
    await alerter.drain(0.05)  # a stop: what is queued is dropped, counted
    assert metrics.alerts["webhook_suspended:dropped"] == ALERT_QUEUE_MAX + 3
    assert metrics.alerts["webhook_suspended:sent"] == 0
    assert alerter.idle
    assert hung.sent == ["alert:webhook_suspended:evt-0:won:Hook"]
