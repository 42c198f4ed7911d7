"""Progress of a long command on a terminal: one status line, rewritten in place.

Shown only when the stream (stderr) is a terminal; into a pipe or a file nothing
is written, so scripts and logs get the command's own output alone. The line is
rewritten at most every ``every_s`` (a redraw per record would cost more than
reading it) and erased when the command ends, before its summary is printed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, TextIO

# Ten redraws a second: smooth to the eye, negligible next to reading records.
REDRAW_EVERY_S: Final = 0.1
# Carriage return and "erase to the end of the line" (ECMA-48 EL).
_REWIND: Final = "\r\x1b[K"


class Progress:
    """``with Progress("replay-dlq") as p: p.update(done, total, note)``."""

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        *,
        every_s: float = REDRAW_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.every_s = every_s
        self._clock = clock
        self.enabled = _is_terminal(self.stream)
        self._next_s = 0.0
        self._shown = False

    def __repr__(self) -> str:
        return f"Progress({self.label!r}, enabled={self.enabled})"

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        """The count so far (of ``total``, when known); drawn if it is time to."""
        if not self.enabled:
            return
        now = self._clock()
        if now < self._next_s:
            return
        self._next_s = now + self.every_s
        if total:
            text = f"{self.label}: {done:,}/{total:,} ({100 * done // total}%)"
        else:
            text = f"{self.label}: {done:,}"
        if note:
            text += f" {note}"
        self.stream.write(_REWIND + text)
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """Erase the line, so that what the command prints next starts clean."""
        if self._shown:
            self.stream.write(_REWIND)
            self.stream.flush()
            self._shown = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False
