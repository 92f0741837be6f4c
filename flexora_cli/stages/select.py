"""Stage 3 — selection, as a recipe: read the search's ranking, apply `select.rule`
(method/selection.py), write select/selection.json (method.Selection) and the figure.
`select.layers=[...]` or `all` bypasses the search.
"""

from __future__ import annotations

from omegaconf import DictConfig

from flexora_cli import report
from flexora_cli.errors import ConfigError
from flexora_cli.method import SearchResult, Selection, explicit_layers, ranking, select_layers
from flexora_cli.modeling import lora_params_per_layer_of
from flexora_cli.settings import Settings
from flexora_cli.stages import locked, planted_layers, setup


@locked
def run(cfg: DictConfig | Settings) -> Selection:
    # -- setup: the ranking to select from (or the explicit layers) ------------------------------
    settings, run_dir = setup(cfg)
    spec = settings.select
    searched = None
    if spec.layers is not None:
        params_per_layer = lora_params_per_layer_of(settings.model, settings.lora)
        layers, rule = explicit_layers(spec, len(params_per_layer)), "explicit"
    else:
        searched = SearchResult.read(run_dir.alpha_json, "search", "select")
        run_dir.check_upstream("search", "select", settings)
        params_per_layer = searched.lora_params_per_layer
        model_layers = len(lora_params_per_layer_of(settings.model, settings.lora))
        if searched.num_layers != model_layers:
            raise ConfigError(
                f"{run_dir.alpha_json} ranks {searched.num_layers} layers but {settings.model.name_or_path} "
                f"has {model_layers}: it comes from another model; rerun `flexora search` for this model"
            )
        layers = select_layers(searched.alpha, spec.rule, spec.k, spec.max_params, params_per_layer)
        rule = spec.rule

    # -- save -----------------------------------------------------------------------------------
    run_dir.begin_stage("select", settings)
    selection = Selection(
        layers=layers,
        rule=rule,
        trainable_params=sum(params_per_layer[i] for i in layers),
        num_layers=len(params_per_layer),
        all_layers_params=sum(params_per_layer),
        ranking=ranking(searched.alpha) if searched else None,
    )
    run_dir.write_json(run_dir.selection_json, selection.to_json())
    if searched is not None:  # the ranking again, with the chosen layers marked
        run_dir.save_figure(
            run_dir.selection_png, lambda: report.plot_alpha(searched.alpha, searched.history, layers)
        )
    run_dir.end_stage("select", layers=layers)
    print_selection(settings, run_dir, selection, searched)
    return selection


def print_selection(settings: Settings, run_dir, selection: Selection, searched: SearchResult | None) -> None:
    """The α̂ table with the chosen layers marked, and the closing panel."""
    if searched is not None:
        table = report.alpha_table(
            searched.alpha, selection.ranking, selection.layers, planted_layers(settings)
        )
        report.console.print(table)
    share = selection.trainable_params / selection.all_layers_params
    facts = [
        f"rule {selection.rule}: layers {selection.layers}",
        f"{selection.trainable_params:,} trainable LoRA parameters ({share:.0%} of LoRA on all layers)",
    ]
    report.console.print(report.stage_panel("select", facts, [run_dir.selection_json, run_dir.selection_png]))
