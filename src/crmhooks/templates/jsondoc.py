"""JSON body templates: each placeholder in a string or as a whole value, and its encoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final
from zoneinfo import ZoneInfo

from crmhooks.errors import TemplateError
from crmhooks.templates.formatting import (
    Encoder,
    format_value,
    json_string,
    json_value,
    needs_json_escape,
)
from crmhooks.templates.placeholders import Span


def json_in_string(value: Any, tz: ZoneInfo) -> str:
    """A value escaped for the inside of a JSON string literal (without the quotes)."""
    text = format_value(value, tz)
    return json_string(text)[1:-1] if needs_json_escape(text) else text


_JSON_WS: Final = " \t\r\n"


def json_contexts(text: str, spans: Sequence[Span]) -> list[Encoder]:
    """The encoder for each placeholder of a JSON template: inside a string or a whole value."""
    encoders: list[Encoder] = []
    starts = {start: end for start, end, _ in spans}
    stack: list[str] = []
    expect_key = False
    in_string = in_key = False
    # The last significant token outside strings: "" (start), a char, or "$" (a placeholder).
    last = ""
    i, n = 0, len(text)
    while i < n:
        end = starts.get(i)
        if end is not None:
            written = text[i:end]
            if in_string:
                if in_key:
                    raise TemplateError(f"placeholder {written} inside a JSON object key")
                encoders.append(json_in_string)
            else:
                if expect_key and stack and stack[-1] == "{":
                    raise TemplateError(f"placeholder {written} as a JSON object key")
                j = end
                while j < n and text[j] in _JSON_WS:
                    j += 1
                if last not in ("", "[", ":", ",") or (j < n and text[j] not in ",]}"):
                    raise TemplateError(
                        f"placeholder {written} outside a JSON string must be a whole value"
                    )
                encoders.append(json_value)
                last = "$"
            i = end
            continue
        ch = text[i]
        if in_string:
            if ch == "\\":
                if i + 1 in starts:
                    raise TemplateError(
                        f"placeholder {text[i + 1 : starts[i + 1]]} after a backslash"
                    )
                i += 2
                continue
            if ch == '"':
                in_string = False
                last = '"'
        elif ch == '"':
            in_string = True
            in_key = expect_key and bool(stack) and stack[-1] == "{"
        elif ch not in _JSON_WS:
            if ch in "{[":
                stack.append(ch)
                expect_key = ch == "{"
            elif ch in "}]":
                if stack:
                    stack.pop()
                expect_key = False
            elif ch == ",":
                expect_key = bool(stack) and stack[-1] == "{"
            elif ch == ":":
                expect_key = False
            last = ch
        i += 1
    return encoders
