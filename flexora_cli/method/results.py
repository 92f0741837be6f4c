"""The method's typed outputs: what the search found (search/alpha.json) and what the selection
chose (select/selection.json), on records.JsonRecord. Every reader goes through these classes, not
through string keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flexora_cli.records import JsonRecord


@dataclass
class SearchResult(JsonRecord):
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
