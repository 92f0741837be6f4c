"""`flexora run`: search → select → finetune → eval, skipping stages already complete.

A stage is skipped when the manifest says it completed with these settings, from the current
outputs of the stage before it, and its own outputs still verify (manifest.Manifest.completion);
a stage whose outputs are missing or damaged runs again, saying why. With an explicit
`select.layers` the search is not needed and is skipped. `force=true` redoes every stage.
"""

from __future__ import annotations

from omegaconf import DictConfig

from flexora_cli import report
from flexora_cli.manifest import Manifest
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
    manifest = Manifest(run_dir)
    results = {}
    for name, stage in PIPELINE:
        if name == "search" and settings.select.layers is not None:
            report.console.print("run: search skipped (select.layers is given)")
            continue
        key = manifest.eval_key(settings) if name == "eval" else name
        completion = manifest.completion(name, settings, key)
        if completion.done and not settings.force:
            report.line(f"run: {name} already complete in {run_dir.root / key} (same settings), skipped")
            continue
        if completion.lost and not settings.force:
            report.warn(f"run: {name} runs again: {completion.reason}")
        report.console.rule(f"[bold]{name}")
        results[name] = stage(settings)
    return results
