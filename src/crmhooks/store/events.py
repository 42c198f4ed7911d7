"""The event that triggered an instant action, kept with the action when the action is
stored not delivered, and purged with it.

SPEC §5: an instant action, and every retry of it, is rendered from the record as it
was in the event that triggered it — not from the record's latest snapshot
(``records.py``), which a later edit overwrites. Most instant actions are delivered
at once and stored finished at their first write, with no event (the hot path: one
row). The others keep their event here: one stored pending (unfinished when its
batch had to be committed, or retrying), one that ended undelivered at its first
attempt (so that ``crmhooks redeliver`` renders it as it was), one rearmed by a
replayed dead letter.

Changelog records: ``e`` + SEP + action id, the event as received (JSON).

An event stays while its action row exists; the purge after the actions' own
(finished actions past their retention) forgets the events left without one, with
tombstones.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import orjson

from crmhooks.store.changes import (
    SEP,
    ChangelogRecord,
    PurgeStep,
    StoreTable,
    WriteBatch,
    delete_chunk,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS action_events (
    action_id TEXT PRIMARY KEY,            -- an instant action's
    partition INTEGER NOT NULL,
    data      BLOB NOT NULL                -- the event that triggered it, as received (JSON)
);
"""


class EventTable(StoreTable):
    """Triggering events of instant actions: ``store.events``."""

    letters = "e"
    schema = SCHEMA

    # -- writes (inside the writer's transaction) ------------------------------

    def apply(
        self, db: sqlite3.Connection, b: WriteBatch, now_ms: int, out: list[ChangelogRecord] | None
    ) -> None:
        if not b.action_events:
            return
        # An action's triggering event never changes; one written again (an event read
        # again after a crash, a replayed dead letter) is the same version.
        db.executemany(
            "INSERT OR REPLACE INTO action_events (action_id, partition, data) VALUES (?,?,?)",
            b.action_events,
        )
        if out is not None:
            latest = {a: (a, p, d) for a, p, d in b.action_events}
            out += [(p, f"e{SEP}{a}".encode(), data) for a, p, data in latest.values()]

    def restore(
        self,
        db: sqlite3.Connection,
        partition: int,
        letter: str,
        key: str,
        value: bytes | None,
        now_ms: int,
    ) -> None:
        if value is None:
            db.execute("DELETE FROM action_events WHERE action_id = ?", (key,))
        else:
            db.execute(
                "INSERT OR REPLACE INTO action_events (action_id, partition, data) VALUES (?,?,?)",
                (key, partition, value),
            )

    # -- purge ---------------------------------------------------------------------

    def purges(self, partitions: tuple[int, ...], before_ms: int) -> list[PurgeStep]:
        """The events whose action is gone (purged by ``actions``' steps, run before)."""
        marks = ",".join("?" * len(partitions))

        def orphans(
            db: sqlite3.Connection, out: list[ChangelogRecord] | None, cursor: int
        ) -> int | None:
            more = delete_chunk(
                db,
                out,
                "DELETE FROM action_events WHERE rowid IN (SELECT e.rowid FROM action_events e "
                f"WHERE e.partition IN ({marks}) AND NOT EXISTS "
                "(SELECT 1 FROM actions a WHERE a.action_id = e.action_id) LIMIT ?) "
                "RETURNING partition, action_id",
                partitions,
                lambda action_id: f"e{SEP}{action_id}",
            )
            return cursor if more else None

        return [orphans]

    # -- reads (aiosqlite's thread) ------------------------------------------------

    async def events(self, action_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The triggering event stored for each of ``action_ids`` (absent: none kept)."""
        sql = "SELECT action_id, data FROM action_events WHERE action_id IN ({marks})"
        rows = await self._writer.select_in(sql, action_ids)
        return {row[0]: orjson.loads(row[1]) for row in rows}
