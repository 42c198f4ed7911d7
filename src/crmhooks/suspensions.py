"""Suspensions (SPEC §5): failed actions counted per (organisation, rule, webhook), and
the webhooks suspended after ``suspend_after_failed_actions`` of them in a row.

A suspension holds for the rule and webhook as they were configured when it was
counted (a fingerprint of both, made through the configuration in force: an
organisation's config-topic document when it has one): a config change to either
lifts it — read at start and at each assignment, and looked at again by
``config_changed`` after a reload or a document — as does ``crmhooks resume``
(written to the store by another process, noticed by polling the store's data
version).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from crmhooks.actions import Action
from crmhooks.logs import about
from crmhooks.snapshot import ConfigSnapshot
from crmhooks.store import Store, WriteBatch
from crmhooks.store import fingerprint as config_fingerprint

log = logging.getLogger(__name__)

# How often a running processor looks for `crmhooks resume` written by another process.
RESUME_POLL_S = 1.0

SuspensionKey = tuple[str, str, str]  # (org_id, rule_id, webhook)


class Suspensions:
    """Owns the failure counts and suspensions of its partitions' organisations.

    Only webhooks with failures counted (or suspended) are kept in memory: a reset
    one is absent, so while every webhook delivers the table is empty and the
    look-ups of each delivery (``is_suspended``, ``count_success``) are skipped."""

    def __init__(
        self,
        store: Store,
        config: Callable[[], ConfigSnapshot],
        owns: Callable[[int], bool] = lambda partition: False,
    ) -> None:
        """``owns`` says which partitions' rows this process may write (their owner)."""
        self._store = store
        self._config = config
        self._owns = owns
        self._table: dict[SuspensionKey, tuple[int, bool]] = {}
        # The fingerprint each entry of ``_table`` was counted under.
        self._counted_under: dict[SuspensionKey, str] = {}
        # (org, rule, webhook) → fingerprint under the snapshot ``_fingerprints_of``
        self._fingerprints: dict[tuple[str, str, str], str] = {}
        self._fingerprints_of = 0

    def __repr__(self) -> str:
        suspended = sum(1 for _, s in self._table.values() if s)
        return f"Suspensions(counting={len(self._table)}, suspended={suspended})"

    def suspended_count(self) -> int:
        return sum(1 for _, s in self._table.values() if s)

    async def load(self) -> None:
        """Read suspensions; one recorded under another config of its rule or webhook
        is lifted.

        A row of an owned partition that changed outside this process's writer is
        written again through it, so the changelog says so too and the next owner of
        the partition does not restore the old row: one ``crmhooks resume`` reset
        (the command writes the SQLite file only), one lifted by a config change
        (stored reset, under the new fingerprint: it is not lifted, and logged, again
        at every start)."""
        table: dict[SuspensionKey, tuple[int, bool]] = {}
        counted: dict[SuspensionKey, str] = {}
        rewrite: list[tuple[str, str, str, int, int, bool, str]] = []
        for org_id, rule_id, webhook, partition, failed, suspended, fingerprint in (
            await self._store.suspension_rows()
        ):
            skey = (org_id, rule_id, webhook)
            now = self.fingerprint(*skey)
            if fingerprint == now:
                if failed or suspended:
                    table[skey] = (failed, suspended)
                    counted[skey] = fingerprint
                elif skey in self._table and self._owns(partition):  # reset by resume
                    rewrite.append((*skey, partition, 0, False, now))
                continue
            if suspended:
                log.info(
                    "suspension of %s lifted: its rule or webhook config changed",
                    skey,
                    extra={"org_id": org_id, "rule_id": rule_id, "webhook": webhook},
                )
            if (failed or suspended) and self._owns(partition):
                rewrite.append((*skey, partition, 0, False, now))
        self._table = table
        self._counted_under = counted
        if rewrite:
            await self._store.write(WriteBatch(suspensions=rewrite))

    def config_changed(self, org_id: str | None = None) -> int:
        """The configuration changed (of ``org_id``, or of every organisation): counts
        and suspensions made under another config of their rule or webhook are lifted
        (in memory; the store's rows say so with their fingerprint). How many."""
        lifted = 0
        for skey in [k for k in self._table if org_id is None or k[0] == org_id]:
            if self._counted_under.get(skey) != self.fingerprint(*skey):
                _, suspended = self._table.pop(skey)
                self._counted_under.pop(skey, None)
                if suspended:
                    lifted += 1
                    log.info("suspension of %s lifted: its rule or webhook config changed", skey)
        return lifted

    def fingerprint(self, org_id: str, rule_id: str, webhook: str) -> str:
        """Changes whenever the rule's or the webhook's config changes (SPEC §5), its
        secret values apart (``crmhooks.store.suspensions``: the store keeps nothing
        made from a secret)."""
        snapshot = self._config()
        if snapshot.version != self._fingerprints_of:
            self._fingerprints = {}
            self._fingerprints_of = snapshot.version
        key = (org_id, rule_id, webhook)
        found = self._fingerprints.get(key)
        if found is None:
            target = snapshot.target(org_id, webhook)
            found = config_fingerprint(
                snapshot.rule(org_id, rule_id), None if target is None else target.webhook
            )
            self._fingerprints[key] = found
        return found

    def is_suspended(self, org_id: str, rule_id: str, webhook: str) -> bool:
        if not self._table:  # no failure counted anywhere
            return False
        entry = self._table.get((org_id, rule_id, webhook))
        return entry is not None and entry[1]

    def count_success(self, action: Action, batch: WriteBatch) -> None:
        """A delivered action resets its (rule, webhook)'s count, in ``batch``."""
        if not self._table:  # no failure counted anywhere
            return
        skey = (action.org_id, action.rule_id, action.webhook)
        if self._table.get(skey, (0, False))[0]:
            del self._table[skey]  # reset: stored as (0, False), absent in memory
            self._counted_under.pop(skey, None)
            batch.suspensions.append((*skey, action.partition, 0, False, self.fingerprint(*skey)))

    def count_failure(self, action: Action, batch: WriteBatch, threshold: int) -> bool:
        """A failed action counts one, in ``batch``; True when this suspends its
        (rule, webhook) (``threshold`` failed actions in a row; 0 = never)."""
        skey = (action.org_id, action.rule_id, action.webhook)
        before = self._table.get(skey, (0, False))
        failed = before[0] + 1
        suspended = threshold > 0 and failed >= threshold
        if suspended and not before[1]:  # once: failures counted meanwhile are not news
            log.warning(
                "webhook %s of rule %s suspended for %s",
                action.webhook,
                action.rule_id,
                action.org_id,
                extra=about(action),
            )
        self._table[skey] = (failed, suspended)
        fingerprint = self.fingerprint(*skey)
        self._counted_under[skey] = fingerprint
        batch.suspensions.append((*skey, action.partition, failed, suspended, fingerprint))
        return suspended and not before[1]

    async def poll_loop(self) -> None:
        """Reload when another process (``crmhooks resume``) changed the store."""
        version = await self._store.data_version()
        while True:
            await asyncio.sleep(RESUME_POLL_S)
            now_version = await self._store.data_version()
            if now_version != version:
                version = now_version
                await self.load()
