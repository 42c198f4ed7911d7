"""Prometheus metrics: plain counters on the hot path, exposed by prometheus-client at scrape.

The processor bumps plain ints in our own objects (``Counts.inc``: ~0.1 µs,
``Buckets.observe``: ~0.25 µs) instead of prometheus-client's own metrics
(``Counter.inc`` ~0.4 µs, ``Histogram.observe`` ~1.1 µs: each takes a lock,
and an instant delivery costs ~65 µs of CPU in all). At scrape time a
``prometheus_client.registry.Collector`` turns them into the library's
``CounterMetricFamily``/``HistogramMetricFamily``/``GaugeMetricFamily``, and the
library writes the exposition format. Gauges of state (pending actions,
suspensions, consumer lag) are read through callbacks at scrape time only.

Everything here is touched from the event loop's thread only (the admin endpoint
scrapes on the same loop), so nothing takes a lock.

No label carries an organisation, a record, a rule or a URL: label values come
from the code's own fixed sets (statuses, error classes, error codes), so the
number of series is bounded whatever the events hold (SPEC §12).
"""

from __future__ import annotations

import bisect
import logging
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from crmhooks import __version__

log = logging.getLogger(__name__)

# The label values each family shows from the start, at 0, so that a dashboard's
# rate() has a series before the first event of that kind (SPEC §7, §8).
EVENT_OUTCOMES: Final = ("planned", "ignored", "dead_lettered")
RESULT_STATUSES: Final = (
    "scheduled",
    "delivered",
    "retrying",
    "failed",
    "cancelled",
    "skipped",
    "quota_exceeded",
    "suspended",
)
DEAD_LETTER_CODES: Final = ("internal_process_error", "daily_limit_reached", "invalid_config")
ALERT_TYPES: Final = ("webhook_suspended", "daily_limit_reached")
# dropped: not sent because too many were waiting, or the process stopped (alerts.py).
ALERT_OUTCOMES: Final = ("sent", "failed", "dropped")
RELOAD_OUTCOMES: Final = ("applied", "refused")

# Request times (s): from a fast receiver on the same network (~5 ms) to the
# default total timeout (15 s) and a raised one (30, 60 s).
DELIVERY_BUCKETS_S: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0,
)  # fmt: skip
# How late a timer fired (s): a loaded loop is late by milliseconds; timers that
# fell due while crmhooks was down fire at once after start, hours late.
LATENESS_BUCKETS_S: Final = (
    0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip

# Every family this module defines: the dashboard and the docs may name no other.
FAMILIES: Final = (
    "crmhooks_events_total",
    "crmhooks_actions_total",
    "crmhooks_delivery_seconds",
    "crmhooks_pending_actions",
    "crmhooks_consumer_lag",
    "crmhooks_timer_lateness_seconds",
    "crmhooks_dead_letters_total",
    "crmhooks_suspended_webhooks",
    "crmhooks_config_documents",
    "crmhooks_alerts_total",
    "crmhooks_config_reloads_total",
    "crmhooks_offset_commit_failures_total",
    "crmhooks_store_commits_total",
    "crmhooks_requests_in_flight",
    "crmhooks_log_lines_suppressed_total",
    "crmhooks_build_info",
)

IntSource = Callable[[], int]


class Counts:
    """Counters by one label: ``inc(value)`` is a dict update, read at scrape time."""

    __slots__ = ("values",)

    def __init__(self, initial: Iterable[str] = ()) -> None:
        self.values: dict[str, int] = dict.fromkeys(initial, 0)

    def inc(self, label: str, n: int = 1) -> None:
        values = self.values
        values[label] = values.get(label, 0) + n

    def __getitem__(self, label: str) -> int:
        return self.values.get(label, 0)

    def __repr__(self) -> str:
        return f"Counts({self.values})"


class Buckets:
    """One histogram's counts per bucket (not cumulative) and its sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound falls in that bound's bucket (le=).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as the exposition wants them, +Inf last."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else _le(bound), float(total)))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


class LabelledBuckets:
    """Histograms by one label, each made on its label value's first observation."""

    __slots__ = ("bounds", "by_label")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.by_label: dict[str, Buckets] = {}

    def observe(self, label: str, value: float) -> None:
        found = self.by_label.get(label)
        if found is None:
            found = self.by_label[label] = Buckets(self.bounds)
        found.observe(value)


class ConsumerLag:
    """Records behind, per partition: the end offset the consumer last saw (the last
    stable offset under read_committed, else the high watermark) minus the offset
    committed. Ends come from ``ends`` (KafkaIO.end_offsets_seen), read at scrape;
    committed offsets from the processor (``assigned``, ``committed_now``)."""

    __slots__ = ("committed", "ends")

    def __init__(self) -> None:
        self.committed: dict[int, int] = {}
        # Partition → end offset, for the assigned partitions fetched at least once.
        self.ends: Callable[[], Mapping[int, int]] = dict

    def assigned(self, committed: Mapping[int, int | None]) -> None:
        """Partitions handed to this process, with the group's committed offset of each
        (None: the group never committed it, so its lag counts from offset 0)."""
        for partition, offset in committed.items():
            self.committed[partition] = offset or 0

    def revoked(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self.committed.pop(partition, None)

    def committed_now(self, offsets: Mapping[int, int]) -> None:
        """A commit of ``partition → next offset`` succeeded."""
        committed = self.committed
        for partition, offset in offsets.items():
            if partition in committed and offset > committed[partition]:
                committed[partition] = offset

    def sample(self) -> dict[int, int]:
        """Partition → lag, for partitions with both offsets known."""
        committed = self.committed
        return {p: max(0, end - committed[p]) for p, end in self.ends().items() if p in committed}


class Metrics:
    """The process's metrics, and the registry that exposes them (not prometheus-client's
    global one: several processors in one test process each have their own).

    The processor calls, on the hot path: ``actions.inc(status)`` per result record,
    ``delivery.observe(error_class or "none", seconds)`` per request sent,
    ``timer_lateness.observe(seconds)`` per scheduled action or retry fired;
    per batch: ``events.inc("planned"|"ignored"|"dead_lettered", n)``; and
    ``dead_letters.inc(error_code)``, ``alert(type, outcome)``,
    ``config_reloads.inc(outcome)``, ``commit_failures += 1`` when those happen.
    Gauges are callbacks given to ``watch``; consumer lag is ``lag``.
    """

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.events = Counts(EVENT_OUTCOMES)
        self.actions = Counts(RESULT_STATUSES)
        self.dead_letters = Counts(DEAD_LETTER_CODES)
        self.alerts = Counts(f"{t}:{o}" for t in ALERT_TYPES for o in ALERT_OUTCOMES)
        self.config_reloads = Counts(RELOAD_OUTCOMES)
        self.commit_failures = 0
        self.delivery = LabelledBuckets(DELIVERY_BUCKETS_S)
        self.timer_lateness = Buckets(LATENESS_BUCKETS_S)
        self.lag = ConsumerLag()
        self._sources: dict[str, IntSource] = {}
        self._suppressed: Callable[[], Mapping[str, int]] = dict
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        if process_metrics:  # CPU, memory, open files of this process; the Python version
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)

    def __repr__(self) -> str:
        return f"Metrics(events={self.events.values}, actions={self.actions.values})"

    def alert(self, kind: str, outcome: str) -> None:
        """An administrator alert of ``kind`` (webhook_suspended, ...) was sent, failed or
        was dropped."""
        self.alerts.inc(f"{kind}:{outcome}")

    def watch(
        self,
        *,
        pending_actions: IntSource | None = None,
        suspended_webhooks: IntSource | None = None,
        config_documents: IntSource | None = None,
        requests_in_flight: IntSource | None = None,
        store_commits: IntSource | None = None,
        suppressed_log_lines: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        """Where the gauges read their values at scrape time (each optional; a family
        without a source is exposed with no sample rather than a made-up 0)."""
        given = {
            "pending_actions": pending_actions,
            "suspended_webhooks": suspended_webhooks,
            "config_documents": config_documents,
            "requests_in_flight": requests_in_flight,
            "store_commits": store_commits,
        }
        self._sources.update({k: v for k, v in given.items() if v is not None})
        if suppressed_log_lines is not None:
            self._suppressed = suppressed_log_lines

    def _read(self, name: str) -> int | None:
        source = self._sources.get(name)
        if source is None:
            return None
        try:
            return source()
        except Exception:  # a scrape must never fail as a whole for one gauge
            log.exception("metrics: reading %s failed", name)
            return None


class _Collector:
    """Builds the library's metric families from ``Metrics`` at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> Iterable[Metric]:
        return list(self._families(with_samples=False))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(with_samples=True))

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        m = self.m
        yield _counter(
            "crmhooks_events",
            "Events read from the events topic, by what became of them",
            "outcome",
            m.events.values if with_samples else {},
        )
        yield _counter(
            "crmhooks_actions",
            "Result records written, by status (one per state change of an action)",
            "status",
            m.actions.values if with_samples else {},
        )
        delivery = HistogramMetricFamily(
            "crmhooks_delivery_seconds",
            "Time of each request sent, by error_class (none: delivered)",
            labels=["error_class"],
        )
        if with_samples:
            for label, buckets in sorted(m.delivery.by_label.items()):
                delivery.add_metric([label], buckets.cumulative(), buckets.sum)
        yield delivery
        lateness = HistogramMetricFamily(
            "crmhooks_timer_lateness_seconds",
            "How long after its due time a scheduled action or retry was fired",
            labels=[],
        )
        if with_samples:
            lateness.add_metric([], m.timer_lateness.cumulative(), m.timer_lateness.sum)
        yield lateness
        yield _counter(
            "crmhooks_dead_letters",
            "Dead letters written, by error_code",
            "error_code",
            m.dead_letters.values if with_samples else {},
        )
        alerts = CounterMetricFamily(
            "crmhooks_alerts",
            "Administrator alerts, by type and outcome (sent, failed, dropped)",
            labels=["type", "outcome"],
        )
        if with_samples:
            for key, n in sorted(m.alerts.values.items()):
                kind, _, outcome = key.partition(":")
                alerts.add_metric([kind, outcome], n)
        yield alerts
        yield _counter(
            "crmhooks_config_reloads",
            "Config reloads (SIGHUP, file change), by outcome (applied, refused)",
            "outcome",
            m.config_reloads.values if with_samples else {},
        )
        commit_failures = CounterMetricFamily(
            "crmhooks_offset_commit_failures",
            "Offset commits that failed (retried with the next)",
        )
        if with_samples:
            commit_failures.add_metric([], m.commit_failures)
        yield commit_failures
        store_commits = CounterMetricFamily(
            "crmhooks_store_commits", "Transactions committed to the SQLite store"
        )
        if with_samples and (commits := m._read("store_commits")) is not None:
            store_commits.add_metric([], commits)
        yield store_commits
        for name, text in (
            ("pending_actions", "Actions stored and not finished (scheduled, or awaiting a retry)"),
            ("suspended_webhooks", "Suspended (organisation, rule, webhook) triples"),
            ("config_documents", "Organisation documents in force from the config topic"),
            ("requests_in_flight", "Webhook requests sent and not yet answered"),
        ):
            gauge = GaugeMetricFamily(f"crmhooks_{name}", text)
            if with_samples and (value := m._read(name)) is not None:
                gauge.add_metric([], value)
            yield gauge
        lag = GaugeMetricFamily(
            "crmhooks_consumer_lag",
            "Events not yet committed, per partition of the events topic owned here",
            labels=["partition"],
        )
        if with_samples:
            try:
                sampled = m.lag.sample()
            except Exception:
                log.exception("metrics: reading the consumer lag failed")
                sampled = {}
            for partition, behind in sorted(sampled.items()):
                lag.add_metric([str(partition)], behind)
        yield lag
        suppressed = CounterMetricFamily(
            "crmhooks_log_lines_suppressed",
            "Repeated library log lines not written (rate limit), by logger",
            labels=["logger"],
        )
        if with_samples:
            for logger, n in sorted(m._suppressed().items()):
                suppressed.add_metric([logger], n)
        yield suppressed
        info = GaugeMetricFamily(
            "crmhooks_build_info", "Always 1: the running version", labels=["version", "python"]
        )
        if with_samples:
            info.add_metric([__version__, platform.python_version()], 1)
        yield info


def _counter(name: str, text: str, label: str, values: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, text, labels=[label])
    for value, n in sorted(values.items()):
        family.add_metric([value], n)
    return family
