"""What the store keeps per CRM record: its latest snapshot (scheduled actions render
it at fire time) and its ``repeat = "once"`` flags, with their purge.

Changelog records: ``r`` + SEP + record key, the event as received (JSON);
``o`` + SEP + state key (rule id, SEP, record key), ``1`` or ``0``.

What is kept, and for how long:

- A snapshot stays while an action of its record is pending (it renders the
  action, and its retries, at fire time). Once none is, nothing of this version
  reads it; it is purged, with a tombstone, once the finished actions' retention
  has passed since it was last written (``written_ms``): a margin for a record
  seen again soon, and for tools looking at recently finished actions. (So the
  snapshot of a 30-day timer goes at the first purge after the timer ends.) It is
  never purged while a pending action of its record exists: the purge's test and
  the insert of a pending action are transactions of the one writer, so either
  the action is there when the purge looks, or its transaction writes the
  snapshot again after the purge.
- A flag that is set (criteria met last time) stays as long as the record can
  have events: it is what makes the rule fire once. One that is cleared means the
  same as no flag; it is kept for the retention since it was cleared
  (``changed_ms``), then purged with a tombstone. (Not deleted at once: a process of
  the previous version restoring the partition ignores ``o`` tombstones, and must
  see the ``0`` before the tombstone replaces it in the compacted topic.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import aiosqlite
import orjson

from crmhooks.store.actions import PENDING_OF_RECORD
from crmhooks.store.changes import (
    SEP,
    ChangelogRecord,
    PurgeStep,
    StoreTable,
    WriteBatch,
    delete_chunk,
)
from crmhooks.store.files import columns

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    record_key TEXT PRIMARY KEY,
    partition  INTEGER NOT NULL,
    data       BLOB NOT NULL,               -- the latest event seen for the record (JSON)
    written_ms INTEGER NOT NULL DEFAULT 0   -- when it was (the purge's clock)
);
CREATE TABLE IF NOT EXISTS rule_state (
    state_key  TEXT PRIMARY KEY,           -- rule_id, U+001F, record_key
    partition  INTEGER NOT NULL,
    matched    INTEGER NOT NULL,           -- repeat = "once": criteria met last time
    changed_ms INTEGER NOT NULL DEFAULT 0  -- when matched was last written
);
-- The purge's way to the cleared flags (only those are in it).
CREATE INDEX IF NOT EXISTS rule_state_cleared ON rule_state (changed_ms) WHERE matched = 0;
"""

# Snapshots looked at per purge transaction (by rowid: no index on written_ms, which
# every snapshot written would have to keep up to date): ~5 ms of the event loop's
# thread each.
SNAPSHOT_PURGE_WINDOW = 5000


class RecordTable(StoreTable):
    """Record snapshots and ``repeat = "once"`` flags: ``store.records``."""

    letters = "ro"
    schema = SCHEMA

    async def migrate(self, conn: aiosqlite.Connection, now_ms: int) -> None:
        # Rows of an older version: as if written now (kept the retention from here).
        if (found := await columns(conn, "records")) and "written_ms" not in found:
            await conn.execute(
                f"ALTER TABLE records ADD COLUMN written_ms INTEGER NOT NULL DEFAULT {now_ms:d}"
            )
        if (found := await columns(conn, "rule_state")) and "changed_ms" not in found:
            await conn.execute(
                f"ALTER TABLE rule_state ADD COLUMN changed_ms INTEGER NOT NULL DEFAULT {now_ms:d}"
            )

    # -- writes (inside the writer's transaction) ------------------------------

    def apply(
        self, db: sqlite3.Connection, b: WriteBatch, now_ms: int, out: list[ChangelogRecord] | None
    ) -> None:
        if b.snapshots:
            db.executemany(
                "INSERT INTO records (record_key, partition, data, written_ms) VALUES (?,?,?,?) "
                "ON CONFLICT (record_key) DO UPDATE SET data = excluded.data, "
                "written_ms = excluded.written_ms",
                [(k, p, data, now_ms) for k, p, data in b.snapshots],
            )
            if out is not None:
                latest = {k: (k, p, d) for k, p, d in b.snapshots}
                out += [(p, f"r{SEP}{k}".encode(), data) for k, p, data in latest.values()]
        if b.once_state:
            db.executemany(
                "INSERT INTO rule_state (state_key, partition, matched, changed_ms) "
                "VALUES (?,?,?,?) ON CONFLICT (state_key) DO UPDATE SET "
                "matched = excluded.matched, changed_ms = excluded.changed_ms",
                [(k, p, int(m), now_ms) for k, p, m in b.once_state],
            )
            if out is not None:
                flags = {k: (k, p, m) for k, p, m in b.once_state}
                out += [
                    (p, f"o{SEP}{k}".encode(), b"1" if m else b"0") for k, p, m in flags.values()
                ]

    def restore(
        self,
        db: sqlite3.Connection,
        partition: int,
        letter: str,
        key: str,
        value: bytes | None,
        now_ms: int,
    ) -> None:
        if letter == "r":
            if value is None:
                db.execute("DELETE FROM records WHERE record_key = ?", (key,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO records (record_key, partition, data, written_ms) "
                    "VALUES (?,?,?,?)",
                    (key, partition, value, now_ms),
                )
        elif value is None:
            db.execute("DELETE FROM rule_state WHERE state_key = ?", (key,))
        else:
            db.execute(
                "INSERT OR REPLACE INTO rule_state (state_key, partition, matched, changed_ms) "
                "VALUES (?,?,?,?)",
                (key, partition, int(value == b"1"), now_ms),
            )

    # -- purge ---------------------------------------------------------------------

    def purges(self, partitions: tuple[int, ...], before_ms: int) -> list[PurgeStep]:
        """Snapshots written before ``before_ms`` of records with no pending action;
        flags cleared before ``before_ms`` (see the module docstring)."""
        marks = ",".join("?" * len(partitions))

        def snapshots(
            db: sqlite3.Connection, out: list[ChangelogRecord] | None, cursor: int
        ) -> int | None:
            end = cursor + SNAPSHOT_PURGE_WINDOW
            cur = db.execute(
                "DELETE FROM records WHERE rowid > ? AND rowid <= ? "
                f"AND partition IN ({marks}) AND written_ms < ? "
                f"AND NOT EXISTS ({PENDING_OF_RECORD.format('records.record_key')}) "
                "RETURNING partition, record_key",
                (cursor, end, *partitions, before_ms),
            )
            gone = cur.fetchall()
            if out is not None:
                out += [(int(p), f"r{SEP}{k}".encode(), None) for p, k in gone]
            (last,) = db.execute("SELECT max(rowid) FROM records").fetchone()
            return end if last is not None and last > end else None

        def cleared_flags(
            db: sqlite3.Connection, out: list[ChangelogRecord] | None, cursor: int
        ) -> int | None:
            more = delete_chunk(
                db,
                out,
                "DELETE FROM rule_state WHERE rowid IN (SELECT rowid FROM rule_state "
                f"WHERE matched = 0 AND changed_ms < ? AND partition IN ({marks}) LIMIT ?) "
                "RETURNING partition, state_key",
                (before_ms, *partitions),
                lambda state_key: f"o{SEP}{state_key}",
            )
            return cursor if more else None

        return [snapshots, cleared_flags]

    # -- reads (aiosqlite's thread) ------------------------------------------------

    async def snapshots(self, record_keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The latest event stored for each record key."""
        sql = "SELECT record_key, data FROM records WHERE record_key IN ({marks})"
        rows = await self._writer.select_in(sql, record_keys)
        return {row[0]: orjson.loads(row[1]) for row in rows}

    async def once_states(self, state_keys: Sequence[str]) -> dict[str, bool]:
        """``repeat = "once"`` flags by state key (absent: never met)."""
        sql = "SELECT state_key, matched FROM rule_state WHERE state_key IN ({marks})"
        return {row[0]: bool(row[1]) for row in await self._writer.select_in(sql, state_keys)}
