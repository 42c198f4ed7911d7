"""The admin endpoint (SPEC §12): ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP.

An aiohttp server on the processor's own event loop (``[admin] listen``, "" = off):

- ``GET /metrics``: the registry of ``Metrics``, in the format the scraper asks
  for (Prometheus text, or OpenMetrics), written by prometheus-client.
- ``GET /healthz`` (liveness): 200 while the process runs its loop. Answering at
  all shows the event loop is responsive (a blocked loop answers nothing, and the
  probe times out); 503 when the processor's loop has ended or has not turned for
  ``stall_after_s`` outside a restore (``Liveness``). A restart helps then.
- ``GET /readyz`` (readiness): 200 once the group gave this process its
  partitions and their state is restored from the changelog; 503 before, during a
  restore or a rebalance, and while stopping, with the reason as the body
  (``Readiness``). A restart does not help then: wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import time
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any, Final

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from crmhooks.errors import AdminError
from crmhooks.metrics import Metrics

# How long the processor's loop may go without a turn before /healthz fails. A turn
# is a fetch (at most 200 ms when idle) and its batch; waits for the store's write
# lock end within ~10 s, over-budget waits within a request timeout. Two minutes is
# far past all of them, yet a stuck process is restarted within a few probe periods.
STALL_AFTER_S: Final = 120.0
# The event loop's own check: a task that wakes up this often and notes how late.
LOOP_CHECK_EVERY_S: Final = 1.0


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"``, ``"0.0.0.0:9464"``, ``"[::1]:9464"``, ``"localhost:0"`` →
    (host, port); ValueError naming the text otherwise. Port 0: any free port."""
    example = 'expected HOST:PORT such as "127.0.0.1:9464" ("" turns the endpoint off)'
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"listen {text!r}: {example}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"listen {text!r}: port {port} is not below 65536")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"listen {text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"listen {text!r}: write an IPv6 address in brackets, [{host}]:{port}")
    return host, port


class Readiness:
    """Whether the processor is ready, and why not; the processor sets it as it goes.

    Starting → (partitions assigned) restoring → ready; a rebalance or a stop makes
    it not ready again. An empty assignment is ready: the group has more processes
    than partitions, and this one waits for a partition as a spare."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ready = False
        self._reason = "starting: not connected to Kafka yet"
        self._since_s = clock()

    def __repr__(self) -> str:
        return f"Readiness({self.status()})"

    def _set(self, ready: bool, reason: str) -> None:
        self._ready, self._reason, self._since_s = ready, reason, self._clock()

    def set_waiting(self) -> None:
        """Connected and subscribed; the group has not assigned partitions yet."""
        self._set(False, "no partitions assigned yet: waiting for the consumer group")

    def set_rebalancing(self) -> None:
        """Partitions revoked: a new assignment is coming."""
        self._set(False, "rebalancing: partitions revoked, waiting for the new assignment")

    def set_restoring(self, partitions: Iterable[int]) -> None:
        self._set(False, f"restoring partitions {sorted(partitions)} from the changelog")

    def set_ready(self, partitions: Iterable[int]) -> None:
        owned = sorted(partitions)
        if owned:
            self._set(True, f"ready: partitions {owned}")
        else:
            self._set(True, "ready: no partitions assigned (more processes than partitions)")

    def set_not_ready(self, reason: str) -> None:
        self._set(False, reason)

    def set_stopping(self) -> None:
        self._set(False, "stopping")

    @property
    def restoring(self) -> bool:
        return self._reason.startswith(("restoring", "starting"))

    def status(self) -> tuple[bool, str]:
        """(ready, reason); the reason says for how long when not ready."""
        if self._ready:
            return True, self._reason
        return False, f"{self._reason} (for {self._clock() - self._since_s:.0f} s)"


class Liveness:
    """Whether the processor's loop is alive: ``beat()`` each turn, ``died(reason)``
    when it ends other than by a stop (``watch(task)`` does that for a task)."""

    def __init__(
        self,
        readiness: Readiness | None = None,
        *,
        stall_after_s: float = STALL_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._readiness = readiness
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._last_beat_s: float | None = None
        self._death: str | None = None
        self.loop_lateness_s = 0.0  # how late the loop check woke up, last time

    def __repr__(self) -> str:
        return f"Liveness({self.status()})"

    def beat(self) -> None:
        self._last_beat_s = self._clock()

    def died(self, reason: str) -> None:
        self._death = reason

    def watch(self, task: asyncio.Task[Any]) -> None:
        """The task is the processor's loop: its end by an error is a death."""
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.died(f"{type(exc).__name__}: {exc}")

    def status(self) -> tuple[bool, str]:
        if self._death is not None:
            return False, f"processor loop ended: {self._death}"
        if self._last_beat_s is not None:
            quiet_s = self._clock() - self._last_beat_s
            restoring = self._readiness is not None and self._readiness.restoring
            if quiet_s > self.stall_after_s and not restoring:
                return False, f"processor loop has not turned for {quiet_s:.0f} s"
        return True, f"alive (event loop {self.loop_lateness_s * 1000:.0f} ms late)"


class AdminServer:
    """``async with AdminServer(listen, metrics, readiness, liveness) as admin:`` serves
    until the block ends; ``admin.port`` is the port bound (``listen`` may say 0)."""

    def __init__(
        self, listen: str, metrics: Metrics, readiness: Readiness, liveness: Liveness
    ) -> None:
        try:
            self.host, self.port = parse_listen(listen)
        except ValueError as exc:
            raise AdminError(f"[admin] {exc}") from None
        self.listen = listen
        self.metrics = metrics
        self.readiness = readiness
        self.liveness = liveness
        self._runner: web.AppRunner | None = None
        self._loop_check: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"AdminServer({self.host}:{self.port})"

    async def __aenter__(self) -> AdminServer:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise AdminError(f"[admin] listen {self.listen!r}: cannot listen: {why}") from None
        self._runner = runner
        for address in runner.addresses:
            self.port = int(address[1])
            break
        self._loop_check = asyncio.create_task(self._check_loop(), name="admin-loop-check")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop_check is not None:
            self._loop_check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_check
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LOOP_CHECK_EVERY_S)
            self.liveness.loop_lateness_s = max(0.0, loop.time() - start - LOOP_CHECK_EVERY_S)

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(self.metrics.registry)
        # content_type carries parameters (version, charset): set the header whole.
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        alive, reason = self.liveness.status()
        return web.Response(status=200 if alive else 503, text=reason + "\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, reason = self.readiness.status()
        return web.Response(status=200 if ready else 503, text=reason + "\n")


@contextlib.asynccontextmanager
async def serving(
    listen: str, metrics: Metrics, readiness: Readiness, liveness: Liveness
) -> AsyncIterator[AdminServer | None]:
    """The admin endpoint for the block's duration; none when ``listen`` is ""."""
    if not listen:
        yield None
        return
    async with AdminServer(listen, metrics, readiness, liveness) as server:
        yield server
