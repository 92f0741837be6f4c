"""compare's table maths: per-run rows summarised over seeds, random draws pooled, Jaccard."""

from __future__ import annotations

import statistics

import pytest

from flexora_cli.comparison import (
    RUN_COLUMNS,
    SFT_RUN_COLUMNS,
    SFT_SUMMARY_COLUMNS,
    RunRow,
    jaccard,
    mean_jaccard,
    run_columns,
    runs_csv,
    summarise,
    summary_columns,
)


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


def test_sft_rows_show_loss_and_exact_match():
    def sft(variant: str, seed: int, loss: float, em: float | None) -> RunRow:
        return RunRow("gsm8k", variant, [0], 10, None, None, 48, None, 5.0, seed, loss=loss,
                      perplexity=2.0, exact_match=em, em_flexible=em)  # fmt: skip

    rows = [sft("flexora", 1, 1.0, 0.02), sft("flexora", 2, 1.2, 0.04), sft("lora_all", 1, 0.9, None)]
    assert run_columns(rows) == SFT_RUN_COLUMNS and run_columns([row("base", 1, 0.5, [])]) == RUN_COLUMNS
    assert rows[0].cells(SFT_RUN_COLUMNS)[4:8] == ["1.0000", "2.0000", "0.0200", "0.0200"]
    assert rows[2].cells(SFT_RUN_COLUMNS)[6] == "–"
    summary = {r.variant: r for r in summarise(rows)}
    assert summary["flexora"].loss_mean == pytest.approx(1.1) and summary["flexora"].acc_mean is None
    assert summary["flexora"].exact_match_std == pytest.approx(statistics.stdev([0.02, 0.04]))
    assert summary["lora_all"].exact_match_mean is None
    assert summary_columns(list(summary.values())) == SFT_SUMMARY_COLUMNS
    assert runs_csv(rows).splitlines()[0].split(",")[4:8] == [
        "loss",
        "perplexity",
        "exact_match",
        "em_flexible",
    ]
