"""Scheduled actions, cancellation, retries and suspension on the real broker and store."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from crmhooks.config import (
    AllOf,
    BodySpec,
    Condition,
    Config,
    DeliverySettings,
    OrgSettings,
    Rule,
    ScheduledSpec,
    StoreSettings,
    Webhook,
)
from crmhooks.store import Store
from tests.support import (
    Receiver,
    event,
    produce,
    receiver,
    running,
    unique_kafka,
    wait_for_records,
)

pytestmark = pytest.mark.kafka

JSON_BODY = '{"deal": "${Potentials.Potential Name}", "stage": "${Potentials.Stage}"}'


def config_for(
    rx: Receiver, tmp_path: Path, *, offset_ms: int = 0, path: str = "/hook", **delivery: Any
) -> Config:
    webhook = Webhook(
        name="Hook",
        url=f"{rx.url}{path}",
        module="Potentials",
        body=BodySpec(format="json", template=JSON_BODY),
    )
    scheduled = (ScheduledSpec(webhook="Hook", relative_to="trigger", offset_ms=offset_ms),)
    rule = Rule(
        id="r1",
        module="Potentials",
        trigger="create_or_edit",
        criteria=AllOf((Condition("Stage", "is", "Closed Won"),)),
        instant=None if offset_ms else "Hook",
        scheduled=scheduled if offset_ms else (),
    )
    settings = {"allow_private_networks": True, "retry_delays_s": (0.3,), **delivery}
    return Config(
        kafka=unique_kafka(),
        store=StoreSettings(path=str(tmp_path / "crmhooks.db")),
        delivery=DeliverySettings(**settings),
        orgs={"org-acme": OrgSettings("org-acme", users=100, time_zone="Europe/Berlin")},
        webhooks={"Hook": webhook},
        rules=(rule,),
    )


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def final(event_id: str, status: str) -> Any:
    def check(records: list[dict[str, Any]]) -> bool:
        return any(r["event_id"] == event_id and r["status"] == status for r in records)

    return check


async def test_scheduled_action_fires_within_a_second_of_its_due_time(tmp_path: Path) -> None:
    arrivals: list[float] = []
    async with receiver() as rx:
        config = config_for(rx, tmp_path, offset_ms=2000)
        rx.status_for = lambda path, n: arrivals.append(time.time()) or 200  # type: ignore[func-returns-value]
        async with running(config):
            occurred = now_rfc3339()
            await produce(config, event("s1", occurred_at=occurred))
            results = await wait_for_records(
                config, config.kafka.results_topic, final("evt-s1", "delivered")
            )
        due_s = datetime.fromisoformat(occurred).timestamp() + 2.0
        assert len(arrivals) == 1
        assert -0.05 <= arrivals[0] - due_s <= 1.0, arrivals[0] - due_s
        statuses = [r["status"] for r in results if r["event_id"] == "evt-s1"]
        assert statuses == ["scheduled", "delivered"]


async def test_record_edited_out_of_the_criteria_is_cancelled_and_never_sent(
    tmp_path: Path,
) -> None:
    async with receiver() as rx:
        config = config_for(rx, tmp_path, offset_ms=1500)
        async with running(config):
            edit = event(
                "c2",
                operation="edit",
                record_id="rec-c1",
                previous={"Stage": "Closed Won"},
                record={"Stage": "Closed Lost"},
            )
            await produce(config, event("c1"), edit)
            await wait_for_records(config, config.kafka.results_topic, final("evt-c1", "cancelled"))
            # A later record due later than the cancelled one: once it arrived, the
            # cancelled one would have arrived too.
            await produce(config, event("sentinel"))
            results = await wait_for_records(
                config, config.kafka.results_topic, final("evt-sentinel", "delivered")
            )
        assert [r.body for r in rx.requests] == [
            b'{"deal": "Deal sentinel", "stage": "Closed Won"}'
        ]
        mine = [(r["status"], r["reason"]) for r in results if r["event_id"] == "evt-c1"]
        assert mine == [("scheduled", None), ("cancelled", "criteria_not_met")]


async def test_receiver_failing_once_gets_two_attempts_with_the_same_webhook_id(
    tmp_path: Path,
) -> None:
    async with receiver(lambda path, n: 500 if n == 1 else 200) as rx:
        config = config_for(rx, tmp_path)
        async with running(config):
            await produce(config, event("f1"))
            results = await wait_for_records(
                config, config.kafka.results_topic, final("evt-f1", "delivered")
            )
        ids = [r.headers["webhook-id"] for r in rx.requests]
        assert ids == ["evt-f1:r1:Hook", "evt-f1:r1:Hook"]
        mine = [(r["status"], r["attempt"], r["error_class"]) for r in results]
        assert mine == [("retrying", 1, "server_error"), ("delivered", 2, None)]
        assert results[0]["next_attempt_at"] is not None


async def test_failed_webhook_is_suspended_until_resumed(tmp_path: Path) -> None:
    async with receiver(lambda path, n: 503 if path == "/hook" else 200) as rx:
        config = config_for(rx, tmp_path, suspend_after_failed_actions=1)
        async with running(config):
            await produce(config, event("x1"))
            await wait_for_records(config, config.kafka.results_topic, final("evt-x1", "failed"))
            await produce(config, event("x2"))
            await wait_for_records(config, config.kafka.results_topic, final("evt-x2", "suspended"))
            assert len(rx.requests) == 2  # x1 and its retry; x2 sent nothing
            async with Store(config.store.path) as other:  # what `crmhooks resume` does
                assert await other.resume("r1", "Hook") == 1
            await asyncio.sleep(1.5)  # the processor polls for resumes every second
            rx.status_for = lambda path, n: 200
            await produce(config, event("x3"))
            await wait_for_records(config, config.kafka.results_topic, final("evt-x3", "delivered"))


async def test_a_delivery_between_failures_starts_the_count_again(tmp_path: Path) -> None:
    """Suspension counts consecutive failed actions (SPEC §5): one delivered in
    between resets the count, in memory and in the store, across a restart."""
    async with receiver(lambda path, n: 503 if n % 2 else 200) as rx:
        config = config_for(rx, tmp_path, suspend_after_failed_actions=2, retry_delays_s=())
        async with running(config):
            for name, status in (("z1", "failed"), ("z2", "delivered"), ("z3", "failed")):
                await produce(config, event(name))
                done = final(f"evt-{name}", status)
                await wait_for_records(config, config.kafka.results_topic, done)
        async with running(config):  # z3's row says 1 failure, not 2: z4 is sent
            await produce(config, event("z4"))
            await wait_for_records(config, config.kafka.results_topic, final("evt-z4", "delivered"))
            await produce(config, event("z5"))
            await wait_for_records(config, config.kafka.results_topic, final("evt-z5", "failed"))
            await produce(config, event("z6"))
            await wait_for_records(config, config.kafka.results_topic, final("evt-z6", "delivered"))
        assert len(rx.requests) == 6


async def test_a_config_change_to_the_webhook_lifts_its_suspension(tmp_path: Path) -> None:
    async with receiver(lambda path, n: 503) as rx:
        config = config_for(rx, tmp_path, suspend_after_failed_actions=1, retry_delays_s=())
        async with running(config):
            await produce(config, event("y1"))
            await wait_for_records(config, config.kafka.results_topic, final("evt-y1", "failed"))
            await produce(config, event("y2"))
            await wait_for_records(config, config.kafka.results_topic, final("evt-y2", "suspended"))
        async with running(config):  # a restart alone keeps it suspended
            await produce(config, event("y3"))
            await wait_for_records(config, config.kafka.results_topic, final("evt-y3", "suspended"))
        rx.status_for = lambda path, n: 200
        hook = replace(config.webhooks["Hook"], description="fixed endpoint")
        changed = replace(config, webhooks={"Hook": hook})
        async with running(changed):
            await produce(changed, event("y4"))
            await wait_for_records(
                changed, changed.kafka.results_topic, final("evt-y4", "delivered")
            )
        assert len(rx.requests) == 2  # y1 (no retries configured) and y4


async def test_a_longer_retry_after_of_a_503_is_honoured(tmp_path: Path) -> None:
    def answer(path: str, n: int) -> int | tuple[int, dict[str, str]]:
        return (503, {"Retry-After": "2"}) if n == 1 else 200

    async with receiver(answer) as rx:
        config = config_for(rx, tmp_path, retry_delays_s=(0.1,))
        async with running(config):
            await produce(config, event("ra"))
            results = await wait_for_records(
                config, config.kafka.results_topic, final("evt-ra", "delivered")
            )
        retrying, done = results
        sent = [datetime.fromisoformat(r["sent_at"]).timestamp() for r in (retrying, done)]
        planned = datetime.fromisoformat(retrying["next_attempt_at"]).timestamp()
        assert planned - sent[0] >= 1.9  # 2 s from Retry-After, not the configured 0.1 s
        assert sent[1] >= planned - 0.05
        assert len(rx.requests) == 2


async def test_a_hung_endpoint_does_not_hold_up_a_healthy_one(tmp_path: Path) -> None:
    """Per-host queues: 20 actions for a host that never answers, then 20 for a healthy one."""
    release = asyncio.Event()

    async with receiver() as healthy, receiver() as hung:
        config = config_for(healthy, tmp_path, max_in_flight_per_host=2, total_timeout_s=5.0)
        slow = replace(config.webhooks["Hook"], name="Slow", url=f"{hung.url}/slow")
        rule = replace(
            config.rules[0],
            id="r0",
            instant="Slow",
            criteria=AllOf((Condition("Stage", "is", "Slow"),)),
        )
        config = replace(
            config, webhooks={**config.webhooks, "Slow": slow}, rules=(rule, *config.rules)
        )

        async def stall() -> None:
            await release.wait()

        hung.on_request = stall
        async with running(config):
            await produce(config, *(event(f"h{n}", record={"Stage": "Slow"}) for n in range(20)))
            await produce(config, *(event(f"ok{n}") for n in range(20)))
            await wait_for_records(
                config,
                config.kafka.results_topic,
                lambda rs: sum(r["status"] == "delivered" for r in rs) == 20,
                timeout_s=4.0,  # well below the hung host's 5 s timeout
            )
            assert len(healthy.requests) == 20
            assert len(hung.requests) == 2  # max_in_flight_per_host; the rest wait their turn
            release.set()
