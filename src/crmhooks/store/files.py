"""The store's file: its modes on disk, the SQLite errors that mean it is broken, and
the SQL helpers every part of the store uses.

The store's directory is created 0700 when the store creates it (one that exists
is the operator's, left as it is: the files inside are private anyway), the
database 0600; SQLite gives its ``-wal`` and ``-shm`` files the database's mode
(and sets it whatever the umask). Files of an older version with wider modes are
narrowed to 0600 (SPEC §12: they hold CRM records).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

log = logging.getLogger("crmhooks.store")

# SQLite's primary result codes for errors of the file itself: no retry can help.
_SQLITE_PERM, _SQLITE_NOMEM, _SQLITE_READONLY = 3, 7, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 10, 11, 13, 14, 26
_FATAL_CODES = frozenset(
    {
        _SQLITE_PERM,
        _SQLITE_NOMEM,
        _SQLITE_READONLY,
        _SQLITE_IOERR,
        _SQLITE_CORRUPT,
        _SQLITE_FULL,
        _SQLITE_CANTOPEN,
        _SQLITE_NOTADB,
    }
)


def is_fatal(exc: sqlite3.Error) -> bool:
    """An error of the file or the disk: no retry can help (see ``writer``)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _FATAL_CODES


def is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def chunks(items: Sequence[str], size: int = 500) -> Iterable[Sequence[str]]:
    # SQLite limits host parameters per statement (32766 by default); stay far below.
    for start in range(0, len(items), size):
        yield items[start : start + size]


def select_in_writer(db: sqlite3.Connection, sql: str, keys: Sequence[str]) -> list[Any]:
    """Rows of ``sql`` whose ``{marks}`` stands for ``keys``, in chunks, on the
    writer's connection (inside its transaction)."""
    rows: list[Any] = []
    for chunk in chunks(keys):
        marks = ",".join("?" * len(chunk))
        rows.extend(db.execute(sql.format(marks=marks), chunk).fetchall())
    return rows


async def columns(conn: aiosqlite.Connection, table: str) -> set[str]:
    """The columns of ``table`` (none: it does not exist yet), for migrations."""
    async with conn.execute(f"PRAGMA table_info({table})") as cur:
        return {row[1] async for row in cur}


def private_files(path: Path) -> None:
    """Make the store's directory (0700) if it is missing, and its database file
    (0600); narrow the modes of the files of an older version (SPEC §12)."""
    directory = path.parent
    if not directory.is_dir():
        with contextlib.suppress(FileExistsError):  # made meanwhile: someone else's
            directory.mkdir(mode=0o700, parents=True)
            os.chmod(directory, 0o700)  # exactly: mkdir's mode is narrowed by the umask
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.fchmod(fd, 0o600)  # an odd umask (0277) must not leave it unwritable
        finally:
            os.close(fd)
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            try:
                os.chmod(name, mode & 0o700)
            except PermissionError as exc:  # another user's file we may still write to
                log.warning("store file %s: cannot narrow its mode %04o: %s", name, mode, exc)
            else:
                log.info("store file %s was open to others (%04o): narrowed", name, mode)
