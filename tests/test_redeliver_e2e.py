"""`crmhooks redeliver` end to end on the real broker (SPEC §11): an action that failed is
sent again once the receiver is fixed, as a new attempt of the same action id; its
result on the results topic."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from crmhooks.cli import main
from crmhooks.config import load_config
from tests.support import event, produce, receiver, running, unique_kafka, wait_for_records

pytestmark = pytest.mark.kafka

AID = "evt-1:won:Hook"


def config_file(tmp_path: Path, url: str) -> Path:
    k = unique_kafka(partitions=2)
    path = tmp_path / "crmhooks.toml"
    path.write_text(
        f"""
[kafka]
bootstrap_servers = "{k.bootstrap_servers}"
group_id = "{k.group_id}"
events_topic = "{k.events_topic}"
results_topic = "{k.results_topic}"
dlq_topic = "{k.dlq_topic}"
partitions = 2

[store]
path = "{tmp_path / "crmhooks.db"}"

[delivery]
allow_private_networks = true
retry_delays_s = [0.2]            # one retry, quickly: then the action is failed
suspend_after_failed_actions = 0

[[orgs]]
id = "org-acme"
users = 100

[[webhooks]]
name = "Hook"
url = "{url}/hook"
module = "Potentials"

  [webhooks.body]
  format = "json"
  template = '{{"deal": "${{Potentials.Potential Name}}"}}'

[[rules]]
id = "won"
module = "Potentials"
instant = "Hook"
""",
        encoding="utf-8",
    )
    return path


def final(status: str, attempt: int) -> Any:
    def check(records: list[dict[str, Any]]) -> bool:
        return any(
            r["action_id"] == AID and r["status"] == status and r["attempt"] == attempt
            for r in records
        )

    return check


async def test_a_failed_action_is_redelivered_once_the_receiver_is_fixed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixed = False

    def status_for(path: str, n: int) -> int:
        return 200 if fixed else 503

    async with receiver(status_for) as rx:
        path = config_file(tmp_path, rx.url)
        config = load_config(path, env={})
        async with running(config):
            await produce(config, event(1))
            await wait_for_records(config, config.kafka.results_topic, final("failed", 2))
            fixed = True
            code = await asyncio.to_thread(
                main, ["redeliver", "--config", str(path), "--action", AID]
            )
            out, err = capsys.readouterr()
            assert code == 0, err
            assert out.startswith(f"redelivery of {AID} requested: attempt 3 will be sent")
            results = await wait_for_records(
                config, config.kafka.results_topic, final("delivered", 3)
            )
            # Any finished action may be sent again, a delivered one too: attempt 4.
            code = await asyncio.to_thread(
                main, ["redeliver", "--config", str(path), "--action", AID]
            )
            assert code == 0
            await wait_for_records(config, config.kafka.results_topic, final("delivered", 4))
        code = await asyncio.to_thread(
            main, ["redeliver", "--config", str(path), "--action", "evt-404:won:Hook"]
        )
        _, err = capsys.readouterr()
    assert code == 1
    # (The processor, in this process, logged to stderr too: the command's line is last.)
    last = err.splitlines()[-1]
    assert last.startswith("crmhooks: no action 'evt-404:won:Hook' in the store ")
    # Every attempt with the same webhook-id; the redelivery rendered the same request.
    assert [r.headers["webhook-id"] for r in rx.requests] == [AID] * 4
    assert len({r.body for r in rx.requests}) == 1
    mine = [(r["status"], r["attempt"]) for r in results if r["action_id"] == AID]
    assert mine == [("retrying", 1), ("failed", 2), ("delivered", 3)]
