"""Config-topic documents applied by the processor (SPEC §3.2), its parts with fakes:
a fake topic, a fake Kafka, a fake transport, a real SQLite store, a FakeClock."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from crmhooks.actions import Action
from crmhooks.app import Processor
from crmhooks.clock import FakeClock
from crmhooks.config import config_from_mapping
from crmhooks.kafka_documents import DocumentRecord, partition_of
from crmhooks.store import Store, WriteBatch
from tests.fakes import NOW_MS, FakeKafka, GatedTransport, Rec, fetched, until
from tests.schemas import validate_dead_letter
from tests.support import event

TOPIC = "crm.workflow-config"
PARTITIONS = 3
SECRET = "top-secret-api-key"
# Organisations by the events partition of their key (partition_of, murmur2).
ORGS = {p: next(f"org-{i}" for i in range(100) if partition_of(f"org-{i}", PARTITIONS) == p)
        for p in range(PARTITIONS)}  # fmt: skip


class FakeTopic:
    """The config topic: records appended by the test, read as ``ConfigTopicReader``."""

    topic = TOPIC

    def __init__(self) -> None:
        self.records: list[DocumentRecord] = []
        self._next = 0

    def append(self, org: str | None, value: bytes | None) -> None:
        key = None if org is None else org.encode()
        self.records.append(DocumentRecord(0, len(self.records), key, value))

    async def start(self, positions: Mapping[int, int]) -> dict[int, int]:
        self._next = positions.get(0, 0)
        return {0: len(self.records)}

    async def fetch(self, timeout_ms: int, max_records: int) -> list[DocumentRecord]:
        out = self.records[self._next : self._next + max_records]
        self._next += len(out)
        if not out:
            await asyncio.sleep(0.001)
        return out

    async def positions(self) -> dict[int, int]:
        return {0: self._next}

    async def more_partitions(self, positions: Mapping[int, int]) -> bool:
        return False

    async def partition_count(self, topic: str) -> int | None:
        return PARTITIONS


def document(org: str, path: str = "/hook", **rule: Any) -> bytes:
    return orjson.dumps(
        {
            "org": {"id": org, "users": 10},
            "webhooks": [
                {
                    "name": "Hook",
                    "url": f"http://receiver.test{path}",
                    "module": "Potentials",
                    "custom_params": {"apikey": SECRET},
                },
                {"name": "Later", "url": "http://receiver.test/later", "module": "Potentials"},
            ],
            "rules": [
                {
                    "id": "won",
                    "module": "Potentials",
                    "criteria": {"field": "Stage", "op": "is", "value": "Closed Won"},
                    "instant": "Hook",
                    "scheduled": [{"webhook": "Later", "offset": "1d"}],
                    **rule,
                }
            ],
        }
    )


@contextlib.asynccontextmanager
async def processor(
    tmp_path: Path, owned: set[int], store_name: str = "s.db"
) -> AsyncIterator[tuple[Processor, FakeKafka, GatedTransport]]:
    kafka = FakeKafka()
    transport = GatedTransport()
    raw = {"kafka": {"config_topic": TOPIC}, "delivery": {"allow_private_networks": True}}
    async with Store(tmp_path / store_name) as store:
        p = Processor(config_from_mapping(raw, {}), store, transport, FakeClock(NOW_MS))
        p.attach(kafka, owned)
        loops = [asyncio.create_task(p.dispatcher.loop()), asyncio.create_task(p.sweeper.loop())]
        try:
            yield p, kafka, transport
        finally:
            p.dispatcher.stop()
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await p.dispatcher.drain(5.0)


async def started(p: Processor, topic: FakeTopic) -> None:
    assert p.documents is not None
    await p.documents.open()
    await p.documents.catch_up(topic)


async def follow(p: Processor, topic: FakeTopic) -> None:
    """What ``follow`` does with what the topic has now."""
    assert p.documents is not None
    await p.documents.apply(await topic.fetch(0, 500))


def won(n: int, org: str, partition: int) -> Rec:
    return Rec(partition, 100 + n, orjson.dumps(event(n, org_id=org)), key=org.encode())


def letters(kafka: FakeKafka) -> list[dict[str, Any]]:
    return [r for r in kafka.results if "error_code" in r]


async def test_an_organisations_events_follow_its_document(tmp_path: Path) -> None:
    org = ORGS[0]
    topic = FakeTopic()
    topic.append(org, document(org))
    async with processor(tmp_path, {0}) as (p, kafka, transport):
        await started(p, topic)
        await p._process_batch(fetched([won(1, org, 0)]))
        await until(lambda: len(transport.sent) == 1, "the instant action is sent")
        assert transport.requests[0].url == "http://receiver.test/hook"
        topic.append(org, document(org, "/moved"))
        await follow(p, topic)
        await p._process_batch(fetched([won(2, org, 0)]))
        await until(lambda: len(transport.sent) == 2, "the next one is sent")
        assert transport.requests[1].url == "http://receiver.test/moved"
        # Another organisation: the file, which has no rule.
        await p._process_batch(fetched([won(3, ORGS[1], 0)]))
        assert [r["status"] for r in kafka.results].count("delivered") == 2
        assert len(transport.sent) == 2


async def test_a_refused_document_is_dead_lettered_by_its_partitions_owner_once(
    tmp_path: Path,
) -> None:
    org = ORGS[1]
    topic = FakeTopic()
    topic.append(org, document(org))
    bad = orjson.loads(document(org))
    bad["webhooks"][0]["url"] = "ftp://receiver.test/hook"
    bad["rules"][0]["trigger"] = "sometimes"
    async with (
        processor(tmp_path, {1}, "owner.db") as (owner, owner_kafka, owner_transport),
        processor(tmp_path, {0, 2}, "other.db") as (other, other_kafka, _),
    ):
        for p in (owner, other):
            await started(p, topic)
        topic.append(org, orjson.dumps(bad))
        for p in (owner, other):
            topic._next = 1  # each process reads the record
            await follow(p, topic)
        assert letters(other_kafka) == []
        (letter,) = letters(owner_kafka)
        validate_dead_letter(letter)
        assert letter["error_code"] == "invalid_config"
        assert letter["source"] == {"topic": TOPIC, "partition": 0, "offset": 1, "key": org}
        assert "webhooks[Hook].url" in letter["message"]
        assert "rules[won].trigger" in letter["message"]
        assert letter["event"]["webhooks"][0]["custom_params"] == {"apikey": "***"}
        assert SECRET not in orjson.dumps(letter).decode()
        assert owner.metrics.dead_letters["invalid_config"] == 1
        # The last valid document stays in force, in both.
        for p in (owner, other):
            target = p.config.current.target(org, "Hook")
            assert target is not None
            assert target.webhook.url == "http://receiver.test/hook"
        # The partition moves to the other process: the dead letter is not written again
        # (its mark comes with the partition's state; here, the same store's row).
        await owner.on_revoked({1})
        await owner.on_assigned({1})
        assert len(letters(owner_kafka)) == 1
        del owner_transport


async def test_a_document_read_while_no_one_owned_its_partition_is_reported_at_assignment(
    tmp_path: Path,
) -> None:
    org = ORGS[2]
    topic = FakeTopic()
    topic.append(org, b'{"org": {"id": "' + org.encode() + b'"}, "rules": [')  # no JSON
    topic.append(None, document(ORGS[1]))  # no key: its org.id says whose it is
    async with processor(tmp_path, set()) as (p, kafka, _):
        await started(p, topic)  # catching up: nothing owned
        assert letters(kafka) == []
        await p.on_assigned({2})
        (letter,) = letters(kafka)
        validate_dead_letter(letter)
        assert letter["message"].startswith(f"config document of {org} refused (1 errors): ")
        assert "not valid JSON" in letter["message"]
        assert (letter["event"], letter["raw"]) == (None, None)
        await p.on_revoked({2})
        await p.on_assigned({2})  # (as the next owner would: the mark says it is written)
        assert len(letters(kafka)) == 1
        await p.on_assigned({0, 1})
        assert len(letters(kafka)) == 2
        assert "key: missing" in letters(kafka)[1]["message"]
        assert letters(kafka)[1]["source"]["key"] is None
        # Neither a key nor an org.id: written at once by events partition 0's owner.
        topic.append(None, b"not a document")
        await follow(p, topic)
        await until(lambda: len(letters(kafka)) == 3, "the keyless document's dead letter")
        assert letters(kafka)[2]["message"].startswith("config document of (no key) refused")


async def test_a_document_keyed_by_another_organisation_is_refused(tmp_path: Path) -> None:
    topic = FakeTopic()
    topic.append(ORGS[0], document(ORGS[1]))
    async with processor(tmp_path, set()) as (p, kafka, _):
        await started(p, topic)
        await p.on_assigned({0})
        assert p.config.current.orgs is not None
        assert len(p.config.current.orgs) == 0
        (letter,) = letters(kafka)
        assert f"org.id: the document is keyed '{ORGS[0]}'" in letter["message"]


async def test_a_tombstone_ends_the_document_and_its_pending_actions(tmp_path: Path) -> None:
    org = ORGS[0]
    topic = FakeTopic()
    topic.append(org, document(org))
    async with processor(tmp_path, {0}) as (p, kafka, transport):
        await started(p, topic)
        await p._process_batch(fetched([won(1, org, 0)]))
        await until(lambda: len(transport.sent) == 1, "the instant action is sent")
        assert await p.store.count_pending() == 1  # the scheduled one, a day ahead
        topic.append(org, None)
        await follow(p, topic)
        await p.sweeper.until_idle()
        cancelled = [r for r in kafka.results if r.get("status") == "cancelled"]
        assert [(r["action_id"], r["reason"]) for r in cancelled] == [
            ("evt-1:won:Later", "config_removed")
        ]
        await p._process_batch(fetched([won(2, org, 0)]))
        assert len(transport.sent) == 1  # nothing more for the organisation
        assert await p.store.documents.org_ids() == []


async def test_catching_up_checks_each_organisations_latest_documents_only(
    tmp_path: Path,
) -> None:
    a, b = ORGS[0], ORGS[1]
    broken = document(a, bogus=1)
    topic = FakeTopic()
    for record in [(a, document(a, "/a1")), (b, document(b, "/b1")), (a, broken),
                   (a, document(a, "/a2")), (b, broken), (b, None), (b, document(b, "/b2")),
                   (a, broken)]:  # fmt: skip
        topic.append(*record)
    async with processor(tmp_path, set()) as (p, _kafka, _):
        assert p.documents is not None
        checked: list[int] = []
        check = p.documents._check

        def counted(rec: DocumentRecord) -> Any:
            checked.append(rec.offset)
            return check(rec)

        p.documents._check = counted  # type: ignore[method-assign]
        await started(p, topic)
        assert sorted(checked) == [3, 6, 7]  # a: 7 refused, 3 valid; b: 6
        now = p.config.current
        for org, path in ((a, "/a2"), (b, "/b2")):
            target = now.target(org, "Hook")
            assert target is not None
            assert target.webhook.url.endswith(path)
        refused = await p.store.documents.refused()
        assert [(r.org_id, r.offset) for r in refused] == [(a, 7)]
        # A restart reads nothing again.
        assert await p.store.documents.positions() == {0: 8}


async def test_a_changed_document_lifts_a_suspension_of_what_it_changed(tmp_path: Path) -> None:
    org = ORGS[0]
    topic = FakeTopic()
    topic.append(org, document(org))
    failed = Action(
        action_id="evt-9:won:Hook",
        event_id="evt-9",
        org_id=org,
        module="Potentials",
        record_id="rec-9",
        rule_id="won",
        webhook="Hook",
        kind="instant",
        slot=0,
        due_ms=NOW_MS,
        partition=0,
        source_offset=9,
    )
    async with processor(tmp_path, {0}) as (p, _kafka, _):
        await started(p, topic)
        p.suspensions.count_failure(failed, WriteBatch(), 1)
        assert p.suspensions.is_suspended(org, "won", "Hook")
        topic.append(org, document(org, "/hook", repeat="once"))  # the rule changed
        await follow(p, topic)
        assert not p.suspensions.is_suspended(org, "won", "Hook")


async def test_a_document_change_keeps_repeat_once_state_quota_and_timers(tmp_path: Path) -> None:
    """SPEC §5 / issue 23.5: a new version of the document (another URL) changes neither
    the rule's repeat = "once" state of a record, nor quota counts, nor pending timers."""
    org = ORGS[0]
    topic = FakeTopic()
    topic.append(org, document(org, repeat="once"))
    async with processor(tmp_path, {0}) as (p, kafka, transport):
        await started(p, topic)
        await p._process_batch(fetched([won(1, org, 0)]))
        await until(lambda: len(transport.sent) == 1, "the instant action is sent")
        due_before = {a.action_id: a.due_ms for a in await p.store.load_pending([0], 1 << 62)}
        day, _ = p.quota.today(org, NOW_MS)
        used_before = await p.store.quota_used(org, day)
        topic.append(org, document(org, "/moved", repeat="once"))
        await follow(p, topic)
        await p.sweeper.until_idle()
        again = Rec(0, 200, orjson.dumps(event(2, org_id=org, record_id="rec-1")), key=org.encode())
        await p._process_batch(fetched([again]))  # the same record, still Closed Won
        await asyncio.sleep(0.05)
        assert len(transport.sent) == 1  # once: not again, whatever the document's URL
        due_after = {a.action_id: a.due_ms for a in await p.store.load_pending([0], 1 << 62)}
        assert due_after == due_before  # the scheduled one is still pending, as it was
        assert await p.store.quota_used(org, day) == used_before
        assert not [r for r in kafka.results if r.get("status") == "cancelled"]
