"""The durable store (SQLite, WAL): pending actions, record snapshots, rule state, quota.

Every row carries the Kafka partition that owns it, so a partition's state can be
loaded when the partition is assigned and left alone when it is revoked.

Every committed change is also sent to a compacted changelog topic (when a
``ChangelogSink`` is attached), keyed by table and primary key, in the partition
that owns the row: a process on another machine that is assigned the partition
restores its state from there (``restore``), as Kafka Streams does. (Actions
stored finished at their first write are the exception: one record per
transaction and partition holds them all, see ``_insert_done``.)

Writes go through one group-commit writer: callers hand over a ``WriteBatch`` and
await it; the writer folds every batch queued meanwhile into one transaction, so
under load there is one commit per round, not one per event. A caller hears
"stored" only once its transaction's changelog records are acknowledged too;
the writer does not wait for those acknowledgements before the next transaction
(the records are queued in commit order, and callers are answered in that order).

The writer's transactions run on the event loop's own thread, on a connection
of their own: short transactions (a few hundred µs) cost less there than the
hops to a worker thread and the handing over of the GIL that each one took
(+30 % deliveries per second, measured). What can take long stays on
aiosqlite's thread: the reads (a partition's pending actions when it is
assigned may be a million rows) and the WAL checkpoints, which fsync and which
the writer's connection therefore never runs itself (``wal_autocheckpoint=0``).

WAL with ``synchronous=NORMAL`` keeps every committed transaction across
``kill -9`` (the WAL is in the OS page cache); only a power loss may lose the
last commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import aiosqlite
import orjson

from crmhooks.actions import Action
from crmhooks.errors import StoreError
from crmhooks.values import keyed

log = logging.getLogger(__name__)

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
-- Changelog records each holding the rows of actions finished at their first write
-- (``WriteBatch.done``) of one transaction and partition: what a purge tombstones.
CREATE TABLE IF NOT EXISTS done_batches (
    batch_id    TEXT PRIMARY KEY,         -- its changelog key's id: its first action's id
    partition   INTEGER NOT NULL,
    finished_ms INTEGER NOT NULL          -- the latest of its actions'
);
CREATE TABLE IF NOT EXISTS records (
    record_key TEXT PRIMARY KEY,
    partition  INTEGER NOT NULL,
    data       BLOB NOT NULL               -- the latest event seen for the record (JSON)
);
CREATE TABLE IF NOT EXISTS rule_state (
    state_key  TEXT PRIMARY KEY,           -- rule_id, U+001F, record_key
    partition  INTEGER NOT NULL,
    matched    INTEGER NOT NULL            -- repeat = "once": criteria met last time
);
CREATE TABLE IF NOT EXISTS quota (
    org_id    TEXT NOT NULL,
    day       TEXT NOT NULL,               -- yyyy-MM-dd in the organisation's time zone
    partition INTEGER NOT NULL,
    used      INTEGER NOT NULL,
    PRIMARY KEY (org_id, day)
);
CREATE TABLE IF NOT EXISTS changelog_offsets (
    partition   INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL           -- the changelog offset this file reflects
);
CREATE TABLE IF NOT EXISTS suspensions (
    org_id         TEXT NOT NULL,
    rule_id        TEXT NOT NULL,
    webhook        TEXT NOT NULL,
    partition      INTEGER NOT NULL,
    failed_actions INTEGER NOT NULL,       -- consecutive failed actions
    suspended      INTEGER NOT NULL,
    fingerprint    TEXT NOT NULL,          -- of the rule and webhook config it applies to
    PRIMARY KEY (org_id, rule_id, webhook)
);
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


# (partition, key, value): one row's latest state; value None deletes it (tombstone)
ChangelogRecord = tuple[int, bytes, bytes | None]


class ChangelogSink(Protocol):
    """Queues changelog records in the order given and returns, without waiting for
    the broker, an awaitable of their acknowledgement: partition → next offset."""

    async def __call__(self, records: Sequence[ChangelogRecord]) -> Awaitable[dict[int, int]]: ...


class ChangelogSource(Protocol):
    """Reads one changelog partition from an offset to its current end."""

    def __call__(
        self, partition: int, from_offset: int
    ) -> AsyncIterator[tuple[int, bytes, bytes | None]]: ...


SEP = "\x1f"  # between the parts of a changelog key: never in ids (control characters)


@dataclass(slots=True)
class WriteBatch:
    """Changes to apply atomically, in this order of statements."""

    new_actions: list[Action] = field(default_factory=list)
    # (action_id, due_ms, attempt): move a pending action (retry or reschedule)
    moved: list[tuple[str, int, int]] = field(default_factory=list)
    # replayed from the dead-letter topic: a finished, undelivered action made pending again
    rearmed: list[Action] = field(default_factory=list)
    # (action_id, final status, finished_ms)
    finished: list[tuple[str, str, int]] = field(default_factory=list)
    # (action, final status, finished_ms): stored for the first time, already finished
    # (an instant action sent before it was stored). One row written as it is final.
    done: list[tuple[Action, str, int]] = field(default_factory=list)
    snapshots: list[tuple[str, int, bytes]] = field(default_factory=list)
    # (state key of workflow.once_key, partition, matched)
    once_state: list[tuple[str, int, bool]] = field(default_factory=list)
    # (org_id, day, partition, delta)
    quota: list[tuple[str, str, int, int]] = field(default_factory=list)
    # (org_id, rule_id, webhook, partition, failed_actions, suspended, config fingerprint)
    suspensions: list[tuple[str, str, str, int, int, bool, str]] = field(default_factory=list)
    # rows read back from the changelog (restore): applied as they are, not sent again
    restored: list[ChangelogRecord] = field(default_factory=list)
    restored_offsets: dict[int, int] = field(default_factory=dict)
    # (partitions, before_ms): delete final actions finished before then
    purge: list[tuple[tuple[int, ...], int]] = field(default_factory=list)
    tombstones: list[ChangelogRecord] = field(default_factory=list)  # filled by the store

    def extend(self, other: WriteBatch) -> None:
        # Most batches carry one or two kinds of change: test before concatenating.
        for name in _CHANGE_LISTS:
            more = getattr(other, name)
            if more:
                getattr(self, name).extend(more)
        if other.restored_offsets:
            self.restored_offsets.update(other.restored_offsets)

    def __bool__(self) -> bool:
        return bool(self.restored_offsets) or any(getattr(self, n) for n in _CHANGE_LISTS)


# The lists of changes of a WriteBatch (``tombstones`` is the store's own output).
_CHANGE_LISTS = (
    "new_actions",
    "moved",
    "rearmed",
    "finished",
    "done",
    "snapshots",
    "once_state",
    "quota",
    "suspensions",
    "restored",
    "purge",
)


async def _migrate(conn: aiosqlite.Connection) -> None:
    """Columns added since a store file may have been made."""
    async with conn.execute("PRAGMA table_info(actions)") as cur:
        columns = {row[1] async for row in cur}
    if "logged" not in columns:  # made before round 8: every row had a record of its own
        await conn.execute("ALTER TABLE actions ADD COLUMN logged TEXT NOT NULL DEFAULT 'a'")


# Tries of one group commit when SQLite says the file is locked or busy (another
# process sharing it, `crmhooks resume`). The writer's connection waits at most
# WRITER_BUSY_MS inside SQLite (on the event loop's thread), then the writer
# sleeps (asynchronously) and tries again: ~10 s in all, as busy_timeout was.
LOCKED_RETRIES = 50
WRITER_BUSY_MS = 50
LOCKED_PAUSE_S = 0.15
# A WAL checkpoint (on aiosqlite's thread) after this many commits, or sooner once
# this many rows changed (large transactions: a million timers scheduled), so the
# WAL stays small (SQLite's own automatic checkpoint is at ~1,000 pages).
CHECKPOINT_EVERY = 200
CHECKPOINT_ROWS = 20_000


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _fail(callers: Sequence[asyncio.Future[None]], exc: Exception) -> None:
    for fut in callers:
        if not fut.done():
            fut.set_exception(exc)


def _chunks(items: Sequence[str], size: int = 500) -> Iterable[Sequence[str]]:
    # SQLite limits host parameters per statement (32766 by default); stay far below.
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Store:
    """SQLite-backed durable state. ``async with Store(path) as store``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: aiosqlite.Connection | None = None  # reads, checkpoints: its own thread
        self._db: sqlite3.Connection | None = None  # the writer's, on the loop's thread
        self._checkpoint: asyncio.Task[None] | None = None
        self._commits_since_checkpoint = 0
        self._changes_at_checkpoint = 0  # the writer's total_changes then
        self._queue: list[tuple[WriteBatch, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        # Committed transactions waiting for their changelog acknowledgement, in order:
        # (acknowledgement or None without records, the callers to answer after it)
        self._unacked: asyncio.Queue[
            tuple[Awaitable[dict[int, int]] | None, list[asyncio.Future[None]]] | None
        ] = asyncio.Queue()
        self._acker: asyncio.Task[None] | None = None
        self._closing = False
        self.commits = 0  # transactions committed (for tests and benchmarks)
        # Attached by the processor once Kafka is up; None: no changelog (tools, tests).
        self.changelog: ChangelogSink | None = None
        self._acked_offsets: dict[int, int] = {}  # written with the next transaction

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, commits={self.commits})"

    async def __aenter__(self) -> Store:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn: aiosqlite.Connection | None = None
        db: sqlite3.Connection | None = None
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=NORMAL")
            # Another process (a second consumer, `crmhooks resume`) may hold the write lock.
            await conn.execute("PRAGMA busy_timeout=10000")
            await conn.executescript(SCHEMA)
            await _migrate(conn)
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA busy_timeout={WRITER_BUSY_MS}")
            db.execute("PRAGMA wal_autocheckpoint=0")
        except Exception as exc:
            if db is not None:
                db.close()
            if conn is not None:
                await conn.close()
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        self._conn = conn
        self._db = db
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")
        self._acker = asyncio.create_task(self._ack_loop(), name="store-changelog-acks")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._writer is not None:
            # Let queued writes land before closing: the writer exits once idle.
            self._closing = True
            self._wakeup.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._acker is not None:
            self._unacked.put_nowait(None)  # after every committed transaction
            with contextlib.suppress(asyncio.CancelledError):
                await self._acker
        if self._checkpoint is not None:
            with contextlib.suppress(Exception):
                await self._checkpoint
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @property
    def conn(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreError("store is not open")
        return self._conn

    @property
    def db(self) -> sqlite3.Connection:
        """The writer's connection (the event loop's thread only)."""
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    # -- writes ---------------------------------------------------------------

    async def write(self, batch: WriteBatch) -> None:
        """Apply ``batch`` durably (group commit); returns once it is committed."""
        if not batch:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((batch, fut))
        self._wakeup.set()
        await fut

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            pending, self._queue = self._queue, []
            merged = WriteBatch()
            for batch, _ in pending:
                merged.extend(batch)
            callers = [fut for _, fut in pending]
            try:
                records = await self._apply_retrying(merged)
                self._checkpoint_soon()
                # Queued here, in commit order, so the changelog's last record of a
                # key is its row's latest version; acknowledged in _ack_loop.
                acked = await self.changelog(records) if records and self.changelog else None
            except Exception as exc:
                _fail(callers, StoreError(f"store write failed: {exc}"))
                continue
            self._unacked.put_nowait((acked, callers))

    async def _ack_loop(self) -> None:
        """Answer the writers, transaction by transaction, once the changelog has them."""
        while (item := await self._unacked.get()) is not None:
            acked, callers = item
            if acked is not None:
                try:
                    # Saved with the next transaction (see changelog_offsets).
                    self._acked_offsets.update(await acked)
                except Exception as exc:
                    _fail(callers, StoreError(f"changelog not acknowledged: {exc}"))
                    continue
            for fut in callers:
                if not fut.done():
                    fut.set_result(None)

    async def _apply_retrying(self, b: WriteBatch) -> list[ChangelogRecord]:
        """``_apply``, again when another process held the file's lock past busy_timeout.

        Only SQLite's own errors are retried: they roll the transaction back, so
        nothing (quota increments in particular) is applied twice.
        """
        for attempt in range(LOCKED_RETRIES):
            try:
                return self._apply(b)
            except sqlite3.OperationalError as exc:
                if attempt + 1 == LOCKED_RETRIES or not _is_busy(exc):
                    raise
                if attempt % 10 == 0:
                    log.warning("store busy (%s); retrying the commit", exc)
                await asyncio.sleep(LOCKED_PAUSE_S)
        raise AssertionError("not reached: the last try returns or raises")

    def _checkpoint_soon(self) -> None:
        """Every CHECKPOINT_EVERY commits or CHECKPOINT_ROWS changed rows, a passive WAL
        checkpoint on aiosqlite's thread (the writer's connection never checkpoints:
        that fsyncs)."""
        self._commits_since_checkpoint += 1
        changes = self.db.total_changes
        if (
            self._commits_since_checkpoint < CHECKPOINT_EVERY
            and changes - self._changes_at_checkpoint < CHECKPOINT_ROWS
        ):
            return
        if self._checkpoint is not None and not self._checkpoint.done():
            return
        self._commits_since_checkpoint = 0
        self._changes_at_checkpoint = changes
        self._checkpoint = asyncio.create_task(self._run_checkpoint(), name="store-checkpoint")

    async def _run_checkpoint(self) -> None:
        try:
            await self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception as exc:  # the next one tries again; the WAL only grows meanwhile
            log.warning("store checkpoint failed: %s", exc)

    def _apply(self, b: WriteBatch) -> list[ChangelogRecord]:
        """Commit ``b``; returns the changelog records of what it changed."""
        conn = self.db
        conn.execute("BEGIN IMMEDIATE")
        try:
            if self._acked_offsets:
                offsets, self._acked_offsets = self._acked_offsets, {}
                self._save_offsets(offsets)
            if b.new_actions:
                conn.executemany(
                    f"INSERT OR IGNORE INTO actions ({_ACTION_COLUMNS}, record_key, status) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,'pending')",
                    [(*_action_row(a), a.record_key) for a in b.new_actions],
                )
            finished = b.finished
            done_rows = self._insert_done(b) if b.done else []
            if done_rows is None:  # ended below, read back like the rest
                finished = finished + [(a.action_id, status, at) for a, status, at in b.done]
            if b.rearmed:
                conn.executemany(
                    "UPDATE actions SET status = 'pending', finished_ms = NULL, attempt = 0, "
                    "due_ms = ?, partition = ?, source_offset = ? "
                    "WHERE action_id = ? AND status NOT IN ('pending', 'delivered')",
                    [(a.due_ms, a.partition, a.source_offset, a.action_id) for a in b.rearmed],
                )
            if b.moved:
                conn.executemany(
                    "UPDATE actions SET due_ms = ?, attempt = ? "
                    "WHERE action_id = ? AND status = 'pending'",
                    [(due, attempt, aid) for aid, due, attempt in b.moved],
                )
            if finished:
                conn.executemany(
                    "UPDATE actions SET status = ?, finished_ms = ? "
                    "WHERE action_id = ? AND status = 'pending'",
                    [(status, at, aid) for aid, status, at in finished],
                )
            if b.snapshots:
                conn.executemany(
                    "INSERT INTO records (record_key, partition, data) VALUES (?,?,?) "
                    "ON CONFLICT (record_key) DO UPDATE SET data = excluded.data",
                    b.snapshots,
                )
            if b.once_state:
                conn.executemany(
                    "INSERT INTO rule_state (state_key, partition, matched) VALUES (?,?,?) "
                    "ON CONFLICT (state_key) DO UPDATE SET matched = excluded.matched",
                    [(k, p, int(m)) for k, p, m in b.once_state],
                )
            if b.quota:
                conn.executemany(
                    "INSERT INTO quota (org_id, day, partition, used) VALUES (?,?,?,?) "
                    "ON CONFLICT (org_id, day) DO UPDATE SET used = used + excluded.used",
                    b.quota,
                )
            if b.suspensions:
                conn.executemany(
                    "INSERT INTO suspensions (org_id, rule_id, webhook, partition, "
                    "failed_actions, suspended, fingerprint) VALUES (?,?,?,?,?,?,?) "
                    "ON CONFLICT (org_id, rule_id, webhook) DO UPDATE SET "
                    "failed_actions = excluded.failed_actions, suspended = excluded.suspended, "
                    "fingerprint = excluded.fingerprint",
                    [(o, r, w, p, f, int(s), fp) for o, r, w, p, f, s, fp in b.suspensions],
                )
            if b.restored or b.restored_offsets:
                self._apply_restored(b)
            for partitions, before_ms in b.purge:
                marks = ",".join("?" * len(partitions))
                cur = conn.execute(
                    f"DELETE FROM actions WHERE status != 'pending' AND finished_ms < ? "
                    f"AND partition IN ({marks}) RETURNING partition, action_id, logged",
                    (before_ms, *partitions),
                )
                b.tombstones += [
                    (int(p), f"a{SEP}{aid}".encode(), None) for p, aid, how in cur if how == "a"
                ]
                # Every row of a batch finished no later than its finished_ms: all gone.
                cur = conn.execute(
                    f"DELETE FROM done_batches WHERE finished_ms < ? "
                    f"AND partition IN ({marks}) RETURNING partition, batch_id",
                    (before_ms, *partitions),
                )
                b.tombstones += [(int(p), f"d{SEP}{bid}".encode(), None) for p, bid in cur]
            records = (
                self._changelog_of(b, finished, done_rows) if self.changelog is not None else []
            )
            conn.execute("COMMIT")
            self.commits += 1
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        # The callers hear "stored" only once these are acknowledged: what they do next
        # (commit an offset, send a request) may only happen once another machine
        # could see it.
        return records

    def _save_offsets(self, offsets: dict[int, int]) -> None:
        self.db.executemany(
            "INSERT INTO changelog_offsets (partition, next_offset) VALUES (?,?) "
            "ON CONFLICT (partition) DO UPDATE SET "
            "next_offset = max(next_offset, excluded.next_offset)",
            list(offsets.items()),
        )

    def _insert_done(self, b: WriteBatch) -> list[ChangelogRecord] | None:
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
        conn = self.db
        rows = [_final_row(a, status, at) for a, status, at in b.done]
        before = conn.total_changes
        conn.executemany(
            f"INSERT OR IGNORE INTO actions ({_ROW_COLUMNS}, logged) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,'d')",
            rows,
        )
        others = {a.action_id for a in b.new_actions}
        others.update(a.action_id for a in b.rearmed)
        others.update(m[0] for m in b.moved)
        others.update(f[0] for f in b.finished)
        if conn.total_changes - before != len(rows) or any(r[0] in others for r in rows):
            return None
        batches = _done_batches(rows)
        conn.executemany(
            _INSERT_DONE_BATCH,
            [(batch_id, p, max(r[-1] for r in part)) for p, batch_id, part in batches],
        )
        return [
            (p, f"d{SEP}{batch_id}".encode(), orjson.dumps(part)) for p, batch_id, part in batches
        ]

    def _changelog_of(
        self,
        b: WriteBatch,
        finished: list[tuple[str, str, int]],
        done_rows: list[ChangelogRecord] | None,
    ) -> list[ChangelogRecord]:
        """The rows ``b`` touched, as they are now (read inside its transaction);
        ``done_rows``: those of ``b.done``, known without reading them (None: they
        are in ``finished``, read back)."""
        out: list[ChangelogRecord] = []
        ids = list(
            dict.fromkeys(
                [a.action_id for a in b.new_actions]
                + [a.action_id for a in b.rearmed]
                + [m[0] for m in b.moved]
                + [f[0] for f in finished]
            )
        )
        # Read back as they are now; those in a d record get records of their own.
        # (Marking only those: rewriting every row read back, with UPDATE .. RETURNING,
        # cost ~9 % of the scheduling rate.)
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            self.db.execute(
                f"UPDATE actions SET logged = 'a' WHERE logged = 'd' AND action_id IN ({marks})",
                chunk,
            )
        sql = f"SELECT {_ROW_COLUMNS} FROM actions WHERE action_id IN ({{marks}})"
        out += [_action_change(row) for row in self._select_in_writer(sql, ids)]
        if done_rows:
            out += done_rows
        for record_key, partition, data in {k: (k, p, d) for k, p, d in b.snapshots}.values():
            out.append((partition, f"r{SEP}{record_key}".encode(), data))
        for state_key, partition, matched in {k: (k, p, m) for k, p, m in b.once_state}.values():
            out.append((partition, f"o{SEP}{state_key}".encode(), b"1" if matched else b"0"))
        for org_id, day, partition in {(o, d): (o, d, p) for o, d, p, _ in b.quota}.values():
            found = self.db.execute(
                "SELECT used FROM quota WHERE org_id = ? AND day = ?", (org_id, day)
            ).fetchone()
            used = int(found[0]) if found else 0
            out.append((partition, f"q{SEP}{org_id}{SEP}{day}".encode(), str(used).encode()))
        latest = {(o, r, w): (o, r, w, p, f, sus, fp) for o, r, w, p, f, sus, fp in b.suspensions}
        for org_id, rule_id, webhook, partition, failed, suspended, fp in latest.values():
            skey = f"s{SEP}{org_id}{SEP}{rule_id}{SEP}{webhook}".encode()
            out.append((partition, skey, orjson.dumps([failed, suspended, fp])))
        out.extend(b.tombstones)
        return out

    # -- restoring from the changelog ---------------------------------------------

    async def changelog_offsets(self, partitions: Sequence[int]) -> dict[int, int]:
        """The next changelog offset this file reflects, per partition (0: nothing)."""
        found = dict.fromkeys(partitions, 0)
        async with self.conn.execute("SELECT partition, next_offset FROM changelog_offsets") as cur:
            async for p, offset in cur:
                if p in found:
                    found[p] = int(offset)
        for p, offset in self._acked_offsets.items():
            if p in found:
                found[p] = max(found[p], offset)
        return found

    async def restore(self, partitions: Sequence[int], source: ChangelogSource) -> int:
        """Bring the rows of ``partitions`` up to date from the changelog; returns how many.

        Records this file wrote itself come back too: applying a row's latest state
        again changes nothing.
        """
        applied = 0
        for partition, start in (await self.changelog_offsets(partitions)).items():
            pending: list[tuple[bytes, bytes | None]] = []
            next_offset = start
            async for offset, key, value in source(partition, start):
                pending.append((key, value))
                next_offset = offset + 1
                if len(pending) >= 5000:
                    applied += await self._restore_rows(partition, pending, next_offset)
                    pending = []
            if pending or next_offset != start:
                applied += await self._restore_rows(partition, pending, next_offset)
        return applied

    async def _restore_rows(
        self, partition: int, rows: list[tuple[bytes, bytes | None]], next_offset: int
    ) -> int:
        batch = WriteBatch()  # only to go through the writer: one writer, one transaction
        batch.restored = [(partition, k, v) for k, v in rows]
        batch.restored_offsets = {partition: next_offset}
        await self.write(batch)
        return len(rows)

    def _apply_restored(self, b: WriteBatch) -> None:
        conn = self.db
        for partition, key, value in b.restored:
            table, _, rest = key.decode().partition(SEP)
            if table == "a":
                if value is None:
                    conn.execute("DELETE FROM actions WHERE action_id = ?", (rest,))
                else:
                    row = orjson.loads(value)
                    conn.execute(
                        f"INSERT OR REPLACE INTO actions ({_ROW_COLUMNS}) "
                        f"VALUES ({','.join('?' * len(_ROW_FIELDS))})",
                        [row[name] for name in _ROW_FIELDS],
                    )
            elif table == "d":
                # A tombstone: the writer purged these rows; they go here at this
                # store's own purge (they finished as long ago).
                if value is None:
                    conn.execute("DELETE FROM done_batches WHERE batch_id = ?", (rest,))
                else:
                    rows = [tuple(row) for row in orjson.loads(value)]
                    conn.executemany(
                        f"INSERT OR REPLACE INTO actions ({_ROW_COLUMNS}, logged) "
                        f"VALUES ({','.join('?' * len(_ROW_FIELDS))}, 'd')",
                        rows,
                    )
                    conn.execute(
                        _INSERT_DONE_BATCH, (rest, partition, max(row[-1] for row in rows))
                    )
            elif table == "r" and value is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO records (record_key, partition, data) VALUES (?,?,?)",
                    (rest, partition, value),
                )
            elif table == "o" and value is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO rule_state (state_key, partition, matched) "
                    "VALUES (?,?,?)",
                    (rest, partition, int(value == b"1")),
                )
            elif table == "q" and value is not None:
                org_id, _, day = rest.partition(SEP)
                conn.execute(
                    "INSERT OR REPLACE INTO quota (org_id, day, partition, used) VALUES (?,?,?,?)",
                    (org_id, day, partition, int(value)),
                )
            elif table == "s" and value is not None:
                org_id, rule_id, webhook = rest.split(SEP)
                failed, suspended, fingerprint = orjson.loads(value)
                conn.execute(
                    "INSERT OR REPLACE INTO suspensions (org_id, rule_id, webhook, partition, "
                    "failed_actions, suspended, fingerprint) VALUES (?,?,?,?,?,?,?)",
                    (org_id, rule_id, webhook, partition, failed, int(suspended), fingerprint),
                )
        if b.restored_offsets:
            self._save_offsets(b.restored_offsets)

    # -- reads ----------------------------------------------------------------

    async def action_statuses(self, action_ids: Sequence[str]) -> dict[str, str]:
        """Status of each known action id ('pending' or a final status)."""
        found: dict[str, str] = {}
        sql = "SELECT action_id, status FROM actions WHERE action_id IN ({marks})"
        for row in await self._select_in(sql, action_ids):
            found[row[0]] = row[1]
        return found

    async def get_actions(self, action_ids: Sequence[str]) -> dict[str, Action]:
        """Pending actions by id."""
        found: dict[str, Action] = {}
        sql = (
            f"SELECT {_ACTION_COLUMNS} FROM actions "
            "WHERE status = 'pending' AND action_id IN ({marks})"
        )
        for row in await self._select_in(sql, action_ids):
            found[row[0]] = _action_from_row(row)
        return found

    async def pending_for_records(self, record_keys: Sequence[str]) -> list[Action]:
        """Pending actions of the given records (``org/module/record_id`` keys)."""
        found: list[Action] = []
        sql = (
            f"SELECT {_ACTION_COLUMNS} FROM actions "
            "WHERE status = 'pending' AND record_key IN ({marks})"
        )
        found.extend(_action_from_row(row) for row in await self._select_in(sql, record_keys))
        return found

    async def snapshots(self, record_keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The latest event stored for each record key."""
        found: dict[str, dict[str, Any]] = {}
        sql = "SELECT record_key, data FROM records WHERE record_key IN ({marks})"
        for row in await self._select_in(sql, record_keys):
            found[row[0]] = orjson.loads(row[1])
        return found

    async def once_states(self, state_keys: Sequence[str]) -> dict[str, bool]:
        """``repeat = "once"`` flags by state key (absent: never met)."""
        found: dict[str, bool] = {}
        sql = "SELECT state_key, matched FROM rule_state WHERE state_key IN ({marks})"
        for row in await self._select_in(sql, state_keys):
            found[row[0]] = bool(row[1])
        return found

    async def _select_in(self, sql: str, keys: Sequence[str]) -> list[Any]:
        """Rows of ``sql`` whose ``{marks}`` stands for ``keys``, queried in chunks."""
        rows: list[Any] = []
        for chunk in _chunks(keys):
            marks = ",".join("?" * len(chunk))
            async with self.conn.execute(sql.format(marks=marks), chunk) as cur:
                rows.extend(await cur.fetchall())
        return rows

    def _select_in_writer(self, sql: str, keys: Sequence[str]) -> list[Any]:
        """``_select_in`` on the writer's connection (inside its transaction)."""
        rows: list[Any] = []
        for chunk in _chunks(keys):
            marks = ",".join("?" * len(chunk))
            rows.extend(self.db.execute(sql.format(marks=marks), chunk).fetchall())
        return rows

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
        async with self.conn.execute(sql, params) as cur:
            return [_action_from_row(row) async for row in cur]

    async def count_pending(self) -> int:
        async with self.conn.execute(
            "SELECT count(*) FROM actions WHERE status = 'pending'"
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def quota_used(self, org_id: str, day: str) -> int:
        async with self.conn.execute(
            "SELECT used FROM quota WHERE org_id = ? AND day = ?", (org_id, day)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def suspension_table(self) -> dict[tuple[str, str, str], tuple[int, bool, str]]:
        """(org, rule, webhook) → (consecutive failed actions, suspended, config fingerprint)."""
        async with self.conn.execute(
            "SELECT org_id, rule_id, webhook, failed_actions, suspended, fingerprint "
            "FROM suspensions"
        ) as cur:
            return {(r[0], r[1], r[2]): (int(r[3]), bool(r[4]), r[5]) async for r in cur}

    async def data_version(self) -> int:
        """Changes when another connection (``crmhooks resume``) commits to the file."""
        # On the writer's connection: the reads' connection sees the writer's commits
        # as another connection's.
        row = self.db.execute("PRAGMA data_version").fetchone()
        return int(row[0]) if row else 0

    async def resume(self, rule_id: str, webhook: str) -> int:
        """Lift the suspension of (rule, webhook) in every organisation; returns how many."""
        cur = await self.conn.execute(
            "UPDATE suspensions SET suspended = 0, failed_actions = 0 "
            "WHERE rule_id = ? AND webhook = ? AND suspended = 1",
            (rule_id, webhook),
        )
        return cur.rowcount

    async def purge_finished(self, partitions: Sequence[int], before_ms: int) -> None:
        """Forget final actions finished before ``before_ms`` (their ids stop deduplicating).

        Tombstones go to the changelog, so compaction forgets them there too.
        """
        if partitions:
            await self.write(WriteBatch(purge=[(tuple(partitions), before_ms)]))
