"""The composition root: wires store, transport, Kafka and the processor, handles signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from crmhooks.admin import Liveness, Readiness, serving
from crmhooks.app import Processor
from crmhooks.clock import SystemClock
from crmhooks.config import Config
from crmhooks.delivery import HttpTransport
from crmhooks.kafka_documents import ConfigTopicReader, ensure_config_topic
from crmhooks.kafka_io import KafkaIO
from crmhooks.logs import suppressed_counts
from crmhooks.metrics import Metrics
from crmhooks.reload import Reloader
from crmhooks.store import Store

log = logging.getLogger(__name__)


async def run_processor(
    config: Config,
    stop: asyncio.Event | None = None,
    *,
    handle_signals: bool = True,
    config_path: str | Path | None = None,
) -> None:
    """Run the processor until SIGTERM/SIGINT (or ``stop``), then stop gracefully.

    ``config_path``: the file ``config`` was read from, reloaded on SIGHUP and when it
    changes (SPEC §3.1); None: no reloading."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if handle_signals:
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
        also: list[Coroutine[Any, Any, None]] = []
        if config_path is not None:
            reloader = Reloader(config_path, processor.config, processor.config_changed, metrics)
            if handle_signals:
                loop.add_signal_handler(signal.SIGHUP, reloader.request)
            also.append(reloader.loop())
        try:
            await _run(processor, config, stop, readiness, also)
        finally:
            for coroutine in also:
                coroutine.close()  # (not started when something failed before the run)
    log.info("crmhooks stopped: %s", processor.stats | {"store_commits": processor.store.commits})


async def _run(
    processor: Processor,
    config: Config,
    stop: asyncio.Event,
    readiness: Readiness,
    also: list[Coroutine[Any, Any, None]],
) -> None:
    """The config topic caught up (when there is one), then the group joined and run."""
    async with contextlib.AsyncExitStack() as stack:
        documents = processor.documents
        if documents is not None:
            # Every document up to the topic's end in force before the group is
            # joined: no event is planned without its organisation's document.
            topic = config.kafka.config_topic
            await ensure_config_topic(config.kafka, topic)
            held = await documents.open()
            log.info("config topic %s: %d organisations' documents in the store", topic, held)
            source = await stack.enter_async_context(ConfigTopicReader(config.kafka, topic))
            await documents.catch_up(source, stop, readiness)
            also.append(documents.follow())
        kio = await stack.enter_async_context(
            KafkaIO(config.kafka, processor.on_revoked, processor.on_assigned)
        )
        log.info(
            "crmhooks running: %s, %d rules, %d webhooks, event loop %s",
            kio,
            len(config.rules),
            len(config.webhooks),
            type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        await processor.run(kio, stop, also)
