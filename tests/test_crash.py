"""kill -9 in the middle of a stream: no action lost, repeats only with the same webhook-id."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from crmhooks.config import Config, load_config
from crmhooks.kafka_io import ensure_topics, produce_records, read_topic
from tests.crash_support import FlakyReceiver, ProcessorProcess, crash_config_toml, flaky_receiver
from tests.support import event, read_all, unique_kafka

pytestmark = pytest.mark.kafka

RULE = "crash"
# Keys of these six organisations hash to all three partitions (murmur2), so the
# crash hits several partitions, each with its own committed offset and timers.
ORGS = tuple(f"org-{i}" for i in range(6))
EVENTS = 300
# 300 events in 12 waves half a second apart: while the stream is still arriving,
# the first scheduled actions (3 s after their event) are already firing, so the
# kill lands among delivered, in-flight, retrying, pending and unread actions alike.
WAVES = 12
WAVE_GAP_S = 0.5
OFFSET = "3s"
RETRY_DELAY_S = 0.5
FINAL = frozenset({"delivered", "failed", "cancelled", "skipped", "quota_exceeded", "suspended"})
# Bounds on the waits. The restart is the slow part: the group waits for the killed
# member's session to expire (aiokafka's default 10 s) before it reassigns partitions.
STARTUP_S = 30.0
CONVERGE_S = 60.0
SIGTERM_EXIT_S = 30.0


def eid(n: int) -> str:
    return f"evt-c{n}"


def now_id(n: int) -> str:
    return f"{eid(n)}:{RULE}:Now"


def later_id(n: int) -> str:
    return f"{eid(n)}:{RULE}:Later"


# Event 0 is the warm-up that shows the first process is consuming; 1..EVENTS the stream.
NUMBERS = range(EVENTS + 1)
EXPECTED_NOW = frozenset(now_id(n) for n in NUMBERS)
EXPECTED_LATER = frozenset(later_id(n) for n in NUMBERS)
EXPECTED = EXPECTED_NOW | EXPECTED_LATER
# Every fifth instant action and every fifth scheduled one fail their first attempt,
# so retries (and their timers) are pending when the process dies.
FAIL_FIRST = frozenset(
    [now_id(n) for n in NUMBERS if n and n % 5 == 0] + [later_id(n) for n in NUMBERS if n % 5 == 2]
)
# Requests the receiver gets without a crash; the kill comes after a third of them.
KILL_AT = (len(EXPECTED) + len(FAIL_FIRST)) // 3


def record_event(n: int) -> tuple[bytes, bytes]:
    org = ORGS[n % len(ORGS)]
    data = event(f"c{n}", org_id=org, record={"Ref": eid(n)})
    return org.encode(), orjson.dumps(data)


async def produce_events(config: Config, numbers: range) -> None:
    topic = config.kafka.events_topic
    await produce_records(
        config.kafka,
        [(topic, *record_event(n)) for n in numbers],
    )


async def produce_stream(config: Config) -> None:
    per_wave = EVENTS // WAVES
    for wave in range(WAVES):
        start = 1 + wave * per_wave
        await produce_events(config, range(start, start + per_wave))
        await asyncio.sleep(WAVE_GAP_S)


async def wait_until(
    condition: Callable[[], bool], timeout_s: float, explain: Callable[[], str]
) -> None:
    """Poll ``condition`` (bounded); fail with ``explain()`` when it never holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s: {explain()}")
        await asyncio.sleep(0.1)


def received_ids(rx: FlakyReceiver) -> set[str]:
    return {h.webhook_id for h in rx.hits}


def finals_by_action(results: list[dict[str, Any]]) -> dict[str, set[str]]:
    finals: dict[str, set[str]] = {}
    for r in results:
        if r["status"] in FINAL:
            finals.setdefault(r["action_id"], set()).add(r["status"])
    return finals


def sample(ids: set[str] | frozenset[str], limit: int = 15) -> str:
    shown = sorted(ids)[:limit]
    more = f" … and {len(ids) - limit} more" if len(ids) > limit else ""
    return f"{len(ids)}: {shown}{more}"


async def event_partitions(config: Config) -> set[int]:
    k = config.kafka
    return {rec.partition async for rec in read_topic(k, k.events_topic, idle_timeout_s=1.0)}


async def test_kill_9_mid_stream_loses_no_action_and_repeats_keep_their_webhook_id(
    tmp_path: Path,
) -> None:
    kafka = unique_kafka()
    servers = kafka.bootstrap_servers
    await ensure_topics(
        kafka, [kafka.events_topic, kafka.results_topic, kafka.dlq_topic], kafka.partitions
    )
    async with flaky_receiver(FAIL_FIRST) as rx:
        config_path = tmp_path / "crmhooks.toml"
        config_path.write_text(
            crash_config_toml(
                kafka,
                tmp_path / "crmhooks.db",
                rx.url,
                ORGS,
                offset=OFFSET,
                retry_delay_s=RETRY_DELAY_S,
            ),
            encoding="utf-8",
        )
        config = load_config(config_path, env={"CRMHOOKS_BOOTSTRAP_SERVERS": servers})
        first = ProcessorProcess(config_path, tmp_path / "first.log", servers)
        second = ProcessorProcess(config_path, tmp_path / "second.log", servers)
        stream: asyncio.Task[None] | None = None
        try:
            await first.start()
            await produce_events(config, range(1))
            await wait_until(
                lambda: now_id(0) in received_ids(rx),
                STARTUP_S,
                lambda: f"the first processor never sent the warm-up request\n{first.log_tail()}",
            )

            stream = asyncio.create_task(produce_stream(config))
            await wait_until(
                lambda: len(rx.hits) >= KILL_AT,
                STARTUP_S,
                lambda: (
                    f"only {len(rx.hits)} of {KILL_AT} requests before the kill\n{first.log_tail()}"
                ),
            )
            assert first.running, f"the first processor died by itself\n{first.log_tail()}"
            await first.kill()
            at_kill = received_ids(rx)
            later_at_kill = at_kill & EXPECTED_LATER
            # The crash must hit pending timers, or it would prove nothing about them.
            assert len(later_at_kill) < len(EXPECTED_LATER), "every timer fired before the kill"

            await second.start()
            await stream
            stream = None

            await wait_until(
                lambda: received_ids(rx) >= EXPECTED,
                CONVERGE_S,
                lambda: (
                    "the receiver never got "
                    f"{sample(EXPECTED - received_ids(rx))}\n{second.log_tail()}"
                ),
            )
            deadline = time.monotonic() + CONVERGE_S
            while True:
                results = await read_all(config, config.kafka.results_topic)
                finals = finals_by_action(results)
                without_final = EXPECTED - finals.keys()
                if not without_final or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.3)
            assert not without_final, (
                f"actions without a final status on the results topic: {sample(without_final)}"
            )

            code = await second.terminate(SIGTERM_EXIT_S)
            assert code == 0, (
                f"on SIGTERM the processor exited with {code} (None: still running after "
                f"{SIGTERM_EXIT_S:.0f} s)\n{second.log_tail()}"
            )
        finally:
            if stream is not None:
                stream.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stream
            await first.close()
            await second.close()

        # Every timer fired, every action reached the receiver, and nothing else did.
        got = received_ids(rx)
        fired = {h.webhook_id for h in rx.hits if h.path == "/later"}
        assert fired >= EXPECTED_LATER, f"timers never fired: {sample(EXPECTED_LATER - fired)}"
        assert got == EXPECTED, f"unexpected webhook-ids: {sample(got - EXPECTED)}"
        # A repeated request is the same action: its webhook-id is the one its content
        # (webhook path, event reference) says, on the first request and every repeat.
        wrong = {
            f"{h.path} {h.body!r} came with webhook-id {h.webhook_id!r}"
            for h in rx.hits
            if h.webhook_id
            != f"{orjson.loads(h.body)['ref']}:{RULE}:{'Now' if h.path == '/now' else 'Later'}"
        }
        assert not wrong, f"requests whose webhook-id is not their action's: {sample(wrong)}"

        # Exactly one final status per action (it may repeat after the crash, never change).
        conflicting = {aid: s for aid, s in finals.items() if len(s) > 1}
        assert not conflicting, f"actions with different final statuses: {conflicting}"
        not_delivered = {aid for aid, s in finals.items() if s != {"delivered"}}
        assert not not_delivered, f"actions not delivered: {sample(not_delivered)}"
        assert finals.keys() == EXPECTED, f"results for unknown actions: {finals.keys() - EXPECTED}"
        letters = await read_all(config, config.kafka.dlq_topic)
        assert letters == [], f"unexpected dead letters: {letters[:3]}"
        assert len(await event_partitions(config)) >= 2, "the events used only one partition"

        repeats = len(rx.hits) - len(got) - len(FAIL_FIRST)
        print(
            f"kill after {len(at_kill)} actions reached the receiver "
            f"({len(later_at_kill)} scheduled); {repeats} requests repeated after the crash"
        )
