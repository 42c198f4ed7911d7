"""Which version of the record is sent (SPEC §5), end to end on the real broker: a
create and four edits of one record, produced together, send five instant requests,
each with its own event's data; a scheduled reminder carries the latest."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
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
from tests.support import event, produce, receiver, running, unique_kafka, wait_for_records

pytestmark = pytest.mark.kafka

WON = AllOf((Condition("Stage", "is", "Closed Won"),))


def config(url: str, tmp_path: Path) -> Config:
    hook = Webhook(
        name="Hook",
        url=f"{url}/hook",
        module="Potentials",
        body=BodySpec(
            format="json",
            template='{"event": "${Potentials.Potential Name}", "amount": ${Potentials.Amount}}',
        ),
    )
    return Config(
        kafka=unique_kafka(partitions=1),
        store=StoreSettings(path=str(tmp_path / "crmhooks.db")),
        delivery=DeliverySettings(allow_private_networks=True),
        orgs={"org-acme": OrgSettings("org-acme", users=100)},
        webhooks={"Hook": hook},
        rules=(
            Rule(id="won", module="Potentials", criteria=WON, instant="Hook"),
            # A reminder 3 s after the create: it renders what the record is then.
            Rule(
                id="remind",
                module="Potentials",
                trigger="create",
                criteria=WON,
                scheduled=(ScheduledSpec("Hook", "trigger", offset_ms=3000),),
            ),
        ),
    )


def version(n: int, amount: int, operation: str) -> dict[str, Any]:
    data = event(
        n,
        record_id="rec-1",
        operation=operation,
        record={"Potential Name": f"v{n}", "Amount": amount},
    )
    data["occurred_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return data


async def test_each_instant_request_carries_its_own_event_the_reminder_the_latest(
    tmp_path: Path,
) -> None:
    async with receiver() as rx:
        cfg = config(rx.url, tmp_path)
        async with running(cfg):
            versions = [version(1, 100, "create")]
            versions += [version(n, 100 * n, "edit") for n in range(2, 6)]
            await produce(cfg, *versions)  # one produce: read in one batch
            results = await wait_for_records(
                cfg,
                cfg.kafka.results_topic,
                lambda records: sum(r["status"] == "delivered" for r in records) >= 6,
            )
    bodies = {r.headers["webhook-id"]: orjson.loads(r.body) for r in rx.requests}
    assert bodies == {
        **{f"evt-{n}:won:Hook": {"event": f"v{n}", "amount": 100 * n} for n in range(1, 6)},
        # Scheduled by the create, fired 3 s later: the last edit's data.
        "evt-1:remind:Hook": {"event": "v5", "amount": 500},
    }
    assert len(rx.requests) == 6
    delivered = {r["action_id"] for r in results if r["status"] == "delivered"}
    assert delivered == set(bodies)
