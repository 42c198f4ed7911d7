"""Fakes of the processor's edges for tests of its parts: Kafka, the transport, records."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from crmhooks.delivery import Outcome
from crmhooks.endpoints import Endpoint
from crmhooks.errors import ProduceError, RecordsTooLarge
from crmhooks.kafka_io import BatchRecord, Fetched
from crmhooks.templates import RenderedRequest
from tests.support import event

NOW_MS = 1_764_320_400_000


@dataclass
class Rec:
    partition: int
    offset: int
    value: bytes
    key: bytes | None = b"org-acme"
    headers: Sequence[tuple[str, bytes]] = ()


def rec(n: int, offset: int, partition: int = 0, **fields: Any) -> Rec:
    return Rec(partition, offset, orjson.dumps(event(n, **fields)))


def fetched(records: list[Rec]) -> Fetched:
    """As ``KafkaIO.fetch`` returns ``records``: each partition with its records."""
    by_partition: dict[int, list[BatchRecord]] = {}
    for r in records:
        by_partition.setdefault(r.partition, []).append(r)
    return list(by_partition.items())


@dataclass
class FakeKafka:
    committed: dict[int, int] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    changelog_keys: list[bytes] = field(default_factory=list)
    changelog: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)
    fetches: int = 0
    to_fetch: list[Fetched] = field(default_factory=list)  # what the next fetches return
    dead_letter_max_bytes: int | None = None
    event_max_bytes: int | None = None

    _broken: asyncio.Future[None] | None = None

    @property
    def broken(self) -> asyncio.Future[None]:
        """Never resolves: the fake's producer is never lost."""
        if self._broken is None:
            self._broken = asyncio.get_running_loop().create_future()
        return self._broken

    async def commit(self, next_offsets: dict[int, int]) -> None:
        self.committed.update(next_offsets)

    produce_calls: int = 0
    produce_failures: int = 0  # the next ones fail
    refuse_over_bytes: int | None = None  # larger records are refused, as a broker would

    async def produce_all(self, records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        self.produce_calls += 1
        if self.produce_failures:
            self.produce_failures -= 1
            raise ProduceError("broker away")
        limit = self.refuse_over_bytes
        refused = [r for r in records if limit is not None and len(r[2]) > limit]
        self.results += [orjson.loads(r[2]) for r in records if r not in refused]
        if refused:
            raise RecordsTooLarge("refused: larger than the topic takes", refused)

    async def produce_changelog(
        self, records: Sequence[tuple[int, bytes, bytes | None]]
    ) -> Awaitable[dict[int, int]]:
        self.changelog_keys += [k for _, k, _ in records]
        self.changelog += records

        async def acked() -> dict[int, int]:
            return {}

        return acked()

    async def read_changelog(
        self, partition: int, from_offset: int
    ) -> AsyncIterator[tuple[int, bytes, bytes | None]]:
        """An empty changelog: nothing to restore."""
        nothing: list[tuple[int, bytes, bytes | None]] = []
        for record in nothing:
            yield record

    async def committed_offsets(self, partitions: Iterable[int]) -> dict[int, int | None]:
        return {p: self.committed.get(p) for p in partitions}

    def end_offsets_seen(self) -> dict[int, int]:
        return {}

    async def fetch(self, timeout_ms: int, max_records: int) -> Fetched:
        self.fetches += 1
        if self.to_fetch:
            return self.to_fetch.pop(0)
        await asyncio.sleep(0.001)  # nothing more to read
        return []


class GatedTransport:
    """Answers 200 to every request once ``gate`` is set."""

    def __init__(self, open_now: bool = True) -> None:
        self.gate = asyncio.Event()
        if open_now:
            self.gate.set()
        self.sent: list[str] = []
        self.requests: list[RenderedRequest] = []

    async def send(self, action_id: str, request: RenderedRequest, endpoint: Endpoint) -> Outcome:
        self.sent.append(action_id)
        self.requests.append(request)
        await self.gate.wait()
        return Outcome(None, 200, None, 1.0, NOW_MS)


async def until(check: Any, what: str) -> None:
    for _ in range(500):  # bounded: a few loop turns each
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")
