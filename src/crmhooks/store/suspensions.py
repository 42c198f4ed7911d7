"""Suspensions per (organisation, rule, webhook): consecutive failed actions, whether
suspended, and the fingerprint of the config they were counted under (SPEC §5).

Changelog records: ``s`` + SEP + org id + SEP + rule id + SEP + webhook, the JSON
array ``[failed_actions, suspended, fingerprint]``.

Rows are not purged: there is one per (organisation, rule, webhook) that ever
failed, bounded by the config; a success stores ``[0, false, …]``, which means
the same as no row.

**The fingerprint holds no secret.** It is what tells a suspension counted under
another config of its rule or webhook (then lifted: SPEC §5) — and it must be
comparable on any process of the group, as the row travels with its partition.
It used to be a plain SHA-256 over the config *with* its secrets: anyone holding
the store file or reading the changelog topic could test guesses of an API key
offline. A keyed hash does not help unless the key is kept from them, and it
cannot be: the next owner of the partition, on another machine, needs the same
key, so it would live in the same file and travel in the same topic as the
fingerprints. So the fingerprint is a plain SHA-256 of the config *without* its
secrets: every value ``Webhook.secret_values`` names (the signing secret, custom
parameters, references' values, literal header values, the auth password, token
or client secret, the URL's password: what crmhooks scrubs from what it writes)
is replaced by ``***`` wherever it appears; which fields hold a secret still
counts. The price: a change of a secret alone (an API key rotated after 401s)
does not lift a suspension; ``crmhooks resume`` does.

The fingerprint is the config as canonical JSON (sorted keys, sets sorted), not
its ``repr``: ``repr`` of a frozenset (``secret_params``) follows the string
hash, which changes from one process to the next. 32 hex digits: a fingerprint
of the earlier kind (16) never equals one of these, so a suspension stored before
is lifted once, at the first start of this version, with the processor's usual
"config changed" log line; if the webhook still fails it is suspended again after
``suspend_after_failed_actions`` failed actions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
from collections.abc import Mapping
from datetime import date, time
from typing import Any

import orjson

from crmhooks.settings import Rule, Webhook
from crmhooks.store.changes import SEP, ChangelogRecord, PurgeStep, StoreTable, WriteBatch

SCHEMA = """
CREATE TABLE IF NOT EXISTS suspensions (
    org_id         TEXT NOT NULL,
    rule_id        TEXT NOT NULL,
    webhook        TEXT NOT NULL,
    partition      INTEGER NOT NULL,
    failed_actions INTEGER NOT NULL,       -- consecutive failed actions
    suspended      INTEGER NOT NULL,
    fingerprint    TEXT NOT NULL,          -- of the rule and webhook config it applies to
    PRIMARY KEY (org_id, rule_id, webhook)
);
"""

REDACTED = "***"


def fingerprint(rule: Rule | None, webhook: Webhook | None) -> str:
    """Changes whenever the rule's or the webhook's config changes, its secrets apart
    (see the module docstring); None: the rule or webhook no longer exists."""
    # Longest first: a secret that holds another is masked whole.
    secrets = () if webhook is None else tuple(sorted(webhook.secret_values(), key=len)[::-1])
    text = orjson.dumps(
        [_canonical(rule, secrets), _canonical(webhook, secrets)], option=orjson.OPT_SORT_KEYS
    )
    return hashlib.sha256(text).hexdigest()[:32]


def _masked(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _canonical(value: Any, secrets: tuple[str, ...]) -> Any:
    """``value`` as JSON-able data that is the same in every process, ``secrets`` masked."""
    if isinstance(value, str):
        return _masked(value, secrets)
    if value is None or isinstance(value, bool | int | float):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "_type": type(value).__name__,
            **{
                f.name: _canonical(getattr(value, f.name), secrets)
                for f in dataclasses.fields(value)
            },
        }
    if isinstance(value, Mapping):
        return {_masked(str(k), secrets): _canonical(v, secrets) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((_canonical(v, secrets) for v in value), key=repr)
    if isinstance(value, list | tuple):
        return [_canonical(v, secrets) for v in value]
    if isinstance(value, date | time):
        return value.isoformat()
    return _masked(repr(value), secrets)


class SuspensionTable(StoreTable):
    """Suspensions: ``store.suspensions``."""

    letters = "s"
    schema = SCHEMA

    def apply(
        self, db: sqlite3.Connection, b: WriteBatch, now_ms: int, out: list[ChangelogRecord] | None
    ) -> None:
        if not b.suspensions:
            return
        db.executemany(
            "INSERT INTO suspensions (org_id, rule_id, webhook, partition, "
            "failed_actions, suspended, fingerprint) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT (org_id, rule_id, webhook) DO UPDATE SET "
            "failed_actions = excluded.failed_actions, suspended = excluded.suspended, "
            "fingerprint = excluded.fingerprint",
            [(o, r, w, p, f, int(s), fp) for o, r, w, p, f, s, fp in b.suspensions],
        )
        if out is None:
            return
        latest = {(o, r, w): (o, r, w, p, f, sus, fp) for o, r, w, p, f, sus, fp in b.suspensions}
        for org_id, rule_id, webhook, partition, failed, suspended, fp in latest.values():
            skey = f"s{SEP}{org_id}{SEP}{rule_id}{SEP}{webhook}".encode()
            out.append((partition, skey, orjson.dumps([failed, suspended, fp])))

    def restore(
        self,
        db: sqlite3.Connection,
        partition: int,
        letter: str,
        key: str,
        value: bytes | None,
        now_ms: int,
    ) -> None:
        org_id, rule_id, webhook = key.split(SEP)
        if value is None:
            db.execute(
                "DELETE FROM suspensions WHERE org_id = ? AND rule_id = ? AND webhook = ?",
                (org_id, rule_id, webhook),
            )
            return
        failed, suspended, fp = orjson.loads(value)
        db.execute(
            "INSERT OR REPLACE INTO suspensions (org_id, rule_id, webhook, partition, "
            "failed_actions, suspended, fingerprint) VALUES (?,?,?,?,?,?,?)",
            (org_id, rule_id, webhook, partition, failed, int(suspended), fp),
        )

    def purges(self, partitions: tuple[int, ...], before_ms: int) -> list[PurgeStep]:
        return []  # bounded by the config (see the module docstring)

    async def table(self) -> dict[tuple[str, str, str], tuple[int, bool, str]]:
        """(org, rule, webhook) → (consecutive failed actions, suspended, config fingerprint)."""
        rows = await self._writer.read(
            "SELECT org_id, rule_id, webhook, failed_actions, suspended, fingerprint "
            "FROM suspensions"
        )
        return {(r[0], r[1], r[2]): (int(r[3]), bool(r[4]), r[5]) for r in rows}

    async def rows(self) -> list[tuple[str, str, str, int, int, bool, str]]:
        """Every row: (org, rule, webhook, partition, failed actions, suspended, fingerprint)."""
        rows = await self._writer.read(
            "SELECT org_id, rule_id, webhook, partition, failed_actions, suspended, fingerprint "
            "FROM suspensions"
        )
        return [(r[0], r[1], r[2], int(r[3]), int(r[4]), bool(r[5]), r[6]) for r in rows]

    async def resume(self, rule_id: str, webhook: str) -> int:
        """Lift the suspension of (rule, webhook) in every organisation; returns how many.

        Written on the reads' connection, from another process (``crmhooks resume``):
        the running processor sees the file's data_version change and reads the table
        again.
        """
        with self._writer.reading():
            cur = await self._writer.conn.execute(
                "UPDATE suspensions SET suspended = 0, failed_actions = 0 "
                "WHERE rule_id = ? AND webhook = ? AND suspended = 1",
                (rule_id, webhook),
            )
        return cur.rowcount
