"""Stage 3 — selection: turn the α̂ ranking into the set of layers that get LoRA.

Rules: `positive` (α̂ > 0, the paper's; since Σα̂ = 0 that is "above the mean"), `top_k`, and
`budget` (best-ranked layers while the LoRA parameter count stays within max_params).
`select.layers=[...]` or `all` bypasses the search. Output: select/selection.json.
"""

from __future__ import annotations

from omegaconf import DictConfig

from flexora_cli import report
from flexora_cli.errors import ConfigError, FlexoraError
from flexora_cli.gates import ranking
from flexora_cli.modeling import describe
from flexora_cli.rundir import read_json
from flexora_cli.settings import SelectSettings, Settings
from flexora_cli.stages import locked, planted_layers, setup


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
        chosen = [i for i in ranked if alpha[i] > 0]
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
    if spec.layers == "all":
        return list(range(num_layers))
    bad = [i for i in spec.layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(
            f"select.layers: {bad} out of range for a model with {num_layers} layers (0..{num_layers - 1})"
        )
    return sorted(spec.layers)


@locked
def run(cfg: DictConfig | Settings) -> dict:
    settings, run_dir = setup(cfg)
    spec = settings.select
    if spec.layers is not None:
        params_per_layer = describe(settings.model, settings.lora)
        layers, rule, alpha = explicit_layers(spec, len(params_per_layer)), "explicit", None
    else:
        searched = read_json(run_dir.alpha_json, "search", "select")
        run_dir.check_upstream("search", "select", settings)
        alpha, params_per_layer = searched["alpha"], searched["lora_params_per_layer"]
        model_layers = len(describe(settings.model, settings.lora))
        if len(alpha) != model_layers:
            raise ConfigError(
                f"{run_dir.alpha_json} ranks {len(alpha)} layers but {settings.model.name_or_path} has "
                f"{model_layers}: it comes from another model; rerun `flexora search` for this model"
            )
        layers, rule = select_layers(alpha, spec.rule, spec.k, spec.max_params, params_per_layer), spec.rule
    run_dir.begin_stage("select", settings)
    result = {
        "layers": layers,
        "rule": rule,
        "trainable_params": sum(params_per_layer[i] for i in layers),
        "num_layers": len(params_per_layer),
        "all_layers_params": sum(params_per_layer),
        "ranking": ranking(alpha) if alpha else None,
    }
    run_dir.write_json(run_dir.selection_json, result)
    if alpha is not None:  # the ranking again, with the chosen layers marked
        run_dir.save_figure(
            run_dir.selection_png, lambda: report.plot_alpha(alpha, searched["history"], layers)
        )
    run_dir.end_stage("select", layers=layers)

    if alpha is not None:
        report.console.print(report.alpha_table(alpha, result["ranking"], layers, planted_layers(settings)))
    share = result["trainable_params"] / result["all_layers_params"]
    facts = [
        f"rule {rule}: layers {layers}",
        f"{result['trainable_params']:,} trainable LoRA parameters ({share:.0%} of LoRA on all layers)",
    ]
    report.console.print(report.stage_panel("select", facts, [run_dir.selection_json, run_dir.selection_png]))
    return result
