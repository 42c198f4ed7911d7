"""compose.yaml's monitoring profile and the dashboard: they parse and name only real metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import generate_latest

from crmhooks.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
DASHBOARD = ROOT / "docs" / "dashboard.json"

# The labels metrics.py gives its families (and the histograms' le).
LABELS = {"outcome", "status", "error_class", "error_code", "partition", "type", "logger", "le"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def exposed_names() -> set[str]:
    """Every sample name a crmhooks process exposes (families, _bucket/_sum/_count/_total)."""
    m = Metrics()
    m.delivery.observe("none", 0.1)
    m.watch(
        pending_actions=lambda: 0,
        suspended_webhooks=lambda: 0,
        config_documents=lambda: 0,
        requests_in_flight=lambda: 0,
        store_commits=lambda: 0,
        suppressed_log_lines=lambda: {"aiokafka": 1},
    )
    m.lag.ends = lambda: {0: 1}
    m.lag.assigned({0: 0})
    text = generate_latest(m.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


def test_the_default_compose_stays_small_and_monitoring_is_a_profile() -> None:
    services = load_yaml(COMPOSE)["services"]
    default = {name for name, s in services.items() if not s.get("profiles")}
    assert default == {"kafka", "receiver", "crmhooks"}
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    assert "127.0.0.1:9464:9464" in services["crmhooks"]["ports"]


def test_every_file_the_monitoring_services_mount_exists() -> None:
    services = load_yaml(COMPOSE)["services"]
    mounts = [
        v.split(":")[:2]
        for name in ("prometheus", "grafana")
        for v in services[name]["volumes"]
        if v.startswith("./")
    ]
    assert mounts
    for source, _ in mounts:
        assert (ROOT / source).exists(), source
    targets = dict(mounts)
    assert targets["./docs/dashboard.json"] == "/var/lib/grafana/dashboards/crmhooks.json"


def test_prometheus_scrapes_the_admin_endpoint_of_the_crmhooks_service() -> None:
    config = load_yaml(ROOT / "config" / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["crmhooks:9464"]


def test_grafana_provisions_prometheus_and_the_dashboard_folder() -> None:
    provisioning = ROOT / "config" / "grafana" / "provisioning"
    (source,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(provisioning / "dashboards" / "crmhooks.yml")["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_the_dashboard_has_the_panels_operators_need() -> None:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    titles = {p["title"] for p in board["panels"]}
    assert {
        "Results by status",
        "Delivery time (delivered)",
        "Consumer lag by partition",
        "Pending actions",
        "Timer lateness",
        "Dead letters by error code",
    } <= titles
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    exprs = " ".join(dashboard_exprs())
    assert "histogram_quantile(0.5," in exprs
    assert "histogram_quantile(0.99," in exprs


def test_every_dashboard_query_names_only_metrics_and_labels_crmhooks_exposes() -> None:
    exposed = exposed_names()
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        assert expr.count("(") == expr.count(")"), expr
        names = set(re.findall(r"\b(?:crmhooks|process|python)_[a-z_]+\b", expr))
        assert names, expr
        assert names <= exposed, (expr, names - exposed)
        for group in re.findall(r"by \(([^)]*)\)", expr):
            labels = {label.strip() for label in group.split(",")}
            assert labels <= LABELS, (expr, labels - LABELS)
        for label in re.findall(r"\{(\w+)[!=]", expr):
            assert label in LABELS | {"job"}, expr
