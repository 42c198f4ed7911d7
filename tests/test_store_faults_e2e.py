"""A full or read-only disk under a running processor, on real parts (issue 26.1, 26.2).

``crmhooks run`` as a subprocess, the real broker, a real receiver, events flowing.
The store is on:

- ``tmpfs-full``: a tmpfs of its own (mounted by the test as root; skipped only where
  mounting is impossible), filled by the test while events flow: the kernel's ENOSPC;
- ``sqlite-full`` / ``sqlite-read-only``: an ordinary directory, the fault made at the
  SQLite layer by tests/store_fault_run.py (``max_page_count``: SQLITE_FULL;
  ``query_only``: SQLITE_READONLY). They run everywhere; the read-only one stands in
  for a read-only file system, which the kernel will not make under a file open for
  writing (tests/test_store_disk.py shows that refusal at the next start).

What must hold (SPEC §10, issue 26):

- the real SQLite error is logged, and the process exits non-zero within seconds;
- while it runs, no request is sent twice (26.1, the store failing: the report is
  not retried by sending the request again);
- no offset is committed past an event whose actions were not stored;
- once the disk is fixed, a restart finishes everything: each action exactly one
  final status (its result repeated only where its request was), a ``webhook-id``
  received twice only if it was in flight at the failure (sent, not stored
  finished), and never three times.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from crmhooks.config import KafkaSettings, load_config
from crmhooks.kafka_io import ensure_topics, produce_records, read_topic
from tests.crash_support import ProcessorProcess
from tests.support import Receiver, event, read_all, receiver, unique_kafka
from tests.test_store_disk import fill

pytestmark = pytest.mark.kafka

# Keys of these six organisations hash to all three partitions (murmur2).
ORGS = tuple(f"org-{i}" for i in range(6))
WARM = 6  # events that show the processor is up, both their actions delivered
EVENTS = 300  # events produced while the disk fails and after
WAVE = 25  # produced together, WAVE_GAP_S apart: a stream, not one batch
WAVE_GAP_S = 0.25
FAULT_AFTER_WAVES = 3  # the disk fails after these, while events flow
# Events before the fault are of rule "both" (an instant and a scheduled action:
# every batch writes to the store, and timers are pending at the failure); those
# from the fault on are of rule "quick" (instant only: a batch writes nothing, the
# first write to fail is an attempt's report, and nothing but the store's failure
# itself can stop the process, as in issue 26.2).
FIRST_QUICK = WARM + FAULT_AFTER_WAVES * WAVE
# Requests take this long to answer: some are in flight when the store fails.
ANSWER_S = 0.1
# Each event's record carries this much: its snapshot (stored for the scheduled
# action) makes the store grow by pages every batch.
PAD = "p" * 2000
OFFSET = "2s"  # the scheduled action of each "both" event
FINAL = frozenset({"delivered", "failed", "cancelled", "skipped", "quota_exceeded", "suspended"})
STARTUP_S = 60.0
FAILURE_S = 60.0  # from the fault to the process's exit
# SPEC §10 "exits non-zero at once": from the store's failure logged to the exit (a
# stop without grace for requests whose results cannot be stored: leaving the
# consumer group and closing the producer are most of it).
EXIT_AFTER_FAILURE_S = 5.0
CONVERGE_S = 90.0


def eid(n: int) -> str:
    return f"evt-d{n}"


def action_ids(n: int) -> tuple[str, ...]:
    if n < FIRST_QUICK:
        return f"{eid(n)}:both:Now", f"{eid(n)}:both:Later"
    return (f"{eid(n)}:quick:Now",)


EXPECTED = frozenset(a for n in range(WARM + EVENTS) for a in action_ids(n))


def config_toml(kafka: KafkaSettings, store_path: Path, receiver_url: str) -> str:
    q = json.dumps  # a TOML basic string (JSON string escapes are valid TOML escapes)
    orgs = "".join(f"\n[[orgs]]\nid = {q(org)}\nusers = 1000\n" for org in ORGS)
    body = q('{"ref": "${Potentials.Ref}"}')
    webhooks = "".join(
        f"""
[[webhooks]]
name = "{name}"
url = {q(receiver_url + "/" + name.lower())}
module = "Potentials"
  [webhooks.body]
  format = "json"
  template = {body}
"""
        for name in ("Now", "Later")
    )
    return f"""
[kafka]
bootstrap_servers = {q(kafka.bootstrap_servers)}
group_id = {q(kafka.group_id)}
events_topic = {q(kafka.events_topic)}
results_topic = {q(kafka.results_topic)}
dlq_topic = {q(kafka.dlq_topic)}
partitions = {kafka.partitions}
session_timeout_ms = 6000

[store]
path = {q(str(store_path))}

[delivery]
allow_private_networks = true
suspend_after_failed_actions = 0
shutdown_grace_s = 5

[quota]
daily_limit = 1000000
per_user = 1000000
{orgs}
{webhooks}
[[rules]]
id = "both"
module = "Potentials"
repeat = "every"
criteria = {{ all = [ {{ field = "Flow", op = "is", value = "both" }} ] }}
instant = "Now"
  [[rules.scheduled]]
  webhook = "Later"
  relative_to = "trigger"
  offset = {q(OFFSET)}

[[rules]]
id = "quick"
module = "Potentials"
repeat = "every"
criteria = {{ all = [ {{ field = "Flow", op = "is", value = "instant" }} ] }}
instant = "Now"
"""


@dataclass
class Fault:
    """How one variant's store fails, and is fixed."""

    name: str
    store_path: Path
    launcher: Sequence[str]
    make: Callable[[ProcessorProcess], None]
    fix: Callable[[], None]
    error: str  # SQLite's own text
    sqlite_name: str


def mount_tmpfs(mnt: Path, size: str) -> None:
    try:
        made = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a small file system (the sqlite-* variants run)")
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()} (the sqlite-* variants run)")


@contextlib.contextmanager
def fault(kind: str, tmp_path: Path) -> Iterator[Fault]:
    if kind == "tmpfs-full":
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        mount_tmpfs(mnt, "16m")
        filler = mnt / "filler"

        def make(_: ProcessorProcess) -> None:
            fill(mnt)

        try:
            yield Fault(
                kind,
                mnt / "store" / "crmhooks.db",
                ("-m", "crmhooks.cli"),
                make=make,
                fix=filler.unlink,  # the operator frees space
                error="database or disk is full",
                sqlite_name="SQLITE_FULL",
            )
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        return
    fault_name = kind.removeprefix("sqlite-")

    def signal_it(process: ProcessorProcess) -> None:
        assert process.proc is not None
        process.proc.send_signal(signal.SIGUSR1)

    yield Fault(
        kind,
        tmp_path / "store" / "crmhooks.db",
        ("-m", "tests.store_fault_run", fault_name),
        make=signal_it,
        fix=lambda: None,  # the next start is a connection without the fault
        error={
            "full": "database or disk is full",
            "read-only": "attempt to write a readonly database",
        }[fault_name],
        sqlite_name={"full": "SQLITE_FULL", "read-only": "SQLITE_READONLY"}[fault_name],
    )


def record_event(kafka: KafkaSettings, n: int) -> tuple[str, bytes, bytes]:
    org = ORGS[n % len(ORGS)]
    flow = "both" if n < FIRST_QUICK else "instant"
    data = event(f"d{n}", org_id=org, record={"Ref": eid(n), "Pad": PAD, "Flow": flow})
    return kafka.events_topic, org.encode(), orjson.dumps(data)


async def committed_offsets(kafka: KafkaSettings) -> dict[int, int]:
    """The group's committed offset of each events partition (0 where none)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers, group_id=kafka.group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        out = {}
        for p in range(kafka.partitions):
            out[p] = await consumer.committed(TopicPartition(kafka.events_topic, p)) or 0
        return out
    finally:
        await consumer.stop()


async def events_at(kafka: KafkaSettings) -> list[tuple[int, int, str]]:
    """(partition, offset, event_id) of every event produced."""
    out = []
    async for rec in read_topic(kafka, kafka.events_topic, idle_timeout_s=1.0):
        assert rec.value is not None
        out.append((rec.partition, rec.offset, orjson.loads(rec.value)["event_id"]))
    return out


def stored_actions(path: Path) -> dict[str, str]:
    """action_id → status in the store file as the failed process left it."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT action_id, status FROM actions").fetchall())
    finally:
        db.close()


def sent(rx: Receiver) -> list[str]:
    """The webhook-id of every request the receiver got, in order."""
    return [r.headers["webhook-id"] for r in rx.requests]


def finals_of(results: list[dict[str, Any]]) -> dict[str, list[str]]:
    finals: dict[str, list[str]] = collections.defaultdict(list)
    for r in results:
        if r["status"] in FINAL:
            finals[r["action_id"]].append(r["status"])
    return finals


async def wait_until(
    condition: Callable[[], bool], timeout_s: float, explain: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s: {explain()}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("kind", ["tmpfs-full", "sqlite-full", "sqlite-read-only"])
async def test_a_failing_disk_stops_the_processor_and_a_restart_finishes_everything(
    kind: str, tmp_path: Path
) -> None:
    kafka = unique_kafka()
    servers = kafka.bootstrap_servers
    await ensure_topics(kafka, [kafka.events_topic, kafka.results_topic, kafka.dlq_topic], 3)
    with fault(kind, tmp_path) as f:
        async with receiver() as rx:

            async def slow() -> None:
                await asyncio.sleep(ANSWER_S)

            rx.on_request = slow
            config_path = tmp_path / "crmhooks.toml"
            config_path.write_text(
                config_toml(kafka, f.store_path, rx.url),
                encoding="utf-8",
            )
            config = load_config(config_path, env={"CRMHOOKS_BOOTSTRAP_SERVERS": servers})
            first = ProcessorProcess(config_path, tmp_path / "first.log", servers, f.launcher)
            second = ProcessorProcess(config_path, tmp_path / "second.log", servers)
            failed_line = (
                f"ERROR crmhooks.store: store {f.store_path} failed: {f.error} "
                f"({f.sqlite_name}); it takes no more writes"
            )
            try:
                await first.start()
                await produce_records(kafka, [record_event(kafka, n) for n in range(WARM)])
                warm = {a for n in range(WARM) for a in action_ids(n)}
                await wait_until(
                    lambda: warm <= set(sent(rx)),
                    STARTUP_S,
                    lambda: f"the warm-up was never delivered\n{first.log_tail()}",
                )

                failed_seen: float | None = None
                exited_at: float | None = None
                produced = WARM
                deadline = time.monotonic() + FAILURE_S + FAULT_AFTER_WAVES * WAVE_GAP_S
                next_wave = 0.0
                while exited_at is None:  # events flow until the process is gone, and after
                    now = time.monotonic()
                    assert now < deadline, (
                        "the process did not exit after its store failed"
                        if failed_seen is not None
                        else "the store never failed"
                    ) + f"\n{first.log_tail()}"
                    if produced < WARM + EVENTS and now >= next_wave:
                        if produced == FIRST_QUICK:
                            f.make(first)  # events flowing, requests in flight, timers pending
                        wave = range(produced, min(produced + WAVE, WARM + EVENTS))
                        await produce_records(kafka, [record_event(kafka, n) for n in wave])
                        produced = wave.stop
                        next_wave = now + WAVE_GAP_S
                    if failed_seen is None and failed_line in first.log_path.read_text("utf-8"):
                        failed_seen = time.monotonic()
                    if not first.running:
                        exited_at = time.monotonic()
                    await asyncio.sleep(0.05)
                assert first.proc is not None
                code = await first.proc.wait()
                await first.close()
                log_text = first.log_path.read_text("utf-8")
                sent_before = collections.Counter(sent(rx))
                await produce_records(
                    kafka, [record_event(kafka, n) for n in range(produced, WARM + EVENTS)]
                )

                # The real error, once, and the exit: non-zero, within seconds of it.
                assert failed_seen is not None, f"no line {failed_line!r}\n{first.log_tail(40)}"
                assert log_text.count(failed_line) == 1, first.log_tail(40)
                assert "cannot rollback" not in log_text
                assert code == 1, first.log_tail(40)
                assert (
                    log_text.rstrip().splitlines()[-1] == f"crmhooks: store write failed: {f.error}"
                )
                exit_s = exited_at - failed_seen
                assert exit_s <= EXIT_AFTER_FAILURE_S, (exit_s, first.log_tail(40))

                # 26.1: while it ran, nothing was sent twice.
                assert max(sent_before.values()) == 1, sent_before.most_common(3)

                # Nothing committed that was not stored: every event before a partition's
                # committed offset has both its actions in the store.
                f.fix()
                committed = await committed_offsets(kafka)
                stored = stored_actions(f.store_path)
                events = await events_at(kafka)
                assert len(events) == WARM + EVENTS
                covered = [(p, o, e) for p, o, e in events if o < committed[p]]
                unstored = [
                    (p, o, e)
                    for p, o, e in covered
                    if not all(a in stored for a in action_ids(int(e.removeprefix("evt-d"))))
                ]
                assert not unstored, f"committed past events not stored: {unstored[:5]}"
                left = len(events) - len(covered)
                assert left > 0, "the failure left nothing for the restart: it proves nothing"
                finished_before = {a for a, s in stored.items() if s != "pending"}
                in_flight = set(sent_before) - finished_before

                # The disk fixed, a restart finishes everything.
                await second.start()
                await wait_until(
                    lambda: set(sent(rx)) >= EXPECTED,
                    CONVERGE_S,
                    lambda: (
                        f"never sent: {sorted(EXPECTED - set(sent(rx)))[:10]}\n{second.log_tail()}"
                    ),
                )
                deadline = time.monotonic() + CONVERGE_S
                while True:
                    finals = finals_of(await read_all(config, kafka.results_topic))
                    if finals.keys() >= EXPECTED or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.3)
                assert await second.terminate(30) == 0, second.log_tail()
                finals = finals_of(await read_all(config, kafka.results_topic))

                per_id = collections.Counter(sent(rx))
                repeated = {a for a, c in per_id.items() if c > 1}
                assert set(per_id) == EXPECTED
                assert max(per_id.values()) <= 2, per_id.most_common(3)
                assert repeated <= in_flight, sorted(repeated - in_flight)[:10]
                assert set(finals) == EXPECTED
                assert {a: set(ss) for a, ss in finals.items()} == {
                    a: {"delivered"} for a in EXPECTED
                }
                results_repeated = {a for a, ss in finals.items() if len(ss) > 1}
                assert results_repeated <= repeated, sorted(results_repeated - repeated)[:10]
                assert max(len(ss) for ss in finals.values()) <= 2
                print(
                    f"\n{kind}: exit {code} {exit_s:.2f} s after the failure was logged; "
                    f"{len(covered)} of {len(events)} events committed; {len(in_flight)} actions "
                    f"in flight at the failure, {len(repeated)} sent again after the restart"
                )
            finally:
                await first.close()
                await second.close()
