"""`flexora run`: search → select → finetune → eval, skipping stages already complete.

A stage is skipped when the manifest says it completed with these settings, from the current
outputs of the stage before it, and its own outputs still verify (manifest.Manifest.completion);
a stage whose outputs are missing or damaged runs again, saying why. With an explicit
`select.layers` the search is not needed and is skipped. `force=true` redoes every stage.
"""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from flexora_cli import report
from flexora_cli.manifest import Manifest
from flexora_cli.settings import Settings
from flexora_cli.stage_table import BY_NAME, PIPELINE
from flexora_cli.stages import locked, setup

RUNS = {name: importlib.import_module(BY_NAME[name].module).run for name in PIPELINE}
"""The pipeline's stages, in stage_table's order."""


@locked
def run(cfg: DictConfig | Settings) -> dict:
    settings, run_dir = setup(cfg)
    manifest = Manifest(run_dir)
    results = {}
    for name in PIPELINE:
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
        results[name] = RUNS[name](settings)
    return results
