"""Administrator alerts of a running processor on the real broker (SPEC §12): a webhook
suspended and an organisation over its daily limit each give one signed alert, and
/metrics counts them."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from standardwebhooks.webhooks import Webhook as Verifier

from crmhooks.config import Config, config_from_mapping
from tests.support import (
    Receiver,
    event,
    produce,
    receiver,
    running,
    unique_kafka,
    wait_for_records,
)
from tests.test_metrics_e2e import free_port, total, until_scraped

pytestmark = pytest.mark.kafka

SECRET = "whsec_" + base64.b64encode(b"alerts end to end, 32 bytes key!").decode()


def config(rx: Receiver, tmp_path: Path, port: int) -> Config:
    def rule(rule_id: str, stage: str, hook: str) -> dict[str, Any]:
        return {
            "id": rule_id,
            "module": "Potentials",
            "criteria": {"all": [{"field": "Stage", "op": "is", "value": stage}]},
            "instant": hook,
        }

    cfg = config_from_mapping(
        {
            "store": {"path": str(tmp_path / "store.db")},
            "delivery": {"allow_private_networks": True, "retry_delays_s": []},
            "admin": {"listen": f"127.0.0.1:{port}"},
            "alerts": {"webhook": "OpsAlerts"},
            "orgs": [
                {"id": "org-acme", "users": 100},
                {"id": "org-beta", "users": 1},  # limit: min(2500, 50 × 1)
            ],
            "quota": {"per_user": 1},  # org-beta: 1 request a day; org-acme: 100
            "webhooks": [
                {"name": name, "url": f"{rx.url}/{name.lower()}", "module": "Potentials"}
                for name in ("Good", "Bad")
            ]
            + [
                {
                    "name": "OpsAlerts",
                    "url": f"{rx.url}/alerts",
                    "module": "Potentials",
                    "secret": SECRET,
                }
            ],
            "rules": [rule("won", "Closed Won", "Bad"), rule("lost", "Closed Lost", "Good")],
        },
        {},
    )
    return replace(cfg, kafka=unique_kafka())


async def test_a_suspension_and_a_daily_limit_each_alert_once(tmp_path: Path) -> None:
    port = free_port()
    async with receiver(lambda path, n: 500 if path == "/bad" else 200) as rx:
        cfg = config(rx, tmp_path, port)
        async with running(cfg):
            await produce(cfg, event(1))  # org-acme: failed, the webhook suspended
            await wait_for_records(cfg, cfg.kafka.results_topic, lambda rs: len(rs) == 1)
            await produce(cfg, event(2))  # suspended: nothing sent
            beta = [event(n, org_id="org-beta", record={"Stage": "Closed Lost"}) for n in (3, 4)]
            await produce(cfg, *beta, key=b"org-beta")  # delivered, then over the limit
            results = await wait_for_records(cfg, cfg.kafka.results_topic, lambda rs: len(rs) >= 4)
            samples = await until_scraped(
                port,
                lambda s: total(s, "crmhooks_alerts_total", outcome="sent") == 2,
                "both alerts sent",
            )
    assert sorted((r["event_id"], r["status"]) for r in results) == [
        ("evt-1", "failed"),
        ("evt-2", "suspended"),
        ("evt-3", "delivered"),
        ("evt-4", "quota_exceeded"),
    ]
    alerts = rx.on("/alerts")  # all of them: a graceful stop sends what is queued
    assert len(alerts) == 2
    bodies = sorted((Verifier(SECRET).verify(a.body, a.headers) for a in alerts), key=str)
    assert [(b["type"], b["org_id"], b["rule_id"], b["webhook"]) for b in bodies] == [
        ("daily_limit_reached", "org-beta", "lost", "Good"),
        ("webhook_suspended", "org-acme", "won", "Bad"),
    ]
    assert bodies == sorted((orjson.loads(a.body) for a in alerts), key=str)
    assert total(samples, "crmhooks_alerts_total", type="webhook_suspended", outcome="sent") == 1
    assert total(samples, "crmhooks_alerts_total", type="daily_limit_reached", outcome="sent") == 1
    assert total(samples, "crmhooks_alerts_total", outcome="failed") == 0
    assert total(samples, "crmhooks_suspended_webhooks") == 1
