"""bench/promql_lite.py: the dashboard's PromQL over scrapes in memory (what the picture
in docs/operations.md is drawn with) computes what Prometheus would."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from bench.promql_lite import (
    Evaluator,
    Labels,
    PromQLError,
    Scrape,
    legend,
    parse,
    quantile,
    samples_of,
)
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "dashboard.json"


def labels(**pairs: str) -> Labels:
    return frozenset(pairs.items())


def scrape(t_s: float, text: str) -> Scrape:
    return Scrape(t_s, samples_of(text_string_to_metric_families(text)))


def test_every_expression_of_the_dashboard_is_in_the_subset() -> None:
    exprs = [
        target["expr"]
        for panel in json.loads(DASHBOARD.read_text())["panels"]
        for target in panel.get("targets", [])
    ]
    assert len(exprs) >= 15
    for expr in exprs:
        parse(expr, 4.0)  # raises for anything the evaluator would get wrong


def test_what_is_not_in_the_subset_is_refused() -> None:
    for expr in ("avg(x)", "rate(x)", "x + y", "x{a=b}", "irate(x[1m])"):
        with pytest.raises(PromQLError):
            parse(expr, 4.0)


def counter(t_s: float, delivered: float, failed: float) -> Scrape:
    return scrape(
        t_s,
        "# TYPE crmhooks_actions counter\n"
        f'crmhooks_actions_total{{status="delivered"}} {delivered}\n'
        f'crmhooks_actions_total{{status="failed"}} {failed}\n',
    )


def test_rate_increase_and_sum_by() -> None:
    # delivered: 10 a second; failed: 1 a second, with a counter reset (a restart) at t=3.
    scrapes = [counter(t, 10 * t, f) for t, f in zip(range(6), (0, 1, 2, 0, 1, 2), strict=True)]
    ev = Evaluator(scrapes, rate_interval_s=4.0)
    by_status = ev.at("sum by (status) (rate(crmhooks_actions_total[$__rate_interval]))", 5)
    # The window (1, 5] holds t = 2..5: delivered 20 → 50 over 3 s; failed 2, 0, 1, 2:
    # a reset counts from 0, so 0 + 1 + 1 = 2 over 3 s.
    assert by_status == pytest.approx(
        {labels(status="delivered"): 10.0, labels(status="failed"): 2 / 3}
    )
    total = ev.at('sum(rate(crmhooks_actions_total{status!="failed"}[4s]))', 5)
    assert total == pytest.approx({frozenset(): 10.0})
    increase = ev.at('increase(crmhooks_actions_total{status="delivered"}[2s])', 5)
    # The window (3, 5] holds t = 4, 5: 10 a second, times the 2 s window.
    assert increase == pytest.approx({labels(status="delivered"): 20.0})
    assert ev.at("rate(crmhooks_actions_total[4s])", 0) == {}  # one sample: no rate yet


def test_a_series_has_nan_where_it_has_no_value() -> None:
    ev = Evaluator([counter(t, 10 * t, 0) for t in range(3)], rate_interval_s=4.0)
    times, series = ev.series('sum(rate(crmhooks_actions_total{status="delivered"}[4s]))')
    assert times == [0, 1, 2]
    assert math.isnan(series[frozenset()][0])
    assert series[frozenset()][1:] == [10.0, 10.0]


def test_target_labels_are_added_as_prometheus_adds_job() -> None:
    text = "# TYPE process_cpu_seconds counter\nprocess_cpu_seconds_total {}\n"
    ev = Evaluator(
        [scrape(0, text.format(1.0)), scrape(2, text.format(2.0))],
        rate_interval_s=4.0,
        target_labels={"job": "crmhooks"},
    )
    cpu = ev.at('rate(process_cpu_seconds_total{job="crmhooks"}[$__rate_interval])', 2)
    assert cpu == {labels(job="crmhooks"): 0.5}
    assert ev.at('rate(process_cpu_seconds_total{job="other"}[4s])', 2) == {}


def histogram(t_s: float, counts: tuple[int, int, int, int]) -> Scrape:
    """Cumulative counts of buckets le 0.1, 0.5, 1, +Inf."""
    lines = ["# TYPE crmhooks_delivery_seconds histogram"]
    for le, n in zip(("0.1", "0.5", "1.0", "+Inf"), counts, strict=True):
        lines.append(f'crmhooks_delivery_seconds_bucket{{error_class="none",le="{le}"}} {n}')
    lines.append(f'crmhooks_delivery_seconds_count{{error_class="none"}} {counts[-1]}')
    lines.append(f'crmhooks_delivery_seconds_sum{{error_class="none"}} {counts[-1] * 0.2}')
    return scrape(t_s, "\n".join(lines) + "\n")


def test_histogram_quantile_of_the_rates_of_the_buckets() -> None:
    # Between the two scrapes: 50 requests ≤ 0.1 s, 40 in (0.1, 0.5], 10 in (0.5, 1].
    ev = Evaluator(
        [histogram(0, (100, 100, 100, 100)), histogram(2, (150, 190, 200, 200))],
        rate_interval_s=4.0,
    )
    expr = (
        "histogram_quantile({q}, sum by (le) "
        '(rate(crmhooks_delivery_seconds_bucket{{error_class="none"}}[$__rate_interval])))'
    )
    # p50: rank 50 of 100, the end of the first bucket; p90: rank 90, the end of the
    # second; p99: rank 99, 9/10 into (0.5, 1].
    assert ev.at(expr.format(q=0.5), 2) == pytest.approx({frozenset(): 0.1})
    assert ev.at(expr.format(q=0.9), 2) == pytest.approx({frozenset(): 0.5})
    assert ev.at(expr.format(q=0.99), 2) == pytest.approx({frozenset(): 0.95})


def test_quantile_edges_as_prometheus() -> None:
    inf = math.inf
    assert math.isnan(quantile(0.5, [(0.1, 0), (inf, 0)]))  # no observations
    assert quantile(0.99, [(0.1, 1), (1.0, 1), (inf, 5)]) == 1.0  # in +Inf: last bound
    assert quantile(0.5, [(0.1, 4), (inf, 4)]) == pytest.approx(0.05)


def test_legend_format() -> None:
    series = labels(type="webhook_suspended", outcome="sent")
    assert legend("{{type}} {{outcome}}", series, str) == "webhook_suspended sent"
    assert legend("partition {{ partition }}", labels(partition="2"), str) == "partition 2"
    assert legend(None, frozenset(), lambda _: "value") == "value"
