"""`flexora summary DIR` — one table for a sweep: every run directory under DIR, the settings that
differ between them, the layers each selected, and each one's accuracy.

Setup: find every run directory under DIR (it holds manifest.json). Loop: read each run's settings
(the config.yaml of its latest stage) and outputs. Save: DIR/summary.md, summary.csv and
summary.json; the table is printed too. Runs that have not reached eval show "–".
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import yaml
from rich.table import Table

from flexora_cli import report
from flexora_cli.errors import ConfigError
from flexora_cli.method import Selection
from flexora_cli.records import EvalMetrics
from flexora_cli.rundir import RunDir
from flexora_cli.settings import flatten
from flexora_cli.stage_table import PIPELINE

_LATEST_FIRST = PIPELINE[::-1]  # the config of the latest stage that ran
_NOT_A_SETTING = {"out_dir", "quiet", "print_json", "debug", "force", "demo_assets"}


def run(directory: str) -> dict:
    root = Path(directory)
    runs = sorted(p.parent for p in root.rglob("manifest.json") if "compare" not in p.relative_to(root).parts)
    if not runs:
        raise ConfigError(
            f"{root} holds no run directories (no manifest.json below it); give the sweep's folder"
        )

    rows = [_row(root, run_dir) for run_dir in runs]
    varying = _varying([row.pop("settings") for row in rows], rows)
    columns = ["run", *varying, "layers", "trainable_params", *_score_columns(rows)]
    summary = {"root": str(root), "varying": varying, "columns": columns, "rows": rows}

    writer = RunDir(root)
    writer.write_json(root / "summary.json", summary)
    writer.write_text(
        root / "summary.md",
        report.markdown_table(columns, [[_cell(row.get(c)) for c in columns] for row in rows]),
    )
    writer.write_text(root / "summary.csv", _csv(columns, rows))
    report.result(_table(columns, rows, root))
    report.result(f"summary: {len(rows)} runs; wrote {root}/summary.md, summary.csv, summary.json")
    return summary


def _row(root: Path, run_dir: Path) -> dict:
    paths = RunDir(run_dir)
    config = next(
        (
            paths.stage_dir(s) / "config.yaml"
            for s in _LATEST_FIRST
            if (paths.stage_dir(s) / "config.yaml").exists()
        ),
        None,
    )
    settings = flatten(yaml.safe_load(config.read_text())) if config else {}
    row: dict = {"run": str(run_dir.relative_to(root)) or ".", "settings": settings}
    if paths.selection_json.exists():
        selection = Selection.read(paths.selection_json, "select", "summary")  # damaged: one line
        row.update(layers=selection.layers, trainable_params=selection.trainable_params)
    if paths.metrics_json.exists():
        for dataset, scores in EvalMetrics.read(paths.metrics_json, "eval", "summary").results.items():
            for variant, score in scores.items():
                row[f"{dataset}/{variant}"] = report.headline(score)
    return row


def _varying(settings: list[dict], rows: list[dict]) -> list[str]:
    """The settings whose values differ between runs, each copied into its row."""
    keys = sorted({k for s in settings for k in s} - _NOT_A_SETTING)
    varying = [k for k in keys if len({json.dumps(s.get(k), default=str) for s in settings}) > 1]
    for row, values in zip(rows, settings):
        row.update({k: values.get(k) for k in varying})
    return varying


def _score_columns(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update({k: None for k in row if "/" in k})
    return list(seen)


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _csv(columns: list[str], rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([" ".join(map(str, v)) if isinstance(v := row.get(c), list) else v for c in columns])
    return out.getvalue()


def _table(columns: list[str], rows: list[dict], root: Path) -> Table:
    table = Table(title=f"sweep {root}: {len(rows)} runs")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    return table
