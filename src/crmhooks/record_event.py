"""The record event (SPEC §2): the value a decoded event is, and the key of its record."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

import msgspec

Operation = Literal["create", "edit", "delete"]
OPERATIONS: frozenset[str] = frozenset({"create", "edit", "delete"})

Record = Mapping[str, Any]


def record_key_of(org_id: str, module: str, record_id: str) -> str:
    """The key of a record across events and actions: ``org/module/record_id``."""
    return f"{org_id}/{module}/{record_id}"


class RecordEvent(msgspec.Struct, frozen=True, gc=False):
    """One CRM record event (SPEC §2). ``data`` is the JSON object as received.

    Frozen, like every value. A ``msgspec.Struct``: made in C, ~0.1 µs for these 12
    fields where a frozen dataclass's ``__init__`` (``object.__setattr__`` a field)
    takes ~1.5 µs, a tenth of an event's processing; ``msgspec.structs.replace``
    copies one with changes. ``gc=False``: it holds JSON values, which cannot refer
    back to it, so it is never part of a cycle for the collector to find.
    """

    event_id: str
    org_id: str
    module: str
    operation: Operation
    occurred_at_ms: int
    record_id: str
    record: Record
    previous: Record | None
    related: Mapping[str, Record]
    user: Record | None
    organization: Record | None
    data: Mapping[str, Any]

    @property
    def record_key(self) -> str:
        """Identifies the record across events: ``org/module/record_id``."""
        return record_key_of(self.org_id, self.module, self.record_id)

    def as_event(self) -> RecordEvent:
        """Itself: a RecordEvent is an ``EventView`` too."""
        return self

    def __repr__(self) -> str:
        return (
            f"RecordEvent({self.event_id!r}, org={self.org_id!r}, {self.module}/"
            f"{self.record_id} {self.operation})"
        )


class EventView(Protocol):
    """What deciding whether an event needs planning reads first (``RuleIndex.
    needs_planning``): its organisation, module and record, and the whole event only
    when some rule's criteria must be tried on it. A ``RecordEvent`` is one; so is the
    shape an event is parsed into (``event_shape``), which is made into a RecordEvent
    only when asked: most events read are not wanted, and making one costs ~0.2 µs."""

    @property
    def org_id(self) -> str: ...

    @property
    def module(self) -> str: ...

    @property
    def record(self) -> Record: ...

    def as_event(self) -> RecordEvent: ...
