"""The bench's scenario list: every receiver scenario is reachable by name."""

from __future__ import annotations

from pathlib import Path

from bench import receivers, run


def test_every_receiver_scenario_is_listed_and_the_long_ones_are_extended() -> None:
    assert set(receivers.SCENARIOS) <= set(run.SCENARIOS)
    assert set(run.EXTENDED) <= set(run.SCENARIOS)
    assert "instant" not in run.EXTENDED


def test_a_fresh_run_finds_no_store_or_log_of_an_earlier_run_of_its_name(tmp_path: Path) -> None:
    stale = ["instant300.db", "instant300.db-wal", "instant300.db-shm", "instant300-0.log"]
    kept = ["instant3000.db", "instant30.db", "instant300-secured.db", "filter300-0.log"]
    kept.append("instant300-secured-0.log")
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    run.fresh(tmp_path, "instant300")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
