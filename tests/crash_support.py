"""Crash-test support: the processor as a subprocess, and a receiver that fails first attempts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from aiohttp import web

from crmhooks.config import KafkaSettings
from tests.support import serve


@dataclass(frozen=True, slots=True)
class Hit:
    """One request the receiver got."""

    path: str
    webhook_id: str
    body: bytes
    status: int


@dataclass
class FlakyReceiver:
    """Records every request; the first request of each webhook-id in ``fail_first`` gets 500."""

    fail_first: frozenset[str] = frozenset()
    url: str = ""
    hits: list[Hit] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def answer(self, webhook_id: str) -> int:
        first = webhook_id not in self.seen
        self.seen.add(webhook_id)
        return 500 if first and webhook_id in self.fail_first else 200


@asynccontextmanager
async def flaky_receiver(fail_first: frozenset[str]) -> AsyncIterator[FlakyReceiver]:
    """A FlakyReceiver listening on 127.0.0.1 (port 0) in the running event loop."""
    rx = FlakyReceiver(fail_first=fail_first)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        webhook_id = request.headers.get("webhook-id", "")
        status = rx.answer(webhook_id)
        rx.hits.append(Hit(request.path, webhook_id, body, status))
        return web.Response(status=status)

    async with serve(handle) as url:
        rx.url = url
        yield rx


def _q(value: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML escapes)."""
    return json.dumps(value)


def crash_config_toml(
    kafka: KafkaSettings,
    store_path: Path,
    receiver_url: str,
    orgs: Sequence[str],
    *,
    offset: str,
    retry_delay_s: float,
) -> str:
    """One rule with an instant webhook (``/now``) and a scheduled one (``/later``)."""
    org_tables = "".join(
        f'\n[[orgs]]\nid = {_q(org)}\nusers = 1000\ntime_zone = "Europe/Berlin"\n' for org in orgs
    )
    body = _q('{"ref": "${Potentials.Ref}"}')
    return f"""
[kafka]
bootstrap_servers = {_q(kafka.bootstrap_servers)}
group_id = {_q(kafka.group_id)}
events_topic = {_q(kafka.events_topic)}
results_topic = {_q(kafka.results_topic)}
dlq_topic = {_q(kafka.dlq_topic)}
partitions = {kafka.partitions}
session_timeout_ms = 6000  # the broker's minimum: the restart takes over sooner

[store]
path = {_q(str(store_path))}

[delivery]
allow_private_networks = true
retry_delays_s = [{retry_delay_s}]
# Never suspend: a failure is a bug here, and a suspension would hide the actions after it.
suspend_after_failed_actions = 0
shutdown_grace_s = 5

[quota]
# Far above the test's few hundred requests: quota is not under test here.
daily_limit = 1000000
per_user = 1000000
{org_tables}
[[webhooks]]
name = "Now"
url = {_q(receiver_url + "/now")}
module = "Potentials"
  [webhooks.body]
  format = "json"
  template = {body}

[[webhooks]]
name = "Later"
url = {_q(receiver_url + "/later")}
module = "Potentials"
  [webhooks.body]
  format = "json"
  template = {body}

[[rules]]
id = "crash"
module = "Potentials"
trigger = "create_or_edit"
repeat = "every"
criteria = {{ all = [ {{ field = "Stage", op = "is", value = "Closed Won" }} ] }}
instant = "Now"

  [[rules.scheduled]]
  webhook = "Later"
  relative_to = "trigger"
  offset = {_q(offset)}
"""


_REPO = str(Path(__file__).resolve().parent.parent)


@dataclass
class ProcessorProcess:
    """``crmhooks run`` in a subprocess; its stdout and stderr go to ``log_path``."""

    config_path: Path
    log_path: Path
    bootstrap_servers: str
    # What runs `crmhooks run`: python's arguments before it (a test's launcher that
    # wraps the CLI, e.g. tests/store_fault_run.py, with the repository on PYTHONPATH).
    launcher: Sequence[str] = ("-m", "crmhooks.cli")
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    _log: IO[bytes] | None = None

    async def start(self) -> None:
        env = {**os.environ, "CRMHOOKS_BOOTSTRAP_SERVERS": self.bootstrap_servers}
        env.pop("CRMHOOKS_STORE_PATH", None)  # the store is the one in the config file
        if tuple(self.launcher[1:2]) != ("crmhooks.cli",):  # a launcher of the tests package
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), _REPO]))
        self._log = self.log_path.open("ab")
        self.started_at = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *self.launcher,
            "run",
            "--config",
            str(self.config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        """SIGKILL, as a crash would: no cleanup of any kind runs in the process."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self._reap()

    async def terminate(self, timeout_s: float) -> int | None:
        """SIGTERM; the exit status, or None when it did not exit within ``timeout_s``."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            return None
        await self._reap()
        return self.proc.returncode

    async def _reap(self) -> None:
        if self.proc is not None:
            await self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    async def close(self) -> None:
        """Make sure nothing is left behind (for ``finally``)."""
        await self.kill()

    def log_lines(self) -> int:
        """Lines the process logged so far."""
        try:
            with self.log_path.open("rb") as f:
                return sum(1 for _ in f)
        except OSError:
            return 0

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
