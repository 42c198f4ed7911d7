"""The actions table: pending actions (the durable delay heap), finished action ids,
the ``done_batches`` that group instant actions in the changelog, and their purge.

Changelog records: ``a`` + SEP + action id, the row as a JSON object (its
``_ROW_FIELDS``); ``d`` + SEP + a batch id, the rows of the actions one transaction
stored finished at their first write in one partition, as JSON arrays (see
``_insert_done``).
"""

from __future__ import annotations

import logging
import operator
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import aiosqlite
import orjson

from crmhooks.actions import Action
from crmhooks.store.changes import (
    SEP,
    ChangelogRecord,
    PurgeStep,
    StoreTable,
    WriteBatch,
    delete_chunk,
)
from crmhooks.store.files import chunks, columns, select_in_writer
from crmhooks.values import keyed

log = logging.getLogger("crmhooks.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS actions (
    action_id     TEXT PRIMARY KEY,
    partition     INTEGER NOT NULL,
    org_id        TEXT NOT NULL,
    module        TEXT NOT NULL,
    record_id     TEXT NOT NULL,
    record_key    TEXT NOT NULL,
    rule_id       TEXT NOT NULL,
    webhook       TEXT NOT NULL,
    kind          TEXT NOT NULL,
    slot          INTEGER NOT NULL,
    due_ms        INTEGER NOT NULL,
    attempt       INTEGER NOT NULL,
    relative_to   TEXT NOT NULL,
    event_id      TEXT NOT NULL,
    source_offset INTEGER NOT NULL,
    status        TEXT NOT NULL,          -- 'pending' or the final status
    finished_ms   INTEGER,
    logged        TEXT NOT NULL DEFAULT 'a' -- changelog: 'a' its own record, 'd' a batch's
);
CREATE INDEX IF NOT EXISTS actions_due ON actions (partition, due_ms) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS actions_record ON actions (record_key) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS actions_finished ON actions (finished_ms) WHERE status != 'pending';
-- A config change (SPEC §5): the pending actions of an organisation, of a (rule,
-- webhook) that is gone, found without reading every pending action.
CREATE INDEX IF NOT EXISTS actions_config
    ON actions (org_id, rule_id, webhook, partition) WHERE status = 'pending';
-- Changelog records each holding the rows of actions finished at their first write
-- (``WriteBatch.done``) of one transaction and partition: what a purge tombstones.
CREATE TABLE IF NOT EXISTS done_batches (
    batch_id    TEXT PRIMARY KEY,         -- its changelog key's id: its first action's id
    partition   INTEGER NOT NULL,
    finished_ms INTEGER NOT NULL          -- the latest of its actions'
);
-- The purge's way in: one row a transaction and partition, written with its batch.
CREATE INDEX IF NOT EXISTS done_batches_finished ON done_batches (finished_ms);
"""

_ACTION_COLUMNS = (
    "action_id, partition, org_id, module, record_id, rule_id, webhook, kind, slot, "
    "due_ms, attempt, relative_to, event_id, source_offset"
)

# Every column of an action row, as the changelog carries it.
_ROW_FIELDS = (
    "action_id",
    "partition",
    "org_id",
    "module",
    "record_id",
    "record_key",
    "rule_id",
    "webhook",
    "kind",
    "slot",
    "due_ms",
    "attempt",
    "relative_to",
    "event_id",
    "source_offset",
    "status",
    "finished_ms",
)
_ROW_COLUMNS = ", ".join(_ROW_FIELDS)
# A row as the changelog's JSON object: one for every action finished (~1.6 -> ~1.1 µs).
_row_dict = keyed(_ROW_FIELDS)

# "A pending action of this record exists", for another table's SQL (records.py keeps
# a record's snapshot while one does): the index actions_record answers it.
PENDING_OF_RECORD = "SELECT 1 FROM actions WHERE status = 'pending' AND record_key = {}"


def _done_batches(rows: list[tuple[Any, ...]]) -> list[tuple[int, str, list[tuple[Any, ...]]]]:
    """Rows (``_ROW_FIELDS`` order) by partition: (partition, batch id, rows), the batch
    id being its first row's action id."""
    by_partition: dict[int, list[tuple[Any, ...]]] = {}
    for row in rows:
        by_partition.setdefault(row[1], []).append(row)
    return [(p, part[0][0], part) for p, part in by_partition.items()]


# A d record's entry: its id, partition, and the latest finished_ms of its rows.
_INSERT_DONE_BATCH = (
    "INSERT OR REPLACE INTO done_batches (batch_id, partition, finished_ms) VALUES (?,?,?)"
)


def _action_change(row: Sequence[Any]) -> ChangelogRecord:
    value = _row_dict(row)
    return (int(value["partition"]), f"a{SEP}{value['action_id']}".encode(), orjson.dumps(value))


# A pending action's row, its ``_ACTION_COLUMNS`` read in one C call.
_action_row: Callable[[Action], tuple[Any, ...]] = operator.attrgetter(*_ACTION_COLUMNS.split(", "))


def _final_row(a: Action, status: str, finished_ms: int) -> tuple[Any, ...]:
    """A finished action's row, every column in ``_ROW_FIELDS`` order (one a delivery:
    written out, 0.14 µs; 0.37 spliced from ``_action_row``, 0.35 with an attrgetter)."""
    return (
        a.action_id,
        a.partition,
        a.org_id,
        a.module,
        a.record_id,
        a.record_key,
        a.rule_id,
        a.webhook,
        a.kind,
        a.slot,
        a.due_ms,
        a.attempt,
        a.relative_to,
        a.event_id,
        a.source_offset,
        status,
        finished_ms,
    )


def _action_from_row(row: Sequence[Any]) -> Action:
    """An action from its ``_ACTION_COLUMNS`` (``_action_row`` order)."""
    return Action(
        action_id=row[0],
        partition=row[1],
        org_id=row[2],
        module=row[3],
        record_id=row[4],
        rule_id=row[5],
        webhook=row[6],
        kind=row[7],
        slot=row[8],
        due_ms=row[9],
        attempt=row[10],
        relative_to=row[11],
        event_id=row[12],
        source_offset=row[13],
    )


class ActionTable(StoreTable):
    """Pending and finished actions: ``store.actions``."""

    letters = "ad"
    schema = SCHEMA

    async def migrate(self, conn: aiosqlite.Connection, now_ms: int) -> None:
        found = await columns(conn, "actions")
        # Made before round 8: every row had a changelog record of its own.
        if found and "logged" not in found:
            await conn.execute("ALTER TABLE actions ADD COLUMN logged TEXT NOT NULL DEFAULT 'a'")
        # Made before config changes were swept: the schema adds the index, once.
        if found and not await _has_index(conn, "actions_config"):
            log.info(
                "store %s: indexing pending actions by organisation, rule and webhook (once)",
                self._writer.path,
            )

    # -- writes (inside the writer's transaction) ------------------------------

    def apply(
        self, db: sqlite3.Connection, b: WriteBatch, now_ms: int, out: list[ChangelogRecord] | None
    ) -> None:
        if b.new_actions:
            db.executemany(
                f"INSERT OR IGNORE INTO actions ({_ACTION_COLUMNS}, record_key, status) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,'pending')",
                [(*_action_row(a), a.record_key) for a in b.new_actions],
            )
        finished = b.finished
        done_rows = self._insert_done(db, b) if b.done else []
        if done_rows is None:  # ended below, read back like the rest
            finished = finished + [(a.action_id, status, at) for a, status, at in b.done]
        if b.rearmed:
            db.executemany(
                "UPDATE actions SET status = 'pending', finished_ms = NULL, attempt = 0, "
                "due_ms = ?, partition = ?, source_offset = ? "
                "WHERE action_id = ? AND status NOT IN ('pending', 'delivered')",
                [(a.due_ms, a.partition, a.source_offset, a.action_id) for a in b.rearmed],
            )
        if b.redelivered:
            db.executemany(
                "UPDATE actions SET status = 'pending', finished_ms = NULL, attempt = ?, "
                "due_ms = ? WHERE action_id = ? AND status != 'pending'",
                [(a.attempt, a.due_ms, a.action_id) for a in b.redelivered],
            )
        if b.moved:
            db.executemany(
                "UPDATE actions SET due_ms = ?, attempt = ? "
                "WHERE action_id = ? AND status = 'pending'",
                [(due, attempt, aid) for aid, due, attempt in b.moved],
            )
        if finished:
            db.executemany(
                "UPDATE actions SET status = ?, finished_ms = ? "
                "WHERE action_id = ? AND status = 'pending'",
                [(status, at, aid) for aid, status, at in finished],
            )
        touched = b.new_actions or b.rearmed or b.redelivered or b.moved or finished or done_rows
        if out is not None and touched:
            self._changelog_of(db, b, finished, done_rows, out)

    def _insert_done(self, db: sqlite3.Connection, b: WriteBatch) -> list[ChangelogRecord] | None:
        """Insert ``b.done`` as final rows; their changelog records, or None when a row
        existed already (or the batch touches it otherwise): then the caller ends it
        if still pending, and the changelog reads the rows back as for the rest.

        Most instant actions take this path: one INSERT, instead of an INSERT as
        pending, an UPDATE and a SELECT (~15 -> ~6 µs an action). Their changelog
        carries them as inserted, in one record per partition (key ``d``, the batch
        id; value, the rows as JSON arrays) rather than one per row: ~2 µs of CPU
        less a delivery (round 8's A/B; sending no record at all saved 5-7). Each
        such record is listed in ``done_batches``, so that a purge tombstones it
        with its rows; the rows are marked ``logged = 'd'`` until a change gives one
        a record of its own (``_changelog_of``), so that a purge tombstones only the
        keys that were written.
        """
        rows = [_final_row(a, status, at) for a, status, at in b.done]
        before = db.total_changes
        db.executemany(
            f"INSERT OR IGNORE INTO actions ({_ROW_COLUMNS}, logged) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,'d')",
            rows,
        )
        others = {a.action_id for a in b.new_actions}
        others.update(a.action_id for a in b.rearmed)
        others.update(a.action_id for a in b.redelivered)
        others.update(m[0] for m in b.moved)
        others.update(f[0] for f in b.finished)
        if db.total_changes - before != len(rows) or any(r[0] in others for r in rows):
            return None
        batches = _done_batches(rows)
        db.executemany(
            _INSERT_DONE_BATCH,
            [(batch_id, p, max(r[-1] for r in part)) for p, batch_id, part in batches],
        )
        return [
            (p, f"d{SEP}{batch_id}".encode(), orjson.dumps(part)) for p, batch_id, part in batches
        ]

    @staticmethod
    def _changelog_of(
        db: sqlite3.Connection,
        b: WriteBatch,
        finished: list[tuple[str, str, int]],
        done_rows: list[ChangelogRecord] | None,
        out: list[ChangelogRecord],
    ) -> None:
        """The rows ``b`` touched, as they are now (read inside its transaction);
        ``done_rows``: those of ``b.done``, known without reading them (None: they
        are in ``finished``, read back)."""
        ids = list(
            dict.fromkeys(
                [a.action_id for a in b.new_actions]
                + [a.action_id for a in b.rearmed]
                + [a.action_id for a in b.redelivered]
                + [m[0] for m in b.moved]
                + [f[0] for f in finished]
            )
        )
        # Read back as they are now; those in a d record get records of their own.
        # (Marking only those: rewriting every row read back, with UPDATE .. RETURNING,
        # cost ~9 % of the scheduling rate.)
        for chunk in chunks(ids):
            marks = ",".join("?" * len(chunk))
            db.execute(
                f"UPDATE actions SET logged = 'a' WHERE logged = 'd' AND action_id IN ({marks})",
                chunk,
            )
        sql = f"SELECT {_ROW_COLUMNS} FROM actions WHERE action_id IN ({{marks}})"
        out += [_action_change(row) for row in select_in_writer(db, sql, ids)]
        if done_rows:
            out += done_rows

    def restore(
        self,
        db: sqlite3.Connection,
        partition: int,
        letter: str,
        key: str,
        value: bytes | None,
        now_ms: int,
    ) -> None:
        if letter == "a":
            if value is None:
                db.execute("DELETE FROM actions WHERE action_id = ?", (key,))
            else:
                row = orjson.loads(value)
                db.execute(
                    f"INSERT OR REPLACE INTO actions ({_ROW_COLUMNS}) "
                    f"VALUES ({','.join('?' * len(_ROW_FIELDS))})",
                    [row[name] for name in _ROW_FIELDS],
                )
        elif value is None:
            # A d tombstone: the writer purged these rows; they go here at this
            # store's own purge (they finished as long ago).
            db.execute("DELETE FROM done_batches WHERE batch_id = ?", (key,))
        else:
            rows = [tuple(row) for row in orjson.loads(value)]
            db.executemany(
                f"INSERT OR REPLACE INTO actions ({_ROW_COLUMNS}, logged) "
                f"VALUES ({','.join('?' * len(_ROW_FIELDS))}, 'd')",
                rows,
            )
            db.execute(_INSERT_DONE_BATCH, (key, partition, max(row[-1] for row in rows)))

    # -- purge ---------------------------------------------------------------------

    def purges(self, partitions: tuple[int, ...], before_ms: int) -> list[PurgeStep]:
        """Final actions finished before ``before_ms`` (their ids stop deduplicating),
        then the d records all of whose rows are gone: every row of a batch finished
        no later than its ``finished_ms``."""
        marks = ",".join("?" * len(partitions))

        def finished_rows(
            db: sqlite3.Connection, out: list[ChangelogRecord] | None, cursor: int
        ) -> int | None:
            more = delete_chunk(
                db,
                out,
                "DELETE FROM actions WHERE rowid IN (SELECT rowid FROM actions "
                f"WHERE status != 'pending' AND finished_ms < ? AND partition IN ({marks}) "
                "LIMIT ?) RETURNING partition, action_id, logged",
                (before_ms, *partitions),
                # Rows of a d record leave no tombstone of their own.
                lambda action_id, how: f"a{SEP}{action_id}" if how == "a" else None,
            )
            return cursor if more else None

        def done_batches(
            db: sqlite3.Connection, out: list[ChangelogRecord] | None, cursor: int
        ) -> int | None:
            more = delete_chunk(
                db,
                out,
                "DELETE FROM done_batches WHERE rowid IN (SELECT rowid FROM done_batches "
                f"WHERE finished_ms < ? AND partition IN ({marks}) LIMIT ?) "
                "RETURNING partition, batch_id",
                (before_ms, *partitions),
                lambda batch_id: f"d{SEP}{batch_id}",
            )
            return cursor if more else None

        return [finished_rows, done_batches]

    # -- reads (aiosqlite's thread) ------------------------------------------------

    async def statuses(self, action_ids: Sequence[str]) -> dict[str, str]:
        """Status of each known action id ('pending' or a final status)."""
        sql = "SELECT action_id, status FROM actions WHERE action_id IN ({marks})"
        return {row[0]: row[1] for row in await self._writer.select_in(sql, action_ids)}

    async def with_status(self, action_ids: Sequence[str]) -> dict[str, tuple[Action, str]]:
        """Actions by id, whatever their status: (the action, 'pending' or its final
        status). A finished action's ``attempt`` is the attempts made before its last."""
        sql = f"SELECT {_ACTION_COLUMNS}, status FROM actions WHERE action_id IN ({{marks}})"
        rows = await self._writer.select_in(sql, action_ids)
        return {row[0]: (_action_from_row(row), row[-1]) for row in rows}

    async def pending(self, action_ids: Sequence[str]) -> dict[str, Action]:
        """Pending actions by id."""
        sql = (
            f"SELECT {_ACTION_COLUMNS} FROM actions "
            "WHERE status = 'pending' AND action_id IN ({marks})"
        )
        rows = await self._writer.select_in(sql, action_ids)
        return {row[0]: _action_from_row(row) for row in rows}

    async def pending_for_records(self, record_keys: Sequence[str]) -> list[Action]:
        """Pending actions of the given records (``org/module/record_id`` keys)."""
        sql = (
            f"SELECT {_ACTION_COLUMNS} FROM actions "
            "WHERE status = 'pending' AND record_key IN ({marks})"
        )
        return [_action_from_row(row) for row in await self._writer.select_in(sql, record_keys)]

    async def load_pending(
        self, partitions: Sequence[int], before_ms: int, from_ms: int | None = None
    ) -> list[Action]:
        """Pending actions of ``partitions`` due before ``before_ms`` (and at/after ``from_ms``)."""
        if not partitions:
            return []
        marks = ",".join("?" * len(partitions))
        sql = (
            f"SELECT {_ACTION_COLUMNS} FROM actions WHERE status = 'pending' "
            f"AND partition IN ({marks}) AND due_ms < ?"
        )
        params: list[Any] = [*partitions, before_ms]
        if from_ms is not None:
            sql += " AND due_ms >= ?"
            params.append(from_ms)
        with self._writer.reading():
            # Converted as they come (a million rows when a partition is assigned after
            # a long stop): never all the rows and all the actions in memory at once.
            async with self._writer.conn.execute(sql, params) as cur:
                return [_action_from_row(row) async for row in cur]

    async def pending_combinations(
        self, partitions: Sequence[int], org_id: str | None = None
    ) -> list[tuple[str, str, str]]:
        """The distinct (org, rule, webhook) of the pending actions of ``partitions`` (of
        one organisation, or of all): a walk of the index ``actions_config`` alone."""
        if not partitions:
            return []
        marks = ",".join("?" * len(partitions))
        if org_id is None:
            sql = (
                "SELECT DISTINCT org_id, rule_id, webhook FROM actions "
                f"WHERE status = 'pending' AND partition IN ({marks})"
            )
            rows = await self._writer.read(sql, list(partitions))
        else:
            sql = (
                "SELECT DISTINCT org_id, rule_id, webhook FROM actions "
                f"WHERE status = 'pending' AND org_id = ? AND partition IN ({marks})"
            )
            rows = await self._writer.read(sql, [org_id, *partitions])
        return [(r[0], r[1], r[2]) for r in rows]

    async def pending_of(
        self,
        combination: tuple[str, str, str],
        partition: int,
        after_rowid: int = 0,
        limit: int = 1000,
    ) -> list[tuple[int, Action]]:
        """Pending actions of one (org, rule, webhook) in ``partition``, in chunks: up to
        ``limit`` after ``after_rowid``, each with its rowid (where the next chunk starts).
        In the index's order, nothing sorted."""
        org_id, rule_id, webhook = combination
        sql = (
            f"SELECT rowid, {_ACTION_COLUMNS} FROM actions WHERE status = 'pending' "
            "AND org_id = ? AND rule_id = ? AND webhook = ? AND partition = ? AND rowid > ? "
            "ORDER BY rowid LIMIT ?"
        )
        rows = await self._writer.read(
            sql, [org_id, rule_id, webhook, partition, after_rowid, limit]
        )
        return [(int(row[0]), _action_from_row(row[1:])) for row in rows]

    async def count_pending(self) -> int:
        rows = await self._writer.read("SELECT count(*) FROM actions WHERE status = 'pending'")
        return int(rows[0][0]) if rows else 0


async def _has_index(conn: aiosqlite.Connection, name: str) -> bool:
    async with conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (name,)
    ) as cur:
        return await cur.fetchone() is not None
