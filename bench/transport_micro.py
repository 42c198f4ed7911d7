"""Micro-benchmark of the webhook client: CPU µs per request of ``HttpTransport``.

    .venv/bin/python -m bench.transport_micro [REQUESTS]

Starts the bench's sink (``bench.sink``) in its own process, sends REQUESTS
(default 40,000) POSTs of the bench's body through one ``HttpTransport`` under
uvloop, 64 in flight, once to warm up and once measured, and prints this
process's CPU per request. Compare two versions of ``src/`` by running it with
``PYTHONPATH`` set to the other one's ``src``. The sink answers ~50k requests/s
on this machine: the rate printed is the sink's as much as ours.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

import crmhooks
from crmhooks.clock import SystemClock
from crmhooks.config import DeliverySettings
from crmhooks.delivery import HttpTransport
from crmhooks.templates import RenderedRequest

try:
    from crmhooks.endpoints import PLAIN

    NO_OPTIONS: Any = PLAIN
except ImportError:  # a src/ from before endpoints.py, for A/B: send took the secret
    NO_OPTIONS = None

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = 64
BODY = b'{"deal":"Deal 1","amount":25000,"owner":"Ana Silva","t":0}'


async def measure(port: int, total: int) -> tuple[float, float]:
    """(CPU µs per request, requests per second) of ``total`` requests, after as many."""
    settings = DeliverySettings(allow_private_networks=True, max_in_flight_per_host=CONCURRENCY)
    request = RenderedRequest(
        method="POST",
        url=f"http://127.0.0.1:{port}/hook",
        headers={"Content-Type": "application/json"},
        body=BODY,
        redacted_url=f"http://127.0.0.1:{port}/hook",
    )
    async with HttpTransport(settings, SystemClock()) as transport:
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while sent < total:
                sent += 1
                outcome = await transport.send(f"micro-{sent}", request, NO_OPTIONS)
                if not outcome.delivered:
                    raise RuntimeError(f"not delivered: {outcome}")

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))  # warm up
        sent = 0
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return (time.process_time() - cpu) * 1e6 / total, total / (time.monotonic() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("requests", type=int, nargs="?", default=40_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        sink = subprocess.Popen(
            [sys.executable, "-m", "bench.sink", "--port-file", str(port_file)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            for _ in range(200):
                if port_file.exists() and port_file.read_text().strip():
                    break
                time.sleep(0.05)
            else:
                raise SystemExit("the sink did not start")
            cpu_us, rate = uvloop.run(measure(int(port_file.read_text()), args.requests))
        finally:
            sink.terminate()
            sink.wait()
    print(f"{Path(crmhooks.__file__).parent}: {cpu_us:.2f} µs of CPU a request, {rate:,.0f}/s")


if __name__ == "__main__":
    main()
