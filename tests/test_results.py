"""Result records (SPEC §7) and dead letters (SPEC §8) against their JSON Schemas."""

from __future__ import annotations

import base64
import copy
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crmhooks.actions import FINAL_STATUSES, Action
from crmhooks.delivery import ERROR_CLASSES, Outcome
from crmhooks.events import decode_event
from crmhooks.results import dead_letter, encode, event_dead_letter, result_record, rfc3339_ms
from tests.schemas import (
    DEAD_LETTER_SCHEMA,
    RESULTS_SCHEMA,
    load_schema,
    validate_dead_letter,
    validate_result,
)

DUE_MS = 1_795_856_400_000  # 2026-11-28T09:00:00Z
ACTION = Action(
    action_id="evt-000123:commission-on-close:CreatorCommission",
    event_id="evt-000123",
    org_id="org-acme",
    module="Potentials",
    record_id="4150868000000224005",
    rule_id="commission-on-close",
    webhook="CreatorCommission",
    kind="instant",
    slot=0,
    due_ms=DUE_MS,
    partition=2,
    source_offset=4711,
)
SCHEDULED = Action(
    action_id="evt-000123:commission-on-close:PaymentDueSms",
    event_id="evt-000123",
    org_id="org-acme",
    module="Potentials",
    record_id="4150868000000224005",
    rule_id="commission-on-close",
    webhook="PaymentDueSms",
    kind="scheduled",
    slot=1,
    due_ms=DUE_MS + 86_400_000,
    partition=2,
    source_offset=4711,
)
# What app.py passes: the redacted URL of the rendered request.
SHOWN = {"method": "POST", "url": "https://creator.example.com/api/xml/write?apikey=***"}
DELIVERED = Outcome(
    error_class=None,
    http_status=200,
    error=None,
    latency_ms=12.4321,
    sent_at_ms=DUE_MS + 12,
    response_excerpt='{"ok": true}',
    response_bytes=12,
)
UNAVAILABLE = Outcome(
    error_class="server_error",
    http_status=503,
    error="HTTP 503 Service Unavailable",
    latency_ms=30.0,
    sent_at_ms=DUE_MS + 5,
    retry_after_s=120.0,
    response_excerpt="busy",
)
TIMED_OUT = Outcome(
    error_class="timeout",
    http_status=None,
    error="no response within 15 s",
    latency_ms=15_000.0,
    sent_at_ms=DUE_MS,
)
BLOCKED = Outcome(
    error_class="ssrf_blocked",
    http_status=None,
    error="10.0.0.1 is a private address",
    latency_ms=0.3,
    sent_at_ms=None,
)
SPEC_EVENT: dict[str, Any] = {
    "event_id": "evt-000123",
    "org_id": "org-acme",
    "module": "Potentials",
    "operation": "edit",
    "occurred_at": "2026-11-28T09:00:00Z",
    "record_id": "4150868000000224005",
    "record": {"Potential Name": "Big deal", "Amount": 25000, "Stage": "Closed Won"},
}
MS_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
MIN_MS = (datetime(1, 1, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(
    milliseconds=1
)
MAX_MS = (
    datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)
) // timedelta(milliseconds=1)


def wire(record: dict[str, Any]) -> dict[str, Any]:
    """The record as a consumer of the topic sees it."""
    decoded: dict[str, Any] = orjson.loads(encode(record))
    assert decoded == record
    return decoded


def rejected(validate: Any, record: dict[str, Any]) -> str:
    with pytest.raises(AssertionError) as info:
        validate(record)
    return str(info.value)


# Every status, and every error path, app.py produces.
RECORDS: dict[str, dict[str, Any]] = {
    "scheduled": result_record(SCHEDULED, "scheduled"),
    "rescheduled": result_record(SCHEDULED, "scheduled", reason="rescheduled"),
    "delivered": result_record(ACTION, "delivered", attempt=1, outcome=DELIVERED, request=SHOWN),
    "retrying": result_record(
        ACTION,
        "retrying",
        attempt=1,
        outcome=UNAVAILABLE,
        next_attempt_ms=DUE_MS + 900_000,
        request=SHOWN,
    ),
    "failed-timeout": result_record(ACTION, "failed", attempt=2, outcome=TIMED_OUT, request=SHOWN),
    "failed-ssrf": result_record(ACTION, "failed", attempt=1, outcome=BLOCKED, request=SHOWN),
    "failed-internal": result_record(
        ACTION,
        "failed",
        error_class="internal_process_error",
        error="template failed: ${Potentials.Nope}",
    ),
    "cancelled": result_record(SCHEDULED, "cancelled", reason="superseded"),
    "skip": result_record(SCHEDULED, "skipped", reason="no_due_time: Payment Due"),
    "quota_exceeded": result_record(ACTION, "quota_exceeded", reason="daily_limit_reached"),
    "suspended": result_record(ACTION, "suspended", reason="webhook_suspended"),
}


@pytest.mark.parametrize("record", RECORDS.values(), ids=RECORDS.keys())
def test_every_result_record_fits_the_schema(record: dict[str, Any]) -> None:
    validate_result(wire(record))


def test_the_schema_covers_every_status_and_error_class_the_code_has() -> None:
    props = load_schema(RESULTS_SCHEMA)["properties"]
    assert set(props["status"]["enum"]) == FINAL_STATUSES | {"scheduled", "retrying"}
    assert set(props["error_class"]["enum"]) == ERROR_CLASSES | {"internal_process_error", None}
    assert {r["status"] for r in RECORDS.values()} == set(props["status"]["enum"])
    assert set(load_schema(RESULTS_SCHEMA)["required"]) == set(props)
    assert set(props) == set(RECORDS["delivered"])


def test_a_delivered_record_field_by_field() -> None:
    record = result_record(ACTION, "delivered", attempt=1, outcome=DELIVERED, request=SHOWN)
    assert record == {
        "action_id": "evt-000123:commission-on-close:CreatorCommission",
        "event_id": "evt-000123",
        "org_id": "org-acme",
        "module": "Potentials",
        "record_id": "4150868000000224005",
        "rule_id": "commission-on-close",
        "webhook": "CreatorCommission",
        "kind": "instant",
        "status": "delivered",
        "attempt": 1,
        "due_at": "2026-11-28T09:00:00.000Z",
        "sent_at": "2026-11-28T09:00:00.012Z",
        "http_status": 200,
        "error_class": None,
        "error": None,
        "latency_ms": 12.4,
        "next_attempt_at": None,
        "reason": None,
        # Passed through as given: the caller has redacted the secrets.
        "request": {
            "method": "POST",
            "url": "https://creator.example.com/api/xml/write?apikey=***",
        },
        "response_excerpt": '{"ok": true}',
    }
    assert record["request"] is not SHOWN  # a copy: later changes to the caller's dict do not leak


def test_outcome_errors_fill_in_unless_given() -> None:
    retrying = result_record(ACTION, "retrying", outcome=UNAVAILABLE, next_attempt_ms=DUE_MS + 1)
    assert retrying["error_class"] == "server_error"
    assert retrying["error"] == "HTTP 503 Service Unavailable"
    assert retrying["next_attempt_at"] == "2026-11-28T09:00:00.001Z"
    assert retrying["attempt"] == 0  # the action's own count when none is given
    blocked = result_record(ACTION, "failed", outcome=BLOCKED)
    assert (blocked["sent_at"], blocked["latency_ms"], blocked["http_status"]) == (None, None, None)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"status": "sent"}, "status"),
        ({"kind": "later"}, "kind"),
        ({"due_at": "2026-11-28T09:00:00Z"}, "due_at"),  # milliseconds are always there
        ({"sent_at": "2026-11-28T09:00:00.012+00:00"}, "sent_at"),
        ({"attempt": -1}, "attempt"),
        ({"http_status": "200"}, "http_status"),
        ({"error_class": "teapot"}, "error_class"),
        ({"request": {"method": "PUT", "url": "https://x.example"}}, "request"),
        ({"request": {"method": "GET", "url": "https://x.example", "body": "..."}}, "request"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"extra": 1}, "Additional properties"),
    ],
)
def test_the_result_schema_rejects_what_the_spec_does_not_allow(
    change: dict[str, Any], complaint: str
) -> None:
    record = result_record(ACTION, "delivered", attempt=1, outcome=DELIVERED, request=SHOWN)
    assert complaint in rejected(validate_result, record | change)


@pytest.mark.parametrize("field", ["action_id", "due_at", "sent_at", "response_excerpt", "reason"])
def test_every_result_field_is_required(field: str) -> None:
    record = result_record(ACTION, "delivered", attempt=1, outcome=DELIVERED, request=SHOWN)
    del record[field]
    assert f"'{field}' is a required property" in rejected(validate_result, record)


def poison_letter(event: dict[str, Any] | None, raw: bytes | None, key: bytes | None) -> Any:
    return dead_letter(
        error_code="internal_process_error",
        message="invalid event: not valid JSON",
        failed_at_ms=DUE_MS + 1000,
        topic="crm.record-events",
        partition=0,
        offset=4711,
        key=key,
        event=event,
        raw=raw,
    )


def test_a_poison_pill_that_parsed_carries_the_event() -> None:
    data = orjson.dumps({**SPEC_EVENT, "operation": "update"})
    letter = wire(poison_letter(orjson.loads(data), data, b"org-acme"))
    validate_dead_letter(letter)
    assert letter["event"] == orjson.loads(data)
    assert letter["raw"] is None
    assert letter["failed_at"] == "2026-11-28T09:00:01.000Z"
    assert letter["source"] == {
        "topic": "crm.record-events",
        "partition": 0,
        "offset": 4711,
        "key": "org-acme",
    }
    assert (letter["action_id"], letter["rule_id"], letter["webhook"]) == (None, None, None)


@given(data=st.binary(), key=st.none() | st.binary(max_size=16))
def test_undecodable_bytes_round_trip_through_raw(data: bytes, key: bytes | None) -> None:
    letter = wire(poison_letter(None, data, key))
    validate_dead_letter(letter)
    assert letter["event"] is None
    assert base64.b64decode(letter["raw"], validate=True) == data
    assert letter["source"]["key"] == (None if key is None else key.decode("utf-8", "replace"))


def test_a_tombstone_letter_carries_neither() -> None:
    letter = wire(poison_letter(None, None, b"org-acme"))
    validate_dead_letter(letter)
    assert (letter["event"], letter["raw"]) == (None, None)


def test_quota_and_template_letters_name_the_action() -> None:
    event = decode_event(orjson.dumps(SPEC_EVENT))
    quota = wire(
        event_dead_letter(
            event,
            "daily_limit_reached",
            "org-acme used 50 of 50 notifications on 2026-11-28",
            DUE_MS,
            ACTION,
            "crm.record-events",
        )
    )
    validate_dead_letter(quota)
    assert quota["event"] == SPEC_EVENT
    assert quota["raw"] is None
    assert quota["source"] == {
        "topic": "crm.record-events",
        "partition": 2,
        "offset": 4711,
        "key": "org-acme",
    }
    assert (quota["action_id"], quota["rule_id"], quota["webhook"]) == (
        ACTION.action_id,
        "commission-on-close",
        "CreatorCommission",
    )
    template = wire(
        event_dead_letter(
            event, "internal_process_error", "template failed", DUE_MS, ACTION, "crm.record-events"
        )
    )
    validate_dead_letter(template)


def test_a_lost_snapshot_letter_names_the_action_without_an_event() -> None:
    letter = dead_letter(
        error_code="internal_process_error",
        message="no stored snapshot of the record",
        failed_at_ms=DUE_MS,
        topic="crm.record-events",
        partition=2,
        offset=4711,
        key=b"org-acme",
        event=None,
        raw=None,
        action_id=ACTION.action_id,
        rule_id=ACTION.rule_id,
        webhook=ACTION.webhook,
    )
    validate_dead_letter(wire(letter))


def _quota_letter() -> dict[str, Any]:
    event = decode_event(orjson.dumps(SPEC_EVENT))
    return event_dead_letter(event, "daily_limit_reached", "over", DUE_MS, ACTION, "t")


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"error_code": "oops"}, "error_code"),
        ({"failed_at": "2026-11-28T09:00:01Z"}, "failed_at"),
        ({"message": ""}, "message"),
        ({"raw": "aGk="}, "should not be valid"),  # never both event and raw
        ({"event": None, "raw": "not base64!"}, "raw"),
        ({"event": "{}"}, "event"),
        ({"action_id": None}, "action_id"),  # a quota letter is about an action
        ({"rule_id": None}, "rule_id"),  # an action letter names its rule
        ({"source": {"topic": "t", "partition": -1, "offset": 0, "key": None}}, "partition"),
        ({"source": {"topic": "t", "partition": 0, "offset": 0}}, "key"),
        ({"extra": 1}, "Additional properties"),
    ],
)
def test_the_dead_letter_schema_rejects_what_the_spec_does_not_allow(
    change: dict[str, Any], complaint: str
) -> None:
    letter = copy.deepcopy(_quota_letter())
    validate_dead_letter(letter)
    assert complaint in rejected(validate_dead_letter, letter | change)


def test_the_dead_letter_schema_knows_every_error_code() -> None:
    schema = load_schema(DEAD_LETTER_SCHEMA)
    assert schema["properties"]["error_code"]["enum"] == [
        "internal_process_error",
        "daily_limit_reached",
        "invalid_config",  # a refused config-topic document (SPEC §8)
    ]


@pytest.mark.parametrize(
    ("epoch_ms", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (DUE_MS + 12, "2026-11-28T09:00:00.012Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        (MIN_MS, "0001-01-01T00:00:00.000Z"),  # years below 1000 keep four digits
        (MAX_MS, "9999-12-31T23:59:59.999Z"),
        (951_782_400_000, "2000-02-29T00:00:00.000Z"),
    ],
)
def test_rfc3339_ms_examples(epoch_ms: int, text: str) -> None:
    assert rfc3339_ms(epoch_ms) == text


def test_rfc3339_ms_of_none_is_none() -> None:
    assert rfc3339_ms(None) is None


@given(epoch_ms=st.integers(MIN_MS, MAX_MS))
def test_rfc3339_ms_round_trips(epoch_ms: int) -> None:
    text = rfc3339_ms(epoch_ms)
    assert text is not None
    assert MS_PATTERN.fullmatch(text)
    back = datetime.fromisoformat(text)
    assert back.utcoffset() == timedelta(0)
    assert (back - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1) == epoch_ms
