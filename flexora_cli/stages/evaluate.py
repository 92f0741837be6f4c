"""Stage 4b — accuracy of the base model and of adapters, on one or several datasets.

Setup loads every dataset first (bad data fails before the model loads), then the base model once
with every adapter attached under its own name. The loop scores each dataset with each variant
(the base with adapters disabled, then each adapter) by log-likelihood (scoring.py) and computes
lm-eval's metrics; with several processes the prompts are dealt among them and the scores
gathered. Save: eval/metrics.json (results[dataset][variant]: acc, acc_norm where
defined, their stderr, n) and eval/predictions.jsonl (per example: gold, each variant's prediction and scores).
With eval.evaluator=lm_eval, lm-evaluation-harness scores eval.tasks instead (lm_evaluator.py),
into the same files. An eval with other eval settings (limit, format, datasets, adapters) than the one in eval/ writes
into eval/<settings digest>/ instead, so no result is replaced (manifest.Manifest.eval_key).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from omegaconf import DictConfig
from peft import PeftModel

from flexora_cli import lm_evaluator, report
from flexora_cli.config import dataset_settings
from flexora_cli.data.datasets import load_part, part_split
from flexora_cli.data.prompts import Prompt, model_prompts
from flexora_cli.engine import Engine
from flexora_cli.errors import ConfigError, ModelError
from flexora_cli.manifest import Manifest
from flexora_cli.model_card import write_model_card
from flexora_cli.modeling import compile_layers, load_model, load_tokenizer
from flexora_cli.records import EvalMetrics
from flexora_cli.rundir import RunDir
from flexora_cli.scoring import choice_metrics, score
from flexora_cli.settings import Settings
from flexora_cli.stages import locked, setup


@locked
def run(cfg: DictConfig | Settings) -> EvalMetrics:
    # -- setup -------------------------------------------------------------------------------
    settings, run_dir = setup(cfg)
    manifest = Manifest(run_dir)
    key = manifest.eval_key(settings)
    if key != "eval":
        report.line(
            f"eval: {run_dir.stage_dir('eval')} holds the run's eval with other eval settings; "
            f"this one goes to {run_dir.root / key}"
        )
    lm_eval = settings.eval.evaluator == "lm_eval"
    engine = Engine(settings, settings.eval.precision)
    if settings.distributed == "fsdp" and engine.num_processes > 1:
        report.line("eval: not sharded; each process scores its share of the rows with the whole model")
    lm_eval_tasks = lm_evaluator.task_manager(settings, engine.num_processes) if lm_eval else None
    evaluator = f"lm-eval {lm_evaluator.version()}" if lm_eval else "flexora"
    eval_format = None if lm_eval else settings.eval.format or settings.format
    adapters = _adapter_dirs(settings, manifest)
    tokenizer = load_tokenizer(settings.model)
    tasks = {} if lm_eval else _tasks(settings, tokenizer)
    model = load_model(settings.model, engine.device, engine.precision)
    model = _attach_adapters(model, adapters, settings)
    if engine.compile:
        compile_layers(model, settings.model.layers_path)
    manifest.begin("eval", settings, key)

    # -- loop: every dataset × every variant ----------------------------------------------------
    variants = (["base"] if settings.eval.include_base else []) + list(adapters)
    if lm_eval:
        results, splits, rows = lm_evaluator.evaluate(
            model, tokenizer, lm_eval_tasks, variants, _use_variant, settings
        )
    else:
        results, rows = _score_tasks(model, tokenizer, tasks, variants, settings, engine)
        splits = {dataset: split for dataset, (split, *_) in tasks.items()}

    # -- save ---------------------------------------------------------------------------------
    summary = EvalMetrics(
        model=settings.model.name_or_path,
        evaluator=evaluator,
        format=eval_format,
        variants={name: (str(path) if path else None) for name, path in {"base": None, **adapters}.items()},
        splits=splits,
        partitions={dataset: partition for dataset, (*_, partition) in tasks.items() if partition},
        results=results,
    )
    outputs = [run_dir.root / key / "predictions.jsonl", run_dir.root / key / "metrics.json"]
    run_dir.write_jsonl(outputs[0], rows)
    run_dir.write_json(outputs[1], summary.to_json())
    accuracies = {f"{d}/{v}_acc": s.acc for d, scores in summary.results.items() for v, s in scores.items()}
    inputs = ("finetune",) if settings.eval.adapters is None else ()
    manifest.complete("eval", settings, outputs, inputs, key, **accuracies)
    if key == "eval" and settings.eval.adapters is None:  # this run's adapter: its card gets the table
        write_model_card(run_dir, settings, "eval")
    report.result(report.metrics_table(summary))
    facts = [f"{len(results)} dataset(s) × {len(variants)} variant(s), {report.evaluated_with(summary)}"]
    report.result(report.stage_panel("eval", facts, outputs[::-1]))
    return summary


def _tasks(settings: Settings, tokenizer) -> dict[str, tuple[str, list[Prompt], dict | None]]:
    """Dataset name → (split, prompts) for the built-in scorer; bad data fails before the model loads."""
    eval_format = settings.eval.format or settings.format
    tasks = {}
    for name in settings.eval.datasets or [settings.dataset.name]:
        spec = dataset_settings(name, settings)
        part = load_part(spec, "test")
        tasks[spec.name] = (
            part_split(spec, "test"),
            model_prompts(part.examples[: settings.eval.limit], spec, eval_format, tokenizer, settings.model),
            part.record(),
        )
    return tasks


def _score_tasks(
    model, tokenizer, tasks: dict, variants: list[str], settings: Settings, engine: Engine
) -> tuple[dict, list[dict]]:
    """(results[dataset][variant], per-example rows) from the built-in log-likelihood scorer."""
    results: dict[str, dict] = {}
    rows: list[dict] = []
    for dataset, (_, prompts, _) in tasks.items():
        results[dataset] = {}
        per_example = [{"dataset": dataset, "index": i, "gold": p.gold} for i, p in enumerate(prompts)]
        for variant in variants:
            started = time.perf_counter()
            with _use_variant(model, variant):
                scores = _score(model, tokenizer, prompts, settings, engine, f"eval {dataset} {variant}")
            metrics, examples = choice_metrics(scores, prompts)
            metrics["seconds"] = round(time.perf_counter() - started, 3)
            results[dataset][variant] = metrics
            for row, example in zip(per_example, examples):
                row[variant] = example
        rows += per_example
    return results, rows


def _adapter_dirs(settings: Settings, manifest: Manifest) -> dict[str, Path]:
    """Variant name → adapter directory: this run's adapter, or each of eval.adapters (verified
    against their run's manifest when they come from a flexora run)."""
    if settings.eval.adapters is None:
        return {"adapter": manifest.require_adapter("eval", settings)}
    found: dict[str, Path] = {}
    for entry in settings.eval.adapters:
        path = Path(entry)
        adapter = path if (path / "adapter_config.json").is_file() else RunDir(path).adapter_dir
        if not (adapter / "adapter_config.json").is_file():
            raise ConfigError(
                f"eval.adapters: {entry} holds no adapter (looked for {path}/adapter_config.json and "
                f"{adapter}/adapter_config.json); run `flexora finetune out_dir={entry}` first"
            )
        if adapter == RunDir(path).adapter_dir:
            Manifest(RunDir(path)).require("finetune", "eval")
        name = path.name or str(path)
        while name in found or name == "base":
            name += "'"
        found[name] = adapter
    return found


def _attach_adapters(model, adapters: dict[str, Path], settings: Settings):
    """The base model with every adapter loaded under its variant name (none active yet)."""
    for index, (name, path) in enumerate(adapters.items()):
        try:
            if index == 0:
                model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
            else:
                model.load_adapter(str(path), adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as exc:
            trained_on = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            raise ModelError(
                f"adapter {path} does not fit {settings.model.name_or_path} (it was trained on "
                f"{trained_on}): {str(exc).splitlines()[0][:160]}; evaluate it with model.name_or_path={trained_on}"
            ) from exc
    return model.eval()


@contextlib.contextmanager
def _use_variant(model, variant: str):
    if not isinstance(model, PeftModel):
        yield
    elif variant == "base":
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(variant)
        yield


def _score(
    model, tokenizer, prompts: list[Prompt], settings: Settings, engine: Engine, label: str
) -> list[list[float]]:
    """scores[prompt][choice]; with several processes each scores every num_processes-th prompt."""
    rank, world = engine.process_index, engine.num_processes
    mine = prompts[rank::world]
    with report.progress(label, len(mine)) as bar:

        def advance(done_rows: int, total_rows: int) -> None:
            bar.update(0, completed=len(mine) * done_rows // total_rows)

        scores = score(
            model,
            tokenizer,
            mine,
            settings.eval.batch_size,
            settings.max_length,
            settings.eval.share_prefix,
            advance,
        )
    if world == 1:
        return scores
    from accelerate.utils import gather_object

    merged: list[list[float]] = [[] for _ in prompts]
    for process, part in enumerate(gather_object([scores])):
        merged[process::world] = part
    return merged
