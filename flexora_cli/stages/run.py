"""`flexora run`: search → select → finetune → eval, skipping stages already complete.

A stage is complete when the manifest says so and its settings hash matches; with an explicit
`select.layers` the search is not needed and is skipped. `force=true` redoes every stage.
"""

from __future__ import annotations

from omegaconf import DictConfig

from flexora_cli import report
from flexora_cli.settings import Settings
from flexora_cli.stages import evaluate, finetune, locked, search, select, setup

PIPELINE = (
    ("search", search.run),
    ("select", select.run),
    ("finetune", finetune.run),
    ("eval", evaluate.run),
)


@locked
def run(cfg: DictConfig | Settings) -> dict:
    settings, run_dir = setup(cfg)
    results = {}
    for name, stage in PIPELINE:
        if name == "search" and settings.select.layers is not None:
            report.console.print("run: search skipped (select.layers is given)")
            continue
        if not settings.force and run_dir.is_complete(name, settings):
            report.console.print(
                f"run: {name} already complete in {run_dir.stage_dir(name)} (same settings), skipped"
            )
            continue
        report.console.rule(f"[bold]{name}")
        results[name] = stage(settings)
    return results
