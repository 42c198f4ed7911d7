"""Secret references: ``${env:NAME}`` and ``${file:PATH}`` resolved once, when the config loads.

A missing variable or an unreadable file is an error naming the item and the
variable or the path, never a value (SPEC §3.1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from crmhooks.config.problems import Problems

REFERENCE_RE = re.compile(r"\$\{(env|file):([^}]*)\}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MARKS = ("${env:", "${file:")

NOT_HERE = (
    "${env:...} and ${file:...} are only allowed in what a request sends "
    "and in the [kafka] SASL/SSL settings"
)
# A config-topic document is written by whoever may write the topic (a CRM backend
# passing on what its tenants' administrators typed): were its references read, a
# document could send this process's environment and files (the Kafka password, a
# key file, another tenant's secret) to a URL of its own choosing.
NOT_IN_DOCUMENTS = (
    "${env:...} and ${file:...} are not read in a config-topic document (they would "
    "hand this process's environment and files to whoever writes the topic): "
    "write the value itself, it is kept as a secret"
)


def has_reference(text: str) -> bool:
    """Whether ``text`` holds (or starts) a secret reference."""
    return "${" in text and any(mark in text for mark in _MARKS)


class References:
    """Resolves references for one load; each file is read once however often it is named."""

    __slots__ = ("_env", "_files", "_problems", "_readable", "_refused")

    def __init__(
        self, env: Mapping[str, str], problems: Problems, *, readable: bool = True
    ) -> None:
        """``readable`` False: every reference is an error (a config-topic document)."""
        self._env = env
        self._problems = problems
        self._files: dict[str, str | None] = {}  # path → content, None: unreadable
        self._readable = readable
        self._refused: set[str] = set()  # paths already told (one error an item)

    def resolve(self, path: str, text: str, into: dict[str, str] | None = None) -> tuple[str, bool]:
        """``text`` with every reference replaced by its value; True when it had one.

        Used where values are stored resolved (custom_params, secret, auth, [kafka]);
        ``into`` (when given) also gets each reference's value, as ``collect`` does.
        """
        if "${" not in text:
            return text, False
        found = False

        def replace(match: re.Match[str]) -> str:
            nonlocal found
            found = True
            value = self._value(path, match.group(1), match.group(2))
            if value is not None and into is not None:
                into[f"{match.group(1)}:{match.group(2)}"] = value
            return value or ""

        resolved = REFERENCE_RE.sub(replace, text)
        self._check_terminated(path, REFERENCE_RE.sub("", text))
        return resolved, found

    def collect(self, path: str, text: str, into: dict[str, str]) -> None:
        """Add the value of every reference in template ``text`` to ``into``.

        Keyed by the text inside the braces (``"env:NAME"``): templates keep the
        reference as written and look its value up there.
        """
        if "${" not in text:
            return
        for match in REFERENCE_RE.finditer(text):
            key = f"{match.group(1)}:{match.group(2)}"
            if key not in into:
                value = self._value(path, match.group(1), match.group(2))
                if value is not None:
                    into[key] = value
        self._check_terminated(path, REFERENCE_RE.sub("", text))

    def _check_terminated(self, path: str, rest: str) -> None:
        for mark in _MARKS:
            if mark in rest:
                self._problems.add(path, f"unterminated {mark}...}}")

    def _value(self, path: str, kind: str, argument: str) -> str | None:
        if not self._readable:
            if path not in self._refused:
                self._refused.add(path)
                self._problems.add(path, NOT_IN_DOCUMENTS)
            return None
        if kind == "env":
            if not _ENV_NAME_RE.fullmatch(argument):
                self._problems.add(path, f"invalid environment variable name {argument!r}")
                return None
            value = self._env.get(argument)
            if value is None:
                self._problems.add(path, f"environment variable {argument} is not set")
            return value
        if not argument.strip():
            self._problems.add(path, "${file:PATH} needs a path")
            return None
        if argument not in self._files:
            self._files[argument] = self._read(path, argument)
        elif self._files[argument] is None:
            self._problems.add(path, f"file {argument} cannot be read")
        return self._files[argument]

    def _read(self, path: str, file: str) -> str | None:
        try:
            content = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            self._problems.add(path, f"file {file} cannot be read: {exc.strerror or exc}")
            return None
        except UnicodeDecodeError:
            self._problems.add(path, f"file {file} is not UTF-8 text")
            return None
        # Secret files are usually written by `echo` or an editor: one final newline
        # is not part of the secret.
        if content.endswith("\r\n"):
            return content[:-2]
        return content.removesuffix("\n")
