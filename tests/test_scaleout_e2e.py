"""Scale-out: a partition's timers, quota counts and rule state follow it to another machine.

Two processors with separate SQLite files (two machines) in one consumer group: what
the first stored comes to the second through the changelog topic.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

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


def machine_config(rx: Receiver, store: Path) -> Config:
    hook = Webhook(
        name="Hook",
        url=f"{rx.url}/hook",
        module="Potentials",
        body=BodySpec(format="json", template='{"deal": "${Potentials.Potential Name}"}'),
    )
    later = replace(hook, name="Later", url=f"{rx.url}/later")
    rule = Rule(
        id="r1",
        module="Potentials",
        repeat="once",
        criteria=AllOf((Condition("Stage", "is", "Closed Won"),)),
        instant="Hook",
        scheduled=(ScheduledSpec(webhook="Later", offset_ms=4000),),
    )
    return Config(
        kafka=unique_kafka(),
        store=StoreSettings(path=str(store)),
        delivery=DeliverySettings(allow_private_networks=True, retry_delays_s=(0.2,)),
        quota=QuotaSettings(daily_limit=10_000, per_user=6),
        orgs={"org-acme": OrgSettings("org-acme", users=1, time_zone="UTC")},
        webhooks={"Hook": hook, "Later": later},
        rules=(rule,),
    )


def finals(records: list[dict[str, Any]]) -> dict[str, str]:
    return {r["action_id"]: r["status"] for r in records if r["status"] in FINAL_STATUSES}


async def test_timers_quota_and_rule_state_move_to_a_new_machine(tmp_path: Path) -> None:
    async with receiver() as rx:
        first = machine_config(rx, tmp_path / "machine-a.db")
        async with running(first):
            await produce(first, event(1), event(2))
            await wait_for_records(
                first,
                first.kafka.results_topic,
                lambda rs: {"evt-1:r1:Hook", "evt-2:r1:Hook"} <= set(finals(rs)),
            )
        # Machine A is gone (stopped before the timers fall due); machine B has an
        # empty store of its own and the same group.
        second = replace(first, store=StoreSettings(path=str(tmp_path / "machine-b.db")))
        async with running(second):
            await produce(
                second,
                event(2, event_id="evt-2b", operation="edit", previous={"Amount": 1}),
                event(3),
                event(4),
            )
            results = await wait_for_records(
                second,
                second.kafka.results_topic,
                lambda rs: len(finals(rs)) >= 8,
                timeout_s=30,
            )
        got = finals(results)
        # The timers A scheduled fired on B.
        assert got["evt-1:r1:Later"] == "delivered"
        assert got["evt-2:r1:Later"] == "delivered"
        # repeat = "once": B knew record 2 had met the criteria already.
        assert not any(a.startswith("evt-2b:") for a in got)
        # Quota 6 a day: A sent 2; B sent 3 and 4 at once, then timers 1 and 2: the
        # timers of 3 and 4 are over it. B counted on from A's 2.
        assert got["evt-3:r1:Later"] == got["evt-4:r1:Later"] == "quota_exceeded"
        statuses = Counter(got.values())
        assert statuses == {"delivered": 6, "quota_exceeded": 2}, got
        assert len(rx.requests) == 6
