"""The demo driver: produce sample CRM events for both seed scenarios, show what happened,
where the metrics are, and an administrator alert of a suspended webhook."""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from crmhooks.config import Config, KafkaSettings, load_config
from crmhooks.kafka_io import ensure_topics, produce_records, read_topic

FINAL = {"delivered", "failed", "cancelled", "skipped", "quota_exceeded", "suspended"}
# config/demo.toml: the rule whose webhook (to a receiver that is down) gets suspended.
BROKEN_RULE, BROKEN_WEBHOOK = "erp-sync-on-close", "LegacyErp"
# Actions of each Closed Won deal (config/demo.toml): the commission app, the support
# desk (OAuth2) and the ERP at once, the SMS reminder 5 s later.
ACTIONS_PER_DEAL = 4
# The lines of a /metrics scrape the demo prints (what `curl ... | grep` would show).
SHOWN_FAMILIES = (
    "crmhooks_events_total",
    "crmhooks_actions_total",
    "crmhooks_delivery_seconds_count",
    "crmhooks_alerts_total",
    "crmhooks_suspended_webhooks",
)


def sample_events(run: str, now: datetime) -> list[tuple[str, bytes]]:
    """(description, value) of each sample event; each carries the run id (the
    event ids, the malformed one's bytes), so a run shows its own outcomes only.
    The last one is produced once the ERP webhook is suspended."""
    at = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    due = (now + timedelta(days=7)).strftime("%Y-%m-%d")

    def deal(n: int, stage: str, name: str, account: str) -> bytes:
        return orjson.dumps(
            {
                "event_id": f"demo-{run}-{n}",
                "org_id": "org-acme",
                "module": "Potentials",
                "operation": "create" if n != 3 else "edit",
                "occurred_at": at,
                "record_id": f"41508680000002240{n:02d}",
                "record": {
                    "Potential Name": name,
                    "Amount": 25000 + n,
                    "Stage": stage,
                    "Type": "New Business",
                    "Closing Date": due,
                    "Potential Owner": "Ana Silva",
                    "Payment Due": f"{due} 09:30",
                },
                "previous": {"Stage": "Negotiation"} if n == 3 else None,
                "related": {
                    "Accounts": {"Account Name": account},
                    "Contacts": {"Last Name": "Wong", "Mobile": "+8613800000000"},
                },
                "user": {"Last Name": "Silva", "Mobile": "+351900000000"},
                "organization": {"Company Name": "Acme"},
            }
        )

    return [
        (
            "a deal created as Closed Won / New Business (commission, portal, then the SMS)",
            deal(1, "Closed Won", "Big deal", "Acme & Sons <华南分公司>"),
        ),
        (
            "a deal still in Negotiation (no rule matches: nothing is sent)",
            deal(2, "Negotiation", "Small deal", "Beta Ltd"),
        ),
        (
            "a malformed event (not JSON: goes to the dead-letter topic)",
            f"{{not json, demo run {run}}}".encode(),
        ),
        (
            "a deal edited to Closed Won (the next good event still flows)",
            deal(3, "Closed Won", 'Deal "Q4" & more', "Gamma GmbH"),
        ),
        (
            "a deal closed once the ERP webhook is suspended (nothing more goes to the ERP)",
            deal(5, "Closed Won", "Late deal", "Delta SA"),
        ),
    ]


async def demo(config: Config, config_path: str, wait_s: float) -> int:
    k = config.kafka
    run = uuid.uuid4().hex[:8]
    admin = _admin_url(config)
    if admin is not None:
        print(f"\n== the processor's metrics: {admin}/metrics (probes: /healthz, /readyz) ==")
        print(f"   try it while the demo runs: curl -s {admin}/metrics | grep crmhooks_actions")
        await _until(lambda: _get(f"{admin}/readyz"), 200, wait_s, "the processor is ready")
        await _lift_earlier_suspension(admin, config_path, wait_s)
    *events, late = sample_events(run, datetime.now(UTC))
    print(f"\n== producing {len(events)} sample events to {k.events_topic} (run {run}) ==")
    for i, (what, _) in enumerate(events, 1):
        print(f"  {i}. {what}")
    print(
        f"  (both Closed Won deals also go to {BROKEN_WEBHOOK}, whose receiver is down: it "
        "fails, its retry 2 s later fails, the webhook is suspended and the administrator "
        "alerted: watch for 'ADMINISTRATOR ALERT' from the receiver)"
    )
    await ensure_topics(k, [k.events_topic, k.results_topic, k.dlq_topic], k.partitions)
    await produce_records(k, [(k.events_topic, b"org-acme", value) for _, value in events])
    print(f"\n== waiting up to {wait_s:.0f} s for every action to reach a final status ==\n")
    prefix = f"demo-{run}-"
    results = await _until_final(config, prefix, 2 * ACTIONS_PER_DEAL, wait_s)
    print(f"\n== then: {late[0]} ==\n")
    await produce_records(k, [(k.events_topic, b"org-acme", late[1])])
    results = await _until_final(config, prefix, 3 * ACTIONS_PER_DEAL, wait_s)
    # This run's: the malformed event's bytes, or an event of this run (a dead letter
    # left by an earlier run, read only now, is not this run's).
    letters = [
        d
        async for d in _records(k, k.dlq_topic)
        if (d.get("raw") is not None and f"demo run {run}".encode() in base64.b64decode(d["raw"]))
        or str((d.get("event") or {}).get("event_id", "")).startswith(prefix)
    ]
    print(f"\n== result records on {k.results_topic} (one per state change of an action) ==")
    print(f"  {'status':<10} {'kind':<9} {'webhook':<18} {'due at (UTC)':<13} {'sent at':<13} HTTP")
    for r in results:
        detail = r.get("error_class") or r.get("reason") or ""
        http = r.get("http_status") or "-"
        print(
            f"  {r['status']:<10} {r['kind']:<9} {r['webhook']:<18} {_clock(r['due_at']):<13} "
            f"{_clock(r['sent_at']):<13} {http!s:<4} {detail}  event {r['event_id']}"
        )
    print(f"\n== dead letters on {k.dlq_topic} ==")
    for d in letters:
        src = d["source"]
        print(
            f"  {d['error_code']}: {d['message']}  (partition {src['partition']}, "
            f"offset {src['offset']})"
        )
    alerts = 0.0
    if admin is not None:
        alerts = await _show_metrics(admin)
    delivered = sum(1 for r in results if r["status"] == "delivered")
    suspended = sum(1 for r in results if r["status"] == "suspended")
    print(
        f"\n{delivered} webhooks delivered, {len(letters)} dead letter(s), {suspended} action(s) "
        f"not sent to the suspended {BROKEN_WEBHOOK}, {alerts:.0f} administrator alert(s) sent."
    )
    told = admin is None or alerts >= 1
    # Three deals: all but the ERP's actions delivered (9), a little slack as before.
    return 0 if delivered >= 8 and letters and suspended and told else 1


async def _until_final(
    config: Config, prefix: str, actions: int, wait_s: float
) -> list[dict[str, Any]]:
    """This run's result records, once ``actions`` actions have each a final status (or
    ``wait_s`` passed)."""
    k = config.kafka
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        results = [
            r
            async for r in _records(k, k.results_topic)
            if str(r.get("event_id", "")).startswith(prefix)
        ]
        last: dict[str, str] = {r["action_id"]: r["status"] for r in results}
        if len(last) >= actions and all(s in FINAL for s in last.values()):
            break
        await asyncio.sleep(1.0)
    return results


def _admin_url(config: Config) -> str | None:
    address = config.admin.address
    if address is None:
        return None
    host, port = address
    # A wildcard listen (a container's 0.0.0.0) is reached here on loopback.
    host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    return f"http://{host}:{port}"


async def _get(url: str) -> tuple[int, str]:
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            return resp.status, await resp.text()
    except aiohttp.ClientError as exc:
        return 0, str(exc)


async def _until(
    probe: Callable[[], Awaitable[tuple[int, str]]], status: int, wait_s: float, what: str
) -> tuple[int, str]:
    deadline = time.monotonic() + wait_s
    got: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        got = await probe()
        if got[0] == status:
            return got
        await asyncio.sleep(0.5)
    raise SystemExit(f"demo: gave up waiting {wait_s:.0f} s until {what}: {got[1].strip()}")


async def _gauge(admin: str, family: str) -> float:
    _, text = await _get(f"{admin}/metrics")
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == family
    )


async def _lift_earlier_suspension(admin: str, config_path: str, wait_s: float) -> None:
    """An earlier demo run left LegacyErp suspended (restored from the changelog topic):
    lift it as an operator would, so this run shows the suspension and its alert again."""
    if await _gauge(admin, "crmhooks_suspended_webhooks") == 0:
        return
    print(
        f"\n== {BROKEN_WEBHOOK} is still suspended from an earlier demo run: "
        f"crmhooks resume --rule {BROKEN_RULE} --webhook {BROKEN_WEBHOOK} =="
    )
    resume = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crmhooks.cli", "resume", "--config", config_path,
        "--rule", BROKEN_RULE, "--webhook", BROKEN_WEBHOOK,
    )  # fmt: skip
    await resume.wait()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:  # the processor notices within a second
        if await _gauge(admin, "crmhooks_suspended_webhooks") == 0:
            return
        await asyncio.sleep(0.5)


async def _show_metrics(admin: str) -> float:
    """Print this run's counts as /metrics shows them; the alerts sent."""
    status, text = await _get(f"{admin}/metrics")
    print(f"\n== a scrape of {admin}/metrics (HTTP {status}): these families, zeros left out ==")
    pattern = "|".join(name.removeprefix("crmhooks_") for name in SHOWN_FAMILIES)
    print(f"  $ curl -s {admin}/metrics | grep -E '^crmhooks_({pattern})' | grep -v ' 0.0$'")
    for line in text.splitlines():
        if line.startswith(SHOWN_FAMILIES) and not line.endswith((" 0.0", " 0")):
            print(f"  {line}")
    alerts = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "crmhooks_alerts_total" and sample.labels.get("outcome") == "sent":
                alerts += sample.value
    return alerts


def _clock(rfc3339: str | None) -> str:
    """``2026-11-28T09:00:00.012Z`` → ``09:00:00.012`` (the demo runs within a minute)."""
    return rfc3339[11:23] if rfc3339 else "-"


async def _records(kafka: KafkaSettings, topic: str) -> Any:
    async for rec in read_topic(kafka, topic, idle_timeout_s=1.0):
        if rec.value is not None:
            yield orjson.loads(rec.value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="config/demo.toml")
    parser.add_argument("--wait-s", type=float, default=45.0)
    args = parser.parse_args()
    sys.exit(asyncio.run(demo(load_config(args.config), args.config, args.wait_s)))


if __name__ == "__main__":
    main()
