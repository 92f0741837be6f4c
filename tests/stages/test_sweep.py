"""Sweeps: Hydra multirun gives each job its own run directory, `flexora summary` collects them,
and `flexora compare` works across datasets."""

from __future__ import annotations

import json
from pathlib import Path

from flexora_cli import cli
from flexora_cli.stages import compare

QUICK = [
    "search.budget=64",
    "search.val_samples=32",
    "finetune.epochs=0.25",
    "dataset.max_train_samples=64",
    "eval.limit=20",
    "quiet=true",
]


def test_multirun_jobs_get_their_own_run_directories_and_summary_collects_them(demo_dir, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    args = ["run", "-m", "recipe=demo", f"demo_assets={demo_dir}", f"out_dir={sweep}", *QUICK, "lora=r4,r8"]
    assert cli.main(args) == 0
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["lora-r4", "lora-r8"]  # passes back unquoted: out_dir=.../lora-r8
    for job in jobs:
        manifest = json.loads((sweep / job / "manifest.json").read_text())
        assert manifest["stages"]["eval"]["status"] == "complete"
    capsys.readouterr()

    assert cli.main(["summary", str(sweep), "print_json=true"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "lora.r" in summary["varying"] and "seed" not in summary["varying"]
    assert [row["run"] for row in summary["rows"]] == ["lora-r4", "lora-r8"]
    assert [row["lora.r"] for row in summary["rows"]] == [4, 8]
    assert all(row["demo/adapter"].count("±") == 1 and row["layers"] for row in summary["rows"])
    table = (sweep / "summary.md").read_text().splitlines()
    assert table[0].startswith("| run |") and len(table) == 4
    assert json.loads((sweep / "summary.json").read_text()) == summary


def test_a_bad_sweep_value_is_one_error_before_any_job_runs(demo_dir, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    args = ["run", "-m", "recipe=demo", f"demo_assets={demo_dir}", f"out_dir={sweep}", *QUICK, "lora=r4,r99"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: In 'config': Could not find 'lora/r99'")
    assert not sweep.exists()  # not even the r4 job ran


def test_summary_of_a_folder_without_runs_is_one_clear_error(tmp_path, capsys):
    assert cli.main(["summary", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "holds no run directories" in err and len(err.splitlines()) == 1


def test_compare_across_datasets_writes_one_table(tiny_cfg):
    cfg = tiny_cfg("compare.draws=[]", "compare.datasets=[demo,demo_piqa]", "eval.limit=20")
    results = compare.run(cfg)
    assert results["datasets"] == ["demo", "demo_piqa"]
    assert [(r["dataset"], r["variant"]) for r in results["rows"]] == [
        (d, v) for d in ("demo", "demo_piqa") for v in ("base", "flexora", "lora_all")
    ]
    out = Path(cfg.out_dir)
    assert json.loads((out / "compare" / "results.json").read_text()) == results
    assert (out / "demo_piqa" / "compare" / "table.md").exists()  # each dataset's own table too
    assert (out / "compare" / "table.md").read_text().count("\n") == 8  # header, rule, 6 rows
