"""The config topic read into the store and put in force (SPEC §3.2).

Every process reads every partition of the topic, without a group (any
partitioner may have written it): first up to its end before the processor joins
the consumer group (``catch_up``: no event is planned with an organisation's
document missing), then as documents come (``follow``: in force within a few
hundred milliseconds of Kafka acknowledging them). What it read, and how far, is
stored in one transaction (``store.documents``), so a restart reads only what is
new; then the documents go in force (``orgconfig.OrgConfigs``) and a new snapshot
with them; then the pending actions of the organisations whose document changed
are swept for removed rules and webhooks (``sweep``), and their suspensions looked
at again.

A record is a document (key: the organisation's id; value: its JSON document) or a
tombstone (the organisation's document is gone: the file's configuration applies
to it again). A document is **refused** when it does not parse, fails validation
against the config file in force, does not compile, or is keyed by another
organisation than its ``org.id`` (or not keyed): the organisation's last valid
document stays in force, and a dead letter ``invalid_config`` (SPEC §8) lists every
error and carries the document with its secrets as ``***`` (one that does not
parse is not carried: where its secrets are cannot be told).

**Who writes the dead letter.** Every process refuses the document; exactly one
writes its dead letter: the owner of the events partition of the organisation's
key (SPEC §1: its state is there, its events too), when it reads the document —
or, for one read while no process owned that partition (the whole group down, or
this process starting), the next owner, when the partition is assigned to it. That
a refused document's dead letter was written is part of the partition's state
(``config_reports``, in the changelog), so a later owner does not write it again.
As for every record crmhooks writes, a crash between the dead letter and its mark
writes it again (at least once). A record without a usable key (whose
organisation cannot be known from it) is dead-lettered by the owner of events
partition 0 when it reads it, and by no one if no process runs then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from crmhooks.admin import Readiness
from crmhooks.clock import Clock
from crmhooks.config import ConfigError, decode_org_document, parse_document
from crmhooks.config.masking import document_secrets, mask_text, masked_document
from crmhooks.errors import CrmhooksError
from crmhooks.kafka_documents import DocumentRecord, partition_of
from crmhooks.metrics import Metrics
from crmhooks.orgconfig import CompiledOrg, OrgConfigs
from crmhooks.reporter import Produced, Reporter
from crmhooks.results import dead_letter, encode
from crmhooks.snapshot import LiveConfig
from crmhooks.store import DocumentChange, Refused, Store, WriteBatch
from crmhooks.store.documents import DocumentTable

log = logging.getLogger(__name__)

# Records applied together (one store transaction, one new snapshot).
READ_MAX_RECORDS = 500
# How long one fetch waits for the next document: a document is in force well
# within SPEC §3.2's 2 s of its acknowledgement.
FOLLOW_WAIT_MS = 200
# After a failed read (the broker away), the next try; aiokafka reconnects meanwhile.
RETRY_PAUSE_S = 1.0
# How often the topic is looked at for partitions added while running.
PARTITIONS_EVERY_S = 60.0
# Where the reading stands, in the log and /readyz, while catching up.
PROGRESS_EVERY_S = 5.0


class DocumentSource(Protocol):
    """The config topic (``kafka_documents.ConfigTopicReader``)."""

    topic: str

    async def start(self, positions: Mapping[int, int]) -> dict[int, int]: ...

    async def fetch(self, timeout_ms: int, max_records: int) -> list[DocumentRecord]: ...

    async def positions(self) -> dict[int, int]: ...

    async def more_partitions(self, positions: Mapping[int, int]) -> bool: ...

    async def partition_count(self, topic: str) -> int | None: ...


@dataclass(frozen=True, slots=True)
class _Checked:
    """One record checked: what it changes in the store, and in force."""

    change: DocumentChange
    compiled: CompiledOrg | None = None  # a valid document, compiled
    errors: tuple[str, ...] = ()  # a refused one's


class ConfigTopic:
    """Owns how far the config topic was read, and the dead letters of refused documents."""

    def __init__(
        self,
        config: LiveConfig,
        store: Store,
        reporter: Reporter,
        clock: Clock,
        metrics: Metrics,
        *,
        changed: Callable[[str | None], None],
        owns: Callable[[int], bool],
        lock: asyncio.Lock,
    ) -> None:
        self._live = config
        self._store = store
        self._reporter = reporter
        self._clock = clock
        self._metrics = metrics
        self._changed = changed
        self._owns = owns
        self._lock = lock
        self._source: DocumentSource | None = None
        self._events_partitions: int | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.applied = 0  # documents and tombstones put in force (tests, the stop line)
        self.refused = 0

    def __repr__(self) -> str:
        return f"ConfigTopic(applied={self.applied}, refused={self.refused})"

    @property
    def orgs(self) -> OrgConfigs:
        orgs = self._live.current.orgs
        assert orgs is not None, "ConfigTopic.open first"
        return orgs

    async def open(self) -> int:
        """The documents the store holds, in force at once; how many."""
        ids = await self._store.documents.org_ids()
        self._live.with_documents(OrgConfigs(self._live.current.file, self._store.documents, ids))
        self._metrics.watch(config_documents=lambda: len(self.orgs))
        return len(ids)

    # -- reading ---------------------------------------------------------------------

    async def catch_up(
        self,
        source: DocumentSource,
        stop: asyncio.Event | None = None,
        readiness: Readiness | None = None,
    ) -> int:
        """Read the topic up to its end as it is now; how many records."""
        self._source = source
        positions = await self._store.documents.positions()
        ends = await source.start(positions)
        todo = sum(max(0, end - positions.get(p, 0)) for p, end in ends.items())
        read = 0
        started = time.monotonic()
        shown = started
        log.info("reading the config topic %s: %d records new", source.topic, todo)
        while any(positions.get(p, 0) < end for p, end in ends.items()):
            if stop is not None and stop.is_set():
                break
            records = await source.fetch(FOLLOW_WAIT_MS, READ_MAX_RECORDS)
            if records:
                await self.apply(records, catching_up=True)
                read += len(records)
            positions = await source.positions()
            if readiness is not None:
                readiness.set_not_ready(f"reading the config topic: {read:,} of {todo:,} records")
            if time.monotonic() - shown >= PROGRESS_EVERY_S:
                shown = time.monotonic()
                log.info("config topic: %d of %d records read", read, todo)
        log.info(
            "config topic %s read: %d records in %.1f s, %d organisations with a document",
            source.topic,
            read,
            time.monotonic() - started,
            len(self.orgs),
        )
        return read

    async def follow(self) -> None:
        """Apply documents as they come, until cancelled."""
        source = self._source
        assert source is not None, "catch_up first"
        partitions_at = time.monotonic()
        while True:
            try:
                records = await source.fetch(FOLLOW_WAIT_MS, READ_MAX_RECORDS)
                if records:
                    await self.apply(records)
                if time.monotonic() - partitions_at >= PARTITIONS_EVERY_S:
                    partitions_at = time.monotonic()
                    if await source.more_partitions(await self._store.documents.positions()):
                        log.info(
                            "config topic %s: new partitions, read from their start", source.topic
                        )
            except asyncio.CancelledError:
                raise
            except CrmhooksError as exc:
                if self._store.failed is not None:
                    raise  # the processor stops with the store's error
                log.warning("config topic: %s; trying again in %.0f s", exc, RETRY_PAUSE_S)
                await asyncio.sleep(RETRY_PAUSE_S)
                try:  # read again what was fetched and not stored
                    await source.start(await self._store.documents.positions())
                except CrmhooksError as again:
                    log.warning("config topic: %s", again)

    # -- applying --------------------------------------------------------------------

    async def apply(self, records: Sequence[DocumentRecord], *, catching_up: bool = False) -> None:
        """Check ``records``, store what they change and how far they go, put the valid
        documents and tombstones in force; then sweeps and dead letters (not while
        catching up: assignments do both)."""
        positions: dict[int, int] = {}
        for rec in records:
            positions[rec.partition] = max(positions.get(rec.partition, 0), rec.offset + 1)
        checked = self._check_all(records, latest_only=catching_up)
        changes = [c.change for c in checked]
        await self._store.write(WriteBatch(steps=[DocumentTable.read_step(changes, positions)]))
        orgs = self.orgs
        touched: dict[str, None] = {}
        for c in checked:
            change = c.change
            if change.refused is not None:
                self.refused += 1
                continue
            orgs.apply(change.org_id, c.compiled)
            touched[change.org_id] = None
            self.applied += 1
        if touched:
            self._live.documents_changed()
            if not catching_up:
                for org_id in touched:
                    self._changed(org_id)
        refused = [
            Refused(c.change.org_id, c.change.partition, c.change.offset, c.change.refused)
            for c in checked
            if c.change.refused is not None
        ]
        if refused and not catching_up:
            async with self._lock:
                mine = [r for r in refused if await self._owner_here(r.org_id)]
                await self._report(mine)

    def _check_all(self, records: Sequence[DocumentRecord], *, latest_only: bool) -> list[_Checked]:
        """Each record checked, in reading order. ``latest_only`` (catching up on what
        was written meanwhile): per organisation, only its latest valid document or
        tombstone, and a refused document after it, are checked and kept."""
        if not latest_only:
            return [c for c in (self._check(rec) for rec in records) if c is not None]
        by_org: dict[str, list[DocumentRecord]] = {}
        keyless: list[DocumentRecord] = []
        for rec in records:
            org_id = _org_of(rec.key)
            if org_id is None:
                keyless.append(rec)
            else:
                by_org.setdefault(org_id, []).append(rec)
        out: list[tuple[tuple[int, int], _Checked]] = []
        for recs in by_org.values():
            refusal_kept = False
            for rec in reversed(recs):
                checked = self._check(rec)
                if checked is None:
                    continue
                if checked.change.refused is not None:
                    if not refusal_kept:  # the newest refusal: the one to report
                        refusal_kept = True
                        out.append(((rec.partition, rec.offset), checked))
                    continue
                out.append(((rec.partition, rec.offset), checked))
                break  # a valid document or a tombstone: older ones are history
        for rec in keyless:
            checked = self._check(rec)
            if checked is not None:
                out.append(((rec.partition, rec.offset), checked))
        # Reading order within a partition: the valid one before a newer refusal.
        return [c for _, c in sorted(out, key=lambda item: item[0])]

    def _check(self, rec: DocumentRecord) -> _Checked | None:
        org_id = _org_of(rec.key)
        if rec.value is None:
            if org_id is None:
                log.warning(
                    "config topic: a tombstone without a usable key at %d/%d: ignored",
                    rec.partition,
                    rec.offset,
                )
                return None
            return _Checked(DocumentChange(org_id, rec.partition, rec.offset))
        file = self._live.current.file
        try:
            if org_id is None:
                raise ConfigError(
                    ["key: missing or not UTF-8 (a document is keyed by its organisation's id)"]
                )
            document = decode_org_document(rec.value, file.config, org_id)
            compiled = self.orgs.compile(document)
        except ConfigError as exc:
            return self._refusal(rec, org_id, exc.errors)
        except Exception as exc:  # a document that validates and does not compile
            return self._refusal(rec, org_id, (f"document: does not compile: {exc}",))
        change = DocumentChange(org_id, rec.partition, rec.offset, document=rec.value)
        return _Checked(change, compiled)

    def _refusal(
        self, rec: DocumentRecord, org_id: str | None, errors: Sequence[str]
    ) -> _Checked | None:
        parsed: Any = None
        assert rec.value is not None
        with contextlib.suppress(ConfigError):  # (then not carried: see the docstring)
            parsed = parse_document(rec.value)
        written = parsed.get("org") if isinstance(parsed, Mapping) else None
        named = written.get("id") if isinstance(written, Mapping) else None
        org_id = org_id or (named if isinstance(named, str) and named else None)
        secrets = document_secrets(parsed)
        shown = [mask_text(e, secrets) for e in errors]
        log.warning(
            "config topic: document of %s at %d/%d refused, its last valid document stays "
            "(%d errors): %s",
            org_id or "(no key)",
            rec.partition,
            rec.offset,
            len(shown),
            "; ".join(shown),
        )
        message = (
            f"config document of {org_id or '(no key)'} refused ({len(shown)} errors): "
            + "; ".join(shown)
        )
        letter = dead_letter(
            error_code="invalid_config",
            message=message,
            failed_at_ms=self._clock.now_ms(),
            topic=self._source.topic if self._source is not None else "",
            partition=rec.partition,
            offset=rec.offset,
            key=rec.key,
            event=masked_document(parsed) if isinstance(parsed, Mapping) else None,
            raw=None,  # what does not parse may hold secrets anywhere: not carried
            max_bytes=self._reporter.dead_letter_max_bytes,  # (cut to fit its topic)
        )
        if org_id is None:  # nowhere to store it: written now by events partition 0's owner
            if self._owns(0):
                self._send_now(encode(letter), rec.key)
            return None
        change = DocumentChange(org_id, rec.partition, rec.offset, refused=encode(letter))
        return _Checked(change, errors=tuple(shown))

    def _send_now(self, letter: bytes, key: bytes | None) -> None:
        async def send() -> None:
            try:
                await self._produce([(self._dlq_topic(), key, letter)])
            except Exception as exc:
                log.error("dead letter of a keyless config document not written: %s", exc)

        task = asyncio.get_running_loop().create_task(send(), name="config dead letter")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- dead letters ----------------------------------------------------------------

    async def on_assigned(self, partitions: set[int]) -> None:
        """Partitions assigned (the processor's lock held): the dead letters of refused
        documents of their organisations that no owner wrote yet."""
        refused = await self._store.documents.refused()
        if not refused:
            return
        count = await self._partition_count()
        if count is None:
            return
        mine = [r for r in refused if partition_of(r.org_id, count) in partitions]
        if not mine:
            return
        marks = await self._store.documents.reported([r.org_id for r in mine])
        await self._report([r for r in mine if marks.get(r.org_id) != (r.partition, r.offset)])

    async def _report(self, refused: Sequence[Refused]) -> None:
        """Write the dead letters of ``refused`` (this process owns their partitions),
        then mark them written in the partitions' state."""
        if not refused:
            return
        count = await self._partition_count()
        if count is None:
            return
        dlq = self._dlq_topic()
        await self._produce([(dlq, r.org_id.encode(), r.letter) for r in refused])
        self._metrics.dead_letters.inc("invalid_config", len(refused))
        self._reporter.dead_letters += len(refused)
        marks = [(r.org_id, partition_of(r.org_id, count), r.partition, r.offset) for r in refused]
        await self._store.write(WriteBatch(steps=[DocumentTable.reported_step(marks)]))

    async def _produce(self, records: Sequence[Produced]) -> None:
        await self._reporter.produce(records)

    def _dlq_topic(self) -> str:
        return self._live.current.config.kafka.dlq_topic

    async def _owner_here(self, org_id: str) -> bool:
        count = await self._partition_count()
        return count is not None and self._owns(partition_of(org_id, count))

    async def _partition_count(self) -> int | None:
        if self._events_partitions is None and self._source is not None:
            topic = self._live.current.config.kafka.events_topic
            self._events_partitions = await self._source.partition_count(topic)
        return self._events_partitions


def _org_of(key: bytes | None) -> str | None:
    if not key:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return None
