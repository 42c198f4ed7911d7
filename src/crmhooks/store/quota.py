"""Quota counters: requests counted per organisation and calendar day (SPEC §9).

Changelog records: ``q`` + SEP + org id + SEP + day, the count as decimal text (the
total, read back after the increment: applying a record twice changes nothing).

A purge (its cutoff: now less the finished actions' retention) keeps the days
from two days before the cutoff's UTC day on, and forgets older ones, with
tombstones: no time zone is more than 14 hours from UTC, so those are over
everywhere, with a day to spare.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

from crmhooks.store.changes import (
    SEP,
    ChangelogRecord,
    PurgeStep,
    StoreTable,
    WriteBatch,
    delete_chunk,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS quota (
    org_id    TEXT NOT NULL,
    day       TEXT NOT NULL,               -- yyyy-MM-dd in the organisation's time zone
    partition INTEGER NOT NULL,
    used      INTEGER NOT NULL,
    PRIMARY KEY (org_id, day)
);
"""

# Days kept before the cutoff's UTC day (see the module docstring).
DAYS_KEPT = 2


def oldest_day_kept(before_ms: int) -> str:
    """The first day (yyyy-MM-dd) a purge with this cutoff keeps."""
    day = datetime.fromtimestamp(before_ms / 1000, UTC).date() - timedelta(days=DAYS_KEPT)
    return day.isoformat()


class QuotaTable(StoreTable):
    """Counters per organisation and day: ``store.quota``."""

    letters = "q"
    schema = SCHEMA

    def apply(
        self, db: sqlite3.Connection, b: WriteBatch, now_ms: int, out: list[ChangelogRecord] | None
    ) -> None:
        if not b.quota:
            return
        db.executemany(
            "INSERT INTO quota (org_id, day, partition, used) VALUES (?,?,?,?) "
            "ON CONFLICT (org_id, day) DO UPDATE SET used = used + excluded.used",
            b.quota,
        )
        if out is None:
            return
        for org_id, day, partition in {(o, d): (o, d, p) for o, d, p, _ in b.quota}.values():
            found = db.execute(
                "SELECT used FROM quota WHERE org_id = ? AND day = ?", (org_id, day)
            ).fetchone()
            used = int(found[0]) if found else 0
            out.append((partition, f"q{SEP}{org_id}{SEP}{day}".encode(), str(used).encode()))

    def restore(
        self,
        db: sqlite3.Connection,
        partition: int,
        letter: str,
        key: str,
        value: bytes | None,
        now_ms: int,
    ) -> None:
        org_id, _, day = key.partition(SEP)
        if value is None:
            db.execute("DELETE FROM quota WHERE org_id = ? AND day = ?", (org_id, day))
        else:
            db.execute(
                "INSERT OR REPLACE INTO quota (org_id, day, partition, used) VALUES (?,?,?,?)",
                (org_id, day, partition, int(value)),
            )

    def purges(self, partitions: tuple[int, ...], before_ms: int) -> list[PurgeStep]:
        marks = ",".join("?" * len(partitions))
        oldest = oldest_day_kept(before_ms)

        def old_days(
            db: sqlite3.Connection, out: list[ChangelogRecord] | None, cursor: int
        ) -> int | None:
            more = delete_chunk(
                db,
                out,
                "DELETE FROM quota WHERE rowid IN (SELECT rowid FROM quota "
                f"WHERE day < ? AND partition IN ({marks}) LIMIT ?) "
                "RETURNING partition, org_id, day",
                (oldest, *partitions),
                lambda org_id, day: f"q{SEP}{org_id}{SEP}{day}",
            )
            return cursor if more else None

        return [old_days]

    async def used(self, org_id: str, day: str) -> int:
        rows = await self._writer.read(
            "SELECT used FROM quota WHERE org_id = ? AND day = ?", (org_id, day)
        )
        return int(rows[0][0]) if rows else 0
