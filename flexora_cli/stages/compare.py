"""`flexora compare` — the paper's table in one command: base vs LoRA on all layers vs Flexora's
layers vs Flexora's top-k vs random layers of the same count, on the same data, budget and
training settings.

Setup: the Flexora run is the command's own run directory (or, with `compare.seeds`, one per
training seed in `<out_dir>/seed_<s>/`); every other variant is a full run of its own under
`<that run>/compare/<variant>/` with `select.layers` fixed: all layers, Flexora's k best
(`compare.top_k`, from the same search) or a random draw per `compare.draws`. Loop: `flexora run`
on each (complete runs are reused, not redone). Save: compare/results.json, table.md and
table.csv (one row per run) and, over several seeds, summary.md (mean ± std over seeds per
variant, beside the binomial stderr, and the selection's Jaccard stability); both are printed.
With several datasets (`dataset=[piqa,hellaswag]`) each gets that in `<out_dir>/<dataset>/`, and
`<out_dir>/compare/` holds the tables of them all.
"""

from __future__ import annotations

import copy
import random

from omegaconf import DictConfig
from rich.table import Table

from flexora_cli import report
from flexora_cli.comparison import RunRow, run_columns, runs_csv, summarise, summary_columns
from flexora_cli.config import dataset_settings
from flexora_cli.manifest import Manifest
from flexora_cli.method import SearchResult, Selection
from flexora_cli.records import EvalMetrics, FinetuneLog
from flexora_cli.rundir import RunDir
from flexora_cli.settings import Settings
from flexora_cli.stages import locked, setup
from flexora_cli.stages import run as pipeline


@locked
def run(cfg: DictConfig | Settings) -> dict:
    settings, run_dir = setup(cfg)
    names = settings.compare.datasets or [settings.dataset.name]
    if len(names) == 1:
        return _save(run_dir, _compare_dataset(settings), settings)
    rows = []  # one comparison per dataset, each in out_dir/<dataset>/, then one table for all
    for name in names:
        per_dataset = copy.deepcopy(settings)
        per_dataset.dataset = dataset_settings(name, settings)
        per_dataset.out_dir = str(run_dir.root / per_dataset.dataset.name)
        per_dataset.compare.datasets = per_dataset.eval.datasets = None
        dataset_rows = _compare_dataset(per_dataset)
        _save(RunDir(per_dataset.out_dir), dataset_rows, per_dataset)
        rows += dataset_rows
    return _save(run_dir, rows, settings)


def _compare_dataset(settings: Settings) -> list[RunRow]:
    """Every variant on settings.dataset, for each training seed (the rows of every run)."""
    seeds = settings.compare.seeds
    if seeds is None:
        return _compare_seed(settings, None)
    rows = []
    for index, seed in enumerate(seeds):
        seeded = copy.deepcopy(settings)
        seeded.seed = seed
        seeded.out_dir = str(RunDir(settings.out_dir).root / f"seed_{seed}")
        # The base does not depend on the training seed (same weights, same test rows): the
        # first seed's run scores it, and it is one row of the table.
        seeded.eval.include_base = index == 0
        rows += _compare_seed(seeded, seed)
    return rows


def _compare_seed(settings: Settings, seed: int | None) -> list[RunRow]:
    """Run (or reuse) every variant with one training seed; its rows (the base's first, when
    this seed's Flexora run scores it)."""
    # -- setup: the Flexora run first, since the other variants draw on its selection ----------
    run_dir = RunDir(settings.out_dir)
    settings.select.layers = None  # the Flexora variant selects from its own search
    report.console.rule(f"[bold]compare {settings.dataset.name}{_seed_label(seed)}: flexora")
    pipeline.run(settings)
    selection = Selection.read(run_dir.selection_json, "select", "compare")
    variants = {"flexora": settings, **_other_variants(settings, selection, seed)}

    # -- loop: run (or reuse) every variant -----------------------------------------------------
    for name, variant in variants.items():
        if name != "flexora":
            report.console.rule(f"[bold]compare {settings.dataset.name}{_seed_label(seed)}: {name}")
            pipeline.run(variant)

    # -- collect ------------------------------------------------------------------------------
    search_s = SearchResult.read(run_dir.alpha_json, "search", "compare").seconds
    base = settings.eval.include_base
    rows = [_row("base", run_dir, settings, None, None, base=True)] if base else []
    for name, variant in variants.items():
        searched = name == "flexora" or name.startswith("top_")  # their layers need the search
        rows.append(_row(name, RunDir(variant.out_dir), variant, seed, search_s if searched else None))
    return rows


def _other_variants(settings: Settings, selection: Selection, seed: int | None) -> dict[str, Settings]:
    """lora_all, Flexora's top-k and the random draws of as many layers as Flexora selected."""
    count, num_layers = len(selection.layers), selection.num_layers
    variants = {"lora_all": _variant(settings, "lora_all", "all")}
    for k in settings.compare.top_k:
        if k < num_layers:
            variants[f"top_{k}"] = _variant(settings, f"top_{k}", sorted(selection.ranking[:k]))
    for draw in settings.compare.draws:
        # one seed: random.Random(draw), as before seeds existed; else a draw per seed as well
        rng = random.Random(draw if seed is None else f"{seed}-{draw}")
        variants[f"random_{draw}"] = _variant(
            settings, f"random_{draw}", sorted(rng.sample(range(num_layers), count))
        )
    return variants


def _variant(settings: Settings, name: str, layers) -> Settings:
    variant = copy.deepcopy(settings)
    variant.select.layers = layers
    variant.eval.include_base = False  # the Flexora run scores the base once
    variant.out_dir = str(RunDir(settings.out_dir).root / "compare" / name)
    return variant


def _row(name: str, run_dir: RunDir, settings: Settings, seed, search_s, base: bool = False) -> RunRow:
    key = Manifest(run_dir).eval_key(settings)  # where run's eval wrote
    evaluated = EvalMetrics.read(run_dir.root / key / "metrics.json", "eval", "compare")
    variant = "base" if base else "adapter"
    scored = evaluated.score(settings.dataset.name, variant)
    common = {
        "dataset": settings.dataset.name,
        "variant": name,
        "acc": scored.acc,
        "acc_stderr": scored.acc_stderr,
        "acc_norm": scored.acc_norm,
        "n": scored.n,
        "seed": seed,
        "loss": scored.loss,
        "perplexity": scored.perplexity,
        "exact_match": evaluated.others(variant, "exact_match,strict-match"),
        "em_flexible": evaluated.others(variant, "exact_match,flexible-extract"),
    }
    if base:
        return RunRow(**common, layers=[], trainable_params=0, search_s=None, finetune_s=None)
    selection = Selection.read(run_dir.selection_json, "select", "compare")
    finetune = FinetuneLog.read(run_dir.finetune_log_json, "finetune", "compare")
    return RunRow(
        **common,
        layers=selection.layers,
        trainable_params=selection.trainable_params,
        search_s=search_s,
        finetune_s=finetune.seconds,
    )


def _seed_label(seed: int | None) -> str:
    return "" if seed is None else f" seed {seed}"


def _save(run_dir: RunDir, rows: list[RunRow], settings: Settings) -> dict:
    """Write and print the tables of `rows`; the results as written to results.json."""
    compare_dir = run_dir.root / "compare"
    summary = summarise(rows)
    datasets = list(dict.fromkeys(row.dataset for row in rows))
    results = {
        "datasets": datasets,
        "model": settings.model.name_or_path,
        "seeds": settings.compare.seeds,
        "rows": [row.to_json() for row in rows],
        "summary": [row.to_json() for row in summary],
    }
    run_dir.write_json(compare_dir / "results.json", results)
    columns = run_columns(rows)
    run_dir.write_text(
        compare_dir / "table.md", report.markdown_table(columns, [r.cells(columns) for r in rows])
    )
    run_dir.write_text(compare_dir / "table.csv", runs_csv(rows))
    title = f"{', '.join(datasets)}: base vs LoRA vs Flexora vs random layers (n={rows[0].n})"
    report.result(_table(title, columns, [r.cells(columns) for r in rows]))
    written = "table.md, table.csv, results.json"
    if settings.compare.seeds is not None:
        columns = summary_columns(summary)
        cells = [r.cells(columns) for r in summary]
        run_dir.write_text(compare_dir / "summary.md", report.markdown_table(columns, cells))
        report.result(_table(f"{title}, over seeds {settings.compare.seeds}", columns, cells))
        written = "summary.md, " + written
    report.result(f"compare: wrote {compare_dir}/{written}")
    return results


def _table(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in ("dataset", "variant", "layers") else "right")
    for cells in rows:
        table.add_row(*cells)
    return table
