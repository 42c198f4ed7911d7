"""Dead letters always fit their topic (SPEC §10, issue 26.3): large payloads are cut,
with their size and sha256; a letter that cannot be cut to fit is logged and skipped."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crmhooks.app import Processor
from crmhooks.clock import FakeClock
from crmhooks.errors import InvalidEvent
from crmhooks.events import decode_event
from crmhooks.results import DEAD_LETTER_MAX_BYTES, KEY_MAX_BYTES, dead_letter, encode, shrink
from crmhooks.store import Store
from crmhooks.tools import _not_replayed
from tests.fakes import NOW_MS, FakeKafka, GatedTransport, Rec
from tests.schemas import validate_dead_letter
from tests.support import event as qualifying
from tests.test_app_instant import config
from tests.test_results import ACTION, DUE_MS

CUT = " ... (cut to fit the dead-letter topic: {} characters)"


def letter_of(
    *,
    raw: bytes | None = None,
    event: dict[str, Any] | None = None,
    message: str = "invalid event: not valid JSON",
    key: bytes | None = b"org-acme",
    max_bytes: int = DEAD_LETTER_MAX_BYTES,
    action: bool = False,
) -> dict[str, Any]:
    ids = (
        {"action_id": ACTION.action_id, "rule_id": ACTION.rule_id, "webhook": ACTION.webhook}
        if action
        else {}
    )
    letter = dead_letter(
        error_code="daily_limit_reached" if action else "internal_process_error",
        message=message,
        failed_at_ms=DUE_MS,
        topic="crm.record-events",
        partition=1,
        offset=4711,
        key=key,
        event=event,
        raw=raw,
        max_bytes=max_bytes,
        **ids,
    )
    encoded = encode(letter)
    decoded: dict[str, Any] = orjson.loads(encoded)
    validate_dead_letter(decoded)
    return decoded


def assert_cut(letter: dict[str, Any], payload: bytes, max_bytes: int) -> bytes:
    """``letter`` fits, says it was cut, and carries the start of ``payload``."""
    assert len(encode(letter)) <= max_bytes
    assert letter["truncated"] is True
    assert letter["event"] is None
    assert letter["original_bytes"] == len(payload)
    assert letter["sha256"] == hashlib.sha256(payload).hexdigest()
    start = base64.b64decode(letter["raw"], validate=True)
    assert payload.startswith(start)
    return start


def test_a_letter_that_fits_is_whole_and_says_so() -> None:
    event = {"event_id": "evt-1", "org_id": "org-acme", "record": {"Amount": 1}}
    letter = letter_of(event=event, raw=orjson.dumps(event))
    assert letter["event"] == event
    assert (letter["raw"], letter["truncated"], letter["original_bytes"], letter["sha256"]) == (
        None,
        False,
        None,
        None,
    )


def test_a_900_kb_invalid_event_is_cut_to_its_first_bytes_with_size_and_hash() -> None:
    """Issue 26.3: base64 of 900 KB is 1.2 MB, over what a broker takes by default."""
    payload = os.urandom(900 * 1024)
    letter = letter_of(raw=payload)
    start = assert_cut(letter, payload, DEAD_LETTER_MAX_BYTES)
    # All the room there is goes to the payload: within one base64 quantum of the limit.
    assert DEAD_LETTER_MAX_BYTES - len(encode(letter)) < 4
    assert len(start) > 380_000
    assert letter["message"] == "invalid event: not valid JSON"  # whole
    assert letter["source"] == {
        "topic": "crm.record-events",
        "partition": 1,
        "offset": 4711,
        "key": "org-acme",
    }


def test_an_event_that_parsed_is_cut_from_the_bytes_as_read() -> None:
    """The hash is of the record's value as read, to be found on the events topic."""
    event = {"event_id": "evt-big", "org_id": "org-acme", "record": {"Notes": "n" * 700_000}}
    raw = b"  " + orjson.dumps(event)  # as a producer wrote it, not as we would
    letter = letter_of(event=event, raw=raw)
    start = assert_cut(letter, raw, DEAD_LETTER_MAX_BYTES)
    assert start.startswith(b'  {"event_id":"evt-big"')


def test_an_actions_event_is_cut_from_its_json() -> None:
    event = {"event_id": ACTION.event_id, "record": {"Notes": "n" * 600_000}}
    letter = letter_of(event=event, action=True, message="org-acme used 50 of 50")
    assert_cut(letter, orjson.dumps(event), DEAD_LETTER_MAX_BYTES)
    assert (letter["action_id"], letter["rule_id"], letter["webhook"]) == (
        ACTION.action_id,
        ACTION.rule_id,
        ACTION.webhook,
    )


def test_a_message_too_long_for_the_topic_is_cut_with_a_note() -> None:
    """An invalid_config letter lists every error: thousands, for a large document."""
    message = "; ".join(f"webhooks[{n}].url: longer than 200 characters" for n in range(40_000))
    letter = letter_of(message=message, max_bytes=100_000)
    assert len(encode(letter)) <= 100_000
    assert letter["truncated"] is True
    assert (letter["original_bytes"], letter["sha256"], letter["raw"]) == (None, None, None)
    assert letter["message"].endswith(CUT.format(len(message)))
    assert message.startswith(letter["message"].removesuffix(CUT.format(len(message))))
    assert len(letter["message"]) > 90_000


def test_a_long_message_leaves_a_quarter_of_the_room_to_the_payload() -> None:
    message = "e" * 200_000
    payload = os.urandom(300_000)
    letter = letter_of(message=message, raw=payload, max_bytes=100_000)
    start = assert_cut(letter, payload, 100_000)
    assert 18_000 <= len(start) <= 100_000 * 3 // 16 + 3
    assert letter["message"].endswith(CUT.format(len(message)))


def test_a_long_key_is_carried_in_part() -> None:
    letter = letter_of(raw=b"{oops", key=b"k" * 5000)
    assert letter["source"]["key"] == "k" * KEY_MAX_BYTES
    assert letter["truncated"] is False  # the payload is whole


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(min_size=0, max_size=40_000),
    message=st.text(min_size=1, max_size=20_000),
    max_bytes=st.integers(min_value=4_000, max_value=60_000),
    as_event=st.booleans(),
)
def test_every_letter_fits_and_what_it_carries_is_the_payloads_start(
    payload: bytes, message: str, max_bytes: int, as_event: bool
) -> None:
    """Whatever the payload, the message (any characters: escapes take room) and the
    limit, the letter fits; a cut one carries the payload's first bytes and its hash."""
    event = {"data": payload.hex()} if as_event else None
    letter = letter_of(
        raw=None if as_event else payload, event=event, message=message, max_bytes=max_bytes
    )
    assert len(encode(letter)) <= max_bytes
    whole = orjson.dumps(event) if as_event else payload
    if letter["original_bytes"] is not None:
        assert_cut(letter, whole, max_bytes)
    elif as_event:
        assert letter["event"] == event
    else:
        assert base64.b64decode(letter["raw"]) == payload
    if not letter["truncated"]:
        assert letter["message"] == message


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"truncated": False}, "truncated: True was expected"),  # a cut payload says so
        ({"sha256": None}, "sha256"),
        ({"sha256": "ABC"}, "sha256"),
        ({"original_bytes": -1}, "original_bytes"),
        ({"event": {"event_id": "e"}, "raw": None}, "event: {'event_id': 'e'} is not of type"),
    ],
)
def test_the_schema_rejects_a_cut_letter_that_does_not_say_what_was_cut(
    change: dict[str, Any], complaint: str
) -> None:
    letter = letter_of(raw=os.urandom(600_000))
    with pytest.raises(AssertionError) as info:
        validate_dead_letter(letter | change)
    assert complaint in str(info.value)


def test_the_schema_rejects_a_hash_without_a_cut() -> None:
    letter = letter_of(raw=b"{oops")
    with pytest.raises(AssertionError, match="sha256"):
        validate_dead_letter(letter | {"sha256": "0" * 64})


# -- the reporter: what it produces, and what it skips --------------------------------


async def test_the_reporter_cuts_to_what_the_topic_takes_and_skips_what_cannot_fit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kafka = FakeKafka(dead_letter_max_bytes=20_000)
    async with Store(tmp_path / "s.db") as store:
        p = Processor(config(), store, GatedTransport(), FakeClock(NOW_MS))
        p.attach(kafka, {0})
        reporter = p.reporter
        assert reporter.dead_letter_max_bytes == 20_000
        big = Rec(0, 7, b"\xff" * 50_000)
        with caplog.at_level(logging.WARNING, logger="crmhooks"):
            ((topic, key, value),) = reporter.poison(0, big, InvalidEvent("not JSON"), NOW_MS)
        assert (topic, key) == ("crm.webhook-dlq", b"org-acme")
        assert len(value) <= 20_000
        assert_cut(orjson.loads(value), big.value, 20_000)
        assert caplog.messages[-1] == (
            "dead letter of partition 0 offset 7 (internal_process_error) cut to fit the "
            f"dead-letter topic: 50000 bytes, sha256 {hashlib.sha256(big.value).hexdigest()}"
        )

        # Ids alone too long (an event id of 30,000 characters is a valid event's, and
        # its actions' ids carry it): logged with where the event is, and skipped.
        event_id = "e" * 30_000
        action = msgspec.structs.replace(
            ACTION, event_id=event_id, action_id=f"{event_id}:r:Hook", partition=0
        )
        event = decode_event(orjson.dumps(qualifying(event_id)))
        with caplog.at_level(logging.WARNING, logger="crmhooks"):
            skipped = reporter.action_letter(action, event, "daily_limit_reached", "over")
        assert skipped == []
        assert reporter.dead_letters == 1
        shown = re.fullmatch(
            r"dead letter of partition 0 offset 4711 \(daily_limit_reached\) not written: "
            r"(\d+) bytes even cut \(its ids alone are too long\), the dead-letter topic "
            r"takes 20000; skipped",
            caplog.messages[-1],
        )
        assert shown is not None, caplog.messages[-1]
        assert 30_000 < int(shown.group(1)) < 30_000 + 20_000  # the ids, and as little else


def test_replay_says_where_the_whole_event_of_a_cut_letter_is() -> None:
    payload = os.urandom(600_000)
    letter = letter_of(raw=payload)
    assert _not_replayed(letter) == (
        "not replayed: the internal_process_error dead letter of crm.record-events "
        "partition 1 offset 4711 holds only the start of its event (600,000 bytes, sha256 "
        f"{hashlib.sha256(payload).hexdigest()}); the whole event is there while that "
        "topic keeps it"
    )


@pytest.mark.parametrize(("takes", "written"), [(12_000, True), (8_000, False)])
async def test_a_letter_the_topic_refuses_is_cut_to_half_then_skipped_never_looped_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, takes: int, written: bool
) -> None:
    """The topic takes less than it said at start (its max.message.bytes lowered): the
    refused letter is cut to half its size, and so is every letter after it; refused
    again, it is logged with where its event is and skipped. The batch goes on."""
    kafka = FakeKafka(dead_letter_max_bytes=20_000, refuse_over_bytes=takes)
    async with Store(tmp_path / "s.db") as store:
        p = Processor(config(), store, GatedTransport(), FakeClock(NOW_MS))
        p.attach(kafka, {0})
        reporter = p.reporter
        bad = Rec(0, 7, b"\xff" * 50_000)
        letters = reporter.poison(0, bad, InvalidEvent("not valid UTF-8"), NOW_MS)
        assert len(letters[0][2]) > 19_990
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="crmhooks"):
            await reporter.produce([*letters, ("crm.webhook-results", b"org-acme", b"{}")])
        assert reporter.dead_letter_max_bytes == len(letters[0][2]) // 2
        assert caplog.messages[0] == (
            f"crm.webhook-dlq refused 1 dead letters of {len(letters[0][2])} bytes or more as "
            f"too large: dead letters are cut to {reporter.dead_letter_max_bytes} bytes from "
            "now on (was the topic's max.message.bytes lowered?)"
        )
        assert {} in kafka.results  # the batch's other records are written
        cut = [r for r in kafka.results if r != {}]
        if written:
            (letter,) = cut
            assert len(encode(letter)) <= reporter.dead_letter_max_bytes
            assert_cut(letter, bad.value, reporter.dead_letter_max_bytes)
            assert len(caplog.messages) == 1
        else:
            assert cut == []
            assert caplog.messages[1].startswith(
                "dead letter of partition 0 offset 7 (internal_process_error) not written: "
                "crm.webhook-dlq refused it even cut to "
            )
            assert caplog.messages[1].endswith(" bytes; skipped")
        # The letters after it are cut to the new size at once.
        (later,) = reporter.poison(0, Rec(0, 9, b"\xfe" * 50_000), InvalidEvent("x"), NOW_MS)
        assert len(later[2]) <= reporter.dead_letter_max_bytes


def test_a_letter_cut_again_keeps_the_size_and_hash_of_the_whole() -> None:
    payload = os.urandom(300_000)
    letter = letter_of(raw=payload, max_bytes=200_000)
    again = shrink(letter, 50_000)
    assert_cut(again, payload, 50_000)
    whole = letter_of(event={"event_id": "e", "notes": "n" * 60_000})
    assert whole["truncated"] is False
    event_json = orjson.dumps(whole["event"])
    assert_cut(shrink(whole, 20_000), event_json, 20_000)
