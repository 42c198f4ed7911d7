"""The checkpoint's offset commits: in the background, in order, never fatal."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from crmhooks.checkpoint import Checkpoint
from crmhooks.clock import FakeClock
from crmhooks.errors import KafkaIOError
from crmhooks.metrics import Metrics
from crmhooks.store import Store


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
async def checkpoint(
    tmp_path: Path, kafka: FakeKafka, owned: set[int]
) -> AsyncIterator[tuple[Checkpoint, set[int]]]:
    async with Store(tmp_path / "s.db") as store:
        c = Checkpoint(store, FakeClock(0), owned.__contains__, Metrics(process_metrics=False))
        c.attach(kafka)
        yield c, owned


async def test_a_failed_commit_is_logged_and_its_offsets_go_with_the_next(
    tmp_path: Path,
) -> None:
    kafka = FakeKafka(failures=1)
    async with checkpoint(tmp_path, kafka, {0, 1}) as (p, _):
        p.commit_soon({0: 10, 1: 4})
        await p.committed()  # the first try fails, committed() tries once more
        assert kafka.tried == [{0: 10, 1: 4}, {0: 10, 1: 4}]
        assert kafka.committed == [{0: 10, 1: 4}]
        assert p.commit_failures == 1
        p.commit_soon({0: 12})
        await p.committed()
        assert kafka.committed[-1] == {0: 12}


async def test_offsets_handed_over_before_a_commit_goes_out_are_merged_never_backwards(
    tmp_path: Path,
) -> None:
    kafka = FakeKafka()
    async with checkpoint(tmp_path, kafka, {0, 1}) as (p, _):
        p.commit_soon({0: 10})
        p.commit_soon({0: 20, 1: 3})  # the commit task has not run yet: merged
        p.commit_soon({0: 15})  # (an older offset never moves a partition back)
        await p.committed()
        assert kafka.committed == [{0: 20, 1: 3}]


async def test_revoked_partitions_are_not_committed_by_the_old_owner(tmp_path: Path) -> None:
    kafka = FakeKafka(failures=1)
    async with checkpoint(tmp_path, kafka, {0, 1}) as (p, owned):
        p.commit_soon({0: 10, 1: 4})
        assert p._committing is not None
        await p._committing  # fails: both stay to commit
        owned.discard(1)
        await p.committed()
        assert kafka.committed == [{0: 10}]
