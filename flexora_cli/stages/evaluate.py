"""Stage 4b — accuracy of the base model and of the fine-tuned adapter on the eval split.

Each choice is scored by log-likelihood (scoring.py); the prediction is the best-scoring choice.
Output: eval/metrics.json and eval/predictions.jsonl (one line per example, per-choice scores).
"""

from __future__ import annotations

from omegaconf import DictConfig
from peft import PeftModel

from flexora_cli import report
from flexora_cli.data.datasets import load_split
from flexora_cli.data.prompts import build_prompts
from flexora_cli.errors import MissingArtifactError
from flexora_cli.modeling import load_model, load_tokenizer, resolve_device
from flexora_cli.scoring import accuracy, score
from flexora_cli.settings import Settings
from flexora_cli.stages import setup


def run(cfg: DictConfig | Settings) -> dict:
    settings, run_dir = setup(cfg)
    adapter_config = run_dir.adapter_dir / "adapter_config.json"
    if not adapter_config.exists():
        raise MissingArtifactError(adapter_config, "finetune", "eval")
    device = resolve_device(settings.device)

    split = settings.dataset.eval_split
    examples = load_split(settings.dataset, split)[: settings.dataset.max_eval_samples]
    prompts = build_prompts(examples, settings.format)
    golds = [p.gold for p in prompts]
    tokenizer = load_tokenizer(settings.model)
    model = load_model(settings.model, device)
    run_dir.begin_stage("eval", settings)

    variants = {}
    if settings.eval.include_base:
        variants["base"] = _score(model, tokenizer, prompts, settings, "eval base")
    model = PeftModel.from_pretrained(model, str(run_dir.adapter_dir)).eval()
    variants["adapter"] = _score(model, tokenizer, prompts, settings, "eval adapter")

    metrics = {"dataset": settings.dataset.name, "split": split, "format": settings.format, "n": len(prompts)}
    rows = [{"index": i, "gold": gold} for i, gold in enumerate(golds)]
    for name, scores in variants.items():
        predictions, acc, stderr = accuracy(scores, golds)
        metrics[name] = {
            "accuracy": acc,
            "stderr": stderr,
            "correct": sum(p == g for p, g in zip(predictions, golds)),
        }
        for row, predicted, choice_scores in zip(rows, predictions, scores):
            row[name] = {"predicted": predicted, "scores": choice_scores}
    run_dir.write_jsonl(run_dir.predictions_jsonl, rows)
    run_dir.write_json(run_dir.metrics_json, metrics)
    run_dir.end_stage("eval", **{f"{k}_accuracy": metrics[k]["accuracy"] for k in variants})
    report.console.print(report.metrics_table(metrics))
    report.console.print(f"eval: wrote {run_dir.metrics_json}")
    return metrics


def _score(model, tokenizer, prompts, settings: Settings, label: str) -> list[list[float]]:
    with report.progress(label, len(prompts)) as bar:

        def advance(_n: int) -> None:
            bar.update(0, completed=min(len(prompts), bar.tasks[0].completed + _n))

        return score(model, tokenizer, prompts, settings.eval.batch_size, settings.max_length, advance)
