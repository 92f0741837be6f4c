"""`flexora compare`: every variant's row, reuse of complete runs, and the summary over training seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexora_cli.rundir import RunDir


def flat(rows) -> list[float]:
    return [value for row in rows for value in row]


def test_compare_writes_the_table_for_every_variant(tiny_cfg):
    from flexora_cli.stages import compare

    cfg = tiny_cfg("compare.draws=[7]")
    results = compare.run(cfg)
    rows = {row["variant"]: row for row in results["rows"]}
    assert list(rows) == ["base", "flexora", "lora_all", "random_7"]
    assert rows["lora_all"]["layers"] == list(range(8)) and rows["base"]["trainable_params"] == 0
    assert len(rows["random_7"]["layers"]) == len(rows["flexora"]["layers"])
    assert rows["flexora"]["search_s"] is not None and rows["lora_all"]["search_s"] is None
    assert all(0 <= row["acc"] <= 1 and row["n"] == 40 for row in rows.values())
    out = RunDir(cfg.out_dir).root / "compare"
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "table.md").read_text().count("\n") == 6  # header, rule, 4 variants
    assert (
        (out / "table.csv").read_text().splitlines()[0].startswith("dataset,variant,layers,trainable_params")
    )
    again = compare.run(cfg)  # everything complete: reused, same numbers
    assert again["rows"] == results["rows"]


def test_compare_over_seeds_with_top_k_summarises_each_variant(tiny_cfg):
    """compare.seeds: every variant once per training seed, in seed_<s>/; the summary gives the mean
    ± std over seeds, the selection's Jaccard stability, and pools the random draws."""
    from flexora_cli.stages import compare

    cfg = tiny_cfg("compare.seeds=[1,2]", "compare.draws=[1]", "compare.top_k=[1]", "finetune.epochs=0.25")
    results = compare.run(cfg)
    runs = [(row["seed"], row["variant"]) for row in results["rows"]]
    # the base does not depend on the seed: scored once, by the first seed's run
    assert runs == [(None, "base")] + [
        (s, v) for s in (1, 2) for v in ("flexora", "lora_all", "top_1", "random_1")
    ]
    second_eval = json.loads((Path(cfg.out_dir) / "seed_2" / "eval" / "metrics.json").read_text())
    assert list(second_eval["results"]["demo"]) == ["adapter"]
    by_run = {(row["seed"], row["variant"]): row for row in results["rows"]}
    for seed in (1, 2):
        ranking = json.loads((Path(cfg.out_dir) / f"seed_{seed}" / "select" / "selection.json").read_text())[
            "ranking"
        ]
        assert by_run[seed, "top_1"]["layers"] == ranking[:1]
        assert by_run[seed, "top_1"]["search_s"] == by_run[seed, "flexora"]["search_s"] is not None
    summary = {row["variant"]: row for row in results["summary"]}
    assert list(summary) == ["base", "flexora", "lora_all", "top_1", "random"]
    flexora_accs = [by_run[s, "flexora"]["acc"] for s in (1, 2)]
    assert summary["flexora"]["acc_mean"] == pytest.approx(sum(flexora_accs) / 2)
    assert summary["flexora"]["acc_std"] == pytest.approx(abs(flexora_accs[0] - flexora_accs[1]) / 2**0.5)
    sets = [set(by_run[s, "flexora"]["layers"]) for s in (1, 2)]
    assert summary["flexora"]["jaccard"] == pytest.approx(len(sets[0] & sets[1]) / len(sets[0] | sets[1]))
    assert summary["base"]["runs"] == 1 and summary["lora_all"]["jaccard"] is None
    assert (Path(cfg.out_dir) / "compare" / "summary.md").read_text().count("\n") == 7
