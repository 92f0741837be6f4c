"""`flexora compare` — the paper's table in one command: base vs LoRA on all layers vs Flexora's
layers vs random layers of the same count, on the same data, budget and training settings.

Setup: the Flexora run is the command's own run directory; every other variant is a full run of
its own under `<out_dir>/compare/<variant>/` with `select.layers` fixed (all layers, or a random
draw per `compare.seeds`). Loop: `flexora run` on each (complete runs are reused, not redone).
Save: compare/results.json, table.md and table.csv; the table is printed too.
With several datasets (`dataset=[piqa,hellaswag]`) each gets that in `<out_dir>/<dataset>/`, and
`<out_dir>/compare/` holds one table of them all.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import random

from omegaconf import DictConfig
from rich.table import Table

from flexora_cli import report
from flexora_cli.manifest import Manifest
from flexora_cli.method import SearchResult, Selection
from flexora_cli.rundir import RunDir
from flexora_cli.settings import Settings, dataset_settings
from flexora_cli.stages import locked, setup
from flexora_cli.stages import run as pipeline

COLUMNS = ("dataset", "variant", "layers", "trainable_params", "acc", "acc_stderr", "search_s", "finetune_s")


@locked
def run(cfg: DictConfig | Settings) -> dict:
    settings, run_dir = setup(cfg)
    names = settings.compare.datasets or [settings.dataset.name]
    if len(names) == 1:
        rows = _compare(settings)
        names = [settings.dataset.name]
    else:  # one comparison per dataset, each in out_dir/<dataset>/, then one table for all
        rows = []
        for name in names:
            per_dataset = copy.deepcopy(settings)
            per_dataset.dataset = dataset_settings(name, settings)
            per_dataset.out_dir = str(run_dir.root / per_dataset.dataset.name)
            per_dataset.compare.datasets = per_dataset.eval.datasets = None
            rows += _compare(per_dataset)
        _save(run_dir, rows, settings.model.name_or_path)
    return {"datasets": names, "model": settings.model.name_or_path, "rows": rows}


def _compare(settings: Settings) -> list[dict]:
    """Run (or reuse) every variant on settings.dataset; write and print its table; its rows."""
    # -- setup: the Flexora run first, since the random variants draw as many layers ------------
    run_dir = RunDir(settings.out_dir)
    settings.select.layers = None  # the Flexora variant selects from its own search
    report.console.rule(f"[bold]compare {settings.dataset.name}: flexora")
    pipeline.run(settings)
    selection = Selection.read(run_dir.selection_json, "select", "compare")
    flexora_layers, num_layers = selection.layers, selection.num_layers
    variants = {"flexora": settings, "lora_all": _variant(settings, "lora_all", "all")}
    for seed in settings.compare.seeds:
        drawn = sorted(random.Random(seed).sample(range(num_layers), len(flexora_layers)))
        variants[f"random_{seed}"] = _variant(settings, f"random_{seed}", drawn)

    # -- loop: run (or reuse) every variant -----------------------------------------------------
    for name, variant in variants.items():
        if name != "flexora":
            report.console.rule(f"[bold]compare {settings.dataset.name}: {name}")
            pipeline.run(variant)

    # -- save ---------------------------------------------------------------------------------
    rows = [_row("base", run_dir, settings, base=True)]
    rows += [_row(name, RunDir(v.out_dir), v) for name, v in variants.items()]
    _save(run_dir, rows, settings.model.name_or_path)
    return rows


def _save(run_dir: RunDir, rows: list[dict], model: str) -> None:
    compare_dir = run_dir.root / "compare"
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    run_dir.write_json(compare_dir / "results.json", {"datasets": datasets, "model": model, "rows": rows})
    run_dir.write_text(
        compare_dir / "table.md", report.markdown_table(COLUMNS, [_cells(row) for row in rows])
    )
    run_dir.write_text(compare_dir / "table.csv", _csv(rows))
    report.result(_table(rows, ", ".join(datasets)))
    report.result(f"compare: wrote {compare_dir}/table.md, table.csv, results.json")


def _variant(settings: Settings, name: str, layers) -> Settings:
    variant = copy.deepcopy(settings)
    variant.select.layers = layers
    variant.out_dir = str(RunDir(settings.out_dir).root / "compare" / name)
    return variant


def _row(name: str, run_dir: RunDir, settings: Settings, base: bool = False) -> dict:
    evaluated = run_dir.root / Manifest(run_dir).eval_key(settings) / "metrics.json"  # where run's eval wrote
    metrics = json.loads(evaluated.read_text())["results"][settings.dataset.name]
    scored = metrics["base" if base else "adapter"]
    row = {
        "dataset": settings.dataset.name,
        "variant": name,
        "acc": scored["acc"],
        "acc_stderr": scored["acc_stderr"],
        "n": scored["n"],
    }
    if base:
        return {**row, "layers": [], "trainable_params": 0, "search_s": None, "finetune_s": None}
    selection = Selection.read(run_dir.selection_json, "select", "compare")
    finetune = json.loads(run_dir.finetune_log_json.read_text())
    search_s = (
        SearchResult.read(run_dir.alpha_json, "search", "compare").seconds
        if selection.rule != "explicit"
        else None
    )
    return {
        **row,
        "layers": selection.layers,
        "trainable_params": selection.trainable_params,
        "search_s": search_s,
        "finetune_s": finetune["seconds"],
    }


def _cells(row: dict) -> list[str]:
    layers = ",".join(str(i) for i in row["layers"]) or "–"
    seconds = [f"{row[k]:.1f}" if row[k] is not None else "–" for k in ("search_s", "finetune_s")]
    return [
        row["dataset"],
        row["variant"],
        layers,
        f"{row['trainable_params']:,}",
        f"{row['acc']:.4f}",
        f"{row['acc_stderr']:.4f}",
        *seconds,
    ]


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([" ".join(map(str, row["layers"])) if k == "layers" else row[k] for k in COLUMNS])
    return out.getvalue()


def _table(rows: list[dict], title: str) -> Table:
    table = Table(title=f"{title}: base vs LoRA vs Flexora vs random layers (n={rows[0]['n']})")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("dataset", "variant", "layers") else "right")
    for row in rows:
        table.add_row(*_cells(row))
    return table
