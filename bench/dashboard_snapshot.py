"""The picture of docs/dashboard.json in docs/operations.md, from a real run: a processor
against a real broker, its /metrics scraped every second, the panels drawn with
matplotlib (Grafana is not installable here).

    CRMHOOKS_BOOTSTRAP_SERVERS=127.0.0.1:9092 scripts/dashboard-snapshot [--duration-s 60]

What runs: ``crmhooks run`` (this checkout, a child process) with ``[admin] listen``
on a free port; a receiver in this process that answers most requests after 2-40 ms,
some after 150-600 ms, 3 % with 500, and one path (the ``Broken`` webhook, which
events start to trigger after a third of the run) always 503, so that one (rule,
webhook) is suspended and an administrator alert is sent; events at a steady rate
over three organisations (a fifth of them matched by no rule, one in a hundred not
JSON), one organisation with a low daily limit, and a burst of events at 60 % of
the run (consumer lag). Every panel of docs/dashboard.json is then drawn from the
scrapes: same titles, same layout (gridPos), same expressions evaluated by
bench/promql_lite.py at each scrape, ``$__rate_interval`` = 4 s (what Grafana
takes for a 1 s scrape interval). The scrapes are kept next to the picture's run
(``var/dashboard-snapshot/scrapes.jsonl``), so it can be drawn again
(``--from-scrapes``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import (
    REPO,
    FastProducer,
    admin_port,
    create_topics,
    iso_utc,
    new_topics,
    processors,
)
from bench.promql_lite import Evaluator, Labels, Scrape, legend, samples_of

DASHBOARD = REPO / "docs" / "dashboard.json"
WORKDIR = REPO / "var" / "dashboard-snapshot"
# Prometheus's scrape interval in this picture; Grafana's $__rate_interval is then
# max($__interval + 1 s, 4 × 1 s) = 4 s for a range of a few minutes.
SCRAPE_S = 1.0
RATE_INTERVAL_S = 4.0
# Events a second: enough for every panel to move, little enough for a shared 2-core
# machine (the receiver, producer and scraper run in this process).
EVENTS_PER_S = 120
BURST = 3000  # events produced at once at 60 % of the run: the lag panel moves
ORGS = ("org-0", "org-1", "org-2")  # one per partition
# org-2's daily limit: min(daily_limit, per_user × users) = 20 × 60 = 1,200 requests,
# reached about half-way through a 60 s run: dead letters daily_limit_reached, an alert.
LIMITED_ORG_USERS = 60
PER_USER = 20


# --- the receiver -----------------------------------------------------------------------


@asynccontextmanager
async def receiver(seed: int) -> AsyncIterator[str]:
    """Answers like a fleet of real endpoints: mostly fast, a slow tail, some 500s;
    ``/broken`` always 503; ``/alerts`` 200."""
    rng = random.Random(seed)

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if request.path.startswith("/broken"):
            return web.Response(status=503)
        if request.path.startswith("/alerts"):
            return web.Response(status=200)
        roll = rng.random()
        delay_s = rng.uniform(0.15, 0.6) if roll < 0.02 else rng.uniform(0.002, 0.04)
        await asyncio.sleep(delay_s)
        return web.Response(status=500 if rng.random() < 0.03 else 200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


# --- the run ------------------------------------------------------------------------------


def config(bootstrap: str, topics: Any, store: Path, url: str) -> dict[str, Any]:
    def hook(name: str, path: str, **more: Any) -> dict[str, Any]:
        return {"name": name, "url": f"{url}{path}", "module": "Potentials", **more}

    def rule(rule_id: str, criteria: list[dict[str, Any]], **actions: Any) -> dict[str, Any]:
        return {"id": rule_id, "module": "Potentials", "repeat": "every",
                "criteria": {"all": criteria}, **actions}  # fmt: skip

    won = {"field": "Stage", "op": "is", "value": "Closed Won"}
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": topics.group,
            "events_topic": topics.events,
            "results_topic": topics.results,
            "dlq_topic": topics.dlq,
            "partitions": topics.partitions,
        },
        "store": {"path": str(store)},
        "delivery": {
            "allow_private_networks": True,
            "retry_delays_s": [2],
            # Three failed actions in a row: the 3 % of 500s (and their retries) never
            # get there, the Broken webhook does.
            "suspend_after_failed_actions": 3,
        },
        "quota": {"daily_limit": 1_000_000, "per_user": PER_USER},
        "admin": {"listen": "127.0.0.1:0"},
        "alerts": {"webhook": "OpsAlerts"},
        "orgs": [
            {"id": org, "users": LIMITED_ORG_USERS if org == "org-2" else 100_000} for org in ORGS
        ],
        "webhooks": [
            hook("Commission", "/commission"),
            hook("Reminder", "/reminder"),
            hook("Broken", "/broken"),
            hook("OpsAlerts", "/alerts"),
        ],
        "rules": [
            rule(
                "won",
                [won],
                instant="Commission",
                scheduled=[{"webhook": "Reminder", "relative_to": "trigger", "offset": "3s"}],
            ),
            rule("erp", [won, {"field": "Erp", "op": "is", "value": "yes"}], instant="Broken"),
        ],
    }


def event(n: int, rng: random.Random, erp: bool) -> tuple[int, bytes, bytes]:
    """(partition, key, value): a deal; a fifth in Negotiation (no rule), 1 % not JSON."""
    partition = n % len(ORGS)
    org = ORGS[partition]
    if rng.random() < 0.01:
        return partition, org.encode(), f"{{not json {n}".encode()
    stage = "Negotiation" if rng.random() < 0.2 else "Closed Won"
    value = orjson.dumps(
        {
            "event_id": f"snap-{n}",
            "org_id": org,
            "module": "Potentials",
            "operation": "create",
            "occurred_at": iso_utc(time.time()),
            "record_id": f"rec-{n}",
            "record": {
                "Potential Name": f"Deal {n}",
                "Amount": 1000 + n % 900,
                "Stage": stage,
                "Erp": "yes" if erp and rng.random() < 0.05 else "no",
            },
        }
    )
    return partition, org.encode(), value


async def run(bootstrap: str, duration_s: float, seed: int) -> list[Scrape]:
    """The run; its scrapes, one a second while events flow (the stat panels show the
    last scrape's values: those of a processor at work, not of one gone idle)."""
    WORKDIR.mkdir(parents=True, exist_ok=True)
    topics = new_topics("dashboard", len(ORGS))
    await create_topics(bootstrap, topics)
    rng = random.Random(seed)
    scrapes: list[Scrape] = []
    store = WORKDIR / f"{topics.tag}.db"
    async with receiver(seed) as url:
        cfg = config(bootstrap, topics, store, url)
        async with (
            processors(cfg, WORKDIR, topics.tag) as [proc],
            FastProducer(bootstrap) as producer,
            aiohttp.ClientSession() as http,
        ):
            port = await admin_port(proc.log)
            metrics_url = f"http://127.0.0.1:{port}/metrics"
            ready_deadline = time.monotonic() + 60
            while time.monotonic() < ready_deadline:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.2)

            async def scrape_loop() -> None:
                next_s = time.monotonic()
                while True:
                    t_s = time.time()
                    async with http.get(metrics_url) as resp:
                        text = await resp.text()
                    scrapes.append(Scrape(t_s, samples_of(text_string_to_metric_families(text))))
                    next_s += SCRAPE_S
                    await asyncio.sleep(max(0.0, next_s - time.monotonic()))

            scraper = asyncio.create_task(scrape_loop())
            start = time.monotonic()
            n = 0
            burst_done = False
            try:
                for second in range(int(duration_s)):
                    erp = second >= duration_s / 3  # the Broken webhook starts being used
                    batch = [event(n + i, rng, erp) for i in range(EVENTS_PER_S)]
                    n += EVENTS_PER_S
                    if not burst_done and second >= duration_s * 0.6:
                        batch += [event(n + i, rng, erp) for i in range(BURST)]
                        n += BURST
                        burst_done = True
                    await producer.send_many(topics.events, batch)
                    await asyncio.sleep(max(0.0, start + second + 1 - time.monotonic()))
            finally:
                scraper.cancel()
                await asyncio.gather(scraper, return_exceptions=True)
    print(f"dashboard-snapshot: {n:,} events in {duration_s:.0f} s, {len(scrapes)} scrapes")
    return scrapes


def save(scrapes: Sequence[Scrape], path: Path) -> None:
    with path.open("w") as out:
        for s in scrapes:
            samples = [[name, sorted(labels), v] for (name, labels), v in s.samples.items()]
            out.write(json.dumps({"t_s": s.t_s, "samples": samples}) + "\n")


def load(path: Path) -> list[Scrape]:
    scrapes = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        samples = {
            (name, frozenset((k, v) for k, v in labels)): float(value)
            for name, labels, value in row["samples"]
        }
        scrapes.append(Scrape(row["t_s"], samples))
    return scrapes


# --- drawing ------------------------------------------------------------------------------

BACKGROUND = "#111217"  # Grafana's dark theme
PANEL = "#181b1f"
TEXT = "#ccccdc"
GRID = "#2c3235"
PALETTE = ("#73bf69", "#f2cc0c", "#5794f2", "#ff780a", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a")
ROW_IN = 0.4  # inches per gridPos row (Grafana: 30 px a row, at 72 dpi here ~0.42 in)


def fmt_value(value: float, unit: str | None) -> str:
    if math.isnan(value):
        return "No data"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit in ("reqps", "ops"):
        return f"{value:.1f}/s" if value < 100 else f"{value:.0f}/s"
    return f"{value:.0f}" if abs(value) >= 10 or value == int(value) else f"{value:.2f}"


def render(scrapes: Sequence[Scrape], out: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    ev = Evaluator(scrapes, rate_interval_s=RATE_INTERVAL_S, target_labels={"job": "crmhooks"})
    t0 = scrapes[0].t_s
    width_in, top_in, bottom_in, side_in = 16.0, 0.55, 0.35, 0.15
    height_in = rows * ROW_IN + top_in + bottom_in
    fig = plt.figure(figsize=(width_in, height_in), dpi=72, facecolor=BACKGROUND)
    fig.text(side_in / width_in, 1 - 0.38 / height_in, dashboard["title"], color=TEXT,
             fontsize=15)  # fmt: skip
    fig.text(side_in / width_in, 0.12 / height_in, note, color="#8e8e8e", fontsize=9)
    column_in = (width_in - 2 * side_in) / 24
    gap_in = 0.05  # between panels, as Grafana's margins

    def box(
        x_in: float, y_in: float, w_in: float, h_in: float
    ) -> tuple[float, float, float, float]:
        """Figure fractions of a rectangle given in inches from the top-left corner."""
        return (x_in / width_in, 1 - (y_in + h_in) / height_in, w_in / width_in, h_in / height_in)

    for panel in panels:
        pos = panel["gridPos"]
        x_in = side_in + pos["x"] * column_in + gap_in
        y_in = top_in + pos["y"] * ROW_IN + gap_in
        w_in = pos["w"] * column_in - 2 * gap_in
        h_in = pos["h"] * ROW_IN - 2 * gap_in
        left, bottom, width, height = box(x_in, y_in, w_in, h_in)
        fig.patches.append(
            Rectangle(
                (left, bottom),
                width,
                height,
                transform=fig.transFigure,
                facecolor=PANEL,
                edgecolor=GRID,
                linewidth=0.8,
                zorder=-1,  # behind the panel's axes
            )
        )
        fig.text(box(x_in + 0.1, y_in + 0.06, 1, 0.2)[0], box(0, y_in + 0.06, 1, 0.2)[1],
                 panel["title"], color=TEXT, fontsize=10, fontweight="bold")  # fmt: skip
        stat = panel["type"] == "stat"
        left_in, bottom_pad_in = (0.1, 0.1) if stat else (0.75, 0.32)
        ax = fig.add_axes(
            box(x_in + left_in, y_in + 0.34, w_in - left_in - 0.15, h_in - 0.34 - bottom_pad_in)
        )
        ax.set_facecolor(PANEL)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.tick_params(colors=TEXT, labelsize=8, length=0)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        lines: list[tuple[str, list[float], list[float]]] = []
        for target in panel.get("targets", []):
            times, series = ev.series(target["expr"])
            for labels, values in sorted(series.items(), key=lambda kv: sorted(kv[0])):
                name = legend(target.get("legendFormat"), labels, _default_legend)
                lines.append((name, [t - t0 for t in times], values))
        if stat:
            _stat(ax, lines, unit)
        else:
            _timeseries(ax, lines, unit)
    fig.savefig(out, facecolor=BACKGROUND)
    plt.close(fig)


def _default_legend(labels: Labels) -> str:
    shown = {k: v for k, v in labels if k != "job"}
    return (
        "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(shown.items())) + "}" if shown else "value"
    )


def _stat(ax: Any, lines: Sequence[tuple[str, list[float], list[float]]], unit: str | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if not lines:
        ax.text(0.5, 0.45, "No data", color=TEXT, fontsize=22, ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
        return
    _, times, values = lines[0]
    last = next((v for v in reversed(values) if not math.isnan(v)), math.nan)
    ax.fill_between(times, [0 if math.isnan(v) else v for v in values], color="#73bf69",
                    alpha=0.25, linewidth=0)  # fmt: skip
    ax.set_xlim(times[0], times[-1])
    ax.set_ylim(bottom=0)
    ax.text(0.5, 0.45, fmt_value(last, unit), color="#73bf69", fontsize=26, ha="center",
            va="center", transform=ax.transAxes, fontweight="bold")  # fmt: skip


def _timeseries(
    ax: Any, lines: Sequence[tuple[str, list[float], list[float]]], unit: str | None
) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.grid(color=GRID, linewidth=0.6)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f} s"))
    if not lines:
        ax.text(0.5, 0.5, "No data", color=TEXT, fontsize=14, ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
        return
    for i, (name, times, values) in enumerate(lines):
        ax.plot(times, values, color=PALETTE[i % len(PALETTE)], linewidth=1.4, label=name)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_value(v, unit)))
    ax.set_xlim(lines[0][1][0], lines[0][1][-1])
    ax.legend(loc="upper right", fontsize=7, frameon=True, facecolor=PANEL, edgecolor=PANEL,
              framealpha=0.8, labelcolor=TEXT, ncol=min(3, len(lines)))  # fmt: skip


# --- the command ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--seed", type=int, default=25)
    parser.add_argument(
        "--from-scrapes", type=Path, help="draw from a scrapes.jsonl of an earlier run"
    )
    args = parser.parse_args(argv)
    if args.from_scrapes is not None:
        scrapes = load(args.from_scrapes)
    else:
        bootstrap = os.environ.get("CRMHOOKS_BOOTSTRAP_SERVERS")
        if not bootstrap:
            sys.exit("dashboard-snapshot: set CRMHOOKS_BOOTSTRAP_SERVERS (a running broker)")
        scrapes = asyncio.run(run(bootstrap, args.duration_s, args.seed))
        save(scrapes, WORKDIR / "scrapes.jsonl")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(scrapes[0].t_s))
    note = (
        f"A real run of crmhooks ({when}), /metrics scraped every {SCRAPE_S:.0f} s "
        f"({len(scrapes)} scrapes); docs/dashboard.json's panels and expressions drawn by "
        "bench/dashboard_snapshot.py with matplotlib (not a Grafana screenshot)."
    )
    render(scrapes, args.out, note)
    print(f"dashboard-snapshot: wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
