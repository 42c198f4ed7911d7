"""Config-topic documents (SPEC §3.2) as this process read them, where it stopped
reading, and which refused documents were dead-lettered.

Every process reads the whole config topic into its own store: ``config_documents``
(the valid document in force per organisation, and the dead letter of a newer one
that was refused) and ``config_positions`` (the next offset to read per partition
of the topic, written in the same transaction as the documents read before it), so
a restart reads only what is new. Neither goes to the changelog: they are not a
partition's state, each process has them from the topic itself.

``config_reports`` is a partition's state: the last refused document of an
organisation whose dead letter was written, by the owner of the events partition
of the organisation's key (``config_topic`` says why that one). It travels with
the partition, so the next owner never writes the same dead letter again.
Changelog records: ``c`` + SEP + org id, the JSON array
``[config partition, config offset]``. Not purged: one row per organisation that
ever had a document refused.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from crmhooks.store.changes import SEP, ChangelogRecord, PurgeStep, Step, StoreTable, WriteBatch

SCHEMA = """
CREATE TABLE IF NOT EXISTS config_documents (
    org_id            TEXT PRIMARY KEY,
    document          BLOB,              -- the valid document in force (as read); NULL: none
    partition         INTEGER NOT NULL,  -- where it was read in the config topic
    offset            INTEGER NOT NULL,
    refused           BLOB,              -- the dead letter of a newer, refused document
    refused_partition INTEGER,
    refused_offset    INTEGER
);
-- The organisations with a refused document not superseded: few, looked at when
-- partitions are assigned.
CREATE INDEX IF NOT EXISTS config_documents_refused
    ON config_documents (org_id) WHERE refused IS NOT NULL;
CREATE TABLE IF NOT EXISTS config_positions (
    partition   INTEGER PRIMARY KEY,     -- of the config topic
    next_offset INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS config_reports (
    org_id           TEXT PRIMARY KEY,
    partition        INTEGER NOT NULL,   -- the events partition of the organisation's key
    config_partition INTEGER NOT NULL,   -- the refused document last dead-lettered
    config_offset    INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class DocumentChange:
    """What one record of the config topic changes for its organisation.

    ``document`` set: a valid document, now in force (a refused one before it is
    forgotten). ``refused`` set: the dead letter of a refused document (the valid one
    stays). Neither: a tombstone, the organisation has no document any more.
    """

    org_id: str
    partition: int
    offset: int
    document: bytes | None = None
    refused: bytes | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """A refused document not superseded: where it was read, and its dead letter."""

    org_id: str
    partition: int
    offset: int
    letter: bytes


class DocumentTable(StoreTable):
    """Config-topic documents, positions and dead-letter marks: ``store.documents``."""

    letters = "c"
    schema = SCHEMA

    def apply(
        self, db: sqlite3.Connection, b: WriteBatch, now_ms: int, out: list[ChangelogRecord] | None
    ) -> None:
        pass  # its writes are steps (``read_step``, ``reported_step``)

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
            db.execute("DELETE FROM config_reports WHERE org_id = ?", (key,))
            return
        config_partition, config_offset = orjson.loads(value)
        db.execute(
            "INSERT OR REPLACE INTO config_reports "
            "(org_id, partition, config_partition, config_offset) VALUES (?,?,?,?)",
            (key, partition, config_partition, config_offset),
        )

    def purges(self, partitions: tuple[int, ...], before_ms: int) -> list[PurgeStep]:
        return []  # documents are the topic's; marks are one per organisation

    # -- writes: steps of a WriteBatch -------------------------------------------------

    @staticmethod
    def read_step(changes: Sequence[DocumentChange], positions: Mapping[int, int]) -> Step:
        """Store what a read of the config topic changed, and how far it read: one
        transaction, so a restart reads again exactly what was not stored."""
        changes = list(changes)
        positions = dict(positions)

        def step(db: sqlite3.Connection, out: list[ChangelogRecord] | None) -> None:
            # In the order read: a change of an organisation replaces the one before.
            for change in changes:
                if change.document is not None:
                    db.execute(
                        "INSERT INTO config_documents (org_id, document, partition, offset) "
                        "VALUES (?,?,?,?) ON CONFLICT (org_id) DO UPDATE SET "
                        "document = excluded.document, partition = excluded.partition, "
                        "offset = excluded.offset, refused = NULL, "
                        "refused_partition = NULL, refused_offset = NULL",
                        (change.org_id, change.document, change.partition, change.offset),
                    )
                elif change.refused is not None:
                    db.execute(
                        "INSERT INTO config_documents (org_id, document, partition, offset, "
                        "refused, refused_partition, refused_offset) VALUES (?,NULL,?,?,?,?,?) "
                        "ON CONFLICT (org_id) DO UPDATE SET refused = excluded.refused, "
                        "refused_partition = excluded.refused_partition, "
                        "refused_offset = excluded.refused_offset",
                        (
                            change.org_id,
                            change.partition,
                            change.offset,
                            change.refused,
                            change.partition,
                            change.offset,
                        ),
                    )
                else:  # a tombstone: no document, and no refusal left to report
                    db.execute("DELETE FROM config_documents WHERE org_id = ?", (change.org_id,))
            if positions:
                db.executemany(
                    "INSERT INTO config_positions (partition, next_offset) VALUES (?,?) "
                    "ON CONFLICT (partition) DO UPDATE SET "
                    "next_offset = max(next_offset, excluded.next_offset)",
                    list(positions.items()),
                )

        return step

    @staticmethod
    def reported_step(marks: Iterable[tuple[str, int, int, int]]) -> Step:
        """``(org_id, events partition, config partition, config offset)``: the refused
        documents whose dead letters are written, into the partitions' state."""
        rows = list(marks)

        def step(db: sqlite3.Connection, out: list[ChangelogRecord] | None) -> None:
            db.executemany(
                "INSERT OR REPLACE INTO config_reports "
                "(org_id, partition, config_partition, config_offset) VALUES (?,?,?,?)",
                rows,
            )
            if out is not None:
                out += [
                    (p, f"c{SEP}{org}".encode(), orjson.dumps([cp, co])) for org, p, cp, co in rows
                ]

        return step

    # -- reads ---------------------------------------------------------------------------

    async def positions(self) -> dict[int, int]:
        """Config-topic partition → the next offset to read (absent: from the start)."""
        rows = await self._writer.read("SELECT partition, next_offset FROM config_positions")
        return {int(p): int(o) for p, o in rows}

    async def org_ids(self) -> list[str]:
        """Every organisation with a valid document in force."""
        rows = await self._writer.read(
            "SELECT org_id FROM config_documents WHERE document IS NOT NULL"
        )
        return [r[0] for r in rows]

    async def documents(self, org_ids: Sequence[str]) -> dict[str, bytes]:
        """The documents in force of ``org_ids`` (those that have one)."""
        sql = (
            "SELECT org_id, document FROM config_documents "
            "WHERE document IS NOT NULL AND org_id IN ({marks})"
        )
        return {r[0]: bytes(r[1]) for r in await self._writer.select_in(sql, org_ids)}

    def document_now(self, org_id: str) -> bytes | None:
        """The document in force of one organisation, read at once on the writer's
        connection (the event loop's thread: a primary-key read, tens of µs) for a
        lookup that cannot wait (``orgconfig``: an organisation not prefetched)."""
        with self._writer.reading():
            row = self._writer.db.execute(
                "SELECT document FROM config_documents WHERE org_id = ?", (org_id,)
            ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    async def refused(self) -> list[Refused]:
        """Refused documents not superseded by a valid one or a tombstone."""
        rows = await self._writer.read(
            "SELECT org_id, refused_partition, refused_offset, refused FROM config_documents "
            "WHERE refused IS NOT NULL"
        )
        return [Refused(r[0], int(r[1]), int(r[2]), bytes(r[3])) for r in rows]

    async def reported(self, org_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Organisation → (config partition, offset) of its last dead-lettered document."""
        sql = (
            "SELECT org_id, config_partition, config_offset FROM config_reports "
            "WHERE org_id IN ({marks})"
        )
        rows = await self._writer.select_in(sql, org_ids)
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}
