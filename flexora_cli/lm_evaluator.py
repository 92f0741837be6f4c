"""lm-evaluation-harness as a second evaluator: `flexora eval evaluator=lm_eval tasks=[arc_easy]`.

lm-eval's `simple_evaluate` scores each variant (the base, then each adapter) on lm-eval's own
task definitions, through one `HFLM` around the model that eval already loaded with every
adapter attached (`HFLM(pretrained=model)`; the variant is switched between calls, so the weights
load once). The results land in eval/metrics.json in the built-in scorer's layout, so the table,
`compare` and `summary` read them alike.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from flexora_cli import report
from flexora_cli.data.datasets import load_parts
from flexora_cli.errors import ConfigError, DataError
from flexora_cli.rundir import RunDir
from flexora_cli.scoring import argmax
from flexora_cli.settings import Settings

INSTALL = "pip install 'flexora-cli[lmeval]' (lm_eval==0.4.13)"


def task_manager(settings: Settings, num_processes: int):
    """lm-eval's TaskManager for eval.tasks (with eval.include_path), checked before any model
    loads: a ConfigError names the install command when lm-eval is missing, the unknown tasks, or
    a multi-process launch (lm-eval does not split a model it is handed)."""
    if num_processes > 1:
        raise ConfigError(
            "eval.evaluator=lm_eval runs in one process (lm-eval does not split a loaded model); "
            "launch `flexora eval` without torchrun/accelerate"
        )
    try:
        import lm_eval  # noqa: F401  (the package first: a stale lm_eval.tasks import must not pass)
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError(
            f"eval.evaluator=lm_eval needs lm-evaluation-harness, which is not installed; {INSTALL}"
        ) from exc
    spec = settings.eval
    manager = TaskManager(include_path=spec.include_path) if spec.include_path else TaskManager()
    unknown = [task for task in spec.tasks if not manager.match_tasks([task])]
    if unknown:
        raise ConfigError(
            f"eval.tasks: lm-eval has no task {', '.join(unknown)}; list them with `lm_eval ls tasks`, "
            "or give your own task YAMLs with eval.include_path=DIR"
        )
    return manager


def heldout_tasks(manager, settings: Settings, run_dir: RunDir, folder: Path):
    """(a TaskManager, task names) for eval.task_rows=heldout: each of eval.tasks re-pointed at the
    run dataset's rows. folder/lm_eval_tasks gets the test part (test.jsonl; eval.limit applies
    as lm-eval's --limit), the train part (train.jsonl, the few-shot source, so no test row is
    shown as an example) and per task `<task>_heldout.yaml`, which includes lm-eval's own task
    file (prompt, generation, filters, metrics) and changes only where the rows come from."""
    from lm_eval.tasks import TaskManager

    tasks_dir = folder / "lm_eval_tasks"
    files = {}
    for name, part in zip(("train", "test"), load_parts(settings.dataset)):
        records = [example.record for example in part.examples]
        files[name] = str(run_dir.write_text(tasks_dir / f"{name}.jsonl", _jsonl(records)))
    names = []
    for task in settings.eval.tasks:
        entry = manager.task_index[task]
        if entry.kind.name != "TASK" or entry.yaml_path is None:
            raise ConfigError(
                f"eval.task_rows=heldout: {task} is an lm-eval group or tag, not one task; "
                "name its tasks in eval.tasks"
            )
        config = {
            "include": str(entry.yaml_path),
            "task": f"{task}_heldout",
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
            "test_split": "test",
            "training_split": "train",
            "fewshot_split": "train",
            "validation_split": None,
        }
        run_dir.write_text(tasks_dir / f"{task}_heldout.yaml", yaml.safe_dump(config, sort_keys=False))
        names.append(f"{task}_heldout")
    include = [str(tasks_dir)] + ([settings.eval.include_path] if settings.eval.include_path else [])
    # Only these: the task files include lm-eval's own by path (indexing every task takes ~9 s)
    return TaskManager(include_path=include, include_defaults=False), names


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False, default=str) + "\n" for record in records)


def version() -> str:
    import lm_eval

    return lm_eval.__version__


def evaluate(
    model,
    tokenizer,
    manager,
    variants: list[str],
    use_variant: Callable,
    settings: Settings,
    output: tuple[RunDir, Path],
) -> tuple[dict, dict, list[dict]]:
    """(results[task][variant], splits[task], per-example rows) from lm-eval on eval.tasks, for
    every variant (`manager`: task_manager(settings)); with eval.task_rows=heldout, on the run
    dataset's rows, written into the eval's folder (`output`: the run, that folder)."""
    from lm_eval.models.huggingface import HFLM

    tasks = list(settings.eval.tasks)
    if settings.eval.task_rows == "heldout":
        manager, tasks = heldout_tasks(manager, settings, *output)

    batch = settings.eval.batch_size
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch, max_length=settings.max_length)
    results: dict[str, dict] = {}
    splits: dict[str, str] = {}
    rows: dict[tuple[str, int], dict] = {}
    for variant in variants:
        started = time.perf_counter()
        report.line(f"eval: lm-eval scores {variant} on {', '.join(tasks)}")
        with use_variant(model, variant):
            out = _simple_evaluate(lm, manager, tasks, settings)
        seconds = round(time.perf_counter() - started, 3)
        for task, metrics in out["results"].items():
            if task not in out.get("n-samples", {}):
                continue  # a group's aggregate; its subtasks are listed too
            results.setdefault(task, {})[variant] = {
                **_metrics(metrics),
                "n": out["n-samples"][task]["effective"],
                "seconds": seconds,
            }
            config = out["configs"][task]
            splits[task] = config.get("test_split") or config.get("validation_split") or "?"
            for sample in out["samples"].get(task, []):
                row = rows.setdefault(
                    (task, sample["doc_id"]),
                    {"dataset": task, "index": sample["doc_id"], "gold": sample["target"]},
                )
                row[variant] = _prediction(sample)
    return results, splits, sorted(rows.values(), key=lambda r: (r["dataset"], r["index"]))


def _simple_evaluate(lm, manager, tasks: list[str], settings: Settings) -> dict:
    from lm_eval import simple_evaluate

    spec = settings.eval
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds results only
        try:
            return simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=manager,
                num_fewshot=spec.num_fewshot,
                limit=spec.limit,
                log_samples=True,
                apply_chat_template=settings.model.chat_template,
                random_seed=settings.seed,
                numpy_random_seed=settings.seed,
                torch_random_seed=settings.seed,
                fewshot_random_seed=settings.seed,
            )
        except (OSError, ConnectionError, ValueError, FileNotFoundError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"lm-eval could not run {', '.join(tasks)}: {first[:200]}; its data comes from the hub "
                "(set HF_DATASETS_OFFLINE=0 and check the network), or write a task on local files "
                "(dataset_path: json) and pass eval.include_path=DIR"
            ) from exc


def _metrics(raw: dict) -> dict:
    """lm-eval's `metric,filter` keys as `metric` (the `none` filter) or `metric,filter`."""
    metrics = {}
    for key, value in raw.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        name, filter_name = key.split(",", 1)
        metrics[name if filter_name == "none" else key] = value
    return metrics


def _prediction(sample: dict) -> dict:
    """One example's scores and prediction, as the built-in scorer writes them; a generative
    task's filtered answers (e.g. the number extracted) and the text generated."""
    responses = sample.get("filtered_resps", [])
    if responses and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in responses):
        scores = [float(ll) for ll, _ in responses]
        return {"predicted": argmax(scores), "scores": scores}
    generated = [str(r[0] if isinstance(r, list) and r else r) for r in sample.get("resps", [])]
    return {"responses": [str(r) for r in responses], "generated": generated}
