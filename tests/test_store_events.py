"""Instant actions' triggering events in the store (SPEC §5): written with their action,
sent to the changelog, restored by another store, and purged with their action."""

from __future__ import annotations

from pathlib import Path

from crmhooks.clock import FakeClock
from crmhooks.store import Store, WriteBatch
from tests.test_store import FakeChangelog, action

T0 = 1_764_320_400_000
RETENTION_MS = 7 * 86_400_000


def event_of(n: int) -> bytes:
    return b'{"event_id": "e%d", "record": {"Amount": %d}}' % (n, n)


async def test_events_are_stored_restored_and_purged_with_their_action(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    changelog = FakeChangelog()
    one, two = action(1), action(2)
    async with Store(tmp_path / "a.db", clock=clock) as a:
        a.changelog = changelog
        await a.write(
            WriteBatch(
                new_actions=[one, two],
                action_events=[(one.action_id, 0, event_of(1)), (two.action_id, 0, event_of(2))],
            )
        )
        assert (b"e\x1f" + one.action_id.encode(), event_of(1)) in changelog.partitions[0]
        assert await a.action_events([one.action_id, two.action_id, "nope"]) == {
            one.action_id: {"event_id": "e1", "record": {"Amount": 1}},
            two.action_id: {"event_id": "e2", "record": {"Amount": 2}},
        }
        # The first finishes; a retention later it goes, and its event with it.
        await a.write(WriteBatch(finished=[(one.action_id, "failed", T0)]))
        clock.advance(RETENTION_MS + 1)
        await a.purge([0], before_ms=clock.now_ms() - RETENTION_MS)
        assert set(await a.action_events([one.action_id, two.action_id])) == {two.action_id}
        assert changelog.partitions[0][-2:] == [
            (b"a\x1f" + one.action_id.encode(), None),
            (b"e\x1f" + one.action_id.encode(), None),
        ]
    async with Store(tmp_path / "b.db", clock=clock) as b:  # another machine's store
        await b.restore([0], changelog.read)
        assert await b.action_events([one.action_id, two.action_id]) == {
            two.action_id: {"event_id": "e2", "record": {"Amount": 2}}
        }


async def test_an_action_stored_finished_at_once_keeps_no_event(tmp_path: Path) -> None:
    """The hot path: an instant action delivered at once is one row, one d record."""
    changelog = FakeChangelog()
    async with Store(tmp_path / "s.db") as store:
        store.changelog = changelog
        await store.write(WriteBatch(done=[(action(1), "delivered", T0)]))
        assert [key[:1] for key, _ in changelog.partitions[0]] == [b"d"]
        async with store.conn.execute("SELECT count(*) FROM action_events") as cur:
            assert await cur.fetchone() == (0,)
