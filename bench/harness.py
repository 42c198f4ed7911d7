"""Bench plumbing: fast producing, raw consuming, committed offsets, the sink and processors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import GroupCoordinatorNotAvailableError

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
CRMHOOKS = REPO / ".venv" / "bin" / "crmhooks"
# Records per producer batch request: large batches keep the bench's own producer
# far faster than the processor it feeds (send_batch skips per-record futures).
BATCH_BYTES = 512 * 1024
# Unacknowledged batches of the bench's producer: 32 MB of events in the air.
MAX_BATCHES_IN_FLIGHT = 64
# A scenario whose deliveries stopped this long before all arrived has lost some:
# waiting out its whole timeout would only make the bench slower.
STALL_S = 20.0


def now_ms() -> float:
    return time.time() * 1000.0


def iso_utc(epoch_s: float) -> str:
    """RFC 3339 UTC with milliseconds, as events carry ``occurred_at``."""
    whole, ms = divmod(round(epoch_s * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ms:03d}Z"


def event_bytes(
    n: int,
    org: str,
    stage: str,
    *,
    occurred_s: float | None = None,
    stamp_ms: float = 0.0,
    record_id: str | None = None,
    prefix: str = "e",
) -> bytes:
    """A Potentials record event (SPEC §2); ``T`` carries a time stamp into the webhook body."""
    return orjson.dumps(
        {
            "event_id": f"{prefix}-{n}",
            "org_id": org,
            "module": "Potentials",
            "operation": "create",
            "occurred_at": iso_utc(time.time() if occurred_s is None else occurred_s),
            "record_id": record_id or f"{prefix}-rec-{n}",
            "record": {
                "Potential Name": f"Deal {n}",
                "Amount": 25000 + n % 1000,
                "Stage": stage,
                "Type": "New Business",
                "Closing Date": "2026-11-30",
                "Potential Owner": "Ana Silva",
                "T": round(stamp_ms),
            },
            "related": {"Accounts": {"Account Name": "Acme Corp"}},
            "user": {"Last Name": "Silva", "Email": "ana@example.com"},
        }
    )


@dataclass(frozen=True, slots=True)
class Topics:
    """One scenario's topics and group, so that scenarios never see each other's records."""

    tag: str
    partitions: int

    @property
    def events(self) -> str:
        return f"bench-{self.tag}.events"

    @property
    def results(self) -> str:
        return f"bench-{self.tag}.results"

    @property
    def dlq(self) -> str:
        return f"bench-{self.tag}.dlq"

    @property
    def group(self) -> str:
        return f"bench-{self.tag}"


def new_topics(name: str, partitions: int) -> Topics:
    return Topics(f"{name}-{uuid.uuid4().hex[:6]}", partitions)


async def create_topics(
    bootstrap: str, topics: Topics, events_config: Mapping[str, str] | None = None
) -> None:
    """The scenario's topics; ``events_config``: topic configs of its events topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    t,
                    num_partitions=topics.partitions,
                    replication_factor=1,
                    topic_configs=dict(events_config or {}) if t == topics.events else {},
                )
                for t in (topics.events, topics.results, topics.dlq)
            ]
        )
    finally:
        await admin.close()


class FastProducer:
    """Batches records per partition with ``send_batch``: tens of thousands a second."""

    def __init__(
        self, bootstrap: str, *, linger_ms: int = 0, compression_type: str | None = None
    ) -> None:
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks=1,
            linger_ms=linger_ms,
            compression_type=compression_type,
            max_batch_size=BATCH_BYTES,
            max_request_size=4 * BATCH_BYTES,
        )

    async def __aenter__(self) -> FastProducer:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    async def send_many(self, topic: str, records: Iterable[tuple[int, bytes, bytes]]) -> int:
        """(partition, key, value) records, batched per partition; waits for every ack.

        ``records`` may be a generator: at most ``MAX_BATCHES_IN_FLIGHT`` batches are
        unacknowledged at a time, so a million events never sit in memory at once.
        """
        batches: dict[int, Any] = {}
        futures: list[asyncio.Future[Any]] = []
        count = 0

        async def send(partition: int, batch: Any) -> None:
            nonlocal futures
            batch.close()
            futures.append(await self.producer.send_batch(batch, topic, partition=partition))
            if len(futures) >= MAX_BATCHES_IN_FLIGHT:
                await asyncio.gather(*futures)
                futures = []

        for partition, key, value in records:
            count += 1
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = self.producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                await send(partition, batch)
                batch = batches[partition] = self.producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        for partition, batch in batches.items():
            if batch.record_count():
                await send(partition, batch)
        await asyncio.gather(*futures)
        return count

    async def send_one(self, topic: str, partition: int, key: bytes, value: bytes) -> None:
        """Queue one record now (no wait for its ack): the latency test's paced producer."""
        await self.producer.send(topic, value=value, key=key, partition=partition)

    async def flush(self) -> None:
        await self.producer.flush()


async def raw_consume_rate(
    bootstrap: str, topic: str, partitions: int, count: int
) -> tuple[float, float]:
    """Records/s of a bare AIOKafkaConsumer reading ``count`` records, decoding nothing,
    and its CPU µs per record (this process runs nothing else meanwhile)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # The processor's fetch settings (kafka_io.KafkaIO), so the ceiling is comparable.
        max_partition_fetch_bytes=1 << 20,
        fetch_max_bytes=50 << 20,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = 0
        start = time.monotonic()
        cpu = time.process_time()
        while seen < count:
            batches = await consumer.getmany(timeout_ms=500, max_records=2000)
            seen += sum(len(v) for v in batches.values())
        cpu_us = (time.process_time() - cpu) * 1e6 / seen
        return seen / (time.monotonic() - start), cpu_us
    finally:
        await consumer.stop()


class GroupOffsets:
    """Polls a consumer group's committed offsets on one topic."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self.group = group
        self.topic = topic

    async def __aenter__(self) -> GroupOffsets:
        await self.admin.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.admin.close()

    async def committed(self) -> int:
        """The group's committed sum; 0 while a fresh broker has no group coordinator yet."""
        try:
            offsets = await self.admin.list_consumer_group_offsets(self.group)
        except GroupCoordinatorNotAvailableError:
            return 0
        return sum(max(0, md.offset) for tp, md in offsets.items() if tp.topic == self.topic)

    async def rate_to(self, total: int, timeout_s: float) -> tuple[float, int, float]:
        """Events/s from the first commit seen until the committed sum reaches ``total``.

        Returns (rate, committed at the end, seconds from the first commit). Counting
        from the first commit seen (not from 0) keeps the group join out of the figure.
        """
        deadline = time.monotonic() + timeout_s
        first: tuple[float, int] | None = None
        done = 0
        while time.monotonic() < deadline:
            done = await self.committed()
            t = time.monotonic()
            if first is None and done > 0:
                first = (t, done)
            if done >= total:
                break
            # Finer near the end: the time the last commit is seen ends the figure,
            # and a 50 ms poll would add ~25 ms on average to a run of ~1.5 s.
            await asyncio.sleep(0.01 if done >= 0.9 * total else 0.05)
        if first is None:
            return 0.0, done, 0.0
        elapsed = time.monotonic() - first[0]
        return ((done - first[1]) / elapsed if elapsed > 0 else 0.0), done, elapsed


async def read_topic(bootstrap: str, topic: str, partitions: int) -> AsyncIterator[Any]:
    """Every record of ``topic`` as it is now, from its beginning to its current end."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for messages in batches.values():
                for m in messages:
                    yield m
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                return
    finally:
        await consumer.stop()


async def count_results(
    bootstrap: str, topic: str, partitions: int, status: str
) -> tuple[int, float]:
    """(records with ``status``, the latest such record's timestamp in epoch ms)."""
    seen, last_ms = 0, 0.0
    needle = f'"status":"{status}"'.encode()
    async for m in read_topic(bootstrap, topic, partitions):
        if m.value is not None and needle in m.value:
            seen += 1
            last_ms = max(last_ms, float(m.timestamp))
    return seen, last_ms


async def append_delays(bootstrap: str, topic: str, partitions: int, prefix: str) -> list[float]:
    """For each event of ``topic`` whose id starts with ``prefix``: its record's
    timestamp minus its stamp ``T``, in ms. On a topic with LogAppendTime, the time
    from the bench's stamp to the broker's append of the event (before any processor
    could read it)."""
    delays: list[float] = []
    async for m in read_topic(bootstrap, topic, partitions):
        event = orjson.loads(m.value) if m.value is not None else {}
        if str(event.get("event_id", "")).startswith(prefix):
            delays.append(float(m.timestamp) - float(event["record"]["T"]))
    return delays


# --- the sink process ------------------------------------------------------------


async def build_c_sink(workdir: Path) -> Path:
    """bench/sink.c compiled (``cc -O2``) into ``workdir``; RuntimeError if it cannot be."""
    source = REPO / "bench" / "sink.c"
    binary = workdir / "sink-c"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) for bench/sink.c; use --sink python")
    proc = await asyncio.create_subprocess_exec(
        cc, "-O2", "-o", str(binary), str(source), stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{cc} could not build bench/sink.c: {err.decode(errors='replace')}")
    return binary


def batch_scheduled(pid: int) -> str:
    """Puts process ``pid`` under ``SCHED_BATCH`` (threads it starts later inherit it)
    and names the policy it then runs under.

    The sink shares the cores with the processors it answers. Under the default
    policy each request that wakes it preempts the processor running on that core
    (wake-up preemption); under ``SCHED_BATCH`` it waits for the core's next
    scheduling point, and then answers all the requests that came meanwhile. Its
    CPU per request falls (~12 → ~7.5 µs with two processors), and the processors
    are preempted less. Linux only; anywhere else, or if refused, the default stays.
    """
    try:
        os.sched_setscheduler(pid, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as exc:
        return f"default (SCHED_BATCH refused: {exc})"
    return "SCHED_BATCH"


class Sink:
    """The sink server in a child process, with its control requests."""

    def __init__(self, workdir: Path, kind: str = "c", *, batch: bool = True) -> None:
        self.workdir = workdir
        self.kind = kind  # "c" (bench/sink.c, built here) or "python" (bench.sink)
        self.batch = batch  # run it under SCHED_BATCH (batch_scheduled)
        self.scheduling = "default"  # the policy it runs under, once started
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def __aenter__(self) -> Sink:
        port_file = self.workdir / "sink.port"
        port_file.unlink(missing_ok=True)
        if self.kind == "c":
            command = [str(await build_c_sink(self.workdir))]
        else:
            command = [str(PYTHON), "-m", "bench.sink"]
        self.proc = await asyncio.create_subprocess_exec(
            *command, "--port-file", str(port_file), cwd=REPO
        )
        if self.batch:
            self.scheduling = batch_scheduled(self.proc.pid)
        for _ in range(200):
            if port_file.exists():
                self.port = int(port_file.read_text())
                return self
            await asyncio.sleep(0.05)
        raise RuntimeError("the sink did not start")

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def _get(self, path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: sink\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            return await reader.readexactly(length)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def stats(self) -> tuple[int, float, float]:
        count, first, last = (await self._get("/_stats")).split()
        return int(count), float(first), float(last)

    async def latencies(self) -> list[float]:
        values: list[float] = orjson.loads(await self._get("/_lat"))
        return values

    async def reset(self) -> None:
        await self._get("/_reset")

    async def wait_count(
        self, want: int, timeout_s: float, stall_s: float = STALL_S
    ) -> tuple[int, float, float]:
        """Until ``want`` requests arrived, ``timeout_s`` passed, or requests stopped
        arriving for ``stall_s`` after the first one: (count, first ms, last ms)."""
        deadline = time.monotonic() + timeout_s
        stats = await self.stats()
        changed = time.monotonic()
        while stats[0] < want and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            now = await self.stats()
            if now[0] != stats[0]:
                changed = time.monotonic()
            elif now[0] and time.monotonic() - changed > stall_s:
                return now
            stats = now
        return stats


# --- the processor as a child process ----------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return orjson.dumps(value).decode()  # a JSON string is a TOML basic string
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def render_toml(doc: Mapping[str, Any]) -> str:
    """Tables of scalars and arrays of tables (one level of sub-tables): what crmhooks needs."""
    lines: list[str] = []
    for name, value in doc.items():
        if isinstance(value, Mapping):
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in value.items()]
        else:
            for item in value:
                lines.append(f"[[{name}]]")
                subs = {k: v for k, v in item.items() if isinstance(v, Mapping)}
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items() if k not in subs]
                for sub, table in subs.items():
                    lines.append(f"  [{name}.{sub}]")
                    lines += [f"  {k} = {toml_value(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)


def base_config(bootstrap: str, topics: Topics, store: Path) -> dict[str, Any]:
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": topics.group,
            "events_topic": topics.events,
            "results_topic": topics.results,
            "dlq_topic": topics.dlq,
            "partitions": topics.partitions,
        },
        "store": {"path": str(store)},
        "delivery": {
            "allow_private_networks": True,  # the sink is on 127.0.0.1
            # The bare-client ceiling runs 64 requests in flight to the one sink host.
            # BENCH_MAX_IN_FLIGHT_PER_HOST: a diagnostic knob (is delivery latency-bound?).
            "max_in_flight_per_host": int(os.environ.get("BENCH_MAX_IN_FLIGHT_PER_HOST", "64")),
        },
        # No quota in the way: the bench sends far more than a day's 2500.
        "quota": {"daily_limit": 1_000_000_000, "per_user": 1_000_000_000},
    }


class CpuSampler:
    """CPU seconds of a process (user + system, /proc/PID/stat) or of the whole machine
    (every core, /proc/stat), sampled every 50 ms in the background, so that a
    scenario can tell the CPU spent between two moments it only knows afterwards
    (the sink's first and last request)."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pid: int | None) -> None:
        self.pid = pid  # None: the whole machine
        self.samples: list[tuple[float, float]] = []  # (epoch ms, CPU s)
        self.task: asyncio.Task[None] | None = None

    def cpu_s(self) -> float:
        if self.pid is None:
            # cpu user nice system idle iowait irq softirq steal ...: all but idle, iowait
            ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
            return (sum(ticks[:8]) - ticks[3] - ticks[4]) / self.TICK
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / self.TICK  # utime, stime

    async def _run(self) -> None:
        with contextlib.suppress(OSError):  # the process ended
            while True:
                self.samples.append((now_ms(), self.cpu_s()))
                await asyncio.sleep(0.05)

    async def __aenter__(self) -> CpuSampler:
        self.task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def usage(self, start_ms: float, end_ms: float) -> tuple[float, float]:
        """(CPU seconds, wall seconds) between the first and last sample taken from
        ``start_ms`` to ``end_ms``; (0, 0) with fewer than two."""
        inside = [(t, cpu) for t, cpu in self.samples if start_ms <= t <= end_ms]
        if len(inside) < 2:
            return 0.0, 0.0
        return inside[-1][1] - inside[0][1], (inside[-1][0] - inside[0][0]) / 1000.0

    def cpu_per(self, start_ms: float, end_ms: float, count: float) -> float | None:
        """CPU µs per one of ``count`` things done from ``start_ms`` to ``end_ms``: the
        CPU rate between the samples inside that window, over the whole window. (The
        samples fall up to 50 ms inside each end: CPU seconds between them over
        ``count`` would leave those ends out, ~3 % of a 3 s run, and the processes
        sampled by different samplers would be counted over different spans.)"""
        cpu_s, wall_s = self.usage(start_ms, end_ms)
        if not wall_s or not count:
            return None
        return cpu_s / wall_s * (end_ms - start_ms) * 1000.0 / count


class Processor:
    """``crmhooks run --config F`` as a child process; SIGTERM stops it gracefully."""

    def __init__(
        self,
        config: Path,
        log: Path,
        store: Path | None = None,
        kafka: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.store = store  # its own SQLite file (CRMHOOKS_STORE_PATH), else the config's
        # [kafka] settings of its own (a secured listener), in its config file: the
        # environment's CRMHOOKS_BOOTSTRAP_SERVERS (the bench's PLAINTEXT listener)
        # must not override the file's address then.
        self.kafka = dict(kafka or {})
        self.proc: asyncio.subprocess.Process | None = None
        self.profiler: asyncio.subprocess.Process | None = None
        self.started = 0.0

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.started = time.monotonic()
            # BENCH_CPROFILE=dir: the processor runs under cProfile (call counts per
            # delivery; its overhead distorts times), a .pstats file per run.
            cprofile = os.environ.get("BENCH_CPROFILE")
            wrap = (
                [str(PYTHON), "-m", "cProfile", "-o", f"{cprofile}/{self.log.stem}.pstats"]
                if cprofile
                else []
            )
            command = [str(CRMHOOKS)]
            env = {
                **os.environ,
                "CRMHOOKS_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "INFO"),
                **({"CRMHOOKS_STORE_PATH": str(self.store)} if self.store else {}),
            }
            if self.kafka:
                env.pop("CRMHOOKS_BOOTSTRAP_SERVERS", None)  # the config names its listener
            self.proc = await asyncio.create_subprocess_exec(
                *wrap,
                *command,
                "run",
                "--config",
                str(self.config),
                cwd=REPO,
                stdout=log,
                stderr=log,
                env=env,
            )
        profile_dir = os.environ.get("BENCH_PROFILE")
        if profile_dir:
            # py-spy (pip install py-spy) samples the processor until it exits; collapsed
            # stacks, one file per processor run, for flame graphs or grep.
            out = Path(profile_dir) / f"{self.log.stem}.{self.proc.pid}.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            self.profiler = await asyncio.create_subprocess_exec(
                str(PYTHON.parent / "py-spy"),
                "record",
                "--format",
                "raw",
                "--rate",
                "200",
                "--output",
                str(out),
                "--pid",
                str(self.proc.pid),
                *(["--native"] if os.environ.get("BENCH_PROFILE_NATIVE") else []),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        return 0.0

    async def stop(self, timeout_s: float = 30.0) -> float:
        """SIGTERM, wait; seconds it took (killed after ``timeout_s``)."""
        if self.proc is None or self.proc.returncode is not None:
            return 0.0
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            print(f"bench: processor {self.pid} ignored SIGTERM; killed", file=sys.stderr)
            self.proc.kill()
            await self.proc.wait()
        elapsed = time.monotonic() - start
        if self.profiler is not None:
            await self.profiler.wait()
            self.profiler = None
        return elapsed


@contextlib.asynccontextmanager
async def processors(
    config: Mapping[str, Any],
    workdir: Path,
    name: str,
    count: int = 1,
    *,
    own_stores: bool = False,
    kafka: Mapping[str, Any] | None = None,
) -> AsyncIterator[list[Processor]]:
    """``count`` processors of one config; ``own_stores``: each its own SQLite file, as
    on separate machines (state moves through the changelog)."""
    path = workdir / f"{name}.toml"
    path.write_text(render_toml(config))
    procs = [
        Processor(
            path,
            workdir / f"{name}-{i}.log",
            workdir / f"{name}-{i}.db" if own_stores else None,
            kafka,
        )
        for i in range(count)
    ]
    try:
        for p in procs:
            await p.start()
        yield procs
    finally:
        await asyncio.gather(*(p.stop() for p in procs))


# --- the admin endpoint of a processor ----------------------------------------------


def logged_admin_port(log: Path) -> int | None:
    """The port of the runner's line ``admin endpoint on http://HOST:PORT`` (a processor
    configured with ``[admin] listen = "127.0.0.1:0"`` takes a free one)."""
    if not log.exists():
        return None
    found = re.search(r"admin endpoint on http://[^:\s]+:(\d+)", log.read_text(errors="replace"))
    return int(found.group(1)) if found else None


async def admin_port(log: Path, timeout_s: float = 60.0) -> int:
    """Until the processor logging to ``log`` has its admin endpoint: its port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        port = logged_admin_port(log)
        if port is not None:
            return port
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the processor did not start its admin endpoint; see {log}")


@contextlib.asynccontextmanager
async def scraping(log: Path, interval_s: float | None) -> AsyncIterator[list[float]]:
    """GET /metrics of the processor logging to ``log`` every ``interval_s``, as Prometheus
    would, for the block's duration; yields the list of scrape durations (s), filled
    as they happen. ``interval_s`` None: nothing is scraped (the same run without)."""
    durations: list[float] = []
    if interval_s is None:
        yield durations
        return
    port = await admin_port(log)
    url = f"http://127.0.0.1:{port}/metrics"

    async def scrape_loop(http: aiohttp.ClientSession) -> None:
        next_s = time.monotonic()
        while True:
            start = time.monotonic()
            with contextlib.suppress(aiohttp.ClientError):  # the processor stopping
                async with http.get(url) as resp:
                    await resp.read()
                durations.append(time.monotonic() - start)
            next_s += interval_s
            await asyncio.sleep(max(0.0, next_s - time.monotonic()))

    async with aiohttp.ClientSession() as http:
        task = asyncio.create_task(scrape_loop(http))
        try:
            yield durations
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
