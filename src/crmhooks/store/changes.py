"""What one store transaction changes, and the changelog records it leaves: the types
the writer and the state modules share.

A changelog record is ``(partition, key, value)``: the key is a table letter, SEP,
then the row's primary key (its parts joined by SEP); the value is the row as it is
now, None a tombstone. The letters, each owned by one state module, which alone
encodes and restores its records:

    a  an action (its own record)            actions.py
    d  the actions of one transaction stored finished at their first write
    r  a record's latest snapshot            records.py
    o  a ``repeat = "once"`` flag
    e  the event that triggered an instant action   events.py
    q  a quota counter                       quota.py
    s  a suspension                          suspensions.py
    c  a refused config document dead-lettered  documents.py
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import aiosqlite

from crmhooks.actions import Action

if TYPE_CHECKING:
    from crmhooks.store.writer import Writer

SEP = "\x1f"  # between the parts of a changelog key: never in ids (control characters)

# (partition, key, value): one row's latest state; value None deletes it (tombstone)
ChangelogRecord = tuple[int, bytes, bytes | None]

# Work done inside a transaction besides a WriteBatch's lists (a purge's chunk): run
# on the writer's connection, it appends its changelog records to the list given
# (None: no changelog attached). Run again if SQLite makes the writer retry.
Step = Callable[[sqlite3.Connection, list[ChangelogRecord] | None], None]


class ChangelogSink(Protocol):
    """Queues changelog records in the order given and returns, without waiting for
    the broker, an awaitable of their acknowledgement: partition → next offset."""

    async def __call__(self, records: Sequence[ChangelogRecord]) -> Awaitable[dict[int, int]]: ...


class ChangelogSource(Protocol):
    """Reads one changelog partition from an offset to its current end."""

    def __call__(
        self, partition: int, from_offset: int
    ) -> AsyncIterator[tuple[int, bytes, bytes | None]]: ...


@dataclass(slots=True)
class WriteBatch:
    """Changes to apply atomically. The writer applies restored rows first, then each
    state module its own lists (actions, records, quota, suspensions), then ``steps``."""

    new_actions: list[Action] = field(default_factory=list)
    # (action_id, due_ms, attempt): move a pending action (retry or reschedule)
    moved: list[tuple[str, int, int]] = field(default_factory=list)
    # replayed from the dead-letter topic: a finished, undelivered action made pending again
    rearmed: list[Action] = field(default_factory=list)
    # `crmhooks redeliver`: a finished action made pending again, due at its due_ms, its
    # attempts so far kept in its attempt (the next one continues the count)
    redelivered: list[Action] = field(default_factory=list)
    # (action_id, final status, finished_ms)
    finished: list[tuple[str, str, int]] = field(default_factory=list)
    # (action, final status, finished_ms): stored for the first time, already finished
    # (an instant action sent before it was stored). One row written as it is final.
    done: list[tuple[Action, str, int]] = field(default_factory=list)
    # (record_key, partition, the event as JSON)
    snapshots: list[tuple[str, int, bytes]] = field(default_factory=list)
    # (action_id, partition, the event as JSON): an instant action's triggering event,
    # for an instant action stored without being delivered (events.py)
    action_events: list[tuple[str, int, bytes]] = field(default_factory=list)
    # (state key of workflow.once_key, partition, matched)
    once_state: list[tuple[str, int, bool]] = field(default_factory=list)
    # (org_id, day, partition, delta)
    quota: list[tuple[str, str, int, int]] = field(default_factory=list)
    # (org_id, rule_id, webhook, partition, failed_actions, suspended, config fingerprint)
    suspensions: list[tuple[str, str, str, int, int, bool, str]] = field(default_factory=list)
    # rows read back from the changelog (restore): applied as they are, not sent again
    restored: list[ChangelogRecord] = field(default_factory=list)
    restored_offsets: dict[int, int] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)

    def extend(self, other: WriteBatch) -> None:
        # Most batches carry one or two kinds of change: test before concatenating.
        for name in CHANGE_LISTS:
            more = getattr(other, name)
            if more:
                getattr(self, name).extend(more)
        if other.restored_offsets:
            self.restored_offsets.update(other.restored_offsets)

    def __bool__(self) -> bool:
        return bool(self.restored_offsets) or any(getattr(self, n) for n in CHANGE_LISTS)


# The lists of changes of a WriteBatch.
CHANGE_LISTS = (
    "new_actions",
    "moved",
    "rearmed",
    "redelivered",
    "finished",
    "done",
    "snapshots",
    "action_events",
    "once_state",
    "quota",
    "suspensions",
    "restored",
    "steps",
)


class Table(Protocol):
    """One kind of state in the store: its SQL, its changelog records, its restore.

    The writer calls these inside its transaction, on its own connection (the event
    loop's thread): they must not await. ``now_ms`` is the writer's clock, read once
    a transaction.
    """

    # The changelog key letters whose records this table encodes and restores.
    letters: str
    # CREATE TABLE / INDEX IF NOT EXISTS statements.
    schema: str

    async def migrate(self, conn: aiosqlite.Connection, now_ms: int) -> None:
        """Bring the tables of a file made by an older version up to date. Runs
        before ``schema``, whose indexes may need the columns it adds; a table that
        does not exist yet is left to ``schema``."""

    def apply(
        self, db: sqlite3.Connection, b: WriteBatch, now_ms: int, out: list[ChangelogRecord] | None
    ) -> None:
        """Run ``b``'s changes to this table; append their changelog records to ``out``
        (None: no changelog attached, nothing to encode)."""

    def restore(
        self,
        db: sqlite3.Connection,
        partition: int,
        letter: str,
        key: str,
        value: bytes | None,
        now_ms: int,
    ) -> None:
        """Apply one record read back from the changelog (``key`` without its letter)."""

    def purges(self, partitions: tuple[int, ...], before_ms: int) -> list[PurgeStep]:
        """The steps that forget this table's rows of ``partitions`` that are no longer
        needed (``before_ms``: now less the retention), each run again until done."""


# One chunk of a purge, in a transaction of its own: (connection, changelog records
# out, cursor) -> the cursor to go on from, None when nothing is left to purge. The
# first call gets cursor 0. Chunks keep each transaction short: the writer runs on
# the event loop's thread.
PurgeStep = Callable[[sqlite3.Connection, list[ChangelogRecord] | None, int], int | None]

# Rows deleted per purge transaction: ~10 ms of the event loop's thread each, so
# timers and deliveries go on between them.
PURGE_CHUNK = 2000


def delete_chunk(
    db: sqlite3.Connection,
    out: list[ChangelogRecord] | None,
    sql: str,
    params: Sequence[object],
    tombstone: Callable[..., str | None],
) -> bool:
    """One chunk of a purge: ``sql`` deletes at most PURGE_CHUNK rows (its last
    parameter, after ``params``: ``... LIMIT ?) RETURNING partition, <key columns>``);
    each row deleted leaves the tombstone keyed ``tombstone(*key columns)`` (None: no
    record of its own). Whether a whole chunk went: then more may be left."""
    gone = db.execute(sql, (*params, PURGE_CHUNK)).fetchall()
    if out is not None:
        for partition, *key in gone:
            name = tombstone(*key)
            if name is not None:
                out.append((int(partition), name.encode(), None))
    return len(gone) == PURGE_CHUNK


class StoreTable:
    """What every table of the store shares: its writer, its repr, and no migration
    (a table a version changes overrides ``migrate``)."""

    def __init__(self, writer: Writer) -> None:
        self._writer = writer

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self._writer.path)!r})"

    async def migrate(self, conn: aiosqlite.Connection, now_ms: int) -> None:
        """Nothing to migrate: unchanged since its first version (or new in this one)."""
