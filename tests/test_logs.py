"""Log lines: text and JSON formats, escaping of control characters, rate limiting."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from crmhooks.logs import (
    JsonFormatter,
    RateLimitFilter,
    TextFormatter,
    about,
    configure_logging,
    escape_controls,
    log_context,
    reset_log_context,
    set_log_context,
    suppressed_counts,
)

TS_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
TEXT_LINE_RE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} [A-Z]+ [\w.]+: ")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """The root logger's output through our handler, restored afterwards."""
    root = logging.getLogger()
    level = root.level
    out = io.StringIO()
    yield out
    for h in list(root.handlers):
        if type(h).__name__ == "_Handler":
            root.removeHandler(h)
    root.setLevel(level)


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


@dataclass(frozen=True)
class FakeAction:
    action_id: str = "evt-1:rule-a:Hook"
    event_id: str = "evt-1"
    org_id: str = "org-acme"
    rule_id: str = "rule-a"
    webhook: str = "Hook"


# --- escaping ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text, ünïcödé 中文", "plain text, ünïcödé 中文"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x1b[31mred\x07", "\\x1b[31mred\\x07"),
        ("nul\x00 del\x7f csi\x9b", "nul\\x00 del\\x7f csi\\x9b"),
        ("line\u2028sep\u2029", "line\\u2028sep\\u2029"),
    ],
)
def test_escape_controls(raw: str, shown: str) -> None:
    assert escape_controls(raw) == shown


def test_a_field_name_with_a_newline_cannot_forge_a_text_line(stream: io.StringIO) -> None:
    configure_logging("text", "INFO", stream)
    forged = "Stage\n2026-11-28 09:00:00,000 ERROR crmhooks.app: forged line"
    logging.getLogger("crmhooks.app").warning("dead letter: unknown field %r", forged)
    logging.getLogger("crmhooks.delivery").info("receiver said %s", "OK\x1b]0;pwned\x07")
    out = lines(stream)
    assert len(out) == 2
    assert all(TEXT_LINE_RE.match(line) for line in out)
    assert "\\n2026-11-28" in out[0]
    assert out[1].endswith("receiver said OK\\x1b]0;pwned\\x07")
    assert "\x1b" not in stream.getvalue()
    assert "\x07" not in stream.getvalue()


def test_a_traceback_in_text_keeps_its_lines_all_indented(stream: io.StringIO) -> None:
    configure_logging("text", "INFO", stream)
    try:
        raise ValueError("bad value\n2026-11-28 09:00:00,000 INFO crmhooks: forged \x1b[2J")
    except ValueError:
        logging.getLogger("crmhooks.app").exception("action %s failed", "a-1")
    first, *rest = lines(stream)
    assert TEXT_LINE_RE.match(first)
    assert first.endswith("action a-1 failed")
    assert rest[0] == "  Traceback (most recent call last):"
    assert all(line.startswith("  ") for line in rest)  # none looks like a log line
    assert "  2026-11-28 09:00:00,000 INFO crmhooks: forged \\x1b[2J" in rest
    assert "\x1b" not in stream.getvalue()


def test_text_format_is_the_one_of_before(stream: io.StringIO) -> None:
    configure_logging("text", "INFO", stream)
    logging.getLogger("crmhooks.runner").info("crmhooks running: %d rules", 3)
    (line,) = lines(stream)
    assert TEXT_LINE_RE.match(line)
    assert line.endswith(" INFO crmhooks.runner: crmhooks running: 3 rules")


# --- JSON -------------------------------------------------------------------------


def test_json_lines_parse_one_object_a_line_with_the_ids_known(stream: io.StringIO) -> None:
    configure_logging("json", "INFO", stream)
    log = logging.getLogger("crmhooks.app")
    log.info("action %s delivered", "a-1", extra=about(FakeAction()))
    log.warning("dead letter at %d", 7, extra={"partition": 2, "offset": 7})
    with log_context(org_id="org-x", event_id="evt-9"):
        log.info("planned %s", "x\ny", extra={"action_id": "evt-9:r:W"})
    log.info("no ids here")
    token = set_log_context(org_id="org-y", action_id="evt-2:r:W")
    log.info("in context")
    reset_log_context(token)
    log.info("out of it")
    records = [json.loads(line) for line in lines(stream)]
    assert len(records) == 6
    first, second, third, fourth, fifth, sixth = records
    assert (fifth["org_id"], fifth["action_id"]) == ("org-y", "evt-2:r:W")
    assert "org_id" not in sixth
    assert TS_RE.fullmatch(first["ts"])
    assert first["level"] == "INFO"
    assert first["logger"] == "crmhooks.app"
    assert first["msg"] == "action a-1 delivered"
    assert first["org_id"] == "org-acme"
    assert first["event_id"] == "evt-1"
    assert first["action_id"] == "evt-1:rule-a:Hook"
    assert first["rule_id"] == "rule-a"
    assert first["webhook"] == "Hook"
    assert second["partition"] == 2
    assert second["offset"] == 7
    assert "org_id" not in second
    assert third["msg"] == "planned x\ny"  # escaped by JSON, one line
    assert (third["org_id"], third["event_id"], third["action_id"]) == (
        "org-x",
        "evt-9",
        "evt-9:r:W",
    )
    assert set(fourth) == {"ts", "level", "logger", "msg"}


def test_json_escapes_what_json_encoders_leave_raw(stream: io.StringIO) -> None:
    configure_logging("json", "INFO", stream)
    reason = "Bad\x1b[31m\x07 Gateway\x7f\x9b2J\u2028x 中文"
    logging.getLogger("crmhooks.delivery").warning("receiver said %s", reason)
    text = stream.getvalue()
    assert text.count("\n") == 1
    assert re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", text.rstrip("\n")) is None
    assert "\\u001b" in text
    assert "\\u007f" in text
    assert "\\u009b" in text
    assert "\\u2028" in text
    assert "中文" in text  # other characters stay readable
    assert json.loads(text)["msg"] == f"receiver said {reason}"


def test_json_carries_the_traceback_as_exc(stream: io.StringIO) -> None:
    configure_logging("json", "INFO", stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("crmhooks.app").exception("failed")
    (line,) = lines(stream)
    record = json.loads(line)
    assert record["msg"] == "failed"
    assert record["level"] == "ERROR"
    assert record["exc"].startswith("Traceback (most recent call last):")
    assert record["exc"].rstrip().endswith("RuntimeError: boom")


def test_debug_lines_are_not_formatted_unless_enabled(stream: io.StringIO) -> None:
    configure_logging("json", "INFO", stream)
    formatted = []

    class Probe:
        def __str__(self) -> str:
            formatted.append(1)
            return "probe"

    logging.getLogger("crmhooks.app").debug("delivered %s", Probe())
    assert formatted == []
    assert stream.getvalue() == ""
    configure_logging("json", "DEBUG", stream)
    logging.getLogger("crmhooks.app").debug("delivered %s", Probe())
    assert formatted  # (pytest's own capture formats it too)
    assert json.loads(lines(stream)[0])["msg"] == "delivered probe"


def test_configuring_again_replaces_our_handler_only(stream: io.StringIO) -> None:
    other = logging.StreamHandler(io.StringIO())
    root = logging.getLogger()
    root.addHandler(other)
    try:
        configure_logging("text", "INFO", io.StringIO())
        configure_logging("json", "WARNING", stream)
        ours = [h for h in root.handlers if type(h).__name__ == "_Handler"]
        assert len(ours) == 1
        assert isinstance(ours[0].formatter, JsonFormatter)
        assert other in root.handlers
        assert root.level == logging.WARNING
    finally:
        root.removeHandler(other)


def test_unknown_format_or_level_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="log format 'xml': expected one of text, json"):
        configure_logging("xml", "INFO")
    with pytest.raises(ValueError, match="log level 'LOUD'"):
        configure_logging("text", "LOUD")


# --- rate limiting --------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_flood_of_one_kind_gives_one_line_per_interval_with_the_count() -> None:
    clock = FakeClock()
    limiter = RateLimitFilter(interval_s=10.0, clock=clock)
    template = "Unable connect to node with id %s: %s"
    passed = []
    for i in range(1000):  # 100 a second for 10 s
        clock.now_s = 1000.0 + i / 100
        rec = record("aiokafka.conn", template, 1, f"try {i}")
        if limiter.filter(rec):
            passed.append(rec.getMessage())
    clock.now_s = 1010.0
    assert passed == ["Unable connect to node with id 1: try 0"]
    rec = record("aiokafka.conn", template, 1, "try 1000")
    assert limiter.filter(rec)
    assert rec.getMessage() == (
        "Unable connect to node with id 1: try 1000 (999 similar lines suppressed in the last 10 s)"
    )
    assert limiter.suppressed == {"aiokafka.conn": 999}
    clock.now_s += 60  # quiet since: the next one passes with no count
    rec = record("aiokafka.conn", template, 1, "again")
    assert limiter.filter(rec)
    assert rec.getMessage() == "Unable connect to node with id 1: again"


def test_each_kind_gets_its_own_line() -> None:
    limiter = RateLimitFilter(interval_s=10.0, clock=FakeClock())
    kinds = [
        record("aiokafka.conn", "Unable connect to node %s", 1),
        record("aiokafka.consumer.fetcher", "Unable connect to node %s", 1),  # other logger
        record("aiokafka.conn", "Unable connect to node %s", 1, level=logging.WARNING),
        record("aiokafka.conn", "Connection reset: %s", 1),  # other template
    ]
    assert [limiter.filter(r) for r in kinds] == [True, True, True, True]
    assert [limiter.filter(r) for r in kinds] == [False, False, False, False]


def test_our_lines_and_library_info_lines_are_never_limited() -> None:
    limiter = RateLimitFilter(interval_s=10.0, clock=FakeClock())
    for _ in range(50):
        assert limiter.filter(record("crmhooks.app", "action %s failed", "a"))
        assert limiter.filter(record("aiokafkaesque", "not a child of aiokafka"))
        assert limiter.filter(record("aiokafka.conn", "connected", level=logging.INFO))
    assert limiter.suppressed == {}


def test_the_table_of_kinds_stays_bounded() -> None:
    clock = FakeClock()
    limiter = RateLimitFilter(interval_s=10.0, clock=clock)
    for i in range(5000):  # a library formatting values into its message itself
        limiter.filter(record("aiokafka", f"error {i}"))
        clock.now_s += 0.001
    assert len(limiter._kinds) <= 1000


def test_the_limiter_is_on_the_handler_for_every_library_child_logger(
    stream: io.StringIO,
) -> None:
    configure_logging("text", "INFO", stream)
    log = logging.getLogger("aiokafka.consumer.group_coordinator")
    for _ in range(500):
        log.error("Error sending JoinGroupRequest to node %s: %s", 1, "[Error 7] RequestTimedOut")
    assert len(lines(stream)) == 1
    assert suppressed_counts() == {"aiokafka.consumer.group_coordinator": 499}


def test_text_formatter_is_a_formatter_for_any_handler() -> None:
    rec = record("crmhooks.x", "a\nb")
    assert TextFormatter().format(rec).endswith("crmhooks.x: a\\nb")
    assert json.loads(JsonFormatter().format(rec))["msg"] == "a\nb"
