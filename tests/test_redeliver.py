"""`crmhooks redeliver` (SPEC §11): the request's record, the owner's checks, and the
action sent again through the processor's parts (real SQLite, fake Kafka and
transport, a FakeClock)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from crmhooks.actions import Action
from crmhooks.app import Processor
from crmhooks.clock import FakeClock
from crmhooks.config import Config, config_from_mapping
from crmhooks.delivery import Outcome
from crmhooks.endpoints import Endpoint
from crmhooks.errors import CrmhooksError
from crmhooks.redeliver import (
    REDELIVER_HEADER,
    command_value,
    refusal,
    request_of,
    request_redelivery,
    store_file,
)
from crmhooks.store import Store, WriteBatch
from crmhooks.templates import RenderedRequest
from tests.fakes import NOW_MS, FakeKafka, Rec, fetched, rec, until

DAY_MS = 86_400_000


def config(tmp_path: Path, **delivery: Any) -> Config:
    return config_from_mapping(
        {
            "store": {"path": str(tmp_path / "s.db")},
            "delivery": {"retry_delays_s": [], "suspend_after_failed_actions": 0, **delivery},
            "orgs": [{"id": "org-acme", "users": 100}],
            "webhooks": [
                {
                    "name": "Hook",
                    "url": "http://receiver.test/hook",
                    "module": "Potentials",
                    "body": {"format": "json", "template": '{"a": ${Potentials.Amount}}'},
                }
            ],
            "rules": [{"id": "won", "module": "Potentials", "instant": "Hook"}],
        },
        {},
    )


class Receiver:
    """Refuses (503) until ``fixed``."""

    def __init__(self) -> None:
        self.fixed = False
        self.sent: list[tuple[str, bytes]] = []

    async def send(self, action_id: str, request: RenderedRequest, endpoint: Endpoint) -> Outcome:
        self.sent.append((action_id, request.body))
        if self.fixed:
            return Outcome(None, 200, None, 1.0, NOW_MS)
        return Outcome("server_error", 503, "HTTP 503 Service Unavailable", 1.0, NOW_MS)


@contextlib.asynccontextmanager
async def processor(
    tmp_path: Path, transport: Receiver, **delivery: Any
) -> AsyncIterator[tuple[Processor, FakeKafka]]:
    kafka = FakeKafka()
    async with Store(tmp_path / "s.db") as store:
        p = Processor(config(tmp_path, **delivery), store, transport, FakeClock(NOW_MS))
        p.attach(kafka, {0})
        fire = asyncio.create_task(p.dispatcher.loop())
        try:
            yield p, kafka
        finally:
            p.dispatcher.stop()
            fire.cancel()
            await asyncio.gather(fire, return_exceptions=True)
            await p.dispatcher.drain(5.0)


def results(kafka: FakeKafka) -> list[tuple[str, str, int]]:
    return [(r["action_id"], r["status"], r["attempt"]) for r in kafka.results if "status" in r]


def command(action: Action, offset: int) -> Rec:
    return Rec(0, offset, command_value(action), headers=[(REDELIVER_HEADER, b"x")])


async def stored(p: Processor, action_id: str) -> tuple[Action, str]:
    return (await p.store.actions_with_status([action_id]))[action_id]


async def test_a_failed_instant_action_is_sent_again_with_its_attempts_continued(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crmhooks")
    receiver = Receiver()
    aid = "evt-1:won:Hook"
    async with processor(tmp_path, receiver) as (p, kafka):
        await p._process_batch(fetched([rec(1, 10, record={"Amount": 7})]))
        await until(lambda: (aid, "failed", 1) in results(kafka), "it fails (no retry)")
        await until(lambda: p.dispatcher.idle and p.reporter.idle, "its report is written")
        action, status = await stored(p, aid)
        assert (status, action.attempt) == ("failed", 0)
        # An edit meanwhile: the redelivery still renders the action's own event.
        await p._process_batch(fetched([rec(2, 11, record_id="rec-1", record={"Amount": 8})]))
        receiver.fixed = True
        await p._process_batch(fetched([command(action, 12)]))
        await until(lambda: (aid, "delivered", 2) in results(kafka), "sent again, attempt 2")
        await until(lambda: p.dispatcher.idle and p.reporter.idle, "its report is written")
        again, status = await stored(p, aid)
        assert (status, again.attempt) == ("delivered", 1)
        # The same request read again (after a crash): nothing more is sent.
        await p._process_batch(fetched([command(action, 12)]))
        await asyncio.sleep(0.05)
    sends = [(a, orjson.loads(body)) for a, body in receiver.sent]
    assert sends == [(aid, {"a": 7}), ("evt-2:won:Hook", {"a": 8}), (aid, {"a": 7})]
    assert not [r for r in kafka.results if "error_code" in r]  # the requests: no dead letter
    assert f"redeliver {aid}: asked after attempt 1, done already" in caplog.text


async def test_the_owner_refuses_what_cannot_be_sent_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver()
    receiver.fixed = True
    async with processor(tmp_path, receiver) as (p, kafka):
        await p._process_batch(fetched([rec(1, 10)]))
        await until(lambda: results(kafka), "delivered at once")
        await until(lambda: p.dispatcher.idle and p.reporter.idle, "stored")
        action, status = await stored(p, "evt-1:won:Hook")
        assert status == "delivered"
        unknown = Action(**{**_fields(action), "action_id": "evt-9:won:Hook"})
        await p._process_batch(fetched([command(action, 11), command(unknown, 12)]))
        await asyncio.sleep(0.05)
        assert len(receiver.sent) == 1
    assert "kept no event to render" in caplog.text
    assert "no action 'evt-9:won:Hook' in the store" in caplog.text


def _fields(action: Action) -> dict[str, Any]:
    return {f: getattr(action, f) for f in action.__struct_fields__ if f != "record_key"}


def test_a_request_is_recognised_only_with_its_header_and_shape() -> None:
    value = b'{"crmhooks_command": "redeliver", "action_id": "a:b:c", "after_attempt": 1}'
    assert request_of(3, [(REDELIVER_HEADER, b"a:b:c")], value) == (3, "a:b:c", 1)
    assert request_of(3, [], value) is None
    assert request_of(3, [(REDELIVER_HEADER, b"")], b"{not json") is None
    assert request_of(3, [(REDELIVER_HEADER, b"")], b'{"action_id": "x"}') is None


async def test_a_poison_pill_with_a_header_is_still_a_dead_letter(tmp_path: Path) -> None:
    async with processor(tmp_path, Receiver()) as (p, kafka):
        await p._process_batch(
            fetched([Rec(0, 10, b"{not json", headers=[(REDELIVER_HEADER, b"x")])])
        )
        [letter] = kafka.results
        assert letter["error_code"] == "internal_process_error"


async def test_the_command_refuses_with_one_line_errors(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    with pytest.raises(CrmhooksError, match=r"^no store at .*s\.db: run redeliver where"):
        store_file(cfg)
    clock = FakeClock(NOW_MS)
    pending = _action("evt-1:won:Hook")
    purged = _action("evt-2:won:Hook")
    async with Store(tmp_path / "s.db", clock=clock) as store:
        await store.write(WriteBatch(new_actions=[pending]))
        await store.write(WriteBatch(done=[(purged, "failed", NOW_MS)]))
        clock.advance(8 * DAY_MS)
        await store.purge([0], before_ms=clock.now_ms() - 7 * DAY_MS)
    path = store_file(cfg)
    messages = {}
    for aid in ("evt-1:won:Hook", "evt-2:won:Hook"):
        with pytest.raises(CrmhooksError) as info:
            await request_redelivery(cfg, path, aid)
        messages[aid] = str(info.value)
    assert messages == {
        "evt-1:won:Hook": "action evt-1:won:Hook is still pending: it will be sent, "
        "nothing to redeliver",
        "evt-2:won:Hook": f"no action 'evt-2:won:Hook' in the store {path}: never created, or "
        "finished more than [store] finished_retention_s (7 days) ago and purged",
    }


async def test_a_scheduled_action_whose_snapshot_is_gone_is_refused(tmp_path: Path) -> None:
    action = _action("evt-1:r:Hook", kind="scheduled")
    async with Store(tmp_path / "s.db") as store:
        await store.write(WriteBatch(new_actions=[action]))
        await store.write(WriteBatch(finished=[(action.action_id, "delivered", NOW_MS)]))
        found = await refusal(store, action.action_id, 86400.0)
    assert not isinstance(found, str)
    assert found[1] == (
        "action evt-1:r:Hook (delivered): the snapshot of its record is purged "
        "(kept [store] finished_retention_s after the record was last seen)"
    )


def _action(action_id: str, kind: str = "instant") -> Action:
    return Action(
        action_id=action_id,
        event_id=action_id.split(":")[0],
        org_id="org-acme",
        module="Potentials",
        record_id="rec-1",
        rule_id="won",
        webhook="Hook",
        kind=kind,  # type: ignore[arg-type]
        slot=0 if kind == "instant" else 1,
        due_ms=NOW_MS,
        partition=0,
        source_offset=1,
    )
