"""Stage 3 of the method: from α̂ to the set of layers that get LoRA.

One ranking (α̂ highest first) serves the search's report, every rule and the figures. Rules:
`positive` (α̂ > 0, the paper's; with Σα̂ = 0 that is "above the mean"), `top_k`, and `budget`
(best-ranked layers while the LoRA parameter count stays within max_params).
"""

from __future__ import annotations

from flexora_cli.errors import ConfigError, FlexoraError
from flexora_cli.settings import SelectSettings

MIN_ALPHA_STEPS = 50
"""Fewer α steps than this and α̂ has barely moved from 0: the ranking reflects a few batches."""
MIN_ALPHA_SPREAD = 0.05
"""α̂'s range (max − min) below this: the layers are indistinguishable, the ranking is noise."""


def noise_warning(steps: int, alpha: list[float]) -> str | None:
    """Why a search's ranking is noise rather than a finding, or None when it is not."""
    spread = max(alpha) - min(alpha)
    if steps >= MIN_ALPHA_STEPS and spread >= MIN_ALPHA_SPREAD:
        return None
    return (
        f"the search took {steps} α step(s) and α̂ spans {spread:.3f}: below {MIN_ALPHA_STEPS} steps or a "
        f"{MIN_ALPHA_SPREAD} spread the ranking is mostly noise; raise search.budget (or search.epochs, "
        f"search.alpha_lr) before trusting the selection"
    )


def ranking(alpha: list[float]) -> list[int]:
    """Layer indices by α̂, highest first (ties: lower index first)."""
    return sorted(range(len(alpha)), key=lambda i: (-alpha[i], i))


def positive_layers(alpha: list[float]) -> list[int]:
    """The paper's rule: the layers whose α̂ is above the mean (> 0 once centred), ascending."""
    return [i for i, a in enumerate(alpha) if a > 0]


def select_layers(
    alpha: list[float],
    rule: str,
    k: int | None = None,
    max_params: int | None = None,
    params_per_layer: list[int] | None = None,
) -> list[int]:
    """The selected layer indices (ascending) under `rule`; never empty."""
    ranked = ranking(alpha)
    if rule == "positive":
        chosen = positive_layers(alpha)
        if not chosen:
            raise FlexoraError(
                "select: no layer has α̂ > 0 (the search left α̂ at 0); run a longer search "
                "(search.budget, search.alpha_lr) or use select.rule=top_k select.k=K"
            )
    elif rule == "top_k":
        if k is None or not 0 < k <= len(alpha):
            raise ConfigError(f"select.k={k} is out of range for {len(alpha)} layers; use 1..{len(alpha)}")
        chosen = ranked[:k]
    elif rule == "budget":
        assert params_per_layer is not None and max_params is not None
        chosen, used = [], 0
        for layer in ranked:
            if used + params_per_layer[layer] <= max_params:
                chosen.append(layer)
                used += params_per_layer[layer]
        if not chosen:
            raise ConfigError(
                f"select.max_params={max_params} is below the cheapest layer's "
                f"{min(params_per_layer)} LoRA parameters; raise it"
            )
    else:
        raise ConfigError(f"select.rule={rule!r} is unknown; use positive, top_k or budget")
    return sorted(chosen)


def explicit_layers(spec: SelectSettings, num_layers: int) -> list[int]:
    """`select.layers` (a list or "all") checked against the model's layer count."""
    if spec.layers == "all":
        return list(range(num_layers))
    bad = [i for i in spec.layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(
            f"select.layers: {bad} out of range for a model with {num_layers} layers (0..{num_layers - 1})"
        )
    return sorted(spec.layers)
