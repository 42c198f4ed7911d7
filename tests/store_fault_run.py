"""`crmhooks run` whose store fails at the SQLite layer on SIGUSR1 (tests only).

    python -m tests.store_fault_run FAULT run --config F

Where no small file system can be mounted (and for a read-only one, which the kernel
will not make under a file open for writing), the store's own SQLite connection is
made to fail as the file system would, when the test sends SIGUSR1: ``full`` sets
``PRAGMA max_page_count`` to the pages in use (SQLite answers the next write that
needs a page with SQLITE_FULL, "database or disk is full"), ``read-only`` sets
``PRAGMA query_only`` (SQLITE_READONLY, "attempt to write a readonly database").
Everything else is the real ``crmhooks run``.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from collections.abc import Callable

from crmhooks import cli
from crmhooks.store.writer import Writer


def _full(db: sqlite3.Connection) -> str:
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    return f"PRAGMA max_page_count = {pages}"


FAULTS: dict[str, Callable[[sqlite3.Connection], str]] = {
    "full": _full,
    "read-only": lambda db: "PRAGMA query_only = 1",
}


def main(fault: str, argv: list[str]) -> int:
    make = FAULTS[fault]
    opened = Writer.open

    async def open_then_wait_for_the_signal(self: Writer) -> None:
        await opened(self)
        # Run by the event loop on its own thread, between two of the writer's
        # transactions (the writer's connection is the loop thread's).
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGUSR1, lambda: self.db.execute(make(self.db))
        )

    Writer.open = open_then_wait_for_the_signal  # type: ignore[method-assign]
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
