"""Log output: text or JSON lines, control characters escaped, library floods rate-limited.

Every line comes out of one of two formatters (``configure_logging``):

- **text** (the default): ``2026-11-28 09:00:00,012 WARNING crmhooks.app: message``.
- **json**: one object a line, ``{"ts", "level", "logger", "msg"}`` plus, where known,
  ``org_id``, ``event_id``, ``action_id`` (and ``rule_id``, ``webhook``,
  ``partition``, ``offset``), and ``exc`` with the traceback.

Where the ids come from, cheapest first: ``extra=about(action)`` on the log call
(the object is read only if the line is written); ``extra={"action_id": ...}``;
or ``set_log_context(org_id=..., event_id=...)`` / ``reset_log_context(token)``
around a piece of work (a contextvar, per asyncio task: about 1 µs the pair; the
``with log_context(...)`` form costs ~6 µs, fine off the hot path). On the hot
path ``extra=about(action)`` is cheapest: nothing is read unless the line is written.

**Escaping.** Text that came from events or receivers (field names, reason
phrases, error messages) may hold control characters: a newline would forge a
log line, ESC or BEL would reach an operator's terminal. Both formatters escape
every C0 control, DEL, every C1 control and U+2028/U+2029 in every line: text as
``\\n``, ``\\r``, ``\\t``, ``\\x1b``, ``\\u2028``; JSON with its own ``\\n`` and
``\\u001b`` escapes, plus ``\\u007f``/``\\u0080``-``\\u009f``, which JSON
encoders leave raw. In text format a traceback keeps its own line breaks (it
stays readable), and every line of it is indented by two spaces: no line after
the first of a record can start like a log line, so a newline inside an
exception's message shows as an indented line, never a forged one. Backslashes
are not escaped (Windows paths stay readable): ``\\x1b`` in a line may be an
escaped ESC or those four characters as sent.

**Rate limiting** (``RateLimitFilter``): libraries (aiokafka above all) log the
same error in a tight loop while a broker is down: 259,000 lines in 32 s. Of
their WARNING-and-above lines, the first of a kind (logger, level, message
template) is written, then at most one per ``interval_s`` carrying the count of
those left out: ``... (812 similar lines suppressed in the last 10 s)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, TextIO

import orjson

LOG_FORMATS: Final = ("text", "json")
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Fields a JSON line carries when known, in this order, after ts/level/logger/msg.
LOG_FIELDS: Final = ("org_id", "event_id", "action_id", "rule_id", "webhook", "partition", "offset")
# The attributes of an ``about`` object that are read (Action, RecordEvent have them).
_ABOUT_FIELDS: Final = ("org_id", "event_id", "action_id", "rule_id", "webhook", "partition")

# Loggers of libraries whose repeated errors are rate-limited. Our own lines are
# one per decision and never limited (each names its action).
LIBRARY_LOGGERS: Final = ("aiokafka", "kafka", "aiohttp", "aiosqlite", "asyncio")
# One line per kind per 10 s: a broker outage logs ~8,000 lines a second, of a few
# kinds; ten seconds keeps that to a few lines per 10 s (a thousandth), still tells
# the operator within 10 s that the error goes on (and when it stopped: the count),
# and is the resolution of a usual scrape/alert interval. The first line of a kind
# always goes out at once: the start of an outage is never delayed.
RATE_LIMIT_INTERVAL_S: Final = 10.0
# Kinds remembered at most (message templates are few; a library formatting its
# values into the message itself would otherwise grow the table).
_MAX_KINDS: Final = 1000

# --- escaping -------------------------------------------------------------------

_CONTROL_RE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPES: Final = {
    code: _NAMED.get(chr(code), f"\\x{code:02x}") for code in (*range(0x20), *range(0x7F, 0xA0))
} | {0x2028: "\\u2028", 0x2029: "\\u2029"}
_ESCAPES_BUT_NEWLINE: Final = {k: v for k, v in _ESCAPES.items() if k != ord("\n")}
# What JSON encoders leave raw: DEL and the C1 controls (UTF-8: C2 80..C2 9F),
# and U+2028/U+2029 (E2 80 A8/A9). Only ever inside strings of the encoded line.
_JSON_RAW_RE: Final = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")


def escape_controls(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x1b``)."""
    if _CONTROL_RE.search(text) is None:
        return text
    return text.translate(_ESCAPES)


def _escape_block(text: str) -> str:
    """A traceback: escaped but for its line breaks, every line indented."""
    return "\n".join("  " + line for line in text.translate(_ESCAPES_BUT_NEWLINE).split("\n"))


def _json_escape_raw(match: re.Match[bytes]) -> bytes:
    return f"\\u{ord(match.group().decode()):04x}".encode()


# --- where the ids come from ----------------------------------------------------

_NO_CONTEXT: Final[Mapping[str, Any]] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "crmhooks_log_context", default=_NO_CONTEXT
)


def about(obj: object) -> dict[str, object]:
    """``extra=about(action)``: the line is about this action (or event); its ids are
    read from it only if the line is written."""
    return {"about": obj}


def set_log_context(**fields: Any) -> contextvars.Token[Mapping[str, Any]]:
    """Lines logged from now on in this task carry these ids (``org_id``, ``event_id``,
    ``action_id``), until ``reset_log_context(token)``. About 1 µs the pair; a ``with
    log_context()`` costs ~6 µs (a generator)."""
    return _context.set({**_context.get(), **fields})


def reset_log_context(token: contextvars.Token[Mapping[str, Any]]) -> None:
    _context.reset(token)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Lines logged inside (in this task) carry these ids, e.g. ``org_id``, ``event_id``."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ids of LOG_FIELDS known for a record: its own ``extra`` first, then its
    ``about`` object, then the context it was logged in."""
    found: dict[str, Any] = {}
    attrs = record.__dict__
    subject = attrs.get("about")
    context = _context.get()
    for name in LOG_FIELDS:
        value = attrs.get(name)
        if value is None and subject is not None and name in _ABOUT_FIELDS:
            value = getattr(subject, name, None)
        if value is None:
            value = context.get(name)
        if value is not None:
            found[name] = value
    return found


# --- formatters -------------------------------------------------------------------


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, one line a record (a traceback indented below it), escaped."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{self.formatTime(record)} {record.levelname} {record.name}: "
            f"{escape_controls(record.getMessage())}"
        )
        extra = _traceback_text(self, record)
        return f"{line}\n{_escape_block(extra)}" if extra else line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (RFC 3339 UTC, ms), level, logger, msg, ids, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _rfc3339_ms(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in record_fields(record).items():
            line[name] = value if type(value) in (int, str) else str(value)
        extra = _traceback_text(self, record)
        if extra:
            line["exc"] = extra
        encoded = orjson.dumps(line)
        if _JSON_RAW_RE.search(encoded) is not None:
            encoded = _JSON_RAW_RE.sub(_json_escape_raw, encoded)
        return encoded.decode()


def _traceback_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    parts = []
    if record.exc_info:
        if not record.exc_text:
            record.exc_text = formatter.formatException(record.exc_info)
        parts.append(record.exc_text)
    elif record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(formatter.formatStack(record.stack_info))
    return "\n".join(parts)


_last_second: list[Any] = [None, ""]


def _rfc3339_ms(created: float) -> str:
    """``2026-11-28T09:00:00.012Z``; the part up to the second is remembered."""
    ms_total = int(created * 1000)
    second, ms = divmod(ms_total, 1000)
    if _last_second[0] != second:
        _last_second[0] = second
        _last_second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_last_second[1]}.{ms:03d}Z"


# --- rate limiting ------------------------------------------------------------------


@dataclass(slots=True)
class _Kind:
    window_start_s: float
    suppressed: int = 0


class RateLimitFilter(logging.Filter):
    """At most one line per kind per ``interval_s`` from the ``loggers`` (and their
    children) at ``min_level`` and above; the next line written says how many were
    left out. Other records pass after one prefix test.

    Kind: logger name, level and the message template (``record.msg`` before its
    ``%`` arguments), so each distinct error still gets its line.
    """

    def __init__(
        self,
        loggers: tuple[str, ...] = LIBRARY_LOGGERS,
        *,
        interval_s: float = RATE_LIMIT_INTERVAL_S,
        min_level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._names = frozenset(loggers)
        self._children = tuple(f"{name}." for name in loggers)
        self.interval_s = interval_s
        self.min_level = min_level
        self._clock = clock
        self._kinds: dict[tuple[str, int, str], _Kind] = {}
        self.suppressed: dict[str, int] = {}  # logger → lines left out, since start

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return True
        name = record.name
        if name not in self._names and not name.startswith(self._children):
            return True
        template = record.msg if type(record.msg) is str else type(record.msg).__name__
        key = (name, record.levelno, template)
        now = self._clock()
        kind = self._kinds.get(key)
        if kind is None:
            if len(self._kinds) >= _MAX_KINDS:
                self._forget_quiet(now)
            self._kinds[key] = _Kind(now)
            return True
        elapsed = now - kind.window_start_s
        if elapsed < self.interval_s:
            kind.suppressed += 1
            self.suppressed[name] = self.suppressed.get(name, 0) + 1
            return False
        left_out = kind.suppressed
        kind.window_start_s = now
        kind.suppressed = 0
        if left_out:
            try:
                message = record.getMessage()
            except Exception:  # a library's broken arguments: let logging report them
                return True
            record.msg = (
                f"{message} ({left_out} similar line{'s' if left_out != 1 else ''} "
                f"suppressed in the last {elapsed:.0f} s)"
            )
            record.args = None
        return True

    def _forget_quiet(self, now: float) -> None:
        """Drop the kinds whose window is over (their next line would pass anyway)."""
        for key, kind in list(self._kinds.items()):
            if now - kind.window_start_s >= self.interval_s or len(self._kinds) >= _MAX_KINDS:
                del self._kinds[key]


# --- set-up ---------------------------------------------------------------------------

_active_filter: list[RateLimitFilter] = []


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, so that configuring again replaces it and leaves other handlers alone."""


def configure_logging(
    fmt: str = "text", level: str = "INFO", stream: TextIO | None = None
) -> RateLimitFilter:
    """Send every log record to ``stream`` (stderr) in ``fmt``, from ``level`` up, with
    library floods rate-limited; returns the filter (``suppressed`` counts per logger).
    Calling it again (``crmhooks run`` once its config is read) replaces the set-up."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")
    level_name = level.upper()
    if level_name not in LOG_LEVELS:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LOG_LEVELS)}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    handler = _Handler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    limiter = RateLimitFilter()
    handler.addFilter(limiter)
    root.addHandler(handler)
    root.setLevel(level_name)
    # aiokafka's INFO lines are one per connection and rebalance step: noise at INFO.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    _active_filter[:] = [limiter]
    return limiter


def suppressed_counts() -> Mapping[str, int]:
    """Lines left out by the rate limit of the current set-up, per logger (metrics)."""
    return dict(_active_filter[0].suppressed) if _active_filter else {}
