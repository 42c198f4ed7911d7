"""The errors of one validation pass, each naming its item, listed in config order."""

from __future__ import annotations

# Where an error is listed: (section rank, item index). Errors are listed in
# config order even when a later step (the template check) finds them.
Position = tuple[int, int]


class Problems:
    """Every error found, each ``"<item path>: <message>"``."""

    __slots__ = ("_entries", "position")

    def __init__(self) -> None:
        self._entries: list[tuple[Position, int, str]] = []
        self.position: Position = (0, 0)  # of the item being checked

    def add(self, path: str, message: str, at: Position | None = None) -> None:
        where = self.position if at is None else at
        self._entries.append((where, len(self._entries), f"{path}: {message}"))

    def __len__(self) -> int:
        return len(self._entries)

    def listed(self) -> list[str]:
        return [text for _, _, text in sorted(self._entries)]


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
