"""The store's config-topic documents, positions and dead-letter marks, and the index
that finds pending actions by (org, rule, webhook)."""

from __future__ import annotations

from pathlib import Path

from crmhooks.actions import Action
from crmhooks.store import DocumentChange, Store, WriteBatch
from crmhooks.store.documents import DocumentTable
from tests.test_store import FakeChangelog


async def read(store: Store, changes: list[DocumentChange], positions: dict[int, int]) -> None:
    await store.write(WriteBatch(steps=[DocumentTable.read_step(changes, positions)]))


async def test_documents_read_and_how_far(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        t = store.documents
        await read(
            store,
            [
                DocumentChange("a", 0, 0, document=b'{"v": 1}'),
                DocumentChange("b", 1, 0, document=b'{"v": 1}'),
                DocumentChange("a", 0, 1, refused=b"letter-a1"),  # the valid one stays
                DocumentChange("c", 0, 2, refused=b"letter-c"),  # no valid one at all
            ],
            {0: 3, 1: 1},
        )
        assert sorted(await t.org_ids()) == ["a", "b"]
        assert await t.documents(["a", "c", "x"]) == {"a": b'{"v": 1}'}
        assert t.document_now("b") == b'{"v": 1}'
        assert t.document_now("c") is None
        refused = {(r.org_id, r.partition, r.offset, r.letter) for r in await t.refused()}
        assert refused == {("a", 0, 1, b"letter-a1"), ("c", 0, 2, b"letter-c")}
        assert await t.positions() == {0: 3, 1: 1}
        # A newer valid document supersedes the refusal; a tombstone ends all.
        await read(
            store,
            [DocumentChange("a", 0, 3, document=b'{"v": 2}'), DocumentChange("b", 1, 1)],
            {0: 4, 1: 2},
        )
        assert await t.documents(["a", "b"]) == {"a": b'{"v": 2}'}
        assert [r.org_id for r in await t.refused()] == ["c"]
        assert await t.positions() == {0: 4, 1: 2}
        await read(store, [], {0: 2})  # positions never go back
        assert await t.positions() == {0: 4, 1: 2}


async def test_dead_letter_marks_are_the_partitions_state(tmp_path: Path) -> None:
    changelog = FakeChangelog()
    async with Store(tmp_path / "a.db") as store:
        store.changelog = changelog
        marks = [("org-1", 2, 0, 7), ("org-2", 1, 0, 9)]
        await store.write(WriteBatch(steps=[DocumentTable.reported_step(marks)]))
        assert await store.documents.reported(["org-1", "org-2", "x"]) == {
            "org-1": (0, 7),
            "org-2": (0, 9),
        }
    assert {p: [k for k, _ in log] for p, log in changelog.partitions.items()} == {
        1: [b"c\x1forg-2"],
        2: [b"c\x1forg-1"],
    }
    async with Store(tmp_path / "b.db") as other:  # the next owner of partition 2
        await other.restore([2], changelog.read)
        assert await other.documents.reported(["org-1", "org-2"]) == {"org-1": (0, 7)}


def action(n: int, org: str, rule: str, webhook: str, partition: int = 0) -> Action:
    return Action(
        action_id=f"evt-{n}:{rule}:{webhook}",
        event_id=f"evt-{n}",
        org_id=org,
        module="Leads",
        record_id=f"r{n}",
        rule_id=rule,
        webhook=webhook,
        kind="scheduled",
        slot=1,
        due_ms=1_000 + n,
        partition=partition,
        source_offset=n,
    )


async def test_pending_actions_by_org_rule_and_webhook(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        actions = [action(n, "o1", "r1", "w1") for n in range(5)]
        actions += [action(10, "o1", "r1", "w2"), action(11, "o2", "r1", "w1", partition=1)]
        await store.write(WriteBatch(new_actions=actions))
        await store.write(WriteBatch(finished=[("evt-10:r1:w2", "delivered", 5)]))
        assert sorted(await store.actions.pending_combinations([0, 1])) == [
            ("o1", "r1", "w1"),
            ("o2", "r1", "w1"),
        ]
        assert await store.actions.pending_combinations([0, 1], "o2") == [("o2", "r1", "w1")]
        assert await store.actions.pending_combinations([0], "o2") == []
        first = await store.actions.pending_of(("o1", "r1", "w1"), 0, 0, 3)
        assert [a.action_id for _, a in first] == [f"evt-{n}:r1:w1" for n in range(3)]
        rest = await store.actions.pending_of(("o1", "r1", "w1"), 0, first[-1][0], 3)
        assert [a.action_id for _, a in rest] == ["evt-3:r1:w1", "evt-4:r1:w1"]
        plan = await store.actions._writer.read(
            "EXPLAIN QUERY PLAN SELECT rowid FROM actions WHERE status = 'pending' "
            "AND org_id = ? AND rule_id = ? AND webhook = ? AND partition = ? AND rowid > ? "
            "ORDER BY rowid LIMIT 3",
            ["o1", "r1", "w1", 0, 0],
        )
        assert "actions_config" in " ".join(str(row) for row in plan)
        assert "TEMP B-TREE" not in " ".join(str(row) for row in plan)
