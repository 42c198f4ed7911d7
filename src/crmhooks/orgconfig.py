"""Organisations' own configurations (config-topic documents, SPEC §3.2): one compiled,
and the bounded caches of them a process keeps.

A ``CompiledOrg`` is one organisation's document compiled against the config file
in force (``snapshot.CompiledFile``): its rules indexed, its settings, and the
file's organisation-less rules and webhooks, which still apply. Immutable, but for
its ``seen`` mark (the cache's) and the webhooks compiled on first use
(``OrgConfigs.target``).

``OrgConfigs`` knows which organisations have a document in force (every one: a
set of ids, read from the store at start) and keeps the compiled configuration of
those it saw lately, ``ORG_CACHE_SIZE`` at most; their compiled webhooks in an
LRU of ``TARGET_CACHE_SIZE``. What is not cached is read from the store and
compiled the first time it is looked up (an event decoded, an action fired): a
primary-key read on the event loop's thread (tens of µs), then the compile
(~1.5 ms for 5 webhooks and 5 rules, which no read ahead would save: it is CPU
on that thread either way). Reading a batch's organisations ahead from its record
keys was tried, and cost ~0.4 µs an event over 10,000 organisations — more than
all the rest of a look-up — for the ~30 µs a read it saved once per organisation.

The organisations' cache evicts by the clock algorithm (second chance), an LRU
whose look-ups cost no reordering: a hit sets the entry's ``seen`` mark; when the
cache is full, the oldest entry goes unless it was seen since it was last passed
over (then it is moved to the end, its mark cleared). Every event's look-up is
one dict get and one attribute store.

A document in the store was valid under the file in force when it was read. Under
a file reloaded since, it may no longer be (an organisation-less webhook it used
is gone, lower limits): then what still holds of it is used (``org_document_in_part``)
and the rest is gone, with a warning naming the organisation and every error.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from crmhooks.config import OrgDocument, OrgSettings, Rule, org_document_in_part
from crmhooks.events import RecordEvent
from crmhooks.record_event import EventView
from crmhooks.rules import RuleIndex
from crmhooks.snapshot import CompiledFile, Target, endpoint_of, host_key
from crmhooks.store.documents import DocumentTable

log = logging.getLogger(__name__)

# Organisations whose compiled configuration is kept. A document of 5 webhooks and
# 5 rules takes ~30 KB compiled (its decoded items and the closures of its criteria;
# measured with the bench's documents), so ~360 MB at most: with the process's own
# ~100 MB, inside the 500 MB that a process reading 100,000 organisations' documents
# is given. A process seeing events of more organisations than this reads and
# compiles again each one it sees after it was evicted (~1.5 ms).
ORG_CACHE_SIZE = 12_000
# Compiled webhooks (templates, endpoint) kept, of organisations with a document:
# ~3.7 KB each for the bench's webhooks, ~30 MB. A webhook of an organisation with
# a document whose compiled form is not kept is compiled again when it fires
# (~0.1 ms, against ~65 µs for the rest of a delivery).
TARGET_CACHE_SIZE = 8_192


class CompiledOrg:
    """One organisation's document compiled against the file; swapped whole, never changed
    (but for ``seen``, the cache's mark)."""

    __slots__ = (
        "_candidates",
        "_file",
        "_rules",
        "_shared_needs",
        "document",
        "index",
        "needs_planning",
        "org_id",
        "seen",
    )

    # Whether some rule of the organisation (its own, or the file's organisation-less
    # ones) must plan the event: the index's own method when there are no shared ones.
    needs_planning: Callable[[EventView], bool]

    def __init__(self, document: OrgDocument, file: CompiledFile) -> None:
        self.document = document
        self.org_id = document.org.id
        self._file = file
        self.index = RuleIndex(document.rules, file.catalog)
        self._rules = {r.id: r for r in document.rules}
        self._candidates: dict[str, tuple[Rule, ...]] = {}
        self._shared_needs = None if file.shared_index is None else file.shared_index.needs_planning
        self.needs_planning = (
            self.index.needs_planning if self._shared_needs is None else self._both
        )
        self.seen = True

    def __repr__(self) -> str:
        return (
            f"CompiledOrg({self.org_id!r}, rules={len(self._rules)}, "
            f"webhooks={len(self.document.webhooks)})"
        )

    @property
    def file(self) -> CompiledFile:
        """The config file it was compiled against."""
        return self._file

    @property
    def settings(self) -> OrgSettings:
        return self.document.org

    def rule(self, rule_id: str) -> Rule | None:
        found = self._rules.get(rule_id)
        if found is not None:
            return found
        shared = self._file.rules.get(rule_id)
        return shared if shared is not None and shared.org is None else None

    def candidates(self, module: str) -> tuple[Rule, ...]:
        """The file's organisation-less rules for ``module``, then the document's."""
        found = self._candidates.get(module)
        if found is None:
            shared = self._file.shared_index
            found = tuple(() if shared is None else shared.candidates(self.org_id, module))
            found += tuple(self.index.candidates(self.org_id, module))
            self._candidates[module] = found  # one entry a module name events use
        return found

    def _both(self, event: EventView) -> bool:
        shared = self._shared_needs
        return (shared is not None and shared(event)) or self.index.needs_planning(event)

    def criteria_met(self, rule: Rule, event: RecordEvent) -> bool:
        if rule.org is None:
            return self._file.index.criteria_met(rule, event)
        return self.index.criteria_met(rule, event)

    def webhook_target(self, name: str) -> Target | None:
        """The document's webhook ``name`` compiled now (None: the document has none),
        or the file's organisation-less one (compiled with the file)."""
        hook = self.document.webhooks.get(name)
        if hook is None:
            shared = self._file.targets.get(name)
            return shared if shared is not None and shared.webhook.org is None else None
        return Target.of(hook, self._file.catalog)


def compile_document(raw: bytes, file: CompiledFile, org_id: str) -> CompiledOrg:
    """A document from the store compiled against ``file``: what still holds of it
    (see the module docstring), never an exception."""
    document, errors = org_document_in_part(raw, file.config, org_id)
    if errors:
        log.warning(
            "organisation %s: its document no longer holds whole under the config file "
            "in force; what does not is left out: %s",
            org_id,
            "; ".join(errors),
        )
    if document is None:
        document = OrgDocument(OrgSettings(org_id))
    try:
        return CompiledOrg(document, file)
    except Exception as exc:  # a document never compiled before: must not stop anything
        log.error(
            "organisation %s: its document does not compile (%s); its rules are left out",
            org_id,
            exc,
        )
        return CompiledOrg(OrgDocument(document.org), file)


class OrgConfigs:
    """Which organisations have a document in force, and the compiled configurations of
    those seen lately (bounded caches)."""

    def __init__(
        self,
        file: CompiledFile,
        table: DocumentTable | None,
        ids: Iterable[str] = (),
        *,
        size: int = ORG_CACHE_SIZE,
        target_size: int = TARGET_CACHE_SIZE,
    ) -> None:
        self._file = file
        self._table = table
        self._ids: set[str] = set(ids)
        self._cache: dict[str, CompiledOrg] = {}  # in the clock's order (see the docstring)
        # A hit's look-up, for the hot path (``ConfigSnapshot.needs_planning``): None
        # is a miss, which ``get`` settles.
        self.cached: Callable[[str], CompiledOrg | None] = self._cache.get
        self._targets: OrderedDict[tuple[str, str], tuple[CompiledOrg, Target | None]] = (
            OrderedDict()
        )
        self._size = max(1, size)
        self._target_size = max(1, target_size)
        self.loads = 0  # documents read and compiled (tests, benchmarks)

    def __repr__(self) -> str:
        return f"OrgConfigs(documents={len(self._ids)}, compiled={len(self._cache)})"

    def __len__(self) -> int:
        """Organisations with a document in force."""
        return len(self._ids)

    def __contains__(self, org_id: object) -> bool:
        return org_id in self._ids

    @property
    def compiled(self) -> int:
        """Organisations whose compiled configuration is kept now."""
        return len(self._cache)

    def rebased(self, file: CompiledFile) -> OrgConfigs:
        """The same documents against a new config file: compiled again as needed."""
        return OrgConfigs(
            file, self._table, self._ids, size=self._size, target_size=self._target_size
        )

    # -- look-ups ----------------------------------------------------------------------

    def get(self, org_id: str) -> CompiledOrg | None:
        """The organisation's compiled document; None when it has none (the file applies)."""
        found = self._cache.get(org_id)
        if found is not None:
            found.seen = True
            return found
        if org_id not in self._ids:
            return None
        return self._load(org_id)

    def target(self, compiled: CompiledOrg, name: str) -> Target | None:
        key = (compiled.org_id, name)
        entry = self._targets.get(key)
        if entry is not None and entry[0] is compiled:
            self._targets.move_to_end(key)
            return entry[1]
        try:
            target = compiled.webhook_target(name)
        except Exception as exc:  # (validated when read: a TLS file gone since, say)
            log.error(
                "organisation %s: webhook %s does not compile (%s): its actions are "
                "cancelled as removed",
                compiled.org_id,
                name,
                exc,
            )
            target = None
        self._targets[key] = (compiled, target)
        self._targets.move_to_end(key)
        while len(self._targets) > self._target_size:
            self._targets.popitem(last=False)
        return target

    def _load(self, org_id: str) -> CompiledOrg | None:
        raw = None if self._table is None else self._table.document_now(org_id)
        if raw is None:
            self._ids.discard(org_id)
            return None
        return self._put(compile_document(raw, self._file, org_id))

    def _put(self, compiled: CompiledOrg) -> CompiledOrg:
        self.loads += 1
        cache = self._cache
        cache.pop(compiled.org_id, None)
        cache[compiled.org_id] = compiled
        # The clock: one pass over the entries clears every mark, so this ends; the one
        # just put is never the one that goes.
        while len(cache) > self._size:
            oldest = next(iter(cache))
            entry = cache.pop(oldest)
            if entry is compiled or entry.seen:
                if entry is not compiled:
                    entry.seen = False
                cache[oldest] = entry  # a second chance, at the end
        return compiled

    # -- changes -----------------------------------------------------------------------

    def compile(self, document: OrgDocument) -> CompiledOrg:
        """A new document compiled against the file in force (it raises when it does not
        compile: the document is refused). Its webhooks' templates compiled in its
        validation (``config.compile_check``); what a ``Target`` adds is made here."""
        compiled = CompiledOrg(document, self._file)
        for hook in document.webhooks.values():
            endpoint_of(hook)
            host_key(hook.url)
        return compiled

    def apply(self, org_id: str, compiled: CompiledOrg | None) -> None:
        """``compiled`` in force for ``org_id`` (None: it has no document any more). Kept
        compiled only if the organisation was: the cache holds those seen lately."""
        if compiled is None:
            self._ids.discard(org_id)
            self._cache.pop(org_id, None)
            return
        self._ids.add(org_id)
        if org_id in self._cache:
            if compiled.file is not self._file:  # compiled before a reload: again, as needed
                del self._cache[org_id]
                return
            compiled.seen = self._cache[org_id].seen
            self._cache[org_id] = compiled  # (keeps its place)

    def org_ids(self) -> Sequence[str]:
        return list(self._ids)
