"""JSON logs of a real ``crmhooks run`` (SPEC §12): every line of its stderr is one JSON
object; lines about an action or an event carry its ids; a field name with a newline
in an event and a receiver's reason phrase with ESC come out escaped."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from crmhooks.config import Config
from crmhooks.kafka_io import ensure_topics
from tests.crash_support import ProcessorProcess
from tests.support import event, produce, receiver, unique_kafka, wait_for_records

pytestmark = pytest.mark.kafka

REASON = b"Bad\x1b[31m Gateway"  # the receiver's reason phrase: ESC, as sent
EVIL_FIELD = "Evil\nINFO crmhooks.app: forged line \x1b[2J"
CONTROLS_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@asynccontextmanager
async def escaping_receiver() -> AsyncIterator[str]:
    """Answers every request ``500 Bad<ESC>[31m Gateway``, then closes the connection."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        if length:
            await reader.readexactly(int(length.group(1)))
        writer.write(
            b"HTTP/1.1 500 " + REASON + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def config_toml(cfg: Config, store: Path, hook_url: str, alerts_url: str) -> str:
    k = cfg.kafka
    return f"""
[kafka]
bootstrap_servers = "{k.bootstrap_servers}"
group_id = "{k.group_id}"
events_topic = "{k.events_topic}"
results_topic = "{k.results_topic}"
dlq_topic = "{k.dlq_topic}"

[store]
path = "{store}"

[delivery]
allow_private_networks = true
retry_delays_s = []

[log]
format = "json"
level = "INFO"

[alerts]
webhook = "OpsAlerts"

[[orgs]]
id = "org-acme"
users = 10

[[webhooks]]
name = "Hook"
url = "{hook_url}/hook"
module = "Potentials"

[[webhooks]]
name = "OpsAlerts"
url = "{alerts_url}/alerts"
module = "Potentials"

[[rules]]
id = "won"
module = "Potentials"
criteria = {{ all = [ {{ field = "Stage", op = "is", value = "Closed Won" }} ] }}
instant = "Hook"
"""


async def test_a_json_log_parses_line_by_line_with_ids_and_escapes(tmp_path: Path) -> None:
    cfg = Config(kafka=unique_kafka())
    k = cfg.kafka
    await ensure_topics(k, [k.events_topic, k.results_topic, k.dlq_topic], 3)
    log_path = tmp_path / "processor.log"
    async with escaping_receiver() as hook_url, receiver() as ops:
        config_path = tmp_path / "crmhooks.toml"
        config_path.write_text(config_toml(cfg, tmp_path / "store.db", hook_url, ops.url))
        proc = ProcessorProcess(config_path, log_path, k.bootstrap_servers)
        await proc.start()
        try:
            poison = event("poison")
            poison["record"][EVIL_FIELD] = {"an": "object"}  # not a field value: a dead letter
            await produce(cfg, event(1), poison)
            await wait_for_records(cfg, k.results_topic, lambda rs: len(rs) == 1)
            await wait_for_records(cfg, k.dlq_topic, lambda rs: len(rs) == 1)
            await asyncio.wait_for(ops.arrived.wait(), 30)  # the alert of the suspension
            assert await proc.terminate(30) == 0
        finally:
            await proc.close()

    raw = log_path.read_text(encoding="utf-8")
    assert raw.endswith("\n")
    lines = raw[:-1].split("\n")
    for line in lines:
        assert CONTROLS_RE.search(line) is None, line  # nothing raw: no ESC, no newline
    records: list[dict[str, Any]] = [json.loads(line) for line in lines]  # each one object
    for record in records:
        assert {"ts", "level", "logger", "msg"} <= set(record)

    def the_line(prefix: str) -> dict[str, Any]:
        [found] = [r for r in records if r["msg"].startswith(prefix)]
        return found

    failed = the_line("action evt-1:won:Hook failed on attempt 1")
    assert failed["level"] == "WARNING"
    assert (failed["org_id"], failed["event_id"], failed["action_id"]) == (
        "org-acme",
        "evt-1",
        "evt-1:won:Hook",
    )
    assert (failed["rule_id"], failed["webhook"]) == ("won", "Hook")
    # The reason phrase as the transport escaped it: ESC shown as \x1b, never sent raw.
    assert failed["msg"].endswith("HTTP 500 Bad\\x1b[31m Gateway")

    suspended = the_line("webhook Hook of rule won suspended for org-acme")
    assert (suspended["org_id"], suspended["action_id"]) == ("org-acme", "evt-1:won:Hook")

    alert = the_line("alert webhook_suspended sent")
    assert (alert["org_id"], alert["rule_id"], alert["webhook"]) == ("org-acme", "won", "Hook")

    letter = the_line("dead letter: partition")
    assert (letter["org_id"], letter["event_id"]) == ("org-acme", "evt-poison")
    assert isinstance(letter["partition"], int)
    assert isinstance(letter["offset"], int)
    # The field name's newline and ESC are in the message, escaped by JSON in the line.
    assert EVIL_FIELD in letter["msg"]
    assert "\\nINFO crmhooks.app: forged line \\u001b[2J" in raw
    assert [r for r in records if r["msg"].startswith("INFO crmhooks.app: forged")] == []
    assert orjson.loads(ops.on("/alerts")[0].body)["type"] == "webhook_suspended"
