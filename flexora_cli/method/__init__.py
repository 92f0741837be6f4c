"""Flexora, the method (arXiv 2408.10774), in one folder; docs/method.md says where and why we
differ from the paper and the authors' code.

- gates.py: one hyperparameter α̂ᵢ per layer; every LoRA path of layer i is multiplied once by
  αᵢ = N·softmax(α̂)ᵢ (all ones at α̂ = 0: plain LoRA). α̂ is centred after each α step, so
  Σα̂ = 0 (the paper's Proposition 1) holds under Adam too.
- search_step.py: one search step: a LoRA step on a training batch (α fixed), then an α step on a
  validation batch (θ fixed, no dropout), then centring.
- hypergradient.py: α̂'s gradient: first_order (the paper's K = 0, the authors' code), darts (the
  last LoRA step's effect by a finite difference) or unrolled (exact, through K LoRA steps); their
  names, their rules on the settings and the launch, and the name → class table.
- selection.py: the ranking (α̂ highest first) and the rules positive (α̂ > 0), top_k, budget.
- results.py: SearchResult (search/alpha.json) and Selection (select/selection.json).

stages/search.py and stages/select.py only load, loop, save and print around these.
"""

from flexora_cli.method.gates import LayerGates, gated_lora_model
from flexora_cli.method.hypergradient import HYPERGRADIENTS
from flexora_cli.method.results import SearchResult, Selection
from flexora_cli.method.search_step import SearchStep, build_search_step, search_optimizers
from flexora_cli.method.selection import (
    explicit_layers,
    noise_warning,
    positive_layers,
    ranking,
    select_layers,
)

__all__ = [
    "HYPERGRADIENTS",
    "LayerGates",
    "SearchResult",
    "SearchStep",
    "Selection",
    "build_search_step",
    "explicit_layers",
    "gated_lora_model",
    "noise_warning",
    "positive_layers",
    "ranking",
    "search_optimizers",
    "select_layers",
]
