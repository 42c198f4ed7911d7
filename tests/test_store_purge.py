"""What the store forgets, on real files: snapshots, ``repeat = "once"`` flags and quota
days no longer needed, in chunks, with tombstones that another store applies."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from crmhooks.clock import FakeClock
from crmhooks.store import Store, WriteBatch
from crmhooks.store import changes as changes_module
from crmhooks.store import records as records_module
from crmhooks.store.quota import oldest_day_kept
from tests.test_store import FakeChangelog, action

DAY_MS = 86_400_000
T0 = 1_764_320_400_000  # 2025-11-28T09:00:00Z
RETENTION_MS = 7 * DAY_MS


def record_key(record: str) -> str:
    return f"org/Potentials/{record}"


def snapshot(record: str) -> tuple[str, int, bytes]:
    return (record_key(record), 0, b'{"record": "%s"}' % record.encode())


async def test_a_snapshot_stays_while_its_record_has_a_pending_action(tmp_path: Path) -> None:
    """r1: pending action; r2: its action finished; r3: no action; r4: no action, but
    written after the cutoff. Only r2's and r3's snapshots go, with tombstones; r1's
    goes once its action is finished, a retention after its last write."""
    clock = FakeClock(T0)
    changelog = FakeChangelog()
    async with Store(tmp_path / "a.db", clock=clock) as a:
        a.changelog = changelog
        await a.write(
            WriteBatch(
                new_actions=[action(1, record="r1"), action(2, record="r2")],
                snapshots=[snapshot("r1"), snapshot("r2"), snapshot("r3")],
            )
        )
        await a.write(WriteBatch(finished=[("e2:rule:Hook", "delivered", T0)]))
        clock.advance(RETENTION_MS + 1)
        await a.write(WriteBatch(snapshots=[snapshot("r4")]))
        keys = [record_key(r) for r in ("r1", "r2", "r3", "r4")]
        await a.purge([0], before_ms=clock.now_ms() - RETENTION_MS)
        assert set(await a.snapshots(keys)) == {record_key("r1"), record_key("r4")}
        assert changelog.partitions[0][-3:] == [
            (b"a\x1fe2:rule:Hook", None),
            (f"r\x1f{record_key('r2')}".encode(), None),
            (f"r\x1f{record_key('r3')}".encode(), None),
        ]
        await a.write(WriteBatch(finished=[("e1:rule:Hook", "delivered", clock.now_ms())]))
        await a.purge([0], before_ms=clock.now_ms() - RETENTION_MS)
        assert set(await a.snapshots(keys)) == {record_key("r4")}
    async with Store(tmp_path / "b.db", clock=clock) as b:
        await b.restore([0], changelog.read)
        assert set(await b.snapshots(keys)) == {record_key("r4")}


async def test_a_snapshot_written_again_is_kept_again(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    async with Store(tmp_path / "s.db", clock=clock) as store:
        await store.write(WriteBatch(snapshots=[snapshot("r1")]))
        clock.advance(RETENTION_MS)
        await store.write(WriteBatch(snapshots=[snapshot("r1")]))
        clock.advance(1)
        await store.purge([0], before_ms=clock.now_ms() - RETENTION_MS)
        assert set(await store.snapshots([record_key("r1")])) == {record_key("r1")}


async def test_set_flags_stay_and_cleared_ones_go_after_the_retention(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    changelog = FakeChangelog()
    keys = [f"rule\x1f{record_key(r)}" for r in ("r1", "r2", "r3")]
    async with Store(tmp_path / "a.db", clock=clock) as a:
        a.changelog = changelog
        await a.write(WriteBatch(once_state=[(keys[0], 0, True), (keys[1], 0, False)]))
        clock.advance(RETENTION_MS)
        await a.write(WriteBatch(once_state=[(keys[2], 0, False)]))  # cleared later
        clock.advance(1)
        await a.purge([0], before_ms=clock.now_ms() - RETENTION_MS)
        assert await a.once_states(keys) == {keys[0]: True, keys[2]: False}
        assert changelog.partitions[0][-1] == (f"o\x1f{keys[1]}".encode(), None)
    async with Store(tmp_path / "b.db", clock=clock) as b:
        await b.restore([0], changelog.read)
        assert await b.once_states(keys) == {keys[0]: True, keys[2]: False}


def test_the_oldest_quota_day_kept_is_over_everywhere_first() -> None:
    """A day goes only once it is over in every zone (UTC-12 to UTC+14), a day to spare."""
    assert oldest_day_kept(T0) == "2025-11-26"
    # The cutoff at the last millisecond of a UTC day and at the first of the next.
    assert oldest_day_kept(1_764_374_399_999) == "2025-11-26"
    assert oldest_day_kept(1_764_374_400_000) == "2025-11-27"


async def test_quota_days_over_everywhere_go_with_tombstones(tmp_path: Path) -> None:
    changelog = FakeChangelog()
    days = ["2025-11-24", "2025-11-25", "2025-11-26", "2025-11-27"]
    async with Store(tmp_path / "a.db") as a:
        a.changelog = changelog
        await a.write(WriteBatch(quota=[("org", day, 0, 5) for day in days]))
        await a.write(WriteBatch(quota=[("other", "2025-11-20", 1, 5)]))
        await a.purge([0], before_ms=T0)  # kept from 2025-11-26
        assert [await a.quota_used("org", day) for day in days] == [0, 0, 5, 5]
        assert await a.quota_used("other", "2025-11-20") == 5  # partition 1: not asked
        assert changelog.partitions[0][-2:] == [
            (b"q\x1forg\x1f2025-11-24", None),
            (b"q\x1forg\x1f2025-11-25", None),
        ]
    async with Store(tmp_path / "b.db") as b:
        await b.restore([0], changelog.read)
        assert [await b.quota_used("org", day) for day in days] == [0, 0, 5, 5]


async def test_a_purge_goes_in_chunks_of_their_own_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(changes_module, "PURGE_CHUNK", 3)
    monkeypatch.setattr(records_module, "SNAPSHOT_PURGE_WINDOW", 4)
    clock = FakeClock(T0)
    changelog = FakeChangelog()
    async with Store(tmp_path / "s.db", clock=clock) as store:
        store.changelog = changelog
        actions = [action(n, record=f"r{n}") for n in range(10)]
        events = [(a.action_id, 0, b'{"event_id": "e"}') for a in actions]
        await store.write(WriteBatch(new_actions=actions, action_events=events))
        await store.write(
            WriteBatch(
                finished=[(a.action_id, "delivered", T0) for a in actions],
                snapshots=[snapshot(f"r{n}") for n in range(10)],
                once_state=[(f"rule\x1f{n}", 0, False) for n in range(7)],
                quota=[(f"org-{n}", "2025-11-01", 0, 1) for n in range(7)],
            )
        )
        await store.write(WriteBatch(done=[(action(n), "delivered", T0) for n in range(10, 14)]))
        clock.advance(RETENTION_MS + 1)
        commits = store.commits
        await store.purge([0], before_ms=clock.now_ms() - RETENTION_MS)
        # Rows by 3 (snapshots: rowids by 4), a step ending with a chunk not full:
        # 14 actions (4 of a done batch) 5, 1 done batch 1, 10 actions' events 4,
        # 10 snapshots 3, 7 flags 3, 7 quota days 3.
        assert store.commits - commits == 19
        tombstones = [key for key, value in changelog.partitions[0] if value is None]
        # (a done batch's rows: its one tombstone)
        assert len(tombstones) == 10 + 1 + 10 + 10 + 7 + 7
        tables = ("actions", "done_batches", "action_events", "records", "rule_state", "quota")
        for table in tables:
            with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db:
                assert db.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table


async def test_a_store_file_from_before_the_purge_by_age_gets_its_columns(tmp_path: Path) -> None:
    """Rows of a file made before ``written_ms``/``changed_ms`` count as written at the
    first start of this version: they are kept a retention from then."""
    path = tmp_path / "old.db"
    async with Store(path) as store:
        await store.write(
            WriteBatch(snapshots=[snapshot("r1")], once_state=[("rule\x1fr1", 0, False)])
        )
    with contextlib.closing(sqlite3.connect(path)) as db:  # as files made before them
        db.execute("DROP INDEX rule_state_cleared")
        db.execute("ALTER TABLE records DROP COLUMN written_ms")
        db.execute("ALTER TABLE rule_state DROP COLUMN changed_ms")
    clock = FakeClock(T0)
    async with Store(path, clock=clock) as store:
        await store.purge([0], before_ms=T0 - 1)
        assert set(await store.snapshots([record_key("r1")])) == {record_key("r1")}
        assert await store.once_states(["rule\x1fr1"]) == {"rule\x1fr1": False}
        await store.purge([0], before_ms=T0 + 1)
        assert await store.snapshots([record_key("r1")]) == {}
        assert await store.once_states(["rule\x1fr1"]) == {}
