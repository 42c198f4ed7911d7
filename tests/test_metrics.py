"""Metrics: our counters and buckets, exposed through prometheus-client's own format."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from crmhooks.metrics import (
    DELIVERY_BUCKETS_S,
    FAMILIES,
    RESULT_STATUSES,
    Buckets,
    ConsumerLag,
    Metrics,
)


def scrape(metrics: Metrics) -> dict[str, Any]:
    """Family name → {labels tuple → value} of every sample, as Prometheus would read it."""
    text = generate_latest(metrics.registry).decode()
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        samples = out.setdefault(family.name, {})
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def family_names(metrics: Metrics) -> set[str]:
    text = generate_latest(metrics.registry).decode()
    return {
        line.split()[2]
        for line in text.splitlines()
        if line.startswith("# TYPE ") and line.split()[2].startswith("crmhooks_")
    }


def test_every_family_of_spec_12_is_exposed_before_anything_happened() -> None:
    names = family_names(Metrics(process_metrics=False))
    # The exposition names counters with their _total suffix in the TYPE line too.
    assert names == set(FAMILIES)
    for required in (
        "crmhooks_events_total",
        "crmhooks_actions_total",
        "crmhooks_delivery_seconds",
        "crmhooks_pending_actions",
        "crmhooks_consumer_lag",
        "crmhooks_timer_lateness_seconds",
        "crmhooks_dead_letters_total",
        "crmhooks_suspended_webhooks",
        "crmhooks_config_documents",
    ):
        assert required in names


def test_counters_start_at_zero_for_every_status_and_count_what_is_reported() -> None:
    m = Metrics(process_metrics=False)
    for _ in range(3):
        m.actions.inc("delivered")
    m.actions.inc("retrying")
    m.events.inc("planned", 500)
    m.events.inc("ignored", 20)
    m.dead_letters.inc("daily_limit_reached")
    m.alert("webhook_suspended", "sent")
    m.commit_failures += 2
    got = scrape(m)
    actions = got["crmhooks_actions"]
    assert {labels[0][1] for _, labels in actions} == set(RESULT_STATUSES)
    assert actions[("crmhooks_actions_total", (("status", "delivered"),))] == 3
    assert actions[("crmhooks_actions_total", (("status", "retrying"),))] == 1
    assert actions[("crmhooks_actions_total", (("status", "failed"),))] == 0
    events = got["crmhooks_events"]
    assert events[("crmhooks_events_total", (("outcome", "planned"),))] == 500
    assert events[("crmhooks_events_total", (("outcome", "ignored"),))] == 20
    assert events[("crmhooks_events_total", (("outcome", "dead_lettered"),))] == 0
    letters = got["crmhooks_dead_letters"]
    assert letters[("crmhooks_dead_letters_total", (("error_code", "daily_limit_reached"),))] == 1
    alerts = got["crmhooks_alerts"]
    key = ("crmhooks_alerts_total", (("outcome", "sent"), ("type", "webhook_suspended")))
    assert alerts[key] == 1
    assert got["crmhooks_offset_commit_failures"] == {
        ("crmhooks_offset_commit_failures_total", ()): 2
    }


@given(
    st.lists(
        st.one_of(
            st.sampled_from(DELIVERY_BUCKETS_S),  # exactly on a bound: le= includes it
            st.floats(min_value=0, max_value=120, allow_nan=False),
        ),
        max_size=40,
    )
)
def test_our_buckets_expose_what_the_librarys_histogram_would(values: list[float]) -> None:
    ours = Metrics(process_metrics=False)
    registry = CollectorRegistry()
    theirs = Histogram(
        "crmhooks_delivery_seconds", "x", ["error_class"], buckets=DELIVERY_BUCKETS_S,
        registry=registry,
    )  # fmt: skip
    for v in values:
        ours.delivery.observe("none", v)
        theirs.labels("none").observe(v)
    expected = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
        if not s.name.endswith("_created")
    }
    got = scrape(ours)["crmhooks_delivery_seconds"] if values else {}
    assert {k: pytest.approx(v) for k, v in got.items()} == expected


def test_timer_lateness_is_one_histogram_without_labels() -> None:
    m = Metrics(process_metrics=False)
    m.timer_lateness.observe(0.02)
    m.timer_lateness.observe(7200.0)
    got = scrape(m)["crmhooks_timer_lateness_seconds"]
    assert got[("crmhooks_timer_lateness_seconds_count", ())] == 2
    assert got[("crmhooks_timer_lateness_seconds_bucket", (("le", "0.05"),))] == 1
    assert got[("crmhooks_timer_lateness_seconds_bucket", (("le", "3600.0"),))] == 1
    assert got[("crmhooks_timer_lateness_seconds_bucket", (("le", "+Inf"),))] == 2
    assert got[("crmhooks_timer_lateness_seconds_sum", ())] == pytest.approx(7200.02)


def test_buckets_count_a_value_on_a_bound_in_that_bound() -> None:
    b = Buckets((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 2.0, 3.0):
        b.observe(v)
    assert b.cumulative() == [("1.0", 2.0), ("2.0", 4.0), ("+Inf", 5.0)]
    assert b.count == 5


def test_gauges_read_their_sources_at_scrape_time_and_omit_what_has_none() -> None:
    m = Metrics(process_metrics=False)
    pending = [7]
    m.watch(pending_actions=lambda: pending[0], store_commits=lambda: 12)
    assert scrape(m)["crmhooks_pending_actions"] == {("crmhooks_pending_actions", ()): 7}
    pending[0] = 3
    got = scrape(m)
    assert got["crmhooks_pending_actions"] == {("crmhooks_pending_actions", ()): 3}
    assert got["crmhooks_store_commits"] == {("crmhooks_store_commits_total", ()): 12}
    assert got["crmhooks_suspended_webhooks"] == {}  # no source: no made-up 0


def test_a_failing_source_costs_its_sample_not_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics(process_metrics=False)

    def broken() -> int:
        raise RuntimeError("store closed")

    def broken_ends() -> dict[int, int]:
        raise RuntimeError("consumer stopped")

    m.watch(suspended_webhooks=broken, config_documents=lambda: 4)
    m.lag.ends = broken_ends
    m.lag.assigned({0: 5})
    got = scrape(m)
    assert got["crmhooks_suspended_webhooks"] == {}
    assert got["crmhooks_consumer_lag"] == {}
    assert got["crmhooks_config_documents"] == {("crmhooks_config_documents", ()): 4}
    assert "reading suspended_webhooks failed" in caplog.text


def test_consumer_lag_is_end_minus_committed_per_owned_partition() -> None:
    lag = ConsumerLag()
    ends = {0: 100, 1: 40, 2: 7}
    lag.ends = lambda: ends
    lag.assigned({0: 90, 1: None})  # 1: never committed by the group
    assert lag.sample() == {0: 10, 1: 40}  # 2: not assigned here
    lag.committed_now({0: 100, 1: 25, 2: 7})  # 2: revoked meanwhile, not ours
    assert lag.sample() == {0: 0, 1: 15}
    lag.committed_now({0: 95})  # an older commit finishing late never moves it back
    assert lag.sample()[0] == 0
    lag.revoked([0])
    assert lag.sample() == {1: 15}
    ends = {1: 20}  # end offsets are read at each sample
    assert lag.sample() == {1: 0}  # the last stable offset may lag the commit: never < 0


def test_lag_is_exposed_with_the_partition_as_its_only_label() -> None:
    m = Metrics(process_metrics=False)
    m.lag.ends = lambda: {0: 5, 2: 9}
    m.lag.assigned({0: 5, 2: 1})
    assert scrape(m)["crmhooks_consumer_lag"] == {
        ("crmhooks_consumer_lag", (("partition", "0"),)): 0,
        ("crmhooks_consumer_lag", (("partition", "2"),)): 8,
    }


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()  # with process metrics: no duplicate-series error
    a.actions.inc("delivered")
    assert scrape(a)["crmhooks_actions"][("crmhooks_actions_total", (("status", "delivered"),))]
    assert not scrape(b)["crmhooks_actions"][("crmhooks_actions_total", (("status", "delivered"),))]
    assert "process_cpu_seconds" in scrape(a)


def test_build_info_names_the_version() -> None:
    from crmhooks import __version__

    info = scrape(Metrics(process_metrics=False))["crmhooks_build_info"]
    ((_, labels), value), *_ = info.items()
    assert dict(labels)["version"] == __version__
    assert value == 1


def test_suppressed_log_lines_are_counted_by_logger() -> None:
    m = Metrics(process_metrics=False)
    m.watch(suppressed_log_lines=lambda: {"aiokafka.conn": 250})
    got = scrape(m)["crmhooks_log_lines_suppressed"]
    assert got == {("crmhooks_log_lines_suppressed_total", (("logger", "aiokafka.conn"),)): 250}


@pytest.mark.kafka
async def test_consumer_lag_from_a_real_consumer_goes_to_zero_once_committed() -> None:
    """End offsets as the consumer's fetches saw them, committed offsets read at
    assignment (inside the callback, as the processor would) and after commits."""
    import asyncio

    from crmhooks.kafka_io import KafkaIO, Skipped, produce_records
    from tests.support import unique_kafka

    kafka = unique_kafka(partitions=2)
    m = Metrics(process_metrics=False)
    kio: KafkaIO | None = None

    async def on_assigned(partitions: set[int]) -> None:
        assert kio is not None
        m.lag.assigned(await kio.committed_offsets(partitions))

    async def on_revoked(partitions: set[int]) -> None:
        m.lag.revoked(partitions)

    kio = KafkaIO(kafka, on_revoked, on_assigned)
    async with kio:
        m.lag.ends = kio.end_offsets_seen
        await produce_records(
            kafka,
            [(kafka.events_topic, f"org-{i}".encode(), b"{}") for i in range(20)],
        )
        read: dict[int, int] = {}
        for _ in range(100):  # bounded: ~20 s at most
            for partition, records in await kio.fetch(200, 500):
                assert not isinstance(records, Skipped)
                read[partition] = records[-1].offset + 1
            if sum(read.values()) >= 20 and len(kio.end_offsets_seen()) == 2:
                break
            await asyncio.sleep(0)
        assert sum(read.values()) == 20
        assert kio.end_offsets_seen() == {p: read.get(p, 0) for p in (0, 1)}
        assert sum(m.lag.sample().values()) == 20  # read, not committed: still lag
        lag_text = generate_latest(m.registry).decode()
        assert 'crmhooks_consumer_lag{partition="0"}' in lag_text
        await kio.commit(read)
        m.lag.committed_now(read)
        assert m.lag.sample() == {0: 0, 1: 0}
        assert await kio.committed_offsets([0, 1]) == {p: read.get(p) for p in (0, 1)}
