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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig
from peft import PeftModel

from flexora_cli import lm_evaluator, report
from flexora_cli.config import dataset_settings
from flexora_cli.data.collate import TrainingRow
from flexora_cli.data.datasets import load_part, part_split
from flexora_cli.data.features import training_rows
from flexora_cli.data.prompts import Prompt, model_prompts
from flexora_cli.engine import Engine
from flexora_cli.errors import ConfigError, ModelError
from flexora_cli.manifest import Manifest
from flexora_cli.model_card import write_model_card
from flexora_cli.modeling import compile_layers, load_model, load_tokenizer
from flexora_cli.records import EvalMetrics
from flexora_cli.rundir import RunDir
from flexora_cli.scoring import choice_metrics, response_loss, response_metrics, score
from flexora_cli.settings import Settings
from flexora_cli.stages import locked, setup

_T = TypeVar("_T")


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
    spec = settings.eval
    engine = Engine(settings, spec.precision)
    if settings.distributed == "fsdp" and engine.num_processes > 1:
        report.line("eval: not sharded; each process scores its share of the rows with the whole model")
    lm_eval_tasks = lm_evaluator.task_manager(settings, engine.num_processes) if spec.uses_lm_eval else None
    adapters = _adapter_dirs(settings, manifest)
    tokenizer = load_tokenizer(settings.model)
    tasks = _tasks(settings, tokenizer) if spec.uses_builtin else {}
    model = load_model(settings.model, engine.device, engine.precision)
    model = _attach_adapters(model, adapters, settings)
    if engine.compile:
        compile_layers(model, settings.model.layers_path)
    manifest.begin("eval", settings, key)

    # -- loop: every dataset × every variant, by the built-in scorer, then by lm-eval -----------
    variants = (["base"] if spec.include_base else []) + list(adapters)
    results, rows = _score_tasks(model, tokenizer, tasks, variants, settings, engine)
    splits = {dataset: found.split for dataset, found in tasks.items()}
    if lm_eval_tasks is not None:
        lm_results, lm_splits, lm_rows = lm_evaluator.evaluate(
            model, tokenizer, lm_eval_tasks, variants, _use_variant, settings, (run_dir, run_dir.root / key)
        )
        for task in lm_results:  # a task named like a dataset scored above keeps both
            name = f"{task} (lm-eval)" if task in results else task
            results[name], splits[name] = lm_results[task], lm_splits[task]
        rows += lm_rows

    # -- save ---------------------------------------------------------------------------------
    summary = EvalMetrics(
        model=settings.model.name_or_path,
        evaluator=_evaluated_by(settings),
        format=(spec.format or settings.format)
        if any(t.prompts is not None for t in tasks.values())
        else None,
        variants={name: (str(path) if path else None) for name, path in {"base": None, **adapters}.items()},
        splits=splits,
        partitions={dataset: found.partition for dataset, found in tasks.items() if found.partition},
        results=results,
    )
    outputs = [run_dir.root / key / "predictions.jsonl", run_dir.root / key / "metrics.json"]
    run_dir.write_jsonl(outputs[0], rows)
    run_dir.write_json(outputs[1], summary.to_json())
    inputs = ("finetune",) if spec.adapters is None else ()
    manifest.complete("eval", settings, outputs, inputs, key, **_headlines(summary))
    if key == "eval" and spec.adapters is None:  # this run's adapter: its card gets the table
        write_model_card(run_dir, settings, "eval")
    report.result(report.metrics_table(summary))
    facts = [f"{len(results)} dataset(s) × {len(variants)} variant(s), {report.evaluated_with(summary)}"]
    report.result(report.stage_panel("eval", facts, outputs[::-1]))
    return summary


@dataclass
class EvalSet:
    """One dataset's test rows as the built-in scorer reads them."""

    split: str
    partition: dict | None
    prompts: list[Prompt] | None = None
    """Multiple choice: each example's prompt, scored by log-likelihood."""
    rows: list[TrainingRow] | None = None
    """SFT: each conversation's row, scored by the loss on its responses."""


def _tasks(settings: Settings, tokenizer) -> dict[str, EvalSet]:
    """Dataset name → its test rows for the built-in scorer; bad data fails before the model loads."""
    eval_format = settings.eval.format or settings.format
    tasks = {}
    for name in settings.eval.datasets or [settings.dataset.name]:
        spec = dataset_settings(name, settings)
        part = load_part(spec, "test")
        examples = part.examples[: settings.eval.limit]
        found = EvalSet(part_split(spec, "test"), part.record())
        if spec.task == "sft":
            found.rows = training_rows(examples, spec, settings, tokenizer, "eval")
        else:
            found.prompts = model_prompts(examples, spec, eval_format, tokenizer, settings.model)
        tasks[spec.name] = found
    return tasks


def _score_tasks(
    model, tokenizer, tasks: dict[str, EvalSet], variants: list[str], settings: Settings, engine: Engine
) -> tuple[dict, list[dict]]:
    """(results[dataset][variant], per-example rows) from the built-in scorer."""
    results: dict[str, dict] = {}
    rows: list[dict] = []
    for dataset, found in tasks.items():
        results[dataset] = {}
        prompts = found.prompts or []
        per_example = [{"dataset": dataset, "index": i, "gold": p.gold} for i, p in enumerate(prompts)]
        for variant in variants:
            started = time.perf_counter()
            with _use_variant(model, variant):
                label = f"eval {dataset} {variant}"
                if found.rows is not None:
                    metrics = _response_loss(model, tokenizer, found.rows, settings, engine, label)
                else:
                    scores = _score(model, tokenizer, prompts, settings, engine, label)
                    metrics, examples = choice_metrics(scores, prompts)
                    for row, example in zip(per_example, examples):
                        row[variant] = example
            metrics["seconds"] = round(time.perf_counter() - started, 3)
            results[dataset][variant] = metrics
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
    spec = settings.eval

    def score_share(mine: list[Prompt], advance) -> list[list[float]]:
        budget = spec.pass_tokens(engine.device.type)
        return score(
            model, tokenizer, mine, spec.batch_size, settings.max_length, spec.share_prefix, advance, budget
        )

    merged: list[list[float]] = [[] for _ in prompts]
    for process, part in enumerate(_on_shares(prompts, engine, label, score_share)):
        merged[process :: engine.num_processes] = part
    return merged


def _response_loss(
    model, tokenizer, rows: list[TrainingRow], settings: Settings, engine: Engine, label: str
) -> dict:
    """Held-out loss and perplexity; with several processes each takes every num_processes-th row."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    spec = settings.eval

    def loss_share(mine: list[TrainingRow], advance) -> tuple[float, int]:
        return response_loss(
            model, mine, pad_id, spec.batch_size, advance, spec.pass_tokens(engine.device.type)
        )

    parts = _on_shares(rows, engine, label, loss_share)
    return response_metrics(math.fsum(p[0] for p in parts), sum(p[1] for p in parts), len(rows))


def _on_shares(items: list, engine: Engine, label: str, run: Callable[[list, Callable], _T]) -> list[_T]:
    """run(this process's share of `items` (every num_processes-th), a progress callback) under a
    progress bar; every process's result, in process order."""
    mine = items[engine.process_index :: engine.num_processes]
    with report.progress(label, len(mine)) as bar:

        def advance(done: int, total: int) -> None:
            bar.update(0, completed=len(mine) * done // max(total, 1))

        result = run(mine, advance)
    if engine.num_processes == 1:
        return [result]
    from accelerate.utils import gather_object

    return gather_object([result])


def _evaluated_by(settings: Settings) -> str:
    """flexora, `lm-eval <version>`, or both joined by " + "."""
    names = (["flexora"] if settings.eval.uses_builtin else []) + (
        [f"lm-eval {lm_evaluator.version()}"] if settings.eval.uses_lm_eval else []
    )
    return " + ".join(names)


def _headlines(summary: EvalMetrics) -> dict[str, float | None]:
    """The manifest's summary of an eval: each dataset × variant's accuracy (and SFT loss)."""
    found = {}
    for dataset, scores in summary.results.items():
        for variant, scored in scores.items():
            found[f"{dataset}/{variant}_acc"] = scored.acc
            if scored.loss is not None:
                found[f"{dataset}/{variant}_loss"] = scored.loss
    return found
