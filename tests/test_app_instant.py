"""Instant actions are sent before they are stored: one row once finished, commits after.

The processor runs against a real SQLite store, a fake Kafka (commits, produces,
pause/resume recorded) and a fake transport that answers when the test says.
Time is a FakeClock: the deadline that stores slow actions is reached by advancing it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from crmhooks import checkpoint as checkpoint_module
from crmhooks.app import FETCH_MAX_RECORDS, FETCH_MAX_RECORDS_IGNORING, Processor
from crmhooks.checkpoint import INSTANT_COMMIT_WAIT_MS
from crmhooks.clock import FakeClock
from crmhooks.config import Config, config_from_mapping
from crmhooks.delivery import Outcome
from crmhooks.endpoints import Endpoint
from crmhooks.errors import StoreError
from crmhooks.kafka_io import Fetched
from crmhooks.store import Store, WriteBatch
from crmhooks.templates import RenderedRequest
from tests.fakes import NOW_MS, FakeKafka, GatedTransport, Rec, fetched, rec, until
from tests.support import event


def config(
    quota: dict[str, int] | None = None,
    per_host: int | None = None,
    url: str = "http://receiver.test/hook",
) -> Config:
    return config_from_mapping(
        {
            **({"quota": quota} if quota is not None else {}),
            **({"delivery": {"max_in_flight_per_host": per_host}} if per_host else {}),
            "orgs": [{"id": "org-acme", "users": 100}],
            "webhooks": [
                {
                    "name": "Hook",
                    "url": url,
                    "module": "Potentials",
                    "body": {"format": "json", "template": '{"d":"${Potentials.Potential Name}"}'},
                }
            ],
            "rules": [
                {
                    "id": "won",
                    "module": "Potentials",
                    "criteria": {"all": [{"field": "Stage", "op": "is", "value": "Closed Won"}]},
                    "instant": "Hook",
                }
            ],
        },
        {},
    )


@contextlib.asynccontextmanager
async def processor(
    tmp_path: Path,
    transport: GatedTransport,
    quota: dict[str, int] | None = None,
    per_host: int | None = None,
    url: str = "http://receiver.test/hook",
) -> AsyncIterator[tuple[Processor, FakeKafka, FakeClock]]:
    kafka = FakeKafka()
    clock = FakeClock(NOW_MS)
    async with Store(tmp_path / "s.db") as store:
        store.changelog = kafka.produce_changelog
        p = Processor(config(quota, per_host, url), store, transport, clock)
        p.attach(kafka, {0, 1})
        loops = [
            asyncio.create_task(p.dispatcher.loop()),
            asyncio.create_task(p.checkpoint.deadline_loop()),
        ]
        try:
            yield p, kafka, clock
        finally:
            p.dispatcher.stop()
            transport.gate.set()  # requests still held are answered, so their tasks end
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await p.dispatcher.drain(5.0)


def fires_over(p: Processor) -> bool:
    """No action being fired, nor an attempt's report being written."""
    return p.dispatcher.idle and p.reporter.idle


async def send_two(p: Processor, transport: GatedTransport) -> None:
    """Events 1 and 2 (offsets 10, 11) read; their requests sent, not yet answered."""
    await p._process_batch(fetched([rec(1, 10), rec(2, 11)]))
    await until(lambda: len(transport.sent) == 2, "both requests are sent")


async def rows(store: Store, table: str) -> list[tuple[Any, ...]]:
    column = "status" if table == "actions" else "record_key"
    async with store.conn.execute(f"SELECT action_id, {column} FROM {table}") as cur:
        return [tuple(r) async for r in cur]


async def test_a_delivered_instant_action_is_stored_once_finished(tmp_path: Path) -> None:
    transport = GatedTransport(open_now=False)
    async with processor(tmp_path, transport) as (p, kafka, _):
        await p._process_batch(fetched([rec(1, 10)]))
        await until(lambda: transport.sent, "the request is sent")
        # Sent, not stored, not committed: a crash now reads the event again.
        assert await rows(p.store, "actions") == []
        assert kafka.committed == {}
        transport.gate.set()
        await until(lambda: kafka.committed == {0: 11}, "the offset is committed")
        assert await rows(p.store, "actions") == [("evt-1:won:Hook", "delivered")]
        async with p.store.conn.execute("SELECT count(*) FROM records") as cur:
            assert await cur.fetchone() == (0,)  # no snapshot for an instant-only rule
        # One changelog record for the action (its final row, in a "d" record of the
        # transaction's actions finished at their first write), none for a snapshot
        # (besides the day's quota count, written a block at a time).
        assert kafka.changelog_keys == [b"q\x1forg-acme\x1f2025-11-28", b"d\x1fevt-1:won:Hook"]
        assert [r["status"] for r in kafka.results] == ["delivered"]
        assert p.stats["results"] == 1  # counted where instant results are produced
        assert p.checkpoint.unstored_ids() == []
        # Read again (a crash after the commit was lost): finished, never sent again.
        await p._process_batch(fetched([rec(1, 10)]))
        await asyncio.sleep(0.02)
        assert transport.sent == ["evt-1:won:Hook"]


async def test_a_repeated_key_refuses_an_event_a_rule_acts_on_and_no_other(
    tmp_path: Path,
) -> None:
    """The rule wants Closed Won. Read last, Closed Won is refused: a dead letter, no
    request. Stage repeated but never Closed Won: consumed, no letter, no request."""
    transport = GatedTransport()
    acted = orjson.dumps(event(1)).replace(b'"Stage":', b'"Stage":"Lost","Stage":')
    ignored = orjson.dumps(event(2, record={"Stage": "Lost"})).replace(
        b'"Stage":', b'"Stage":"Closed Won","Stage":'
    )
    async with processor(tmp_path, transport) as (p, kafka, _):
        await p._process_batch(fetched([Rec(0, 10, acted), Rec(0, 11, ignored)]))
        await until(lambda: kafka.committed == {0: 12}, "the offsets are committed")
        assert transport.sent == []
        [letter] = kafka.results
        assert letter["error_code"] == "internal_process_error"
        assert letter["source"]["offset"] == 10
        assert letter["message"] == "invalid event: duplicate key 'Stage' in $.record"


async def test_a_dot_segment_from_a_value_is_a_dead_letter_and_sends_nothing(
    tmp_path: Path,
) -> None:
    """Issue 26.6: "/deals/../hook" would reach another path of the receiver."""
    transport = GatedTransport()
    dots = orjson.dumps(event(1, record={"Potential Name": ".."}))
    url = "http://receiver.test/deals/${Potentials.Potential Name}/hook"
    async with processor(tmp_path, transport, url=url) as (p, kafka, _):
        await p._process_batch(fetched([Rec(0, 10, dots), rec(2, 11)]))
        await until(lambda: kafka.committed == {0: 12}, "the offsets are committed")
        assert transport.sent == ["evt-2:won:Hook"]
        [letter] = [r for r in kafka.results if "error_code" in r]
        assert letter["error_code"] == "internal_process_error"
        assert letter["action_id"] == "evt-1:won:Hook"
        assert letter["source"]["offset"] == 10
        assert "template failed: webhook Hook: " in letter["message"]
        assert "'..'" in letter["message"]
        assert "dot segment" in letter["message"]
        final = {r["action_id"]: r["status"] for r in kafka.results if "status" in r}
        assert final == {"evt-1:won:Hook": "failed", "evt-2:won:Hook": "delivered"}


async def test_commits_stay_in_order_behind_an_unfinished_action(tmp_path: Path) -> None:
    transport = GatedTransport(open_now=False)
    async with processor(tmp_path, transport) as (p, kafka, _):
        await p._process_batch(fetched([rec(1, 10, partition=0)]))
        await until(lambda: transport.sent, "the first request is sent")
        await p._process_batch(fetched([Rec(1, 7, b'{"not": "an event"}')]))  # nothing to send
        await asyncio.sleep(0.02)
        assert kafka.committed == {}  # partition 1 waits behind partition 0's earlier batch
        transport.gate.set()
        await until(lambda: kafka.committed == {0: 11, 1: 8}, "both committed")


async def test_an_action_unfinished_past_the_deadline_is_stored_as_pending(
    tmp_path: Path,
) -> None:
    transport = GatedTransport(open_now=False)
    async with processor(tmp_path, transport) as (p, kafka, clock):
        await send_two(p, transport)
        clock.advance(INSTANT_COMMIT_WAIT_MS - 1)
        await asyncio.sleep(0.02)
        assert kafka.committed == {}
        clock.advance(1)
        await until(lambda: kafka.committed == {0: 12}, "committed once stored")
        assert sorted(await rows(p.store, "actions")) == [
            ("evt-1:won:Hook", "pending"),
            ("evt-2:won:Hook", "pending"),
        ]
        # Their own events too: after a restart they render from the store what they
        # were triggered by (SPEC §5); the records' snapshots are left alone.
        stored = await p.store.action_events(["evt-1:won:Hook", "evt-2:won:Hook"])
        assert {a: e["event_id"] for a, e in stored.items()} == {
            "evt-1:won:Hook": "evt-1",
            "evt-2:won:Hook": "evt-2",
        }
        async with p.store.conn.execute("SELECT count(*) FROM records") as cur:
            assert await cur.fetchone() == (0,)
        transport.gate.set()
        await until(lambda: len(kafka.results) == 2 and fires_over(p), "both reported delivered")
        await until(lambda: not p.store.writer.queued, "the store is idle")
        await asyncio.sleep(0.02)
        assert sorted(await rows(p.store, "actions")) == [
            ("evt-1:won:Hook", "delivered"),
            ("evt-2:won:Hook", "delivered"),
        ]
        assert transport.sent == ["evt-1:won:Hook", "evt-2:won:Hook"]  # each sent once


async def test_attempts_answered_together_are_reported_and_stored_together(
    tmp_path: Path,
) -> None:
    transport = GatedTransport(open_now=False)
    async with processor(tmp_path, transport) as (p, kafka, _):
        await p._process_batch(fetched([rec(n, 10 + n) for n in range(1, 13)]))
        await until(lambda: len(transport.sent) == 12, "every request is sent")
        calls_before = kafka.produce_calls
        commits_before = p.store.commits
        transport.gate.set()  # all answered in the same turn of the loop
        await until(lambda: kafka.committed == {0: 23}, "committed once all are stored")
        assert len(kafka.results) == 12
        assert {r["status"] for r in kafka.results} == {"delivered"}
        assert kafka.produce_calls - calls_before < 5, "one produce for many reports"
        assert p.store.commits - commits_before < 5, "one store write for many reports"
        assert len(await rows(p.store, "actions")) == 12


def hold_results(kafka: FakeKafka, held: asyncio.Event, *, first_only: bool = False) -> list[int]:
    """Holds each produce of results (or the first only) until ``held`` is set; a
    batch's own produce, empty for instant actions, goes through. Returns the number
    of results of each produce, as they come."""
    sizes: list[int] = []
    produce_all = kafka.produce_all

    async def held_produce_all(records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        if records:
            sizes.append(len(records))
            if not first_only or len(sizes) == 1:
                await held.wait()
        await produce_all(records)

    kafka.produce_all = held_produce_all  # type: ignore[method-assign]
    return sizes


class OneByOneTransport(GatedTransport):
    """Answers 200 to a request once the test answers it (``answer``), or ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__(open_now=False)
        self.answered: dict[str, asyncio.Event] = {}

    def answer(self, action_id: str) -> None:
        self.answered.setdefault(action_id, asyncio.Event()).set()

    async def send(self, action_id: str, request: RenderedRequest, endpoint: Endpoint) -> Outcome:
        self.sent.append(action_id)
        answered = self.answered.setdefault(action_id, asyncio.Event())
        waits = {asyncio.ensure_future(answered.wait()), asyncio.ensure_future(self.gate.wait())}
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in pending:
            wait.cancel()
        return Outcome(None, 200, None, 1.0, NOW_MS)


async def test_answers_that_come_one_by_one_during_a_report_are_reported_together(
    tmp_path: Path,
) -> None:
    """A slow endpoint's answers arrive one a turn. While one report is being written,
    the answers that come join the next: one produce and one store write for them all,
    not one each."""
    transport = OneByOneTransport()
    async with processor(tmp_path, transport) as (p, kafka, _):
        held = asyncio.Event()
        sizes = hold_results(kafka, held, first_only=True)
        try:
            await p._process_batch(fetched([rec(n, 10 + n) for n in range(1, 7)]))
            await until(lambda: len(transport.sent) == 6, "every request is sent")
            commits_before = p.store.commits
            transport.answer("evt-1:won:Hook")
            await until(lambda: sizes == [1], "the first answer's report is being written")
            for n in range(2, 7):
                transport.answer(f"evt-{n}:won:Hook")
                await asyncio.sleep(0.005)  # several turns of the loop
            assert sizes == [1]  # the others wait for the first report's write
        finally:
            held.set()
        await until(lambda: kafka.committed == {0: 17}, "all reported, then committed")
        assert sizes == [1, 5]
        assert p.store.commits - commits_before == 2
        assert [r["status"] for r in kafka.results] == ["delivered"] * 6


async def test_a_busy_host_is_served_by_as_many_tasks_as_it_has_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its waiting actions are fired one after the other by the tasks serving it, as
    answers come in, not by a task each."""
    transport = GatedTransport(open_now=False)
    async with processor(tmp_path, transport, per_host=2) as (p, kafka, _):
        started: list[str] = []
        start_fire = p.dispatcher._start

        def counted(host: str, action: Any) -> None:
            started.append(action.action_id)
            start_fire(host, action)

        monkeypatch.setattr(p.dispatcher, "_start", counted)
        await p._process_batch(fetched([rec(n, 10 + n) for n in range(1, 7)]))
        await until(lambda: len(transport.sent) == 2, "two requests out: the host's limit")
        await asyncio.sleep(0.02)
        assert len(transport.sent) == 2
        transport.gate.set()
        await until(lambda: kafka.committed == {0: 17}, "all six delivered, then committed")
        assert [r["status"] for r in kafka.results] == ["delivered"] * 6
        assert len(started) == 2


async def test_the_next_request_of_a_host_does_not_wait_for_a_report(tmp_path: Path) -> None:
    transport = GatedTransport()
    async with processor(tmp_path, transport, per_host=1) as (p, kafka, _):
        held = asyncio.Event()
        hold_results(kafka, held)
        try:
            await p._process_batch(fetched([rec(n, 10 + n) for n in range(1, 4)]))
            await until(lambda: len(transport.sent) == 3, "each sent after the one before")
            assert kafka.results == []  # while no report was written
        finally:
            held.set()
        await until(lambda: kafka.committed == {0: 14}, "all reported, then committed")
        assert len(kafka.results) == 3


async def test_stopping_finishes_what_is_in_flight_and_sends_no_more(tmp_path: Path) -> None:
    transport = GatedTransport(open_now=False)
    async with processor(tmp_path, transport, per_host=1) as (p, kafka, _):
        await p._process_batch(fetched([rec(n, 10 + n) for n in range(1, 4)]))
        await until(lambda: len(transport.sent) == 1, "the first request is out")
        p.dispatcher.stop()
        transport.gate.set()
        await p.dispatcher.drain(5.0)
        await p.checkpoint.store_unstored()
        assert transport.sent == ["evt-1:won:Hook"]  # the host's waiting ones: not sent
        assert [r["status"] for r in kafka.results] == ["delivered"]
        assert sorted(await rows(p.store, "actions")) == [
            ("evt-1:won:Hook", "delivered"),
            ("evt-2:won:Hook", "pending"),  # fired by the next start
            ("evt-3:won:Hook", "pending"),
        ]


async def test_events_of_instant_rules_only_read_no_pending_actions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = GatedTransport()
    async with processor(tmp_path, transport) as (p, kafka, _):
        read: list[Sequence[str]] = []
        pending_for_records = p.store.pending_for_records

        async def counted(keys: Sequence[str]) -> Any:
            read.append(keys)
            return await pending_for_records(keys)

        monkeypatch.setattr(p.store, "pending_for_records", counted)
        await p._process_batch(fetched([rec(n, 10 + n) for n in range(1, 4)]))
        await until(lambda: kafka.committed == {0: 14}, "delivered and committed")
        assert read == []


async def test_a_report_that_cannot_be_produced_is_tried_again_never_the_request(
    tmp_path: Path,
) -> None:
    """SPEC §10: a request may repeat only after a crash. The broker refuses the
    results three times: the report is tried again (after 0.5, 1 and 2 s), the
    requests are not sent again, and the batch commits once the report is written."""
    transport = GatedTransport(open_now=False)
    async with processor(tmp_path, transport) as (p, kafka, clock):
        await send_two(p, transport)
        kafka.produce_failures = 3
        transport.gate.set()
        for left, pause_ms in ((2, 500), (1, 1000), (0, 2000)):
            await until(lambda left=left: kafka.produce_failures == left, "a produce fails")
            await asyncio.sleep(0.01)
            assert kafka.committed == {}
            clock.advance(pause_ms)
        await until(lambda: kafka.committed == {0: 12}, "reported, stored, then committed")
        assert [r["status"] for r in kafka.results] == ["delivered", "delivered"]
        assert transport.sent == ["evt-1:won:Hook", "evt-2:won:Hook"]  # each sent once
        await until(lambda: fires_over(p), "both attempts end")
        statuses = dict(await rows(p.store, "actions"))
        assert statuses == {"evt-1:won:Hook": "delivered", "evt-2:won:Hook": "delivered"}


async def test_a_report_that_cannot_be_stored_is_tried_again_never_the_request(
    tmp_path: Path,
) -> None:
    """SPEC §10 with the store refusing (issue 26.1): the results are produced, storing
    them fails twice with an error a retry can mend (another process held the file
    past every wait): the store write is tried again after 0.5 and 1 s — the results
    are not produced again, the requests not sent again — and the batch commits once
    it is stored."""
    transport = GatedTransport(open_now=False)
    async with processor(tmp_path, transport) as (p, kafka, clock):
        await send_two(p, transport)
        write = p.store.write
        refusals = 2

        async def refusing(batch: WriteBatch) -> None:
            nonlocal refusals
            if batch.done and refusals:
                refusals -= 1
                raise StoreError("store write failed: database is locked")  # retriable
            await write(batch)

        p.store.write = refusing
        transport.gate.set()
        for left, pause_ms in ((1, 500), (0, 1000)):
            await until(lambda left=left: refusals == left, "a store write fails")
            await asyncio.sleep(0.01)
            assert kafka.committed == {}
            assert p.store.failed is None  # not an error of the file: the store goes on
            clock.advance(pause_ms)
        await until(lambda: kafka.committed == {0: 12}, "stored, then committed")
        assert [r["status"] for r in kafka.results] == ["delivered", "delivered"]  # once
        assert transport.sent == ["evt-1:won:Hook", "evt-2:won:Hook"]  # each sent once
        await until(lambda: fires_over(p), "both attempts end")
        statuses = dict(await rows(p.store, "actions"))
        assert statuses == {"evt-1:won:Hook": "delivered", "evt-2:won:Hook": "delivered"}


async def test_a_failed_store_stops_the_processor_at_once_and_sends_nothing_again(
    tmp_path: Path,
) -> None:
    """SPEC §10 with the store failed (issue 26.1, 26.2): two requests are answered 2xx
    and their results produced; storing them fails with SQLite's own error (a database
    it may not write). The processor stops at once with that error — without waiting
    out the shutdown grace on the fake clock — and neither request is sent again nor
    its event's offset committed (a restart sends them again, same webhook-id)."""
    transport = GatedTransport(open_now=False)
    kafka = FakeKafka(to_fetch=[fetched([rec(1, 10), rec(2, 11)])])
    async with Store(tmp_path / "s.db") as store:
        p = Processor(config(), store, transport, FakeClock(NOW_MS))
        p.attach(kafka, {0})
        run = asyncio.create_task(p.run(kafka, asyncio.Event()))
        await until(lambda: len(transport.sent) == 2, "both requests are sent")
        store.writer.db.execute("PRAGMA query_only = 1")  # as a file SQLite may not write
        transport.gate.set()
        with pytest.raises(StoreError) as err:
            await asyncio.wait_for(run, 5)
        assert str(err.value) == "store write failed: attempt to write a readonly database"
        assert [r["status"] for r in kafka.results] == ["delivered", "delivered"]
        assert transport.sent == ["evt-1:won:Hook", "evt-2:won:Hook"]  # never again
        assert kafka.committed == {}
        store.writer.db.execute("PRAGMA query_only = 0")
        assert await rows(store, "actions") == []  # nothing stored: the events run again


async def test_reading_pauses_over_the_budget_and_resumes_below_half(
    tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(checkpoint_module, "UNSTORED_BUDGET", 4)
    transport = GatedTransport(open_now=False)
    async with processor(tmp_path, transport) as (p, kafka, _):
        await p._process_batch(fetched([rec(n, n) for n in range(3)]))
        assert p.checkpoint.may_read()
        await p._process_batch(fetched([rec(n, n) for n in range(3, 5)]))
        assert not p.checkpoint.may_read()  # 5 read and unsettled: over 4
        stop = asyncio.Event()
        consume = asyncio.create_task(p._consume_loop(stop))
        await asyncio.sleep(0.02)
        assert kafka.fetches == 0  # nothing fetched over the budget
        transport.gate.set()
        await until(lambda: kafka.fetches > 0, "reading goes on below half the budget")
        assert p.checkpoint.may_read()
        await until(lambda: kafka.committed == {0: 5}, "all committed")
        stop.set()
        await asyncio.wait_for(consume, 5)


async def test_revoking_stores_what_is_unfinished_and_commits(tmp_path: Path) -> None:
    transport = GatedTransport(open_now=False)
    async with processor(tmp_path, transport) as (p, kafka, _):
        await p._process_batch(fetched([rec(1, 10)]))
        await until(lambda: transport.sent, "the request is sent")
        await p.on_revoked({0})
        assert kafka.committed == {0: 11}  # the next owner starts after the event
        assert await rows(p.store, "actions") == [("evt-1:won:Hook", "pending")]
        transport.gate.set()
        await until(lambda: kafka.results, "the request in flight is reported")
        await until(lambda: fires_over(p), "the fire is over")
        await asyncio.sleep(0.02)
        assert await rows(p.store, "actions") == [("evt-1:won:Hook", "delivered")]


async def test_past_the_deadline_an_action_being_finished_is_waited_for_not_spun_on(
    tmp_path: Path,
) -> None:
    """Its result is being produced (no longer unstored, not yet stored) when its
    batch's deadline passes: the ticket loop must wait for it, not run in circles
    (which starved the event loop: nothing else ran, the result never came)."""
    transport = GatedTransport()
    async with processor(tmp_path, transport) as (p, kafka, clock):
        gate = asyncio.Event()
        produce_all = kafka.produce_all

        async def slow_produce_all(records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
            if records:  # a result (a batch without any produces nothing)
                await gate.wait()
            await produce_all(records)

        kafka.produce_all = slow_produce_all  # type: ignore[method-assign]
        calls = 0
        store_unstored = p.checkpoint.store_unstored

        async def counted(before_ms: int | None = None) -> None:
            nonlocal calls
            calls += 1
            if calls > 50:  # spinning: break out (the loop logs it and sleeps 1 s)
                raise RuntimeError("the ticket loop spins")
            await store_unstored(before_ms)

        p.checkpoint.store_unstored = counted  # type: ignore[method-assign]
        try:
            await p._process_batch(fetched([rec(1, 10)]))
            await until(
                lambda: not p.checkpoint.is_unstored("evt-1:won:Hook"),
                "the result is being produced",
            )
            clock.advance(INSTANT_COMMIT_WAIT_MS)
            for _ in range(20):
                await asyncio.sleep(0.005)  # the event loop runs on
            assert 1 <= calls <= 2
            assert kafka.committed == {}
        finally:
            gate.set()  # else a failure above would hang the teardown
        await until(lambda: kafka.committed == {0: 11}, "committed once stored")
        assert await rows(p.store, "actions") == [("evt-1:won:Hook", "delivered")]
        assert calls <= 3


@pytest.mark.parametrize(
    ("quota", "block"),
    [
        ({"daily_limit": 50, "per_user": 50}, 16),  # the smallest block
        ({"daily_limit": 2500, "per_user": 50}, 25),  # a hundredth of the limit
        ({"daily_limit": 10_000_000, "per_user": 1_000_000}, 1024),  # the largest
        ({"daily_limit": 10, "per_user": 50}, 10),  # never beyond the limit
    ],
)
async def test_quota_is_counted_a_hundredth_of_the_daily_limit_at_a_time(
    tmp_path: Path, quota: dict[str, int], block: int
) -> None:
    async with processor(tmp_path, GatedTransport(), quota) as (p, kafka, _):
        await p._process_batch(fetched([rec(1, 10)]))
        await until(lambda: kafka.committed == {0: 11}, "delivered and committed")
        assert [r["status"] for r in kafka.results] == ["delivered"]
        assert await p.store.quota_used("org-acme", "2025-11-28") == block


async def test_offsets_are_committed_while_a_backlog_is_read(tmp_path: Path) -> None:
    """aiokafka hands buffered records over without suspending, and a batch of events
    no rule acts on stores and produces nothing: the consume loop still lets the
    commit run between batches, not only once the backlog is drained."""
    transport = GatedTransport()
    batches = [
        fetched([rec(n, n, record={"Stage": "Lost"}) for n in range(b * 10, b * 10 + 10)])
        for b in range(20)
    ]

    class Backlog(FakeKafka):
        served = 0
        first_commit_at: int | None = None

        async def fetch(self, timeout_ms: int, max_records: int) -> Fetched:
            if self.served < len(batches):
                self.served += 1
                return batches[self.served - 1]  # buffered: no await
            return await super().fetch(timeout_ms, max_records)

        async def commit(self, next_offsets: dict[int, int]) -> None:
            if self.first_commit_at is None:
                self.first_commit_at = self.served
            await super().commit(next_offsets)

    async with processor(tmp_path, transport) as (p, _, _):
        kafka = Backlog()
        p.attach(kafka, {0, 1})
        stop = asyncio.Event()
        consume = asyncio.create_task(p._consume_loop(stop))
        await until(lambda: kafka.committed == {0: 200}, "the backlog is committed")
        stop.set()
        await asyncio.wait_for(consume, 5)
    assert kafka.first_commit_at is not None
    assert kafka.first_commit_at < len(batches) // 2, kafka.first_commit_at


async def test_a_fetch_reads_more_while_events_are_ignored_and_nothing_is_fired(
    tmp_path: Path,
) -> None:
    """Up to FETCH_MAX_RECORDS_IGNORING events a fetch while the last batch planned no
    event and no action is being fired; FETCH_MAX_RECORDS after a batch that planned
    one (its store write and changelog records), and while an action is being fired
    (planning a batch would hold up the answers of the requests in flight)."""
    transport = GatedTransport(open_now=False)

    class Asked(FakeKafka):
        async def fetch(self, timeout_ms: int, max_records: int) -> Fetched:
            asked.append((max_records, p.dispatcher.idle, p._ignoring))
            return await super().fetch(timeout_ms, max_records)

    asked: list[tuple[int, bool, bool]] = []
    async with processor(tmp_path, transport) as (p, _, _):
        kafka = Asked()
        kafka.to_fetch.append(fetched([rec(1, 10)]))  # an action to fire
        p.attach(kafka, {0, 1})
        stop = asyncio.Event()
        consume = asyncio.create_task(p._consume_loop(stop))
        await until(lambda: transport.sent, "the action is being fired")
        firing = len(asked)
        await until(lambda: len(asked) >= firing + 3, "fetches while it is")
        transport.gate.set()
        await until(lambda: fires_over(p), "answered")
        answered = len(asked)
        await until(lambda: len(asked) >= answered + 3, "fetches after it")
        kafka.to_fetch.append(fetched([rec(2, 11, record={"Stage": "Lost"})]))  # ignored
        await until(lambda: p.batches == 2, "the ignored event read")
        ignored = len(asked)
        await until(lambda: len(asked) >= ignored + 3, "fetches after that")
        stop.set()
        await asyncio.wait_for(consume, 5)
    assert asked[0] == (FETCH_MAX_RECORDS, True, False)  # nothing read yet
    assert {n for n, *_ in asked[firing + 1 : firing + 3]} == {FETCH_MAX_RECORDS}
    assert {n for n, *_ in asked[answered + 1 : answered + 3]} == {FETCH_MAX_RECORDS}
    assert {n for n, *_ in asked[ignored + 1 :]} == {FETCH_MAX_RECORDS_IGNORING}
    assert all((n == FETCH_MAX_RECORDS_IGNORING) is (idle and ign) for n, idle, ign in asked)
    assert FETCH_MAX_RECORDS < FETCH_MAX_RECORDS_IGNORING
