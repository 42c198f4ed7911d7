"""``crmhooks config push / get / rm``: an organisation's document on the config topic
(SPEC §3.2, §11).

``push`` checks the document as every processor will (the same validation against
the same config file, and the same compile), so what it accepts they accept; it
writes the document as JSON (a TOML file is converted), creating the compacted
topic if it is missing, and returns once Kafka acknowledged it. ``get`` reads the
topic to its end and prints the organisation's document in force — its latest
valid one — with every secret as ``***``. ``rm`` writes the tombstone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import orjson

from crmhooks.config import (
    Config,
    ConfigError,
    OrgDocument,
    decode_org_document,
    parse_document,
)
from crmhooks.config.masking import masked_document
from crmhooks.errors import CrmhooksError
from crmhooks.kafka_clients import read_topic
from crmhooks.kafka_documents import ensure_config_topic, produce_document
from crmhooks.orgconfig import OrgConfigs
from crmhooks.progress import Progress
from crmhooks.snapshot import CompiledFile


def config_topic(config: Config, path: str) -> str:
    topic = config.kafka.config_topic
    if not topic:
        raise CrmhooksError(f"{path}: kafka.config_topic is not set: there is no config topic")
    return topic


def checked(config: Config, org_id: str, raw: Any) -> OrgDocument:
    """The document as the processors will check it: ConfigError listing every error."""
    document = decode_org_document(raw, config, org_id)
    try:
        OrgConfigs(CompiledFile(config), None).compile(document)
    except Exception as exc:
        raise ConfigError([f"document: does not compile: {exc}"]) from exc
    return document


def read_document_file(path: str) -> Any:
    """A document file (JSON or TOML) as data; ConfigError naming the file."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return parse_document(text)


async def push(config: Config, config_path: str, org_id: str, path: str) -> str:
    """Check and write ``org_id``'s document from ``path``; a line saying where it went."""
    topic = config_topic(config, config_path)
    raw = read_document_file(path)
    document = checked(config, org_id, raw)
    value = orjson.dumps(raw)
    await ensure_config_topic(config.kafka, topic)
    partition, offset = await produce_document(config.kafka, topic, org_id, value)
    return (
        f"{org_id}: document written to {topic} (partition {partition}, offset {offset}): "
        f"{_count(len(document.webhooks), 'webhook')}, {_count(len(document.rules), 'rule')}"
    )


async def remove(config: Config, config_path: str, org_id: str) -> str:
    topic = config_topic(config, config_path)
    await ensure_config_topic(config.kafka, topic)
    partition, offset = await produce_document(config.kafka, topic, org_id, None)
    return (
        f"{org_id}: tombstone written to {topic} (partition {partition}, offset {offset}): "
        "the config file applies to it again"
    )


class InForce(NamedTuple):
    """An organisation's document in force on the config topic, and where it is."""

    document: OrgDocument
    value: bytes
    partition: int
    offset: int


async def document_in_force(
    config: Config,
    config_path: str,
    org_id: str,
    progress: Progress | None = None,
    notes: TextIO | None = None,
) -> InForce | None:
    """The organisation's latest valid document on the config topic, read to its end;
    None when it has none (never pushed, or removed by a tombstone)."""
    topic = config_topic(config, config_path)
    mine: list[tuple[int, int, bytes | None]] = []
    key = org_id.encode()
    read = 0
    async for rec in read_topic(config.kafka, topic, idle_timeout_s=5.0):
        read += 1
        if progress is not None:
            progress.update(read, note=f"records read, {len(mine)} of {org_id}")
        if rec.key == key:
            mine.append((rec.partition, rec.offset, rec.value))
    for partition, offset, value in reversed(mine):
        if value is None:
            return None  # a tombstone: nothing older counts
        try:
            document = checked(config, org_id, value)
        except ConfigError as exc:
            print(
                f"note: {org_id}'s document at {partition}/{offset} is refused "
                f"({len(exc.errors)} errors); an older one is in force",
                file=notes or sys.stderr,
            )
            continue
        return InForce(document, value, partition, offset)
    return None


async def get(
    config: Config,
    config_path: str,
    org_id: str,
    progress: Progress | None = None,
    notes: TextIO | None = None,
) -> dict[str, Any]:
    """The organisation's document in force, its secrets as ``***``; CrmhooksError when
    it has none."""
    found = await document_in_force(config, config_path, org_id, progress, notes)
    if found is None:
        raise CrmhooksError(
            f"{org_id}: no document in force on {config_topic(config, config_path)}: "
            "the config file applies to it"
        )
    shown: dict[str, Any] = masked_document(
        parse_document(found.value), found.document.secret_values()
    )
    return shown


def with_document(config: Config, document: OrgDocument) -> Config:
    """``config`` as it applies to the document's organisation (SPEC §3.2): the file's
    organisation-less webhooks and rules, then the document's; its settings the
    document's. For the commands that look at one organisation's event (preview,
    send-test, explain)."""
    org = document.org.id
    webhooks = {name: w for name, w in config.webhooks.items() if w.org is None}
    webhooks.update(document.webhooks)
    rules = tuple(r for r in config.rules if r.org is None) + tuple(document.rules)
    return dataclasses.replace(
        config, orgs={**config.orgs, org: document.org}, webhooks=webhooks, rules=rules
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def as_for_org(config: Config, config_path: str, org_id: str, command: str) -> Config:
    """``config`` as it applies to ``org_id``: with the organisation's document from the
    config topic when it has one there (SPEC §3.2), as the processors would use it;
    which one is used is said on stderr (as is a topic that could not be read: then
    the file)."""
    topic = config_topic(config, config_path)
    try:
        found = asyncio.run(document_in_force(config, config_path, org_id, notes=sys.stderr))
    except CrmhooksError as exc:
        print(
            f"{command}: note: {topic} not read ({exc}); the config file's webhooks "
            "and rules are used",
            file=sys.stderr,
        )
        return config
    if found is None:
        print(
            f"{command}: note: {org_id} has no document on {topic}: the config file applies",
            file=sys.stderr,
        )
        return config
    print(
        f"{command}: note: {org_id} is configured by its document on {topic} "
        f"(partition {found.partition}, offset {found.offset})",
        file=sys.stderr,
    )
    return with_document(config, found.document)
