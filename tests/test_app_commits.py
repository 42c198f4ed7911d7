"""The processor's offset commits: in the background, in order, never fatal."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from crmhooks.app import Processor
from crmhooks.clock import FakeClock
from crmhooks.config import Config
from crmhooks.delivery import Outcome
from crmhooks.endpoints import Endpoint
from crmhooks.errors import KafkaIOError
from crmhooks.store import Store
from crmhooks.templates import RenderedRequest


class NoTransport:
    async def send(self, action_id: str, request: RenderedRequest, endpoint: Endpoint) -> Outcome:
        raise AssertionError("nothing is sent in these tests")


class FakeKafka:
    """Records commits; the first ``failures`` of them fail as a rebalance would."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.committed: list[dict[int, int]] = []
        self.tried: list[dict[int, int]] = []

    async def commit(self, next_offsets: dict[int, int]) -> None:
        self.tried.append(dict(next_offsets))
        if self.failures > 0:
            self.failures -= 1
            raise KafkaIOError("commit failed: CommitFailedError (the group rebalanced)")
        self.committed.append(dict(next_offsets))


@contextlib.asynccontextmanager
async def processor(tmp_path: Path, kafka: FakeKafka, owned: set[int]) -> AsyncIterator[Processor]:
    async with Store(tmp_path / "s.db") as store:
        p = Processor(Config(), store, NoTransport(), FakeClock(0))
        p._kio = kafka  # type: ignore[assignment]
        p._owned = set(owned)
        yield p


async def test_a_failed_commit_is_logged_and_its_offsets_go_with_the_next(
    tmp_path: Path,
) -> None:
    kafka = FakeKafka(failures=1)
    async with processor(tmp_path, kafka, {0, 1}) as p:
        p._commit_soon({0: 10, 1: 4})
        await p._committed()  # the first try fails, _committed tries once more
        assert kafka.tried == [{0: 10, 1: 4}, {0: 10, 1: 4}]
        assert kafka.committed == [{0: 10, 1: 4}]
        assert p.stats["commit_failures"] == 1
        p._commit_soon({0: 12})
        await p._committed()
        assert kafka.committed[-1] == {0: 12}


async def test_offsets_handed_over_before_a_commit_goes_out_are_merged_never_backwards(
    tmp_path: Path,
) -> None:
    kafka = FakeKafka()
    async with processor(tmp_path, kafka, {0, 1}) as p:
        p._commit_soon({0: 10})
        p._commit_soon({0: 20, 1: 3})  # the commit task has not run yet: merged
        p._commit_soon({0: 15})  # (an older offset never moves a partition back)
        await p._committed()
        assert kafka.committed == [{0: 20, 1: 3}]


async def test_revoked_partitions_are_not_committed_by_the_old_owner(tmp_path: Path) -> None:
    kafka = FakeKafka(failures=1)
    async with processor(tmp_path, kafka, {0, 1}) as p:
        p._commit_soon({0: 10, 1: 4})
        assert p._committing is not None
        await p._committing  # fails: both stay to commit
        p._owned.discard(1)
        await p._committed()
        assert kafka.committed == [{0: 10}]
