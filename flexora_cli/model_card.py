"""The adapter's model card (finetune/adapter/README.md, Hugging Face's format): what a reader of
the adapter alone needs — the α̂ ranking that chose its layers, the layers, how it was trained,
and its accuracy. finetune writes it; eval rewrites it with the eval table. It is documentation,
so the manifest leaves it out of the adapter's verified files (manifest.fingerprint)."""

from __future__ import annotations

from flexora_cli import report
from flexora_cli.data.datasets import part_split
from flexora_cli.method.results import SearchResult, Selection
from flexora_cli.records import EvalMetrics, FinetuneLog, Score
from flexora_cli.rundir import MODEL_CARD, RunDir
from flexora_cli.settings import Settings


def write_model_card(run_dir: RunDir, settings: Settings, stage: str) -> None:
    """Write the card from this run's records (the ones that exist so far), for `stage`."""
    alpha = SearchResult.read(run_dir.alpha_json, "search", stage) if run_dir.alpha_json.is_file() else None
    selection = Selection.read(run_dir.selection_json, "select", stage)
    log = run_dir.finetune_log_json
    train_log = FinetuneLog.read(log, "finetune", stage) if log.is_file() else None
    metrics = (
        EvalMetrics.read(run_dir.metrics_json, "eval", stage) if run_dir.metrics_json.is_file() else None
    )
    sections = [
        _header(settings, selection),
        _ranking(alpha, selection),
        _training(settings, train_log),
        _evaluation(metrics),
        _usage(settings, run_dir),
    ]
    run_dir.write_text(run_dir.adapter_dir / MODEL_CARD, "\n\n".join(sections) + "\n")


def _header(settings: Settings, selection: Selection) -> str:
    model, lora = settings.model, settings.lora
    return (
        f"---\nbase_model: {model.name_or_path}\nlibrary_name: peft\n"
        f"tags: [flexora, lora, {lora.variant}, {settings.dataset.name}]\n---\n\n"
        f"# {model.name} + LoRA on {settings.dataset.name}, layers chosen by Flexora\n\n"
        f"A {lora.variant} adapter (r={lora.r}, alpha={lora.alpha:g}) on {', '.join(model.target_modules)} of "
        f"{len(selection.layers)} of the {selection.num_layers} layers: {selection.layers} "
        f"(select.rule={selection.rule}), {selection.trainable_params:,} trainable parameters, "
        f"{selection.trainable_params / max(selection.all_layers_params, 1):.0%} of LoRA on every layer. "
        "Made with flexora-cli (Flexora: arXiv 2408.10774)."
    )


def _ranking(alpha: SearchResult | None, selection: Selection) -> str:
    if alpha is None:
        return "## Layer selection\n\nThe layers were given by hand (select.layers); no search ran."
    rows = [
        [str(rank), str(layer), f"{alpha.alpha[layer]:+.4f}", "✓" if layer in selection.layers else ""]
        for rank, layer in enumerate(alpha.ranking, start=1)
    ]
    return (
        "## Layer selection\n\nLayers ranked by the search's gate α̂ (higher: the layer's LoRA helped the "
        f"validation loss more; {alpha.steps} steps, {alpha.hypergradient} hypergradient).\n\n"
        + report.markdown_table(["rank", "layer", "α̂", "selected"], rows)
    )


def _training(settings: Settings, train_log: FinetuneLog | None) -> str:
    chat = ", inside the tokenizer's chat template" if settings.model.chat_template else ""
    lines = [
        f"- data: {settings.dataset.name} ({part_split(settings.dataset, 'train')} split), "
        f"{settings.format} prompts{chat}",
        f"- finetune: {settings.finetune.epochs:g} epoch(s), lr {settings.finetune.lr:g}, "
        f"batch {settings.finetune.batch_size}, seed {settings.seed}",
    ]
    if train_log:
        lines.append(f"- {train_log.steps} steps on {train_log.examples} examples")
    return "## Training\n\n" + "\n".join(lines)


def _evaluation(metrics: EvalMetrics | None) -> str:
    if metrics is None:
        return "## Evaluation\n\nNot evaluated yet (`flexora eval` adds the table here)."
    rows = [
        [dataset, metrics.splits.get(dataset, ""), variant, str(score.n), *_accuracy(score)]
        for dataset, scores in metrics.results.items()
        for variant, score in scores.items()
    ]
    columns = ["dataset", "split", "model", "n", "acc", "acc_norm", "loss"]
    return f"## Evaluation ({report.evaluated_with(metrics)})\n\n" + report.markdown_table(columns, rows)


def _accuracy(score: Score) -> list[str]:
    pairs = ((score.acc, score.acc_stderr), (score.acc_norm, score.acc_norm_stderr))
    cells = [f"{value:.4f} ± {stderr or 0:.4f}" if value is not None else "–" for value, stderr in pairs]
    return cells + ["–" if score.loss is None else f"{score.loss:.4f}"]


def _usage(settings: Settings, run_dir: RunDir) -> str:
    return (
        "## Use\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{settings.model.name_or_path}")\n'
        f'model = PeftModel.from_pretrained(base, "{run_dir.adapter_dir}")\n```'
    )
