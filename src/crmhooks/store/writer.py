"""The store's SQLite file and its one writer: connections, schema, group commit, the
changelog's order and acknowledgements, checkpoints, restore, and failure.

Writes go through one group-commit writer: callers hand over a ``WriteBatch`` and
await it; the writer folds every batch queued meanwhile into one transaction, so
under load there is one commit per round, not one per event. Inside it, each state
module (``Table``) runs its own statements and encodes its own changelog records;
the writer only orders them. A caller hears "stored" only once its transaction's
changelog records are acknowledged too; the writer does not wait for those
acknowledgements before the next transaction (the records are queued in commit
order, and callers are answered in that order).

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

**Failure.** SQLite's "database is locked/busy" (another process holds the
file) is waited out. An error of the file itself — full disk (``database or disk
is full``), read-only file or file system (``attempt to write a readonly
database``), ``disk I/O error``, corruption — **fails** the store: it is logged
once, ``failed`` holds it (a StoreError that is not ``retriable``),
``until_failed`` raises it, and every later write fails at once with the same
text instead of trying again (SPEC §10: the processor exits with the real error;
a restart tries again). Any other error fails only the writes of that
transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import aiosqlite

from crmhooks.clock import Clock
from crmhooks.errors import StoreError
from crmhooks.store.changes import (
    SEP,
    ChangelogRecord,
    ChangelogSink,
    ChangelogSource,
    PurgeStep,
    Table,
    WriteBatch,
)
from crmhooks.store.files import chunks, is_busy, is_fatal, private_files

log = logging.getLogger("crmhooks.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS changelog_offsets (
    partition   INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL           -- the changelog offset this file reflects
);
"""

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
# A WAL grown past this by one large transaction is cut back to it once a
# checkpoint has emptied it (SQLite keeps a WAL file at its largest otherwise).
WAL_SIZE_LIMIT_BYTES = 64 << 20
# Changelog records applied per transaction when restoring.
RESTORE_CHUNK = 5000


def _fail(callers: Sequence[asyncio.Future[None]], exc: Exception) -> None:
    for fut in callers:
        if not fut.done():
            fut.set_exception(exc)


class Writer:
    """The SQLite file: its two connections and its one writer. ``tables`` (the state
    modules) are set before ``open``; ``Store`` does that."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self.clock = clock
        self.tables: tuple[Table, ...] = ()
        self._by_letter: dict[int, Table] = {}  # a changelog key's first byte → its table
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
        # The error that failed the store (see the module docstring), and its signal.
        self.failed: StoreError | None = None
        self._failed = asyncio.Event()

    def __repr__(self) -> str:
        state = f", failed={str(self.failed)!r}" if self.failed else ""
        return f"Writer({str(self.path)!r}, commits={self.commits}{state})"

    @property
    def queued(self) -> int:
        """Batches waiting for the writer's next transaction."""
        return len(self._queue)

    # -- open and close ----------------------------------------------------------

    async def open(self) -> None:
        conn: aiosqlite.Connection | None = None
        db: sqlite3.Connection | None = None
        try:
            private_files(self.path)
            conn = await aiosqlite.connect(self.path, isolation_level=None)
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=NORMAL")
            # Another process (a second consumer, `crmhooks resume`) may hold the write lock.
            await conn.execute("PRAGMA busy_timeout=10000")
            now_ms = self.clock.now_ms()
            await conn.executescript(SCHEMA)
            for table in self.tables:
                await table.migrate(conn, now_ms)  # (before its schema's new indexes)
                await conn.executescript(table.schema)
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA busy_timeout={WRITER_BUSY_MS}")
            db.execute("PRAGMA wal_autocheckpoint=0")
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
        except Exception as exc:
            if db is not None:
                db.close()
            if conn is not None:
                await conn.close()
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        self._conn = conn
        self._db = db
        self._by_letter = {ord(letter): t for t in self.tables for letter in t.letters}
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")
        self._acker = asyncio.create_task(self._ack_loop(), name="store-changelog-acks")

    async def close(self) -> None:
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
        # A failed store's file may refuse its last checkpoint: closing goes on.
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error as exc:
                log.warning("store %s: closing: %s", self.path, exc)
            self._db = None
        if self._conn is not None:
            try:
                await self._conn.close()
            except sqlite3.Error as exc:
                log.warning("store %s: closing: %s", self.path, exc)
            self._conn = None

    @property
    def conn(self) -> aiosqlite.Connection:
        """The reads' connection (aiosqlite's thread)."""
        if self._conn is None:
            raise StoreError("store is not open")
        return self._conn

    @property
    def db(self) -> sqlite3.Connection:
        """The writer's connection (the event loop's thread only)."""
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    # -- failure -------------------------------------------------------------------

    def _sqlite_error(self, what: str, exc: sqlite3.Error) -> StoreError:
        """``exc`` as the callers get it; an error of the file fails the store."""
        error = StoreError(f"store {what} failed: {exc}")
        error.__cause__ = exc
        error.retriable = not is_fatal(exc)
        if not error.retriable and self.failed is None:
            self.failed = error
            self._failed.set()
            log.error(
                "store %s failed: %s (%s); it takes no more writes",
                self.path,
                exc,
                getattr(exc, "sqlite_errorname", type(exc).__name__),
            )
        return error

    def _failure(self) -> StoreError:
        """A new StoreError with the failed store's text, for one more caller."""
        assert self.failed is not None
        error = StoreError(str(self.failed))
        error.__cause__ = self.failed.__cause__
        error.retriable = False
        return error

    async def until_failed(self) -> NoReturn:
        """Wait until the store fails, then raise its error (never returns)."""
        await self._failed.wait()
        raise self._failure()

    # -- writes ----------------------------------------------------------------------

    async def write(self, batch: WriteBatch) -> None:
        """Apply ``batch`` durably (group commit); returns once it is committed and
        its changelog records acknowledged."""
        if not batch:
            return
        if self.failed is not None:
            raise self._failure()
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
            callers = [fut for _, fut in pending]
            if self.failed is not None:  # queued before it failed
                for fut in callers:
                    _fail([fut], self._failure())
                continue
            merged = WriteBatch()
            for batch, _ in pending:
                merged.extend(batch)
            try:
                records = await self._apply_retrying(merged)
                self._checkpoint_soon()
                # Queued here, in commit order, so the changelog's last record of a
                # key is its row's latest version; acknowledged in _ack_loop.
                acked = await self.changelog(records) if records and self.changelog else None
            except sqlite3.Error as exc:
                _fail(callers, self._sqlite_error("write", exc))
                continue
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
            except sqlite3.Error as exc:
                if attempt + 1 == LOCKED_RETRIES or not is_busy(exc):
                    raise
                if attempt % 10 == 0:
                    log.warning("store busy (%s); retrying the commit", exc)
                await asyncio.sleep(LOCKED_PAUSE_S)
        raise AssertionError("not reached: the last try returns or raises")

    def _apply(self, b: WriteBatch) -> list[ChangelogRecord]:
        """Commit ``b``; returns the changelog records of what it changed.

        The callers hear "stored" only once these are acknowledged: what they do next
        (commit an offset, send a request) may only happen once another machine
        could see it.
        """
        db = self.db
        now_ms = self.clock.now_ms()
        out: list[ChangelogRecord] | None = [] if self.changelog is not None else None
        db.execute("BEGIN IMMEDIATE")
        try:
            if self._acked_offsets:
                self._save_offsets(db, self._acked_offsets)
            # Restored rows first: the other changes of the transaction are newer.
            if b.restored or b.restored_offsets:
                self._apply_restored(db, b, now_ms)
            for table in self.tables:
                table.apply(db, b, now_ms, out)
            for step in b.steps:
                step(db, out)
            db.execute("COMMIT")
        except BaseException:
            # After some errors (a full disk, an I/O error) SQLite has rolled back by
            # itself: a ROLLBACK would then raise "cannot rollback - no transaction is
            # active" and hide the real error.
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        self._acked_offsets = {}  # (nothing awaited since they were saved)
        self.commits += 1
        return out or []

    @staticmethod
    def _save_offsets(db: sqlite3.Connection, offsets: dict[int, int]) -> None:
        db.executemany(
            "INSERT INTO changelog_offsets (partition, next_offset) VALUES (?,?) "
            "ON CONFLICT (partition) DO UPDATE SET "
            "next_offset = max(next_offset, excluded.next_offset)",
            list(offsets.items()),
        )

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
        except sqlite3.Error as exc:
            if is_fatal(exc):  # the file is broken: so is the next write
                self._sqlite_error("checkpoint", exc)
            else:  # the next one tries again; the WAL only grows meanwhile
                log.warning("store checkpoint failed: %s", exc)

    async def run_purge(self, step: PurgeStep) -> int:
        """Run ``step`` chunk after chunk, each in a transaction of its own (queued as
        any write: other writes go on between them); returns how many chunks."""
        cursor: int | None = 0
        runs = 0
        while cursor is not None:
            cursor = await self._run_step(step, cursor)
            runs += 1
        return runs

    async def _run_step(self, step: PurgeStep, cursor: int) -> int | None:
        found: list[int | None] = [None]

        def run(db: sqlite3.Connection, out: list[ChangelogRecord] | None) -> None:
            found[0] = step(db, out, cursor)  # (again if SQLite makes the writer retry)

        await self.write(WriteBatch(steps=[run]))
        return found[0]

    # -- restoring from the changelog -------------------------------------------------

    async def changelog_offsets(self, partitions: Sequence[int]) -> dict[int, int]:
        """The next changelog offset this file reflects, per partition (0: nothing)."""
        found = dict.fromkeys(partitions, 0)
        for p, offset in await self.read("SELECT partition, next_offset FROM changelog_offsets"):
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
                if len(pending) >= RESTORE_CHUNK:
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

    def _apply_restored(self, db: sqlite3.Connection, b: WriteBatch, now_ms: int) -> None:
        """Each record to the table owning its key's letter (others, a newer version's:
        skipped)."""
        tables = self._by_letter
        for partition, key, value in b.restored:
            table = tables.get(key[0]) if key else None
            if table is not None:
                letter, _, rest = key.decode().partition(SEP)
                table.restore(db, partition, letter, rest, value, now_ms)
        if b.restored_offsets:
            self._save_offsets(db, b.restored_offsets)

    # -- reads (aiosqlite's thread) -----------------------------------------------------

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Translates SQLite's errors of the reads within (an error of the file fails
        the store)."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self._sqlite_error("read", exc) from exc

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self.reading():
            async with self.conn.execute(sql, params) as cur:
                return list(await cur.fetchall())

    async def select_in(self, sql: str, keys: Sequence[str]) -> list[Any]:
        """Rows of ``sql`` whose ``{marks}`` stands for ``keys``, queried in chunks."""
        rows: list[Any] = []
        with self.reading():
            for chunk in chunks(keys):
                marks = ",".join("?" * len(chunk))
                async with self.conn.execute(sql.format(marks=marks), chunk) as cur:
                    rows.extend(await cur.fetchall())
        return rows

    def data_version(self) -> int:
        """Changes when another connection (``crmhooks resume``) commits to the file."""
        # On the writer's connection: the reads' connection sees the writer's commits
        # as another connection's.
        with self.reading():
            row = self.db.execute("PRAGMA data_version").fetchone()
        return int(row[0]) if row else 0
