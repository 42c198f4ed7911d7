"""Secrets through the processor (SPEC §3.1): a receiver echoing every secret it got, in
its body, its status reason and a redirect's Location, and a template error, leave no
secret in the results, the dead letters, the logs, the store file or the changelog."""

from __future__ import annotations

import asyncio
import base64
import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit

import pytest
from aiohttp import web

from crmhooks.config import (
    BasicAuth,
    BodySpec,
    Config,
    DeliverySettings,
    OrgSettings,
    Rule,
    StoreSettings,
    Webhook,
)
from crmhooks.kafka_io import read_topic
from tests.net_support import recorder
from tests.support import event, produce, running, unique_kafka, wait_for_records

pytestmark = pytest.mark.kafka

# Each from another place of the config; ASCII, so a status reason can carry them.
BODY_KEY = "body-key-SECRET-1"  # ${env:SMS_API_KEY} inside the XML body
HEADER_KEY = "header-key-SECRET-2"  # ${env:HEADER_KEY} in a header
QUERY_KEY = "query/key SECRET+3"  # ${env:QUERY_KEY} in the URL's query
CUSTOM_KEY = "custom-key-SECRET-4"  # a custom parameter (all are secrets)
LITERAL_HEADER = "literal-header-SECRET-5"  # a header value written in the config
PASSWORD = "basic-pass-SECRET-6"  # [webhooks.auth] basic password
URL_PASSWORD = "url-pass-SECRET-7"  # the URL's user:password
SECRETS = [BODY_KEY, HEADER_KEY, QUERY_KEY, CUSTOM_KEY, LITERAL_HEADER, PASSWORD, URL_PASSWORD]


def forms(secret: str) -> list[str]:
    """A secret as it may appear in a text: as is, percent-encoded, in a Basic value."""
    basic = base64.b64encode(f"ops:{secret}".encode()).decode()
    return [secret, quote(secret, safe=""), quote_plus(secret), basic]


async def echo(request: web.Request) -> web.StreamResponse:
    """Repeats every secret it got: in its body, its status reason, a Location."""
    got = " ".join(
        [*request.headers.values(), str(request.url), (await request.text()).replace("\n", " ")]
    )
    if request.path == "/reason":
        return web.Response(status=403, reason=f"Forbidden {got}"[:2000], text=got)
    if request.path == "/redirect":
        return web.Response(status=302, headers={"Location": f"https://x.example/?{got}"[:2000]})
    if request.path == "/down":
        return web.Response(status=503, text=got)
    return web.Response(text=got)


def hook(name: str, url: str, **kwargs: Any) -> Webhook:
    return Webhook(
        name=name,
        url=url + "?k=${env:QUERY_KEY}",
        module="Potentials",
        body=BodySpec(format="xml", template="<sms><apikey>${env:SMS_API_KEY}</apikey></sms>"),
        custom_params={"apikey": CUSTOM_KEY},
        headers={
            "X-Api-Key": "${env:HEADER_KEY}",
            "X-Static": LITERAL_HEADER,
            "X-Deal": "${Potentials.Potential Name}",
        },
        env_values={
            "env:QUERY_KEY": QUERY_KEY,
            "env:SMS_API_KEY": BODY_KEY,
            "env:HEADER_KEY": HEADER_KEY,
        },
        **kwargs,
    )


def secrets_config(base: str, tmp_path: Path) -> Config:
    # Each webhook its own rule (one instant action each), all fired by one event.
    with_url_password = base.replace("http://", f"http://ops:{URL_PASSWORD}@")
    webhooks = {
        "Body": hook("Body", f"{with_url_password}/body"),
        "Reason": hook("Reason", f"{base}/reason", auth=BasicAuth("ops", PASSWORD)),
        "Redirect": hook("Redirect", f"{with_url_password}/redirect"),
        "Down": hook("Down", f"{base}/down", auth=BasicAuth("ops", PASSWORD)),
    }
    rules = tuple(
        Rule(id=f"r-{name.lower()}", module="Potentials", instant=name) for name in webhooks
    )
    return Config(
        kafka=unique_kafka(partitions=1),
        store=StoreSettings(path=str(tmp_path / "crmhooks.db")),
        delivery=DeliverySettings(allow_private_networks=True, retry_delays_s=(0.2,)),
        orgs={"org-acme": OrgSettings("org-acme", users=12)},
        webhooks=webhooks,
        rules=rules,
    )


def finished(count: int) -> Any:
    final = {"delivered", "failed"}
    return lambda records: sum(r["status"] in final for r in records) >= count


async def test_echoed_secrets_reach_no_result_dead_letter_log_store_or_changelog(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="crmhooks")
    async with recorder(echo) as rec:
        config = secrets_config(f"http://127.0.0.1:{rec.port}", tmp_path)
        async with running(config):
            await produce(config, event(1))
            # A header value with a line break from the record: a template error.
            await produce(config, event(2, record={"Potential Name": "two\r\nX-Evil: 1"}))
            results = await wait_for_records(config, config.kafka.results_topic, finished(8))
            letters = await wait_for_records(
                config, config.kafka.dlq_topic, lambda records: len(records) >= 4
            )
    # Sent for real: the receiver got every secret where the config put it.
    body_requests = [s for s in rec.seen if urlsplit(s.path).path == "/body"]
    assert body_requests
    first = body_requests[0]
    assert ET.fromstring(first.body).findtext("apikey") == BODY_KEY
    assert first.headers["X-Api-Key"] == HEADER_KEY
    assert first.headers["X-Static"] == LITERAL_HEADER
    assert parse_qsl(urlsplit(first.path).query) == [("k", QUERY_KEY), ("apikey", CUSTOM_KEY)]
    reason_request = next(s for s in rec.seen if s.path.startswith("/reason"))
    assert reason_request.headers["Authorization"] == "Basic " + base64.b64encode(
        f"ops:{PASSWORD}".encode()
    ).decode("ascii")

    by = {(r["webhook"], r["event_id"], r["status"]): r for r in results}
    assert by[("Body", "evt-1", "delivered")]["response_excerpt"]  # the echo, scrubbed
    assert by[("Reason", "evt-1", "failed")]["error"].startswith("HTTP 403 Forbidden")
    assert "redirect to https://x.example/" in by[("Redirect", "evt-1", "failed")]["error"]
    shown_url = by[("Body", "evt-1", "delivered")]["request"]["url"]
    assert shown_url == (f"http://ops:***@127.0.0.1:{rec.port}/body?k=%2A%2A%2A&apikey=***")
    errors = [d for d in letters if d["error_code"] == "internal_process_error"]
    assert {d["webhook"] for d in errors} == {"Body", "Reason", "Redirect", "Down"}
    assert all("header X-Deal" in d["message"] for d in errors)

    changelog = []
    async for r in read_topic(config.kafka, config.kafka.changelog, idle_timeout_s=1.0):
        changelog.append((r.key or b"") + b" " + (r.value or b""))
    assert changelog
    store_bytes = await asyncio.to_thread(
        lambda: b"".join(p.read_bytes() for p in sorted(tmp_path.glob("crmhooks.db*")))
    )
    logs = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("crmhooks"))
    assert "failed on attempt" in logs  # the failures were logged, with their errors
    texts = {
        "results": repr(results),
        "dead letters": repr(letters),
        "logs": logs,
        "changelog": repr(changelog),
        "store": store_bytes.decode("utf-8", "replace"),
    }
    for where, text in texts.items():
        for secret in SECRETS:
            for form in forms(secret):
                assert form not in text, (where, secret, form)
