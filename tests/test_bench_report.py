"""The bench's table: a figure short of its target never reads as meeting it."""

from __future__ import annotations

from bench.report import Figure, table


def test_a_figure_judged_against_a_target_shows_three_decimals() -> None:
    rows = table(
        [
            Figure("scale-out ratio", 1.5967, "×", target="≥ 1.6", passed=False),
            Figure("instant", 7_994.0, "deliveries/s", 10_000.0, "ratio ≥ 0.8", False),
            Figure("bound", 1.6449, "×"),
        ]
    ).splitlines()
    assert rows[2] == "| scale-out ratio | 1.597 × | — | — | ≥ 1.6 | **short** |"
    assert rows[3] == (
        "| instant | 7,994 deliveries/s | 10,000 deliveries/s | 0.799 | ratio ≥ 0.8 | **short** |"
    )
    assert rows[4] == "| bound | 1.64 × | — | — | — | info |"
