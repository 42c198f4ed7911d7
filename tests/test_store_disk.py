"""The store on disk, on real files: private modes, and a full or read-only disk failing it.

The full and read-only file systems are real ones: a 512 KB tmpfs mounted for the
test. Those tests skip only where mounting is impossible (not root, no
CAP_SYS_ADMIN); the same failures are also made at the SQLite layer
(``max_page_count``, ``query_only``), which runs everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from crmhooks.errors import StoreError
from crmhooks.store import ChangelogRecord, Store, WriteBatch
from tests.test_store import action

FAILED_LOG = "store {path} failed: {error} ({name}); it takes no more writes"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    before = os.umask(value)
    try:
        yield
    finally:
        os.umask(before)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 512 KB of our own (unmounted after the test)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        made = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0755", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a small file system")
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def read_only(mnt: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)


def fill(directory: Path) -> Path:
    """A file taking every free byte of ``directory``'s file system."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (65536, 4096, 1):
            while True:
                try:
                    f.write(b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return filler


async def assert_failed_for_good(store: Store, text: str) -> None:
    """``store`` failed with ``text``: later writes fail at once with it, even ones
    SQLite could take; ``until_failed`` raises it; reads go on."""
    assert store.failed is not None
    assert str(store.failed) == text
    assert not store.failed.retriable
    commits = store.commits
    with pytest.raises(StoreError) as later:
        await store.write(WriteBatch(new_actions=[action(9)]))
    assert str(later.value) == text
    assert store.commits == commits
    with pytest.raises(StoreError) as watched:
        await asyncio.wait_for(store.until_failed(), 1)
    assert str(watched.value) == text
    assert await store.action_statuses(["e1:rule:Hook", "e9:rule:Hook"]) == {
        "e1:rule:Hook": "pending"
    }


async def test_a_full_disk_fails_the_store_with_sqlites_own_error(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = small_fs / "store" / "s.db"
    async with Store(path) as store:
        await store.write(WriteBatch(new_actions=[action(1)]))
        filler = fill(small_fs)
        with (
            caplog.at_level(logging.ERROR, logger="crmhooks.store"),
            pytest.raises(StoreError) as err,
        ):
            await store.write(WriteBatch(snapshots=[("org/Potentials/r1", 0, b"x" * 20_000)]))
        text = "store write failed: database or disk is full"
        assert str(err.value) == text  # not "cannot rollback - no transaction is active"
        assert [r.getMessage() for r in caplog.records] == [
            FAILED_LOG.format(path=path, error="database or disk is full", name="SQLITE_FULL")
        ]
        filler.unlink()  # room again: the store stays failed all the same
        await assert_failed_for_good(store, text)


async def test_a_database_at_its_size_limit_fails_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The full disk, made by SQLite itself (runs where nothing can be mounted)."""
    path = tmp_path / "s.db"
    async with Store(path) as store:
        await store.write(WriteBatch(new_actions=[action(1)]))
        db = store.writer.db
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count = {pages}")
        with (
            caplog.at_level(logging.ERROR, logger="crmhooks.store"),
            pytest.raises(StoreError) as err,
        ):
            await store.write(WriteBatch(snapshots=[("org/Potentials/r1", 0, b"x" * 20_000)]))
        text = "store write failed: database or disk is full"
        assert str(err.value) == text
        assert [r.getMessage() for r in caplog.records] == [
            FAILED_LOG.format(path=path, error="database or disk is full", name="SQLITE_FULL")
        ]
        db.execute(f"PRAGMA max_page_count = {pages * 100}")
        await assert_failed_for_good(store, text)


async def test_a_read_only_database_fails_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.db"
    async with Store(path) as store:
        await store.write(WriteBatch(new_actions=[action(1)]))
        store.writer.db.execute("PRAGMA query_only = 1")  # as a file SQLite may not write
        with (
            caplog.at_level(logging.ERROR, logger="crmhooks.store"),
            pytest.raises(StoreError) as err,
        ):
            await store.write(WriteBatch(quota=[("org", "2026-11-28", 0, 16)]))
        text = "store write failed: attempt to write a readonly database"
        assert str(err.value) == text
        assert [r.getMessage() for r in caplog.records] == [
            FAILED_LOG.format(
                path=path, error="attempt to write a readonly database", name="SQLITE_READONLY"
            )
        ]
        store.writer.db.execute("PRAGMA query_only = 0")
        await assert_failed_for_good(store, text)
        assert await store.quota_used("org", "2026-11-28") == 0


async def test_a_store_on_a_read_only_file_system_is_refused_at_open(small_fs: Path) -> None:
    """A read-only file system cannot be made under an open store (the kernel refuses
    to remount while files are open for writing): it is found at the next start."""
    path = small_fs / "s.db"
    async with Store(path) as store:
        await store.write(WriteBatch(new_actions=[action(1)]))
    read_only(small_fs)
    with pytest.raises(StoreError) as err:
        async with Store(path):
            pass
    assert str(err.value) == f"cannot open store {path}: unable to open database file"
    new = small_fs / "new.db"
    with pytest.raises(StoreError) as err:
        async with Store(new):
            pass
    assert str(err.value) == (f"cannot open store {new}: [Errno 30] Read-only file system: '{new}'")


async def test_an_error_of_one_transaction_fails_its_writes_only(tmp_path: Path) -> None:
    """Not an error of the file (here, SQL naming no table): that transaction is rolled
    back, its callers get the error, and the store goes on."""

    def broken(db: sqlite3.Connection, out: list[ChangelogRecord] | None) -> None:
        db.execute("INSERT INTO nowhere VALUES (1)")

    async with Store(tmp_path / "s.db") as store:
        with pytest.raises(StoreError) as err:
            await store.write(WriteBatch(new_actions=[action(1)], steps=[broken]))
        assert str(err.value) == "store write failed: no such table: nowhere"
        assert err.value.retriable
        assert store.failed is None
        assert await store.action_statuses(["e1:rule:Hook"]) == {}  # rolled back
        await store.write(WriteBatch(new_actions=[action(2)]))
        assert await store.action_statuses(["e2:rule:Hook"]) == {"e2:rule:Hook": "pending"}


async def test_a_new_store_is_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "var" / "crmhooks" / "s.db"
    with umask(0):  # SQLite alone would make 0644 files, mkdir 0777 directories
        async with Store(path) as store:
            await store.write(WriteBatch(new_actions=[action(n) for n in range(50)]))
            assert {p.name: mode(p) for p in path.parent.iterdir()} == {
                "s.db": 0o600,
                "s.db-wal": 0o600,
                "s.db-shm": 0o600,
            }
    assert mode(path.parent) == 0o700
    assert mode(path) == 0o600


async def test_an_existing_directory_is_left_alone_and_older_files_narrowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator's directory keeps its mode (the files inside are private); a
    store file made by an older version with the umask's 0644 is narrowed."""
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    path = directory / "s.db"
    async with Store(path) as store:
        await store.write(WriteBatch(new_actions=[action(1)]))
    os.chmod(path, 0o644)
    with caplog.at_level(logging.INFO, logger="crmhooks.store"):
        async with Store(path) as store:
            await store.write(WriteBatch(new_actions=[action(2)]))
            assert mode(path) == 0o600
            assert mode(Path(f"{path}-wal")) == 0o600
    assert mode(directory) == 0o755
    assert [r.getMessage() for r in caplog.records] == [
        f"store file {path} was open to others (0644): narrowed"
    ]
