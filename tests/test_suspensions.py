"""Suspensions that change outside the processor's writer still reach the changelog, so
a partition's next owner restores them as they are now (SPEC §10: state follows its
partition): `crmhooks resume` writes the SQLite file only, and a suspension lifted by
a config change must not be restored, or lifted and logged, again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import orjson

from crmhooks.app import Processor
from crmhooks.clock import FakeClock
from crmhooks.config import config_from_mapping
from crmhooks.delivery import Outcome
from crmhooks.endpoints import Endpoint
from crmhooks.store import SEP, Store
from crmhooks.templates import RenderedRequest
from tests.fakes import NOW_MS, FakeKafka, fetched, rec, until

SUSPENSION_KEY = f"s{SEP}org-acme{SEP}won{SEP}Hook".encode()


class Failing:
    """Every request answered 500."""

    async def send(self, action_id: str, request: RenderedRequest, endpoint: Endpoint) -> Outcome:
        return Outcome("server_error", 500, "HTTP 500", 1.0, NOW_MS)


@contextlib.asynccontextmanager
async def suspended(tmp_path: Path) -> AsyncIterator[tuple[Processor, FakeKafka]]:
    """A processor whose webhook "Hook" of rule "won" was just suspended (one failed
    action, no retry), the loop firing it stopped again."""
    config = config_from_mapping(
        {
            "delivery": {"retry_delays_s": [], "suspend_after_failed_actions": 1},
            "orgs": [{"id": "org-acme"}],
            "webhooks": [{"name": "Hook", "url": "http://x.test/h", "module": "Potentials"}],
            "rules": [{"id": "won", "module": "Potentials", "instant": "Hook"}],
        },
        {},
    )
    kafka = FakeKafka()
    async with Store(tmp_path / "s.db") as store:
        p = Processor(config, store, Failing(), FakeClock(NOW_MS))
        p.attach(kafka, {0})
        loop = asyncio.create_task(p.dispatcher.loop())
        try:
            await p._process_batch(fetched([rec(1, 10)]))
            await until(
                lambda: p.suspensions.suspended_count() == 1 and p.reporter.idle,
                "the webhook is suspended and the report written",
            )
            yield p, kafka
        finally:
            p.dispatcher.stop()
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
            await p.dispatcher.drain(5.0)


def last_suspension(kafka: FakeKafka) -> list[object]:
    values = [v for _, k, v in kafka.changelog if k == SUSPENSION_KEY]
    assert values
    assert values[-1] is not None
    found: list[object] = orjson.loads(values[-1])
    return found


async def test_a_resume_by_another_process_reaches_the_changelog(tmp_path: Path) -> None:
    async with suspended(tmp_path) as (p, kafka):
        assert last_suspension(kafka)[:2] == [1, True]
        async with Store(tmp_path / "s.db") as cli_store:  # `crmhooks resume`
            assert await cli_store.resume("won", "Hook") == 1
        await p.suspensions.load()  # as the poll loop does on the file's new data version
        assert p.suspensions.suspended_count() == 0
        assert last_suspension(kafka)[:2] == [0, False]


async def test_a_suspension_lifted_by_a_config_change_is_stored_lifted(tmp_path: Path) -> None:
    async with suspended(tmp_path) as (p, kafka):
        before = last_suspension(kafka)
        config = p.config.current.config
        fixed = replace(config.webhooks["Hook"], url="http://x.test/fixed")
        p.config.swap(replace(config, webhooks={"Hook": fixed}))
        await p.suspensions.load()  # as at the next assignment or start
        assert p.suspensions.suspended_count() == 0
        after = last_suspension(kafka)
        assert after[:2] == [0, False]
        assert after[2] != before[2]  # under the new config's fingerprint
        rows = await p.store.suspension_table()
        assert rows[("org-acme", "won", "Hook")] == (0, False, after[2])
