"""End to end on the real broker, a real SQLite file and a real HTTP receiver."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from crmhooks.config import (
    AllOf,
    BodySpec,
    Condition,
    Config,
    DeliverySettings,
    OrgSettings,
    Rule,
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

# The seed's first business scenario: the Zoho Creator sales-commission push.
SEED_XML = """<ZohoCreator><applicationlist><application name='sales-commissions'><formlist>
<form name='Commissions'><add>
<field name='Name'><value>${Potentials.Potential Name}</value></field>
<field name='Closed_Amount'><value>${Potentials.Amount}</value></field>
<field name='Closing_Date'><value>${Potentials.Closing Date}</value></field>
<field name='Customer_Name'><value>${Accounts.Account Name}</value></field>
<field name='Type_of_Business'><value>${Potentials.Type}</value></field>
<field name='Sales_Rep'><value>${Potentials.Potential Owner}</value></field>
</add></form></formlist></application></applicationlist></ZohoCreator>"""


def commission_config(rx: Receiver, tmp_path: Path) -> Config:
    webhook = Webhook(
        name="CreatorCommission",
        url=f"{rx.url}/api/xml/write",
        module="Potentials",
        body=BodySpec(format="xml", template=SEED_XML, param="XMLString"),
        custom_params={"apikey": "secret-key", "zc_ownername": "acme"},
        secret_params=frozenset({"apikey"}),
    )
    rule = Rule(
        id="commission-on-close",
        module="Potentials",
        trigger="create_or_edit",
        criteria=AllOf(
            (Condition("Type", "is", "New Business"), Condition("Stage", "is", "Closed Won"))
        ),
        instant="CreatorCommission",
    )
    return Config(
        kafka=unique_kafka(),
        store=StoreSettings(path=str(tmp_path / "crmhooks.db")),
        delivery=DeliverySettings(allow_private_networks=True, retry_delays_s=(0.2,)),
        orgs={"org-acme": OrgSettings("org-acme", users=12, time_zone="Asia/Shanghai")},
        webhooks={"CreatorCommission": webhook},
        rules=(rule,),
    )


def delivered(event_id: str) -> Any:
    def check(records: list[dict[str, Any]]) -> bool:
        return any(r["event_id"] == event_id and r["status"] == "delivered" for r in records)

    return check


def fields_of(body: bytes) -> dict[str, str]:
    form = parse_qs(body.decode(), keep_blank_values=True)
    root = ET.fromstring(form["XMLString"][0])
    return {f.attrib["name"]: (f.findtext("value") or "") for f in root.iter("field")}


async def test_qualifying_event_is_delivered_once_with_the_rendered_body(tmp_path: Path) -> None:
    async with receiver() as rx:
        config = commission_config(rx, tmp_path)
        tricky = "Wong & Sons <华南> \"quoted\" 'single'"
        async with running(config):
            await produce(config, event(1, related={"Accounts": {"Account Name": tricky}}))
            results = await wait_for_records(config, config.kafka.results_topic, delivered("evt-1"))
        assert len(rx.requests) == 1
        req = rx.requests[0]
        assert req.method == "POST"
        assert req.path == "/api/xml/write"
        assert req.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
        assert req.headers["webhook-id"] == "evt-1:commission-on-close:CreatorCommission"
        form = parse_qs(req.body.decode())
        assert form["apikey"] == ["secret-key"]
        assert form["zc_ownername"] == ["acme"]
        assert fields_of(req.body) == {
            "Name": "Deal 1",
            "Closed_Amount": "25000",
            "Closing_Date": "2026-11-30",
            "Customer_Name": tricky,
            "Type_of_Business": "New Business",
            "Sales_Rep": "Ana Silva",
        }
        (result,) = [r for r in results if r["event_id"] == "evt-1"]
        assert result["status"] == "delivered"
        assert result["http_status"] == 200
        assert result["attempt"] == 1
        assert result["kind"] == "instant"
        assert result["request"]["method"] == "POST"
        assert result["request"]["url"] == f"{rx.url}/api/xml/write"  # form params in the body


async def test_non_qualifying_event_sends_nothing(tmp_path: Path) -> None:
    async with receiver() as rx:
        config = commission_config(rx, tmp_path)
        async with running(config):
            await produce(
                config,
                event("no", record={"Stage": "Negotiation"}),
                event("sentinel"),  # same partition, after it: once it is done, so is "no"
            )
            results = await wait_for_records(
                config, config.kafka.results_topic, delivered("evt-sentinel")
            )
        assert [r["event_id"] for r in results] == ["evt-sentinel"]
        assert len(rx.requests) == 1
        assert fields_of(rx.requests[0].body)["Name"] == "Deal sentinel"


async def test_malformed_event_goes_to_the_dead_letter_topic_and_the_next_flows(
    tmp_path: Path,
) -> None:
    async with receiver() as rx:
        config = commission_config(rx, tmp_path)
        missing = event("missing")
        del missing["record_id"]
        async with running(config):
            await produce(config, b"{not json", missing, event("good"))
            await wait_for_records(config, config.kafka.results_topic, delivered("evt-good"))
            letters = await wait_for_records(
                config, config.kafka.dlq_topic, lambda rs: len(rs) >= 2
            )
        assert len(rx.requests) == 1
        raw_letter, missing_letter = sorted(letters, key=lambda d: d["source"]["offset"])
        assert raw_letter["error_code"] == "internal_process_error"
        assert "not valid JSON" in raw_letter["message"]
        assert raw_letter["event"] is None
        assert raw_letter["raw"] == "e25vdCBqc29u"  # base64 of b"{not json"
        assert raw_letter["source"]["topic"] == config.kafka.events_topic
        assert raw_letter["source"]["key"] == "org-acme"
        assert missing_letter["source"]["offset"] == raw_letter["source"]["offset"] + 1
        assert "record_id" in missing_letter["message"]
        assert missing_letter["event"]["event_id"] == "evt-missing"


async def test_restarted_processor_does_not_send_again(tmp_path: Path) -> None:
    async with receiver() as rx:
        config = commission_config(rx, tmp_path)
        async with running(config):
            await produce(config, event("first"))
            await wait_for_records(config, config.kafka.results_topic, delivered("evt-first"))
        async with running(config):
            await produce(config, event("second"))
            await wait_for_records(config, config.kafka.results_topic, delivered("evt-second"))
        names = [fields_of(r.body)["Name"] for r in rx.requests]
        assert names == ["Deal first", "Deal second"]
