"""repeat = "once" across processor restarts, and triggers, on the real broker and store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from crmhooks.config import Config, config_from_mapping
from tests.support import (
    Receiver,
    event,
    produce,
    receiver,
    running,
    unique_kafka,
    wait_for_records,
    with_kafka,
)

pytestmark = pytest.mark.kafka

CLOSED_WON = {"all": [{"field": "Stage", "op": "is", "value": "Closed Won"}]}


def build_config(rx: Receiver, tmp_path: Path, rules: list[dict[str, Any]]) -> Config:
    """A config as an administrator writes it (validated), on topics of its own."""
    hook = {
        "url": "",
        "module": "Potentials",
        "entity_params": {"deal": "${Potentials.Potential Name}"},
    }
    raw = {
        "store": {"path": str(tmp_path / "crmhooks.db")},
        "delivery": {"allow_private_networks": True, "retry_delays_s": [0.2]},
        "orgs": [{"id": "org-acme", "users": 12, "time_zone": "Asia/Shanghai"}],
        "webhooks": [
            *(
                {**hook, "name": name, "url": f"{rx.url}/{name}"}
                for name in ("Closed", "StageMoved", "Deleted")
            ),
            {"name": "LeadIn", "url": f"{rx.url}/LeadIn", "module": "Leads"},
        ],
        "rules": rules,
    }
    return with_kafka(config_from_mapping(raw, {}), unique_kafka())


def delivered(event_id: str) -> Any:
    def check(records: list[dict[str, Any]]) -> bool:
        return any(r["event_id"] == event_id and r["status"] == "delivered" for r in records)

    return check


def ids_received(rx: Receiver, path: str) -> list[str]:
    return [r.headers["webhook-id"] for r in rx.on(path)]


async def handled(config: Config, sentinel: dict[str, Any]) -> None:
    """Produce a sentinel event of another record and wait for its delivery.

    Same key → same partition → processed after everything produced before it.
    """
    await produce(config, sentinel)
    await wait_for_records(config, config.kafka.results_topic, delivered(sentinel["event_id"]))


def closed_deal_sentinel(name: str) -> dict[str, Any]:
    return event(name, record_id=f"sentinel-{name}")


def lead_sentinel(name: str) -> dict[str, Any]:
    # A lead: no Potentials rule sees it, whatever its trigger.
    return event(name, module="Leads", record_id=f"sentinel-{name}", record={}, related={})


def deal(n: int, stage: str, previous_stage: str | None) -> dict[str, Any]:
    """An event of the one record under test, rec-D."""
    data = event(n, record_id="rec-D", record={"Stage": stage})
    if previous_stage is not None:
        data["operation"] = "edit"
        data["previous"] = {"Stage": previous_stage}
    return data


async def test_repeat_once_holds_across_restarts_and_rearms_after_criteria_stop(
    tmp_path: Path,
) -> None:
    async with receiver() as rx:
        rule = {
            "id": "once-closed",
            "module": "Potentials",
            "repeat": "once",
            "criteria": CLOSED_WON,
            "instant": "Closed",
        }
        config = build_config(rx, tmp_path, [rule])

        def sent_for_deal() -> list[str]:
            return [i for i in ids_received(rx, "/Closed") if not i.startswith("evt-s")]

        async with running(config):
            await produce(config, deal(1, "Closed Won", None))  # meets the criteria: sent
            await wait_for_records(config, config.kafka.results_topic, delivered("evt-1"))
        assert sent_for_deal() == ["evt-1:once-closed:Closed"]

        # A new process, the same store and group: the flag "met" was kept.
        async with running(config):
            await produce(config, deal(2, "Closed Won", "Closed Won"))  # still met: nothing
            await handled(config, closed_deal_sentinel("s2"))
            assert sent_for_deal() == ["evt-1:once-closed:Closed"]
            await produce(config, deal(3, "Negotiation", "Closed Won"))  # not met: nothing
            await handled(config, closed_deal_sentinel("s3"))
            assert sent_for_deal() == ["evt-1:once-closed:Closed"]

        # And again a new process: "not met" was kept too, so meeting them re-arms.
        async with running(config):
            await produce(config, deal(4, "Closed Won", "Negotiation"))
            await wait_for_records(config, config.kafka.results_topic, delivered("evt-4"))
            await handled(config, closed_deal_sentinel("s4"))
            results = await wait_for_records(
                config, config.kafka.results_topic, delivered("evt-s4")
            )

        assert sent_for_deal() == ["evt-1:once-closed:Closed", "evt-4:once-closed:Closed"]
        assert sorted(ids_received(rx, "/Closed")) == sorted(
            [f"evt-{n}:once-closed:Closed" for n in ("1", "4", "s2", "s3", "s4")]
        )
        # Events 2 and 3 created no action at all: no result of any status.
        assert {r["event_id"] for r in results} == {"evt-1", "evt-4", "evt-s2", "evt-s3", "evt-s4"}
        assert all(r["status"] == "delivered" for r in results)


async def test_field_update_and_delete_triggers_on_the_real_processor(tmp_path: Path) -> None:
    async with receiver() as rx:
        rules: list[dict[str, Any]] = [
            {
                "id": "stage-moved",
                "module": "Potentials",
                "trigger": "field_update",
                "fields": ["Stage"],
                "instant": "StageMoved",
            },
            {"id": "deleted", "module": "Deals", "trigger": "delete", "instant": "Deleted"},
            # Sentinels: any lead event reaches /LeadIn.
            {"id": "sentinel", "module": "Leads", "instant": "LeadIn"},
        ]
        config = build_config(rx, tmp_path, rules)
        amount_only = event("amount", record_id="rec-T", operation="edit", previous={"Amount": 1})
        stage = event("stage", record_id="rec-T", operation="edit", previous={"Stage": "Lost"})
        gone = event("gone", record_id="rec-T", operation="delete")
        async with running(config):
            await produce(config, amount_only)  # Stage not in previous: no field_update
            await handled(config, lead_sentinel("s1"))
            assert ids_received(rx, "/StageMoved") == []
            await produce(config, stage)
            await wait_for_records(config, config.kafka.results_topic, delivered("evt-stage"))
            # Sent before the delete arrives: rendered from that version of the record
            # (at fire time it is always the latest version seen).
            await produce(config, gone)
            await handled(config, lead_sentinel("s2"))
            await wait_for_records(config, config.kafka.results_topic, delivered("evt-gone"))

        assert ids_received(rx, "/StageMoved") == ["evt-stage:stage-moved:StageMoved"]
        assert ids_received(rx, "/Deleted") == ["evt-gone:deleted:Deleted"]
        assert ids_received(rx, "/LeadIn") == ["evt-s1:sentinel:LeadIn", "evt-s2:sentinel:LeadIn"]
        (moved,) = rx.on("/StageMoved")
        assert moved.body == b"deal=Deal%20stage"
