"""The one list of stages: what the command line offers, what `flexora run` chains, in which
order, and which settings each stage's outputs depend on (manifest's hashes). Every other module
asks this one; nothing here imports a stage, so the command line stays quick to start.
"""

from __future__ import annotations

from dataclasses import dataclass

# The settings search's outputs depend on; each later stage adds its own section, so a change
# upstream invalidates everything downstream.
_SEARCH_SETTINGS = (
    "model",
    "dataset",
    "lora",
    "search",
    "seed",
    "format",
    "max_length",
    "precision",
    "group_by_length",
)


@dataclass(frozen=True)
class Stage:
    name: str
    """The command (`flexora <name>`) and, for a stage with outputs, its folder in out_dir."""
    module: str
    """The module whose `run(cfg)` carries it out."""
    summary: str
    """One line for `flexora --help`."""
    settings: tuple[str, ...] = ()
    """The settings sections its outputs depend on (empty: it writes no verified outputs)."""
    in_pipeline: bool = False
    """One of the stages `flexora run` chains, in this table's order."""


STAGES: tuple[Stage, ...] = (
    Stage(
        "search",
        "flexora_cli.stages.search",
        "fit one gate α̂ per layer and write the ranking",
        _SEARCH_SETTINGS,
        in_pipeline=True,
    ),
    Stage(
        "select",
        "flexora_cli.stages.select",
        "pick layers from the ranking (or select.layers=[...]|all)",
        (*_SEARCH_SETTINGS, "select"),
        in_pipeline=True,
    ),
    Stage(
        "finetune",
        "flexora_cli.stages.finetune",
        "train fresh LoRA on the selected layers only",
        (*_SEARCH_SETTINGS, "select", "finetune"),
        in_pipeline=True,
    ),
    Stage(
        "eval",
        "flexora_cli.stages.evaluate",
        "accuracy of the base model and adapters, per dataset",
        (*_SEARCH_SETTINGS, "select", "finetune", "eval"),
        in_pipeline=True,
    ),
    Stage("run", "flexora_cli.stages.run", "all four stages, skipping those already complete"),
    Stage(
        "compare",
        "flexora_cli.stages.compare",
        "base vs LoRA (all layers) vs Flexora vs top-k vs random layers, over seeds, one table",
    ),
    Stage(
        "export",
        "flexora_cli.stages.export",
        "merge the adapter into the base: a plain transformers model (and a GGUF)",
        (*_SEARCH_SETTINGS, "select", "finetune", "export"),
    ),
    Stage("summary", "flexora_cli.stages.summary", "one table for a sweep: `flexora summary DIR`"),
)
BY_NAME = {stage.name: stage for stage in STAGES}
PIPELINE = tuple(stage.name for stage in STAGES if stage.in_pipeline)
"""search, select, finetune, eval: the stages `flexora run` chains."""
