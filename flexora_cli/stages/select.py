"""Stage 3 — selection, as a recipe: read the search's ranking, apply `select.rule`
(method/selection.py), write select/selection.json (method.Selection) and the figure.
`select.layers=[...]` or `all` bypasses the search.
"""

from __future__ import annotations

from omegaconf import DictConfig

from flexora_cli import report
from flexora_cli.errors import ConfigError
from flexora_cli.manifest import Manifest
from flexora_cli.method import SearchResult, Selection, explicit_layers, noise_warning, ranking, select_layers
from flexora_cli.modeling import lora_config, lora_params_per_layer_of
from flexora_cli.settings import Settings
from flexora_cli.stages import locked, planted_layers, setup


@locked
def run(cfg: DictConfig | Settings) -> Selection:
    # -- setup: the ranking to select from (or the explicit layers) ------------------------------
    settings, run_dir = setup(cfg)
    manifest = Manifest(run_dir)
    manifest.check_overwrite("select", settings)
    spec = settings.select
    searched = None
    if spec.layers is not None:
        params_per_layer = lora_params_per_layer_of(settings.model, settings.lora)
        layers, rule = explicit_layers(spec, len(params_per_layer)), "explicit"
    else:
        manifest.check_upstream("search", "select", settings)
        searched = SearchResult.read(run_dir.alpha_json, "search", "select")
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
    manifest.begin("select", settings)
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
    inputs = ("search",) if searched else ()
    manifest.complete("select", settings, [run_dir.selection_json], inputs, layers=layers)
    print_selection(settings, run_dir, selection, searched)
    return selection


def print_selection(settings: Settings, run_dir, selection: Selection, searched: SearchResult | None) -> None:
    """The α̂ table with the chosen layers marked, and the closing panel."""
    if searched is not None:
        table = report.alpha_table(
            searched.alpha, selection.ranking, selection.layers, planted_layers(settings)
        )
        report.result(table)
        if warning := noise_warning(searched.alpha_step_count, searched.alpha):
            report.warn(f"select: {warning}")
    share = selection.trainable_params / selection.all_layers_params
    facts = [
        f"rule {selection.rule}: layers {selection.layers}",
        f"{selection.trainable_params:,} trainable LoRA parameters ({share:.0%} of LoRA on all layers)",
    ]
    report.result(report.stage_panel("select", facts, [run_dir.selection_json, run_dir.selection_png]))
    if settings.select.print == "peft":
        report.result(sharing_snippets(settings, selection.layers))


def sharing_snippets(settings: Settings, layers: list[int]) -> str:
    """The selection as the PEFT LoraConfig finetune uses (modeling.lora_config) and as the
    matching axolotl settings, to train the same layers with those tools."""
    config = lora_config(settings.model, settings.lora, layers)
    peft = (
        f"LoraConfig(r={config.r}, lora_alpha={config.lora_alpha}, lora_dropout={config.lora_dropout}, "
        f"target_modules={sorted(config.target_modules)}, layers_to_transform={config.layers_to_transform}, "
        f'layers_pattern="{config.layers_pattern}", task_type="CAUSAL_LM")'
    )
    axolotl = "\n".join(
        [
            "adapter: lora",
            f"lora_r: {config.r}",
            f"lora_alpha: {config.lora_alpha:g}",
            f"lora_dropout: {config.lora_dropout}",
            f"lora_target_modules: [{', '.join(sorted(config.target_modules))}]",
            f"peft_layers_to_transform: {config.layers_to_transform}",
        ]
    )
    return f"# PEFT (from peft import LoraConfig)\n{peft}\n\n# axolotl (config.yml)\n{axolotl}"
