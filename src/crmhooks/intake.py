"""Events in: a fetched batch decoded, checked and planned into what it changes (and the
`crmhooks redeliver` requests among them, made into actions due again).

``Intake.plan`` turns a batch into a ``BatchPlan``: the changes to store (one
transaction), the records to produce (results, dead letters), the actions the
heap gains and loses, and the new instant actions, sent before they are stored.
It reads the store (records' pending actions and ``repeat = "once"`` flags) but
writes nothing: ``app.Processor`` applies the plan, in the order of effects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from crmhooks.actions import Action
from crmhooks.events import RecordEvent, decode_wanted
from crmhooks.kafka_io import BatchRecord, Fetched, Skipped
from crmhooks.modules import UNSUPPORTED_MODULES
from crmhooks.redeliver import Request, plan_redeliveries, request_of
from crmhooks.reporter import Produced, Reporter
from crmhooks.scheduler import Scheduler
from crmhooks.snapshot import ConfigSnapshot, LiveConfig
from crmhooks.store import Store, WriteBatch
from crmhooks.suspensions import Suspensions
from crmhooks.workflow import EventPlan, RecordState, once_key, plan_event

# Kafka header `crmhooks replay-dlq` puts on the events it re-publishes: their
# actions that ended without being delivered (quota, template error) may run again.
REPLAY_HEADER = "crmhooks-replay"

# An event some rule must plan for: its partition, record, event and canonical module.
ToPlan = tuple[int, BatchRecord, RecordEvent, str]


@dataclass(slots=True)
class BatchPlan:
    """What one fetched batch changes, to apply in the order of effects."""

    next_offsets: dict[int, int] = field(default_factory=dict)  # partition → next offset
    read: int = 0  # events read (of owned partitions)
    planned: int = 0  # of them, events some rule acts on
    dead_lettered: int = 0  # of them, invalid events (poison pills)
    batch: WriteBatch = field(default_factory=WriteBatch)  # 1. to store
    out: list[Produced] = field(default_factory=list)  # 2. to produce
    heap_new: list[Action] = field(default_factory=list)  # to push, in plan order
    heap_gone: set[str] = field(default_factory=set)  # ended: out of the heap
    ended: list[Action] = field(default_factory=list)  # those actions
    unstored: list[tuple[Action, bytes]] = field(default_factory=list)  # sent before stored


class Intake:
    """Decodes and plans batches; owns no state between them."""

    def __init__(
        self,
        config: LiveConfig,
        store: Store,
        scheduler: Scheduler,
        suspensions: Suspensions,
        reporter: Reporter,
        owns: Callable[[int], bool],
    ) -> None:
        self._config = config
        self._store = store
        self._scheduler = scheduler
        self._suspensions = suspensions
        self._reporter = reporter
        self._owns = owns
        # Events larger than this are refused whatever kafka.max_event_bytes says: their
        # snapshot would not fit the changelog topic (``KafkaIO.event_max_bytes``).
        self.event_max_bytes: int | None = None

    def __repr__(self) -> str:
        return f"Intake({self._config.current!r})"

    async def plan(self, fetched: Fetched, now_ms: int) -> BatchPlan:
        """Decode every record of ``fetched`` (its owned partitions), dead-letter the
        invalid ones, and plan the events some rule acts on."""
        plan = BatchPlan()
        todo: list[ToPlan] = []
        # Looked up once a batch: the loop below runs for every event read. (An
        # organisation's config-topic document is looked up by the event's own
        # org_id, read and compiled the first time: ``orgconfig``.)
        snapshot = self._config.current
        max_bytes = snapshot.config.kafka.max_event_bytes
        if self.event_max_bytes is not None and self.event_max_bytes < max_bytes:
            max_bytes = self.event_max_bytes
        canonical = snapshot.catalog.canonical
        needs_planning = snapshot.needs_planning
        owns = self._owns
        out = plan.out
        redeliver: list[Request] = []
        for partition, records in fetched:
            if not owns(partition):
                continue  # revoked since the fetch: the new owner reads it again
            if isinstance(records, Skipped):  # offsets the consumer could not decode
                out.append(self._reporter.skipped(records, now_ms))
                plan.dead_lettered += 1
                plan.next_offsets[partition] = records.next_offset  # committed past them
                continue
            plan.read += len(records)
            plan.next_offsets[partition] = records[-1].offset + 1
            # Only events some rule must plan: rules with scheduled actions or
            # repeat="once" keep per-record state that a non-matching event may
            # change; instant-only rules can skip the store. The rest are consumed,
            # ignored, and not checked for repeated keys.
            wanted, invalid = decode_wanted(records, needs_planning, max_bytes)
            for rec, event in wanted:
                module = canonical(event.module)
                # Calls, Notes and modules no rule can name: consumed, ignored.
                if module is not None and event.module not in UNSUPPORTED_MODULES:
                    todo.append((partition, rec, event, module))
            for rec, exc in invalid:
                # Not an event: a `crmhooks redeliver` request, or a poison pill.
                request = request_of(partition, rec.headers, rec.value) if rec.headers else None
                if request is not None:
                    redeliver.append(request)
                    continue
                out += self._reporter.poison(partition, rec, exc, now_ms)
                plan.dead_lettered += 1
        plan.planned = len(todo)
        if todo:
            with self._scheduler.reading():
                await self._plan_events(snapshot, todo, now_ms, plan)
        if redeliver:
            retention_s = snapshot.config.store.finished_retention_s
            again = await plan_redeliveries(self._store, redeliver, now_ms, retention_s)
            plan.batch.redelivered += again
            plan.heap_new += again
        return plan

    async def _plan_events(
        self, snapshot: ConfigSnapshot, todo: list[ToPlan], now_ms: int, into: BatchPlan
    ) -> None:
        """Plan the events of a batch into ``into``.

        A new instant action is not stored here: it is sent first, and stored once,
        finished, with its final status, or as pending if it takes longer than
        INSTANT_COMMIT_WAIT_MS (``checkpoint``). Its event's offset is committed after
        either, so a crash before sends it again (at least once, the same webhook-id),
        never loses it; and most instant actions cost one row and one changelog record
        instead of three of each.
        """
        batch, out = into.batch, into.out
        record_keys = [ev.record_key for _, _, ev, _ in todo]  # a property: made once here
        states = {record_key: RecordState() for record_key in record_keys}
        rules = [snapshot.candidates(ev.org_id, module) for _, _, ev, module in todo]
        # Pending actions matter to rules with scheduled actions only (~0.7 µs an
        # event to read): the records of events that only instant rules see go without.
        keys = list(
            dict.fromkeys(
                record_key
                for record_key, candidates in zip(record_keys, rules, strict=True)
                if any(r.scheduled for r in candidates)
            )
        )
        # An action being fired (or ended while these reads ran) is its fire's to end:
        # the event neither supersedes, cancels nor moves it (one final status each).
        # Asked again after the last await below: a fire may begin meanwhile.
        ends_elsewhere = self._scheduler.ends_elsewhere
        if keys:
            for action in await self._store.pending_for_records(keys):
                if not ends_elsewhere(action.action_id):
                    states[action.record_key].pending[action.action_id] = action
        once_keys = [
            once_key(r.id, record_key)
            for record_key, candidates in zip(record_keys, rules, strict=True)
            for r in candidates
            if r.repeat == "once"
        ]
        if once_keys:
            flags = await self._store.once_states(once_keys)
            for k, matched in flags.items():
                rule_id, record_key = k.split("\x1f", 1)
                states[record_key].once[rule_id] = matched
        plans: list[tuple[int, BatchRecord, RecordEvent, str, EventPlan]] = []
        documents = snapshot.orgs is not None
        for (partition, rec, event, module), record_key, candidates in zip(
            todo, record_keys, rules, strict=True
        ):
            org_id = event.org_id
            plan = plan_event(
                event,
                module,
                candidates,
                states[record_key],
                config=snapshot.config,
                partition=partition,
                offset=rec.offset,
                now_ms=now_ms,
                is_suspended=self._suspensions.is_suspended,
                org=snapshot.org(org_id) if documents else None,
                criteria_met=snapshot.criteria(org_id),
            )
            plans.append((partition, rec, event, record_key, plan))
        created = [a.action_id for *_, p in plans for a in p.new_actions]
        known = await self._store.action_statuses(created) if created else {}
        reporter = self._reporter
        scheduler = self._scheduler
        for partition, rec, event, record_key, plan in plans:
            # The bytes as received: no re-encoding (rec.value is not None once decoded).
            raw = rec.value or orjson.dumps(event.data)
            scheduler.saw(record_key, event)  # the latest, for those due soon
            snapshot_stored = plan.touched
            if plan.touched:
                batch.snapshots.append((record_key, partition, raw))
            for rule_id, matched in plan.once_updates:
                batch.once_state.append((once_key(rule_id, record_key), partition, matched))
            replayed = bool(rec.headers) and any(name == REPLAY_HEADER for name, _ in rec.headers)
            for action in plan.new_actions:
                status = known.get(action.action_id)
                if status is not None and status != "pending":
                    if status == "delivered" or not replayed:
                        continue  # finished before: a reprocessed event never sends again
                    batch.rearmed.append(action)  # replayed after its cause was fixed
                into.heap_new.append(action)
                scheduler.keep(action, event)
                if action.kind == "instant" and status is None:
                    into.unstored.append((action, raw))  # sent first, stored when finished
                    continue
                batch.new_actions.append(action)
                if action.kind == "instant":  # stored (replayed, read again): with its event
                    batch.action_events.append((action.action_id, partition, raw))
                elif not snapshot_stored:
                    snapshot_stored = True
                    batch.snapshots.append((record_key, partition, raw))
                if action.kind == "scheduled":
                    out.append(reporter.result(action, "scheduled"))
            for action in plan.moved:
                if ends_elsewhere(action.action_id):  # (fired since it was read: see above)
                    continue
                batch.moved.append((action.action_id, action.due_ms, action.attempt))
                into.heap_new.append(action)
                out.append(reporter.result(action, "scheduled", reason="rescheduled"))
            for fin in plan.finished:
                a = fin.action
                if known.get(a.action_id, "pending") != "pending" or ends_elsewhere(a.action_id):
                    continue
                batch.new_actions.append(a)  # no-op when stored already; a tombstone if not
                batch.finished.append((a.action_id, fin.status, now_ms))
                into.heap_gone.add(a.action_id)
                into.ended.append(a)
                out.append(reporter.result(a, fin.status, reason=fin.reason))
