"""Quota, dead letters, replay and accounting on the real broker, store and receiver."""

from __future__ import annotations

import asyncio
import io
from collections import Counter
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from crmhooks.actions import FINAL_STATUSES
from crmhooks.config import (
    AllOf,
    BodySpec,
    Condition,
    Config,
    DeliverySettings,
    OrgSettings,
    QuotaSettings,
    Rule,
    ScheduledSpec,
    StoreSettings,
    Webhook,
)
from crmhooks.errors import TemplateError
from crmhooks.store import Store
from crmhooks.templates import CompiledWebhook, RenderContext, RenderedRequest
from crmhooks.tools import replay_dlq, tail_results
from tests.support import (
    Receiver,
    event,
    produce,
    read_all,
    receiver,
    running,
    unique_kafka,
    wait_for_records,
)

pytestmark = pytest.mark.kafka


def config_for(rx: Receiver, tmp_path: Path, *, limit: int, scheduled: bool = False) -> Config:
    hook = Webhook(
        name="Hook",
        url=f"{rx.url}/hook",
        module="Potentials",
        body=BodySpec(format="json", template='{"deal": "${Potentials.Potential Name}"}'),
    )
    flaky = replace(hook, name="Flaky", url=f"{rx.url}/flaky")
    rule = Rule(
        id="r1",
        module="Potentials",
        criteria=AllOf((Condition("Stage", "is", "Closed Won"),)),
        instant="Hook",
        scheduled=(ScheduledSpec(webhook="Flaky", offset_ms=500),) if scheduled else (),
    )
    return Config(
        kafka=unique_kafka(),
        store=StoreSettings(path=str(tmp_path / "crmhooks.db")),
        delivery=DeliverySettings(allow_private_networks=True, retry_delays_s=(0.2,)),
        quota=QuotaSettings(daily_limit=10_000, per_user=limit),
        orgs={"org-acme": OrgSettings("org-acme", users=1, time_zone="America/New_York")},
        webhooks={"Hook": hook, "Flaky": flaky},
        rules=(rule,),
    )


def finals(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in records:
        if r["status"] in FINAL_STATUSES:
            out.setdefault(r["action_id"], []).append(r["status"])
    return out


async def produce_until_final(
    config: Config, *events: bytes | dict[str, Any]
) -> list[dict[str, Any]]:
    """Produce ``events`` (one action each) and read results until every action is final."""
    await produce(config, *events)
    return await wait_for_records(
        config, config.kafka.results_topic, lambda rs: len(finals(rs)) >= len(events)
    )


async def test_quota_is_exact_under_concurrency_and_survives_a_restart(tmp_path: Path) -> None:
    async with receiver() as rx:
        config = config_for(rx, tmp_path, limit=5)
        async with running(config):
            results = await produce_until_final(config, *(event(n) for n in range(12)))
        assert len(rx.requests) == 5
        statuses = Counter(s for ss in finals(results).values() for s in ss)
        assert statuses == {"delivered": 5, "quota_exceeded": 7}
        letters = await read_all(config, config.kafka.dlq_topic)
        assert len(letters) == 7
        assert {d["error_code"] for d in letters} == {"daily_limit_reached"}
        assert all("org-acme used 5 of 5 notifications on " in d["message"] for d in letters)
        assert all(d["action_id"] and d["event"]["event_id"] for d in letters)
        out = io.StringIO()
        assert await tail_results(config, org="org-acme", stream=out) == 12
        lines = out.getvalue().splitlines()
        assert lines[0].startswith("time (UTC)")
        assert sum(" quota_exceeded " in line for line in lines) == 7
        assert sum(" delivered " in line and " 200 " in line for line in lines) == 5
        out = io.StringIO()
        assert await tail_results(config, topic="dlq", event_id="evt-11", stream=out) <= 1
        assert await tail_results(config, org="org-other", stream=io.StringIO()) == 0
        async with running(config):  # the count is durable: still over the limit
            await produce(config, event("after-restart"))
            await wait_for_records(
                config,
                config.kafka.results_topic,
                lambda rs: finals(rs).get("evt-after-restart:r1:Hook") == ["quota_exceeded"],
            )
        assert len(rx.requests) == 5


async def test_quota_blocks_written_ahead_never_overshoot_and_go_back_on_stop(
    tmp_path: Path,
) -> None:
    """A limit of several quota blocks: counts are stored ahead, a block at a time,
    yet exactly the limit is sent, and after a stop the store counts only what was sent."""
    async with receiver() as rx:
        config = config_for(rx, tmp_path, limit=45)
        async with running(config):
            results = await produce_until_final(config, *(event(n) for n in range(60)))
        statuses = Counter(s for ss in finals(results).values() for s in ss)
        assert statuses == {"delivered": 45, "quota_exceeded": 15}
        assert len(rx.requests) == 45
    async with Store(config.store.path) as store:
        assert await store.quota_used("org-acme", _org_day(config)) == 45


async def test_quota_count_given_back_on_stop_when_under_the_limit(tmp_path: Path) -> None:
    async with receiver() as rx:
        config = config_for(rx, tmp_path, limit=1000)
        async with running(config):
            await produce_until_final(config, *(event(n) for n in range(26)))
        assert len(rx.requests) == 26
    async with Store(config.store.path) as store:
        # Three blocks of 16 were stored (each next one once half of the one before
        # was used): 6 unused in the second, 16 in the third. The stop gives them back.
        assert await store.quota_used("org-acme", _org_day(config)) == 26


def _org_day(config: Config) -> str:
    tz = ZoneInfo(config.orgs["org-acme"].time_zone)
    return datetime.now(tz).date().isoformat()


async def test_dead_letters_replayed_after_fixing_the_cause_are_delivered_once(
    tmp_path: Path,
) -> None:
    async with receiver() as rx:
        config = config_for(rx, tmp_path, limit=1)
        async with running(config):
            await produce_until_final(config, event("a"), event("b"))
        assert [r.body for r in rx.requests] == [b'{"deal": "Deal a"}']
        fixed = replace(config, quota=QuotaSettings(daily_limit=10_000, per_user=10))
        async with running(fixed):
            assert await replay_dlq(fixed, "daily_limit_reached", idle_timeout_s=1.0) == 1
            await wait_for_records(
                fixed,
                fixed.kafka.results_topic,
                lambda rs: "delivered" in finals(rs).get("evt-b:r1:Hook", []),
            )
            # Replaying again sends nothing: b is delivered now, a was delivered before.
            assert await replay_dlq(fixed, "daily_limit_reached", idle_timeout_s=1.0) == 1
            await produce(fixed, event("sentinel"))
            await wait_for_records(
                fixed,
                fixed.kafka.results_topic,
                lambda rs: "delivered" in finals(rs).get("evt-sentinel:r1:Hook", []),
            )
        bodies = Counter(r.body for r in rx.requests)
        assert bodies == {
            b'{"deal": "Deal a"}': 1,
            b'{"deal": "Deal b"}': 1,
            b'{"deal": "Deal sentinel"}': 1,
        }


async def test_every_action_ends_in_exactly_one_final_status(tmp_path: Path) -> None:
    """N events with instant, scheduled, failing and over-quota actions: all accounted for."""

    def status(path: str, n: int) -> int:
        return 500 if path == "/flaky" and n % 3 == 0 else 200

    async with receiver(status) as rx:
        config = config_for(rx, tmp_path, limit=45, scheduled=True)
        n_events = 30
        async with running(config):
            events = [event(n) for n in range(n_events)]
            events[5]["record"]["Stage"] = "Negotiation"  # matches nothing
            await produce(config, *events)
            expected = {
                f"evt-{n}:r1:{hook}"
                for n in range(n_events)
                if n != 5
                for hook in ("Hook", "Flaky")
            }
            results = await wait_for_records(
                config,
                config.kafka.results_topic,
                lambda rs: set(finals(rs)) >= expected,
                timeout_s=45,
            )
            await asyncio.sleep(0.5)  # anything extra would show up now
            results = await read_all(config, config.kafka.results_topic)
        got = finals(results)
        assert set(got) == expected, set(got) ^ expected
        assert all(len(set(statuses)) == 1 for statuses in got.values()), got
        every = Counter(s for ss in got.values() for s in ss)
        assert every["quota_exceeded"] > 0
        assert every["delivered"] > 0
        assert sum(every.values()) == len(expected)
        assert {r["action_id"] for r in results} == expected
        assert len(rx.requests) == 45  # exactly the quota: retries count too


def poison_pills() -> list[tuple[str, bytes]]:
    """(what, value) of every poison pill of issue 5, in the order they are produced."""
    good = orjson.dumps(event("pp"))
    missing = event("pp-missing")
    del missing["occurred_at"]
    return [
        ("invalid JSON", b'{"event_id": "x",'),
        ("invalid UTF-8", good.replace(b"Deal pp", b"Deal \xff")),
        ("not an object", b'["evt-1"]'),
        ("nesting 100,000 deep", b"[" * 100_000 + b"]" * 100_000),
        ("integer of 5,000 digits", good.replace(b'"Amount":25000', b'"Amount":' + b"9" * 5000)),
        ("NaN", good.replace(b'"Amount":25000', b'"Amount":NaN')),
        ("Infinity", good.replace(b'"Amount":25000', b'"Amount":Infinity')),
        ("duplicate keys", good.replace(b'"Stage":', b'"Stage":"Lost","Stage":')),
        ("missing required field", orjson.dumps(missing)),
        ("wrong type", orjson.dumps(event("pp-type", record_id=["x"]))),
        ("unknown operation", orjson.dumps(event("pp-op", operation="merge"))),
        ("over the size limit", orjson.dumps(event("pp-big", record={"Notes": "x" * 70_000}))),
    ]


async def test_poison_pills_are_dead_lettered_and_good_events_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every poison pill of issue 5, each between two good events, in one partition.

    A template cannot fail at fire time once validated, so that case is forced: the
    real renderer is wrapped to fail for one record, as a corrupted template would.
    """
    render = CompiledWebhook.render

    def failing_render(self: CompiledWebhook, ctx: RenderContext) -> RenderedRequest:
        if ctx.record.get("Potential Name") == "explode":
            raise TemplateError("rendered URL contains '\\r'")
        return render(self, ctx)

    monkeypatch.setattr(CompiledWebhook, "render", failing_render)
    async with receiver() as rx:
        config = config_for(rx, tmp_path, limit=1000)
        config = replace(config, kafka=replace(config.kafka, max_event_bytes=64 * 1024))
        pills = poison_pills()
        values: list[bytes] = []
        for n, (_, pill) in enumerate(pills):
            values += [orjson.dumps(event(f"good{n}")), pill]
        values.append(orjson.dumps(event("explode", record={"Potential Name": "explode"})))
        values.append(orjson.dumps(event("last")))
        async with running(config):
            await produce(config, *values)
            expected = {f"evt-good{n}:r1:Hook" for n in range(len(pills))} | {"evt-last:r1:Hook"}
            results = await wait_for_records(
                config,
                config.kafka.results_topic,
                lambda rs: set(finals(rs)) >= expected | {"evt-explode:r1:Hook"},
            )
            letters = await wait_for_records(
                config, config.kafka.dlq_topic, lambda ds: len(ds) >= len(pills) + 1
            )
        got = finals(results)
        assert all(got[a] == ["delivered"] for a in expected), got
        assert got["evt-explode:r1:Hook"] == ["failed"]
        assert len(rx.requests) == len(expected)
        by_offset = {d["source"]["offset"]: d for d in letters if d["action_id"] is None}
        assert len(by_offset) == len(pills)
        for n, (what, _) in enumerate(pills):
            letter = by_offset.get(2 * n + 1)  # good, pill, good, pill, ...
            assert letter is not None, f"{what}: no dead letter at offset {2 * n + 1}"
            assert letter["error_code"] == "internal_process_error", what
            assert letter["source"]["topic"] == config.kafka.events_topic
            assert (letter["event"] is None) != (letter["raw"] is None), what
        (fire_letter,) = [d for d in letters if d["action_id"] is not None]
        assert fire_letter["action_id"] == "evt-explode:r1:Hook"
        assert "template failed" in fire_letter["message"]
        assert fire_letter["source"]["offset"] == 2 * len(pills)
