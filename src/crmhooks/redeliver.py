"""``crmhooks redeliver``: a finished action sent again, as a new attempt of the same
action id (SPEC §11), and what the owner of its partition does with the request.

The running processor owns its partitions' state, and in a scale-out another
machine may own the action's partition. So the command does not change the store
itself: it reads the action from the store of the machine it runs on (the one the
processor uses, ``[store] path``), checks that it can be sent again, and produces a
small **command record** to the events topic, in the action's partition, keyed by
its organisation, with the header ``crmhooks-redeliver``. Whichever process owns
that partition reads it in order with the events, checks again against its own
store, makes the action pending again, due now, through its own writer (so the
change is in the changelog too), and fires it through the normal path: the same
``webhook-id``, the attempt count continued, quota counted (every request sent
counts, SPEC §9), a suspended webhook not sent to (lift it with ``crmhooks resume``
first), the result on the results topic. The record is not an event: the intake
recognises it where an invalid event would be dead-lettered, so events pay nothing.

What can be sent again, and what it renders (SPEC §5):

- an action finished with any final status, while its row is kept:
  ``[store] finished_retention_s`` (7 days by default) after it finished;
- a scheduled action renders the latest version of its record (while its snapshot
  is kept, the same retention after the record was last seen);
- an instant action renders the event that triggered it, which the store keeps
  for an instant action stored undelivered (retried, or finished undelivered); one
  delivered at its first attempt kept no event (the hot path writes one row), and
  is refused.

The command names the attempts made when it was asked for: read again (events
read again after a crash), it sends nothing more once its redelivery happened.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import orjson
from msgspec.structs import replace

from crmhooks.actions import Action
from crmhooks.config import Config
from crmhooks.errors import CrmhooksError
from crmhooks.kafka_clients import produce_records
from crmhooks.store import Store

log = logging.getLogger(__name__)

REDELIVER_HEADER = "crmhooks-redeliver"
_COMMAND = "redeliver"

# A request read by the owner: (partition, action id, attempts made when it was asked).
Request = tuple[int, str, int]


def command_value(action: Action) -> bytes:
    """The command record's value: not an event (the intake dead-letters nothing for it)."""
    return orjson.dumps(
        {
            "crmhooks_command": _COMMAND,
            "action_id": action.action_id,
            "after_attempt": action.attempt,
        }
    )


def request_of(
    partition: int, headers: Sequence[tuple[str, bytes]], value: bytes | None
) -> Request | None:
    """The redelivery request a record carries, or None when it is not one."""
    if not any(name == REDELIVER_HEADER for name, _ in headers) or value is None:
        return None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or doc.get("crmhooks_command") != _COMMAND:
        return None
    action_id, after = doc.get("action_id"), doc.get("after_attempt")
    if not isinstance(action_id, str) or not isinstance(after, int):
        return None
    return partition, action_id, after


async def refusal(
    store: Store, action_id: str, retention_s: float
) -> tuple[Action, str | None] | str:
    """The action as stored, with why it cannot be sent again (None: it can); or, when
    the store has no such action, why."""
    found = (await store.actions_with_status([action_id])).get(action_id)
    if found is None:
        days = retention_s / 86400
        return (
            f"no action {action_id!r} in the store {store.path}: never created, or finished "
            f"more than [store] finished_retention_s ({days:g} days) ago and purged"
        )
    action, status = found
    if status == "pending":
        return action, f"action {action_id} is still pending: it will be sent, nothing to redeliver"
    if action.kind == "instant":
        if not await store.action_events([action_id]):
            return action, (
                f"action {action_id} ({status}) kept no event to render: an instant action "
                "delivered at its first attempt is stored without it"
            )
    elif not await store.snapshots([action.record_key]):
        return action, (
            f"action {action_id} ({status}): the snapshot of its record is purged "
            "(kept [store] finished_retention_s after the record was last seen)"
        )
    return action, None


def store_file(config: Config) -> Path:
    """This machine's store file; CrmhooksError when there is none (never made here)."""
    path = Path(config.store.path)
    if not path.is_file():
        raise CrmhooksError(
            f"no store at {path}: run redeliver where the processor keeps its store "
            "([store] path, CRMHOOKS_STORE_PATH)"
        )
    return path


async def request_redelivery(config: Config, path: Path, action_id: str) -> str:
    """``crmhooks redeliver``: check the action in the store ``path`` (``store_file``),
    then ask the owner of its partition to send it again; the line to print.
    CrmhooksError saying why it cannot be."""
    async with Store(path) as store:
        checked = await refusal(store, action_id, config.store.finished_retention_s)
    if isinstance(checked, str):
        raise CrmhooksError(checked)
    action, reason = checked
    if reason is not None:
        raise CrmhooksError(reason)
    k = config.kafka
    await produce_records(
        k,
        [(k.events_topic, action.org_id.encode(), command_value(action))],
        headers=[(REDELIVER_HEADER, action_id.encode())],
        partition=action.partition,
    )
    # Attempts made: the stored attempt counts those before the last one.
    return (
        f"redelivery of {action_id} requested: attempt {action.attempt + 2} will be sent by "
        f"the owner of partition {action.partition} of {k.events_topic}; its result goes to "
        f"{k.results_topic} (crmhooks tail --config F --org {action.org_id})"
    )


async def plan_redeliveries(
    store: Store, requests: Sequence[Request], now_ms: int, retention_s: float
) -> list[Action]:
    """The owner's side: the actions to make pending again, due ``now_ms``, each with
    its attempts so far (the stored attempt, which counts those before the last,
    plus the last). A request that cannot be done is logged and dropped."""
    out: list[Action] = []
    for partition, action_id, after in requests:
        checked = await refusal(store, action_id, retention_s)
        if isinstance(checked, str):
            log.warning("redeliver: %s", checked)
            continue
        action, reason = checked
        if action.attempt != after or action.partition != partition:
            # Done already (this request read again), or redelivered since.
            log.info("redeliver %s: asked after attempt %d, done already", action_id, after + 1)
            continue
        if reason is not None:
            log.warning("redeliver: %s", reason)
            continue
        log.info("redeliver %s: attempt %d, due now", action_id, action.attempt + 2)
        out.append(replace(action, due_ms=now_ms, attempt=action.attempt + 1))
    return out
