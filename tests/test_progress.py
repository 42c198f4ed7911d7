"""Progress on a terminal (a real pty), quiet elsewhere; `tail` lines escaped."""

from __future__ import annotations

import io
import os
import select
from collections.abc import Iterator
from typing import TextIO

import orjson
import pytest

from crmhooks.config import Config
from crmhooks.kafka_io import ensure_topics, produce_records
from crmhooks.progress import Progress
from crmhooks.tools import format_dead_letter, format_result, replay_dlq
from tests.support import unique_kafka


@pytest.fixture
def terminal() -> Iterator[tuple[TextIO, int]]:
    """(a text stream on a pty's terminal side, the fd its output is read from)."""
    controller, terminal_fd = os.openpty()
    stream = os.fdopen(terminal_fd, "w", encoding="utf-8")
    try:
        yield stream, controller
    finally:
        stream.close()
        os.close(controller)


def drain(fd: int) -> str:
    chunks = []
    while select.select([fd], [], [], 0.2)[0]:
        data = os.read(fd, 65536)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode()


class Ticks:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_progress_is_drawn_in_place_on_a_terminal_and_erased(
    terminal: tuple[TextIO, int],
) -> None:
    stream, controller = terminal
    clock = Ticks()
    with Progress("replay-dlq", stream, clock=clock) as p:
        assert p.enabled
        p.update(1, note="read")
        p.update(2, note="read")  # within 0.1 s of the last redraw: not drawn
        clock.now_s = 0.5
        p.update(1500, 3000)
    shown = drain(controller)
    assert shown == ("\r\x1b[Kreplay-dlq: 1 read\r\x1b[Kreplay-dlq: 1,500/3,000 (50%)\r\x1b[K")


def test_progress_writes_nothing_when_not_a_terminal() -> None:
    out = io.StringIO()
    with Progress("replay-dlq", out) as p:
        assert not p.enabled
        for i in range(100):
            p.update(i, 100)
    assert out.getvalue() == ""


@pytest.mark.kafka
async def test_replay_dlq_shows_progress_on_a_terminal_only(
    terminal: tuple[TextIO, int],
) -> None:
    kafka = unique_kafka(partitions=1)
    config = Config(kafka=kafka)
    await ensure_topics(kafka, [kafka.dlq_topic, kafka.events_topic], 1)
    letters = [
        {"error_code": "daily_limit_reached", "event": {"event_id": f"e{i}"}, "raw": None}
        for i in range(5)
    ]
    await produce_records(kafka, [(kafka.dlq_topic, b"org-a", orjson.dumps(x)) for x in letters])
    stream, controller = terminal
    with Progress("replay-dlq", stream, every_s=0.0) as p:
        assert await replay_dlq(config, None, idle_timeout_s=1.0, progress=p) == 5
    shown = drain(controller)
    assert "replay-dlq: 5 dead letters read, 4 to replay" in shown
    assert "replay-dlq: 5 dead letters read; producing 5 events" in shown
    assert shown.endswith("\r\x1b[K")
    quiet = io.StringIO()
    with Progress("replay-dlq", quiet, every_s=0.0) as p:
        assert await replay_dlq(config, None, idle_timeout_s=1.0, progress=p) == 5
    assert quiet.getvalue() == ""


# --- tail ----------------------------------------------------------------------------


def test_tail_escapes_control_characters_from_receivers_and_events() -> None:
    result = {
        "sent_at": "2026-11-28T09:00:00.012Z",
        "status": "retrying",
        "attempt": 1,
        "rule_id": "rule\nforged",
        "webhook": "Hook",
        "http_status": 502,
        "error_class": "server_error",
        "error": "HTTP 502 Bad\x1b]0;pwned\x07 Gateway\r",
        "action_id": "evt-1\x9b2J:rule:Hook",
    }
    line = format_result(result)
    assert "\n" not in line
    assert "\r" not in line
    assert "\x1b" not in line
    assert "\x07" not in line
    assert "\x9b" not in line
    assert "rule\\nforged" in line
    assert "HTTP 502 Bad\\x1b]0;pwned\\x07 Gateway\\r" in line
    assert "action evt-1\\x9b2J:rule:Hook" in line
    letter = {
        "failed_at": "2026-11-28T09:00:01Z",
        "error_code": "internal_process_error",
        "source": {"partition": 0, "offset": 4},
        "message": "invalid event: unknown field 'a\nb\x1b[2J'",
        "action_id": None,
    }
    shown = format_dead_letter(letter)
    assert shown.endswith("invalid event: unknown field 'a\\nb\\x1b[2J'")
    assert "\n" not in shown
    assert "\x1b" not in shown


def test_tail_lines_survive_missing_and_null_fields() -> None:
    assert format_result({"status": None, "attempt": None, "action_id": "a"}).split()[:1] == [
        "None"
    ]
    assert "p0@1" in format_dead_letter({"source": {"partition": 0, "offset": 1}})
