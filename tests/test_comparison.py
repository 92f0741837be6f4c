"""compare's table maths: per-run rows summarised over seeds, random draws pooled, Jaccard."""

from __future__ import annotations

import statistics

import pytest

from flexora_cli.comparison import RunRow, jaccard, mean_jaccard, runs_csv, summarise


def row(variant: str, seed: int, acc: float, layers: list[int], search_s=None) -> RunRow:
    return RunRow("piqa", variant, layers, 10 * len(layers), acc, 0.02, 300, search_s, 5.0, seed)


def test_jaccard():
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5 and jaccard([], []) == 1.0 and jaccard([1], [2]) == 0.0
    assert mean_jaccard([[1, 2], [1, 2], [3]]) == pytest.approx((1 + 0 + 0) / 3)


def test_summary_over_seeds_pools_random_draws():
    rows = [
        *(row("base", s, 0.5, []) for s in (1, 2, 3)),
        row("flexora", 1, 0.60, [0, 1], 3.0),
        row("flexora", 2, 0.64, [0, 2], 5.0),
        row("flexora", 3, 0.62, [0, 1], 4.0),
        *(row(f"random_{d}", s, 0.55 + 0.01 * d, [s, d + 5]) for s in (1, 2, 3) for d in (1, 2)),
    ]
    summary = {r.variant: r for r in summarise(rows)}
    assert list(summary) == ["base", "flexora", "random"]
    flexora = summary["flexora"]
    assert (flexora.runs, flexora.layers, flexora.n) == (3, 2.0, 300)
    assert flexora.acc_mean == pytest.approx(0.62) and flexora.acc_std == pytest.approx(
        statistics.stdev([0.6, 0.64, 0.62])
    )
    assert flexora.jaccard == pytest.approx((1 / 3 + 1 + 1 / 3) / 3) and flexora.search_s == pytest.approx(
        4.0
    )
    assert summary["random"].runs == 6 and summary["random"].acc_mean == pytest.approx(0.565)
    base = summary["base"]
    assert (base.acc_std, base.layers, base.jaccard, base.search_s) == (0.0, 0.0, None, None)
    assert flexora.cells()[:3] == ["piqa", "flexora", "3"]


def test_csv_has_one_line_per_run():
    lines = runs_csv([row("flexora", 1, 0.6, [0, 3], 2.0)]).splitlines()
    assert lines[0].split(",")[-3:] == ["seed", "n", "acc_norm"] and lines[1].startswith(
        "piqa,flexora,0 3,20,0.6"
    )
