"""Dead letters that fit their topic (SPEC §10: one record never stops its partition):
a letter as the record to produce, and letters the broker refused all the same.

``results.dead_letter`` cuts a letter to the size it is given; the reporter keeps what
the dead-letter topic takes (read at start by ``kafka_io``) and passes it. What the
broker refuses as too large anyway (the topic's ``max.message.bytes`` lowered since)
is cut to half and produced once more, then logged with where its event is and
skipped: a record the broker refuses would otherwise fail its batch, the process
would exit, and the restart would meet the same record.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import orjson

from crmhooks.errors import RecordsTooLarge
from crmhooks.results import KEY_MAX_BYTES, encode, shrink

log = logging.getLogger(__name__)

# Dead letters are never cut below this for a topic that refused them: a letter with
# no payload left is a few hundred bytes; a topic taking less than this takes none.
DEAD_LETTER_MIN_BYTES = 4096

# (topic, key, value) of one record to produce.
Produced = tuple[str, bytes | None, bytes]


class Producer(Protocol):
    """Produces records and waits for every acknowledgement (``KafkaIO.produce_all``)."""

    async def produce_all(self, records: Sequence[Produced]) -> None: ...


def as_record(
    topic: str, letter: Mapping[str, Any], key: bytes | None, max_bytes: int
) -> Produced | None:
    """``letter`` (as ``results.dead_letter`` made it) as the record to produce, or None
    when even cut it is larger than ``max_bytes`` (its ids alone too long): logged with
    its event's coordinates, and skipped."""
    value = encode(letter)
    source = letter["source"]
    where = {"partition": source["partition"], "offset": source["offset"]}
    if len(value) > max_bytes:
        log.error(
            "dead letter of partition %d offset %d (%s) not written: %d bytes even cut "
            "(its ids alone are too long), the dead-letter topic takes %d; skipped",
            where["partition"],
            where["offset"],
            letter["error_code"],
            len(value),
            max_bytes,
            extra=where,
        )
        return None
    if letter["truncated"]:
        log.warning(
            "dead letter of partition %d offset %d (%s) cut to fit the dead-letter "
            "topic: %s bytes, sha256 %s",
            where["partition"],
            where["offset"],
            letter["error_code"],
            letter["original_bytes"],
            letter["sha256"],
            extra=where,
        )
    return (topic, key[:KEY_MAX_BYTES] if key is not None else None, value)


async def produce_refused(
    producer: Producer, refused: RecordsTooLarge, topic: str, max_bytes: int
) -> int:
    """Produce again, cut to half their size, the dead letters the broker ``refused``
    as too large; log and skip those it refuses again. Returns the size letters are
    cut to from now on. Records of another topic (results, small) are not ours to
    mend: ``refused`` is raised again."""
    if any(t != topic for t, _, _ in refused.records):
        raise refused
    smallest = min(len(value) for _, _, value in refused.records)
    max_bytes = max(DEAD_LETTER_MIN_BYTES, min(max_bytes, smallest // 2))
    log.error(
        "%s refused %d dead letters of %d bytes or more as too large: dead letters are "
        "cut to %d bytes from now on (was the topic's max.message.bytes lowered?)",
        topic,
        len(refused.records),
        smallest,
        max_bytes,
    )
    again = [
        (t, key, encode(shrink(orjson.loads(value), max_bytes)))
        for t, key, value in refused.records
    ]
    try:
        await producer.produce_all(again)
    except RecordsTooLarge as still:
        for _, _, value in still.records:
            letter = orjson.loads(value)
            source = letter.get("source") or {}
            where = {"partition": source.get("partition"), "offset": source.get("offset")}
            log.error(
                "dead letter of partition %s offset %s (%s) not written: %s refused it "
                "even cut to %d bytes; skipped",
                where["partition"],
                where["offset"],
                letter.get("error_code"),
                topic,
                len(value),
                extra=where,
            )
    return max_bytes
