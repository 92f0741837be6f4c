"""The method's typed outputs: what the search found (search/alpha.json) and what the selection
chose (select/selection.json), on records.JsonRecord. Every reader goes through these classes, not
through string keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flexora_cli.records import JsonRecord, TrainingRun


@dataclass
class SearchResult(TrainingRun):
    """search/alpha.json: the gates the search fitted, and how the search ran (TrainingRun)."""

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
    alpha_steps: int | None = None
    """α steps taken (steps − search.alpha_warmup_steps); None in files from before it existed."""

    @property
    def num_layers(self) -> int:
        return len(self.alpha)

    @property
    def alpha_step_count(self) -> int:
        return self.steps if self.alpha_steps is None else self.alpha_steps

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "num_layers": self.num_layers}


@dataclass
class Selection(JsonRecord):
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
