"""The bench's scenario list: every receiver scenario is reachable by name."""

from __future__ import annotations

from bench import receivers, run


def test_every_receiver_scenario_is_listed_and_the_long_ones_are_extended() -> None:
    assert set(receivers.SCENARIOS) <= set(run.SCENARIOS)
    assert set(run.EXTENDED) <= set(run.SCENARIOS)
    assert "instant" not in run.EXTENDED
