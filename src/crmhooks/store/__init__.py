"""The durable store (SQLite, WAL): one file holding every partition's state, and its
changelog topic. ``async with Store(path) as store``.

Every row carries the Kafka partition that owns it, so a partition's state can be
loaded when the partition is assigned and left alone when it is revoked. Every
committed change is also sent to a compacted changelog topic (when a
``ChangelogSink`` is attached), keyed by table and primary key, in the partition
that owns the row: a process on another machine that is assigned the partition
restores its state from there (``restore``), as Kafka Streams does.

The parts, each owning one kind of state — its SQL, its changelog records, their
restore and its purge — and the one mechanism they share:

    writer.py       the file, its connections, the group-commit writer, the
                    changelog's order and acknowledgements, checkpoints, restore,
                    failure (``Writer``)
    actions.py      pending and finished actions, done batches  ``store.actions``
    records.py      record snapshots, ``repeat = "once"`` flags   ``store.records``
    events.py       instant actions' triggering events           ``store.events``
    quota.py        quota counters per organisation and day      ``store.quota``
    suspensions.py  suspensions, and the config ``fingerprint``   ``store.suspensions``
    documents.py    config-topic documents read, where reading    ``store.documents``
                    stopped, refused ones dead-lettered
    changes.py      ``WriteBatch``, changelog records, the ``Table`` protocol
    files.py        the file's modes, which SQLite errors break it, SQL helpers

A change of several kinds (an event's actions, snapshot and flags) is one
``WriteBatch``, applied in one transaction. ``Store`` composes the parts; its
methods are the ones callers used before the split, each one line delegating to
its part.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import aiosqlite

from crmhooks.actions import Action
from crmhooks.clock import Clock, SystemClock
from crmhooks.errors import StoreError
from crmhooks.store.actions import ActionTable
from crmhooks.store.changes import (
    SEP,
    ChangelogRecord,
    ChangelogSink,
    ChangelogSource,
    WriteBatch,
)
from crmhooks.store.documents import DocumentChange, DocumentTable, Refused
from crmhooks.store.events import EventTable
from crmhooks.store.quota import QuotaTable
from crmhooks.store.records import RecordTable
from crmhooks.store.suspensions import SuspensionTable, fingerprint
from crmhooks.store.writer import Writer

__all__ = [
    "SEP",
    "ChangelogRecord",
    "ChangelogSink",
    "ChangelogSource",
    "DocumentChange",
    "Refused",
    "Store",
    "StoreError",
    "WriteBatch",
    "fingerprint",
]


class Store:
    """The store's parts, composed: ``store.actions``, ``.events``, ``.records``, ``.quota``,
    ``.suspensions``, ``.documents`` and their one ``writer``.

    ``clock`` stamps the rows whose purge goes by age (snapshots, cleared flags).
    """

    def __init__(self, path: str | Path, *, clock: Clock | None = None) -> None:
        self.writer = Writer(Path(path), clock or SystemClock())
        self.actions = ActionTable(self.writer)
        self.records = RecordTable(self.writer)
        self.quota = QuotaTable(self.writer)
        self.suspensions = SuspensionTable(self.writer)
        # Events after actions: their purge forgets the events of actions purged before.
        self.events = EventTable(self.writer)
        self.documents = DocumentTable(self.writer)
        self.writer.tables = (
            self.actions,
            self.events,
            self.records,
            self.quota,
            self.suspensions,
            self.documents,
        )
        # The hot path's one call (every report, every batch of events): the writer's
        # own method, without a frame of delegation.
        self.write = self.writer.write

    def __repr__(self) -> str:
        return repr(self.writer).replace("Writer(", "Store(", 1)

    async def __aenter__(self) -> Store:
        await self.writer.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.writer.close()

    # -- the writer's state ------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.writer.path

    @property
    def commits(self) -> int:
        """Transactions committed (for tests, benchmarks and the stop line)."""
        return self.writer.commits

    @property
    def changelog(self) -> ChangelogSink | None:
        """Where committed changes go; attached by the processor once Kafka is up
        (None: no changelog, as for the tools)."""
        return self.writer.changelog

    @changelog.setter
    def changelog(self, sink: ChangelogSink | None) -> None:
        self.writer.changelog = sink

    @property
    def failed(self) -> StoreError | None:
        """The error that failed the store (full or read-only disk, I/O error): every
        write since fails with its text. None while it works."""
        return self.writer.failed

    async def until_failed(self) -> NoReturn:
        """Wait until the store fails, then raise its StoreError: a task of this
        stops the processor at once, with the real error."""
        await self.writer.until_failed()

    @property
    def conn(self) -> aiosqlite.Connection:
        """The reads' connection (aiosqlite's thread): for tests and tools."""
        return self.writer.conn

    # -- restore and purge --------------------------------------------------------------

    async def restore(self, partitions: Sequence[int], source: ChangelogSource) -> int:
        """Bring the rows of ``partitions`` up to date from the changelog; returns how many."""
        return await self.writer.restore(partitions, source)

    async def changelog_offsets(self, partitions: Sequence[int]) -> dict[int, int]:
        return await self.writer.changelog_offsets(partitions)

    async def purge(self, partitions: Sequence[int], before_ms: int) -> None:
        """Forget what ``partitions`` no longer need (``before_ms``: now less the
        finished actions' retention): finished actions and their done batches,
        snapshots of records with nothing pending, cleared ``repeat = "once"`` flags,
        quota days over everywhere. In chunks, each a transaction of its own;
        tombstones go to the changelog, so compaction forgets them there too."""
        if not partitions:
            return
        owned = tuple(partitions)
        for table in self.writer.tables:
            for step in table.purges(owned, before_ms):
                await self.writer.run_purge(step)

    async def purge_finished(self, partitions: Sequence[int], before_ms: int) -> None:
        """``purge`` (the name callers used when it forgot finished actions only)."""
        await self.purge(partitions, before_ms)

    async def data_version(self) -> int:
        """Changes when another connection (``crmhooks resume``) commits to the file."""
        return self.writer.data_version()

    # -- reads, each of its part ----------------------------------------------------------

    async def action_statuses(self, action_ids: Sequence[str]) -> dict[str, str]:
        return await self.actions.statuses(action_ids)

    async def actions_with_status(self, action_ids: Sequence[str]) -> dict[str, tuple[Action, str]]:
        return await self.actions.with_status(action_ids)

    async def get_actions(self, action_ids: Sequence[str]) -> dict[str, Action]:
        return await self.actions.pending(action_ids)

    async def pending_for_records(self, record_keys: Sequence[str]) -> list[Action]:
        return await self.actions.pending_for_records(record_keys)

    async def load_pending(
        self, partitions: Sequence[int], before_ms: int, from_ms: int | None = None
    ) -> list[Action]:
        return await self.actions.load_pending(partitions, before_ms, from_ms)

    async def count_pending(self) -> int:
        return await self.actions.count_pending()

    async def snapshots(self, record_keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        return await self.records.snapshots(record_keys)

    async def once_states(self, state_keys: Sequence[str]) -> dict[str, bool]:
        return await self.records.once_states(state_keys)

    async def action_events(self, action_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        return await self.events.events(action_ids)

    async def quota_used(self, org_id: str, day: str) -> int:
        return await self.quota.used(org_id, day)

    async def suspension_table(self) -> dict[tuple[str, str, str], tuple[int, bool, str]]:
        return await self.suspensions.table()

    async def suspension_rows(self) -> list[tuple[str, str, str, int, int, bool, str]]:
        return await self.suspensions.rows()

    async def resume(self, rule_id: str, webhook: str) -> int:
        return await self.suspensions.resume(rule_id, webhook)
