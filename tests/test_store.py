"""The SQLite store, on real files: group commit, idempotent inserts, partition loading."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import Any

import pytest

from crmhooks.actions import Action
from crmhooks.errors import StoreError
from crmhooks.store import ChangelogRecord, Store, WriteBatch
from crmhooks.store import writer as writer_module


def action(n: int, *, partition: int = 0, due_ms: int = 1000, record: str = "r1") -> Action:
    return Action(
        action_id=f"e{n}:rule:Hook",
        event_id=f"e{n}",
        org_id="org",
        module="Potentials",
        record_id=record,
        rule_id="rule",
        webhook="Hook",
        kind="scheduled",
        slot=1,
        due_ms=due_ms,
        partition=partition,
        source_offset=n,
    )


def test_a_folded_batch_carries_every_kind_of_change() -> None:
    """Group commit folds queued batches with ``extend``: no kind of change is dropped."""
    folded = WriteBatch()
    assert not folded
    for f in dataclasses.fields(WriteBatch):
        one = WriteBatch()
        value = getattr(one, f.name)
        if isinstance(value, dict):
            value[7] = 8
        else:
            value.append(f.name)
        assert one, f.name
        folded.extend(one)
        folded.extend(WriteBatch())
        assert getattr(folded, f.name) == ({7: 8} if isinstance(value, dict) else [f.name])


async def test_actions_survive_reopen_and_inserts_are_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with Store(path) as store:
        await store.write(WriteBatch(new_actions=[action(1), action(2, partition=1)]))
        await store.write(WriteBatch(new_actions=[action(1, due_ms=5)]))  # replayed: ignored
    async with Store(path) as store:
        loaded = await store.load_pending([0], before_ms=10_000)
        assert [(a.action_id, a.due_ms) for a in loaded] == [("e1:rule:Hook", 1000)]
        assert await store.load_pending([1], before_ms=10_000) == [action(2, partition=1)]
        assert await store.load_pending([0], before_ms=1000) == []


async def test_finished_actions_stay_known_and_are_never_pending_again(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        await store.write(WriteBatch(new_actions=[action(1)]))
        await store.write(WriteBatch(finished=[("e1:rule:Hook", "delivered", 5)]))
        await store.write(WriteBatch(new_actions=[action(1)]))
        assert await store.action_statuses(["e1:rule:Hook", "nope"]) == {
            "e1:rule:Hook": "delivered"
        }
        assert await store.load_pending([0], before_ms=10_000) == []
        assert await store.pending_for_records(["org/Potentials/r1"]) == []


async def test_concurrent_writes_share_commits(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        batches = [WriteBatch(new_actions=[action(n)]) for n in range(200)]
        await asyncio.gather(*(store.write(b) for b in batches))
        assert len(await store.load_pending([0], before_ms=10_000)) == 200
        assert store.commits < 200, "group commit should fold concurrent writes"


async def test_quota_moves_and_suspensions(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        await store.write(WriteBatch(quota=[("org", "2026-11-28", 0, 1)] * 3))
        await store.write(WriteBatch(quota=[("org", "2026-11-28", 0, -1)]))
        assert await store.quota_used("org", "2026-11-28") == 2
        assert await store.quota_used("org", "2026-11-29") == 0
        await store.write(WriteBatch(new_actions=[action(1)]))
        await store.write(WriteBatch(moved=[("e1:rule:Hook", 7000, 1)]))
        (moved,) = await store.load_pending([0], before_ms=10_000)
        assert (moved.due_ms, moved.attempt) == (7000, 1)
        await store.write(WriteBatch(suspensions=[("org", "rule", "Hook", 0, 1, True, "fp")]))
        assert await store.suspension_table() == {("org", "rule", "Hook"): (1, True, "fp")}
        assert await store.resume("rule", "Hook") == 1
        assert await store.suspension_table() == {("org", "rule", "Hook"): (0, False, "fp")}


async def test_snapshots_and_once_state(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        await store.write(
            WriteBatch(
                snapshots=[("org/Potentials/r1", 0, b'{"a": 1}')],
                once_state=[("rule\x1forg/Potentials/r1", 0, True)],
            )
        )
        await store.write(WriteBatch(snapshots=[("org/Potentials/r1", 0, b'{"a": 2}')]))
        assert await store.snapshots(["org/Potentials/r1"]) == {"org/Potentials/r1": {"a": 2}}
        assert await store.once_states(["rule\x1forg/Potentials/r1", "x"]) == {
            "rule\x1forg/Potentials/r1": True
        }


class FakeChangelog:
    """An in-memory changelog topic: the sink appends, the source reads a partition."""

    def __init__(self) -> None:
        self.partitions: dict[int, list[tuple[bytes, bytes | None]]] = {}

    async def __call__(self, records: Sequence[ChangelogRecord]) -> Awaitable[dict[int, int]]:
        for partition, key, value in records:
            self.partitions.setdefault(partition, []).append((key, value))
        return self._acked({p: len(log) for p, log in self.partitions.items()})

    @staticmethod
    async def _acked(offsets: dict[int, int]) -> dict[int, int]:
        return offsets

    async def read(
        self, partition: int, from_offset: int
    ) -> AsyncIterator[tuple[int, bytes, bytes | None]]:
        for offset, (key, value) in enumerate(self.partitions.get(partition, [])):
            if offset >= from_offset:
                yield offset, key, value


async def test_a_partition_state_moves_to_another_store_through_the_changelog(
    tmp_path: Path,
) -> None:
    changelog = FakeChangelog()
    async with Store(tmp_path / "a.db") as a:
        a.changelog = changelog
        await a.write(
            WriteBatch(
                new_actions=[action(1), action(2), action(3, partition=1)],
                snapshots=[("org/Potentials/r1", 0, b'{"v": 1}')],
                once_state=[("rule\x1forg/Potentials/r1", 0, True)],
                quota=[("org", "2026-11-28", 0, 1)] * 2,
                suspensions=[("org", "rule", "Hook", 0, 1, True, "fp")],
            )
        )
        await a.write(WriteBatch(finished=[("e2:rule:Hook", "delivered", 5)]))
        await a.write(WriteBatch(moved=[("e1:rule:Hook", 7000, 1)]))
    async with Store(tmp_path / "b.db") as b:
        assert await b.restore([0], changelog.read) > 0
        (pending,) = await b.load_pending([0], before_ms=100_000)
        assert (pending.action_id, pending.due_ms, pending.attempt) == ("e1:rule:Hook", 7000, 1)
        assert await b.action_statuses(["e2:rule:Hook"]) == {"e2:rule:Hook": "delivered"}
        assert await b.load_pending([1], before_ms=100_000) == []  # not restored: not asked
        assert await b.quota_used("org", "2026-11-28") == 2
        assert await b.once_states(["rule\x1forg/Potentials/r1"]) == {
            "rule\x1forg/Potentials/r1": True
        }
        assert await b.snapshots(["org/Potentials/r1"]) == {"org/Potentials/r1": {"v": 1}}
        assert await b.suspension_table() == {("org", "rule", "Hook"): (1, True, "fp")}
        # Restoring again reads only what is new.
        assert await b.restore([0], changelog.read) == 0


def all_rows(path: Path, table: str = "actions") -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()


async def test_a_finished_first_write_matches_insert_then_finish_rows_here_and_restored(
    tmp_path: Path,
) -> None:
    """``WriteBatch.done`` (one INSERT; one changelog record per partition holding its
    rows) leaves the same rows as storing the actions pending and finishing them in
    one transaction (one changelog record per row), both in its own file and in a
    file restored from its changelog."""
    actions = [action(n, partition=n % 2) for n in range(1, 6)]
    ended = [(a, "delivered" if n % 3 else "failed", 100 + n) for n, a in enumerate(actions)]
    logs = {"old": FakeChangelog(), "new": FakeChangelog()}
    for name, batch in (
        (
            "old",
            WriteBatch(
                new_actions=[a for a, _, _ in ended],
                finished=[(a.action_id, status, at) for a, status, at in ended],
            ),
        ),
        ("new", WriteBatch(done=list(ended))),
    ):
        async with Store(tmp_path / f"{name}.db") as store:
            store.changelog = logs[name]
            await store.write(batch)
        async with Store(tmp_path / f"{name}-restored.db") as other:
            await other.restore([0, 1], logs[name].read)
    rows = {name: all_rows(tmp_path / f"{name}.db") for name in logs}
    rows |= {f"{name}-restored": all_rows(tmp_path / f"{name}-restored.db") for name in logs}
    assert len(rows["new"]) == 5
    # The same columns everywhere but the last, ``logged``: how the changelog has them.
    assert all([r[:-1] for r in these] == [r[:-1] for r in rows["new"]] for these in rows.values())
    assert {name: {r[-1] for r in these} for name, these in rows.items()} == {
        "old": {"a"},
        "old-restored": {"a"},
        "new": {"d"},
        "new-restored": {"d"},
    }
    assert sum(len(log) for log in logs["old"].partitions.values()) == 5
    # One record per partition, keyed by its first action's id.
    assert {p: [k for k, _ in log] for p, log in logs["new"].partitions.items()} == {
        0: [b"d\x1fe2:rule:Hook"],
        1: [b"d\x1fe1:rule:Hook"],
    }
    batches = [("e1:rule:Hook", 1, 104), ("e2:rule:Hook", 0, 103)]
    assert all_rows(tmp_path / "new.db", "done_batches") == batches
    assert all_rows(tmp_path / "new-restored.db", "done_batches") == batches


async def test_a_purge_tombstones_the_record_of_actions_finished_at_their_first_write(
    tmp_path: Path,
) -> None:
    """Once every row of a ``d`` record is purged, so is the record (a tombstone), in
    the store that wrote it and in one that restored it; its rows leave no tombstones
    of their own (they never had records of their own), unless a later change gave
    them one. A store restoring after the tombstone forgets the record too."""
    changelog = FakeChangelog()
    async with Store(tmp_path / "a.db") as a:
        a.changelog = changelog
        await a.write(WriteBatch(done=[(action(1), "delivered", 5), (action(2), "failed", 8)]))
        await a.write(WriteBatch(done=[(action(3), "delivered", 20)]))
        async with Store(tmp_path / "b.db") as b:
            b.changelog = FakeChangelog()
            await b.restore([0], changelog.read)
            await b.purge_finished([0], before_ms=10)
            assert b.changelog.partitions[0] == [(b"d\x1fe1:rule:Hook", None)]
        await a.purge_finished([0], before_ms=8)  # e2 (finished at 8) not yet: nor its record
        assert len(changelog.partitions[0]) == 2  # the two d records, nothing since
        # e2 made pending again (from the dead-letter topic), then failed again: a record
        # of its own, so its purge leaves a tombstone too.
        await a.write(WriteBatch(rearmed=[action(2)]))
        await a.write(WriteBatch(finished=[("e2:rule:Hook", "failed", 9)]))
        assert [k for k, _ in changelog.partitions[0][2:]] == [b"a\x1fe2:rule:Hook"] * 2
        await a.purge_finished([0], before_ms=10)
        assert changelog.partitions[0][-2:] == [
            (b"a\x1fe2:rule:Hook", None),
            (b"d\x1fe1:rule:Hook", None),
        ]
        assert await a.action_statuses(["e1:rule:Hook", "e2:rule:Hook", "e3:rule:Hook"]) == {
            "e3:rule:Hook": "delivered"
        }
    assert all_rows(tmp_path / "a.db", "done_batches") == [("e3:rule:Hook", 0, 20)]
    async with Store(tmp_path / "c.db") as c:
        c.changelog = FakeChangelog()
        await c.restore([0], changelog.read)
        # A d record's tombstone does not say which rows it held: e1, read from the
        # record before it, stays until this store's own purge takes it.
        assert await c.action_statuses(["e1:rule:Hook", "e2:rule:Hook", "e3:rule:Hook"]) == {
            "e1:rule:Hook": "delivered",
            "e3:rule:Hook": "delivered",
        }
        await c.purge_finished([0], before_ms=10)
        assert await c.action_statuses(["e1:rule:Hook", "e3:rule:Hook"]) == {
            "e3:rule:Hook": "delivered"
        }
        assert c.changelog.partitions == {}  # nothing left to tombstone
    assert all_rows(tmp_path / "c.db", "done_batches") == [("e3:rule:Hook", 0, 20)]


async def test_a_store_file_from_before_the_logged_column_gets_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    async with Store(path) as store:
        await store.write(WriteBatch(new_actions=[action(1)]))
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("ALTER TABLE actions DROP COLUMN logged")  # as files made before it
    async with Store(path) as store:
        await store.write(WriteBatch(done=[(action(2), "delivered", 5)]))
    assert [(r[0], r[-1]) for r in all_rows(path)] == [("e1:rule:Hook", "a"), ("e2:rule:Hook", "d")]


async def test_a_finished_first_write_of_a_known_action_keeps_the_rows_truth(
    tmp_path: Path,
) -> None:
    """A row that exists already: a pending one is ended, a finished one keeps its
    status, and the changelog carries each row as it is, not as the batch said."""
    changelog = FakeChangelog()
    async with Store(tmp_path / "s.db") as store:
        store.changelog = changelog
        await store.write(WriteBatch(new_actions=[action(1), action(2)]))
        await store.write(WriteBatch(finished=[("e2:rule:Hook", "failed", 7)]))
        await store.write(
            WriteBatch(done=[(action(1), "delivered", 9), (action(2), "delivered", 9)])
        )
        # The same action twice in one (merged) transaction: stored once.
        await asyncio.gather(
            store.write(WriteBatch(done=[(action(3), "delivered", 11)])),
            store.write(WriteBatch(done=[(action(3), "failed", 12)])),
        )
        assert await store.action_statuses(["e1:rule:Hook", "e2:rule:Hook", "e3:rule:Hook"]) == {
            "e1:rule:Hook": "delivered",
            "e2:rule:Hook": "failed",
            "e3:rule:Hook": "delivered",
        }
    latest = {key: value for key, value in changelog.partitions[0]}
    assert latest[b"a\x1fe1:rule:Hook"] is not None
    assert b'"status":"delivered","finished_ms":9' in latest[b"a\x1fe1:rule:Hook"]
    assert latest[b"a\x1fe2:rule:Hook"] is not None
    assert b'"status":"failed","finished_ms":7' in latest[b"a\x1fe2:rule:Hook"]
    assert latest[b"a\x1fe3:rule:Hook"] is not None
    assert b'"status":"delivered","finished_ms":11' in latest[b"a\x1fe3:rule:Hook"]


async def test_purged_actions_leave_tombstones(tmp_path: Path) -> None:
    changelog = FakeChangelog()
    async with Store(tmp_path / "a.db") as a:
        a.changelog = changelog
        await a.write(WriteBatch(new_actions=[action(1), action(2)]))
        await a.write(WriteBatch(finished=[("e1:rule:Hook", "delivered", 5)]))
        await a.purge_finished([0], before_ms=10)
        assert await a.action_statuses(["e1:rule:Hook", "e2:rule:Hook"]) == {
            "e2:rule:Hook": "pending"
        }
    assert changelog.partitions[0][-1] == (b"a\x1fe1:rule:Hook", None)
    async with Store(tmp_path / "b.db") as b:
        await b.restore([0], changelog.read)
        assert await b.action_statuses(["e1:rule:Hook"]) == {}


async def test_checkpoints_bring_the_writers_commits_into_the_database_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's connection never checkpoints (it runs on the event loop's thread);
    every CHECKPOINT_EVERY commits a checkpoint on aiosqlite's thread does."""
    monkeypatch.setattr(writer_module, "CHECKPOINT_EVERY", 3)
    path = tmp_path / "s.db"

    def in_database_file() -> int:
        """Actions in a copy of the database file alone, without its WAL."""
        copy = tmp_path / "copy.db"
        shutil.copyfile(path, copy)
        with contextlib.closing(sqlite3.connect(copy)) as conn:
            tables = conn.execute("SELECT name FROM sqlite_master WHERE name = 'actions'")
            if tables.fetchone() is None:  # not even the schema left the WAL yet
                return 0
            return int(conn.execute("SELECT count(*) FROM actions").fetchone()[0])

    def checkpoint() -> asyncio.Task[None] | None:
        return store.writer._checkpoint

    async with Store(path) as store:
        assert store.writer.db.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        for n in range(2):
            await store.write(WriteBatch(new_actions=[action(n)]))
        assert checkpoint() is None
        assert in_database_file() == 0  # still only in the WAL
        await store.write(WriteBatch(new_actions=[action(2)]))
        started = checkpoint()
        assert started is not None
        await started
        assert in_database_file() == 3


async def test_a_write_waits_for_another_processs_lock_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    async with Store(path) as store:
        await store.write(WriteBatch(new_actions=[action(1)]))
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # as `crmhooks resume` or a second process might
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        ticker = asyncio.create_task(tick())
        write = asyncio.create_task(store.write(WriteBatch(new_actions=[action(2)])))
        await asyncio.sleep(0.5)  # the lock is held this long
        assert not write.done()
        held_ticks = ticks
        other.execute("COMMIT")
        other.close()
        await asyncio.wait_for(write, 10)
        ticker.cancel()
        assert len(await store.load_pending([0], before_ms=10_000)) == 2
        # SQLite's own wait (WRITER_BUSY_MS at a time) would have stopped the loop
        # for all 0.5 s if it were unbounded; with asynchronous pauses it ran on.
        assert held_ticks >= 20, held_ticks


async def test_a_large_transaction_is_checkpointed_without_waiting_for_more_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "CHECKPOINT_EVERY", 1000)
    monkeypatch.setattr(writer_module, "CHECKPOINT_ROWS", 50)
    async with Store(tmp_path / "s.db") as store:

        def checkpoint() -> asyncio.Task[None] | None:
            return store.writer._checkpoint

        await store.write(WriteBatch(new_actions=[action(n) for n in range(10)]))
        assert checkpoint() is None  # 10 rows
        await store.write(WriteBatch(new_actions=[action(n) for n in range(10, 60)]))
        started = checkpoint()  # 60 rows changed since the start: over 50
        assert started is not None
        await started


def size(path: Path) -> int:
    return os.stat(path).st_size


async def test_a_wal_grown_by_a_large_transaction_is_cut_back_after_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite keeps a WAL file at its largest unless told otherwise: one large
    transaction (a million timers scheduled) would leave it that size for good."""
    monkeypatch.setattr(writer_module, "WAL_SIZE_LIMIT_BYTES", 64 * 1024)
    monkeypatch.setattr(writer_module, "CHECKPOINT_ROWS", 50)
    path = tmp_path / "s.db"
    wal = Path(f"{path}-wal")
    async with Store(path) as store:
        big = [(f"org/Potentials/r{n}", 0, b"x" * 2000) for n in range(500)]
        await store.write(WriteBatch(snapshots=big))
        assert size(wal) > 1024 * 1024
        started = store.writer._checkpoint
        assert started is not None
        await started
        await store.write(WriteBatch(new_actions=[action(1)]))  # starts the WAL over
        assert size(wal) <= 64 * 1024


async def test_a_file_that_is_no_database_is_refused_and_nothing_left_open(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"not a database, " * 512)
    before = set(threading.enumerate())  # (a thread of an earlier test may still end)
    with pytest.raises(StoreError, match=r"cannot open store .*s\.db: file is not a database"):
        async with Store(path):
            pass
    await asyncio.sleep(0.05)  # aiosqlite's thread ends once its connection is closed
    assert set(threading.enumerate()) <= before
