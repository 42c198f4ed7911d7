"""The composition root: wires store, transport, Kafka and the processor, handles signals."""

from __future__ import annotations

import asyncio
import logging
import signal

from crmhooks.admin import Liveness, Readiness, serving
from crmhooks.app import Processor
from crmhooks.clock import SystemClock
from crmhooks.config import Config
from crmhooks.delivery import HttpTransport
from crmhooks.kafka_io import KafkaIO
from crmhooks.logs import suppressed_counts
from crmhooks.metrics import Metrics
from crmhooks.store import Store

log = logging.getLogger(__name__)


async def run_processor(
    config: Config, stop: asyncio.Event | None = None, *, handle_signals: bool = True
) -> None:
    """Run the processor until SIGTERM/SIGINT (or ``stop``), then stop gracefully."""
    stop = stop or asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    clock = SystemClock()
    metrics = Metrics()
    readiness = Readiness()
    liveness = Liveness(readiness)
    metrics.watch(suppressed_log_lines=suppressed_counts)
    # [admin] listen ("" by default: off); the endpoint starts first, so that /readyz
    # says "starting" while Kafka is connected.
    listen = config.admin.listen
    async with (
        serving(listen, metrics, readiness, liveness) as admin,
        Store(config.store.path, clock=clock) as store,
        HttpTransport(
            config.delivery,
            clock,
            proxy=config.delivery.proxy or None,
            allowed_networks=config.delivery.allowed_networks,
        ) as transport,
    ):
        if admin is not None:
            log.info(
                "admin endpoint on http://%s:%d: /metrics /healthz /readyz", admin.host, admin.port
            )
        processor = Processor(
            config, store, transport, clock, metrics=metrics, readiness=readiness, liveness=liveness
        )
        async with KafkaIO(config.kafka, processor.on_revoked, processor.on_assigned) as kio:
            log.info(
                "crmhooks running: %s, %d rules, %d webhooks, event loop %s",
                kio,
                len(config.rules),
                len(config.webhooks),
                type(asyncio.get_running_loop()).__module__.split(".")[0],
            )
            await processor.run(kio, stop)
    log.info("crmhooks stopped: %s", processor.stats | {"store_commits": processor.store.commits})
