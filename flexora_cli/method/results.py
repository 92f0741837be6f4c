"""The method's typed outputs: what the search found (search/alpha.json) and what the selection
chose (select/selection.json). Every reader goes through these classes, not through string keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexora_cli.errors import DamagedArtifactError
from flexora_cli.rundir import read_json


class _JsonRecord:
    """to_json / read for a dataclass whose fields are JSON values."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path | str = "the file", stage: str | None = None):
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}  # fmt: skip
        missing = sorted(required - set(data)) if isinstance(data, dict) else ["(not an object)"]
        if missing:
            raise DamagedArtifactError(
                f"{source} lacks {', '.join(missing)}: it is damaged or from an older flexora; "
                f"rerun {f'`flexora {stage}`' if stage else 'the stage that writes it'} with force=true"
            )
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def read(cls, path: Path, stage: str, this_stage: str):
        """The record `stage` wrote at `path`, for `this_stage` (one clear line when missing)."""
        return cls.from_json(read_json(path, stage, this_stage), path, stage)


@dataclass
class SearchResult(_JsonRecord):
    """search/alpha.json: the gates the search fitted and how the search ran."""

    alpha: list[float]
    """α̂ per layer, centred (Σα̂ = 0 up to rounding)."""
    ranking: list[int]
    """Layer indices, highest α̂ first (selection.ranking)."""
    scaled_alpha: list[float]
    """αᵢ = N·softmax(α̂)ᵢ, the factor each layer's LoRA paths were multiplied by at the end."""
    alpha_sum: float
    """Σα̂ (Proposition 1: 0)."""
    lora_params_per_layer: list[int]
    """LoRA parameters each layer would get (for select.rule=budget and the reports)."""
    hypergradient: str
    """How α̂'s gradient was computed: first_order, darts or unrolled."""
    unroll_steps: int
    """K, the LoRA steps the unrolled hypergradient differentiates through (0 unless unrolled)."""
    steps: int
    seconds: float
    padding_waste: float
    num_processes: int
    precision: str
    max_grad_norm: float
    nonfinite_steps_skipped: int
    history: list[dict] = field(default_factory=list)
    """Every log step: step, train_loss, val_loss, alpha (α̂ per layer), alpha_sum, grad_norm."""
    alpha_steps: int | None = None
    """α steps taken (steps − search.alpha_warmup_steps); None in files from before it existed."""
    partition: dict | None = None
    """dataset.partition's record (data.partition.PartitionRecord) when the rows were cut from one
    split; None: the whole train split."""

    @property
    def num_layers(self) -> int:
        return len(self.alpha)

    @property
    def alpha_step_count(self) -> int:
        return self.steps if self.alpha_steps is None else self.alpha_steps

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "num_layers": self.num_layers}


@dataclass
class Selection(_JsonRecord):
    """select/selection.json: the layers that get LoRA."""

    layers: list[int]
    """Selected layer indices, ascending."""
    rule: str
    """positive, top_k, budget, or explicit (select.layers)."""
    trainable_params: int
    """LoRA parameters of the selected layers."""
    num_layers: int
    all_layers_params: int
    """LoRA parameters of all layers (the plain-LoRA baseline)."""
    ranking: list[int] | None = None
    """The search's ranking (None for explicit layers)."""
