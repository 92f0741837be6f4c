"""The GPU checks in one command: a Llama-3-8B-shaped search and finetune run to the end, the
training benchmark against PEFT + Trainer, and the `gpu` tests. Writes report.json and report.md
to --out after every part, so a run cut short still reports what it finished.

    python3 scripts/gpu_check.py --out DIR                     # on one H100/H200 (≤ 8 min)
    python3 scripts/gpu_check.py --out DIR --device cpu --tiny # the same code paths on a CPU

Parts (--parts, in this order by default):
  scale  a random-init model of Llama-3-8B's shape in bf16 (hidden 4096, 32 layers, MLP 14336,
         32/8 heads, vocabulary 128256; built from a config on the device, no download) through
         --search-steps search steps at batch 4 with ragged rows of 64–512 tokens, then
         --finetune-steps finetune steps on the top half of the layers; the same objects the
         stages use (method.SearchStep, step.TrainStep). Reports finite steps, the
         gradient-norm range, skipped steps, s/step, peak memory, the attention tripwire over
         one step, host syncs over three (HostSyncCounter and CUDA's sync debug mode), and
         the GPU's busy share of three steps (torch.profiler). With --distributed fsdp the
         same steps run FSDP2-sharded (one process: the sharding's own cost).
  bench  scripts/bench_train.py on a Llama-3.2-1B shape: ours, eager and compiled (compile=true),
         vs PEFT + Trainer, and Trainer with Liger's kernels where liger-kernel is installed, at
         batch 8 (64–256 tokens) and batch 32 (256–1024 tokens); 4N-MFU; OOM is a result.
  tests  pytest -m gpu tests/test_gpu.py.
  eval   scripts/compare_lmeval.py on a random-init model of Llama-3-8B's shape in bf16 (the demo's
         tokenizer; the first --eval-limit rows of the demo's hellaswag, piqa and winogrande
         records): flexora's scorer at its defaults against lm-eval's HFLM at its default batch
         of 1, seconds and predictions side by side. Random weights in bf16 can tie choices, so
         differing predictions here say less than on the CPU parity runs; the point is speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {
    "8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
    ),
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    ),
}  # fmt: skip
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run of the same code paths")
    parser.add_argument("--parts", default="scale,bench,tests,eval")
    parser.add_argument("--eval-limit", type=int, default=100, help="eval part: rows per task")
    parser.add_argument(
        "--distributed",
        default="auto",
        choices=("auto", "fsdp"),
        help="scale part: fsdp shards it (FSDP2, one process)",
    )
    parser.add_argument("--search-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--part-timeout", type=int, default=240, help="seconds for each subprocess run")
    parser.add_argument(
        "--loop-budget", type=int, default=240, help="seconds after which a scale loop stops early"
    )
    parser.add_argument(
        "--nonfinite-at", type=int, default=0, help="dry run of the non-finite path: NaN from this step on"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(args)}
    parts = {"scale": scale_check, "bench": bench, "tests": gpu_tests, "eval": eval_speed}
    for name in args.parts.split(","):
        started = time.perf_counter()
        try:
            report[name] = parts[name](args, out)
        except Exception:  # a part that breaks is a result; the next part still runs
            report[name] = {"error": traceback.format_exc()[-3000:]}
        report[name]["part_seconds"] = round(time.perf_counter() - started, 1)
        write(out, report)
        print(f"== {name}: {json.dumps(report[name])[:3000]}", flush=True)


def machine(args) -> dict:
    import transformers

    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# -- scale: the 8B-shaped search and finetune ----------------------------------------------------


def scale_check(args, out: Path) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from flexora_cli.engine import Engine
    from flexora_cli.settings import LoraSettings, ModelSettings, Settings

    device = torch.device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    settings = Settings(
        model=ModelSettings(name_or_path="random-llama-3-8b-shape"),
        lora=LoraSettings(r=8, alpha=16, dropout=0.05),
        device=args.device,
        precision=precision,
        distributed=args.distributed,
    )
    engine = Engine(settings)

    def random_base():
        torch.manual_seed(0)
        config = LlamaConfig(**SHAPES["tiny" if args.tiny else "8b"])
        with torch.device(device):
            base = LlamaForCausalLM._from_config(
                config, dtype=torch.bfloat16 if precision == "bf16" else torch.float32
            )
        return base.requires_grad_(False).eval()

    base = random_base()
    result = {"shape": "tiny" if args.tiny else "8b", "parameters": sum(p.numel() for p in base.parameters())}
    result["distributed"] = args.distributed
    result["search"] = run_search(args, settings, engine, base)
    searched = result["search"].pop("model")
    if engine.fsdp:  # a sharded base is not sharded twice: the finetune gets a fresh one
        del searched, base
        base = random_base()
    else:  # the frozen base again, without the search's LoRA and gates
        base = searched.lm.unload()
    result["finetune"] = run_finetune(args, settings, engine, base)
    return result


def synthetic_rows(args, vocab: int, count: int, seed: int) -> list:
    """Ragged rows (hellaswag-like): a context of min-len..max-len tokens, then 1–8 answer tokens."""
    from flexora_cli.data.collate import TrainingRow

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(args.min_len, args.max_len + 1, (1,), generator=generator))
        answer = int(torch.randint(1, 9, (1,), generator=generator))
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        rows.append(TrainingRow.of(ids[: length - answer], ids[length - answer :]))
    return rows


def run_search(args, settings, engine, base) -> dict:
    from flexora_cli.method import build_search_step

    steps = args.search_steps
    built, gates = build_search_step(engine, base, settings, steps, pad_id=0)
    vocab = base.config.vocab_size
    train = synthetic_rows(args, vocab, steps * args.batch_size, 1)
    val = synthetic_rows(args, vocab, steps * args.batch_size, 2)

    def batch(step: int):
        rows = slice((step - 1) * args.batch_size, step * args.batch_size)
        return pinned(engine, built.collate(train[rows])), pinned(engine, built.collate(val[rows]))

    built.model.train()
    with poisoned(built.one_step, base, args.nonfinite_at) as one_step:
        result = train_loop(args, engine, built.train_step, built.model, one_step, batch, steps, phases=2)
    result |= {
        "alpha_hat": [round(a, 5) for a in gates.alpha_hat.tolist()],
        "model": engine.unwrap(built.model),
    }
    return result


def run_finetune(args, settings, engine, base) -> dict:
    from flexora_cli.modeling import attach_lora
    from flexora_cli.step import AnswerLM, build_lora_step

    steps = args.finetune_steps
    layers = base.config.num_hidden_layers
    model = AnswerLM(attach_lora(base, settings.model, settings.lora, list(range(layers // 2, layers))))
    built = build_lora_step(engine, model, settings, steps, pad_id=0)
    rows = synthetic_rows(args, base.config.vocab_size, steps * args.batch_size, 3)

    def batch(step: int):
        return pinned(engine, built.collate(rows[(step - 1) * args.batch_size : step * args.batch_size]))

    built.model.train()
    with poisoned(built.one_step, base, args.nonfinite_at) as one_step:
        return train_loop(args, engine, built.train_step, built.model, one_step, batch, steps, phases=1)


@contextlib.contextmanager
def poisoned(one_step, base, at: int):
    """--nonfinite-at: from step `at` on, the first decoder layer's output is NaN, so the run takes
    the non-finite path (the guard's readout, the replay naming the module, the stop). The hook
    goes with the block: the finetune part reuses the search's base."""
    if not at:
        yield one_step
        return
    poisoning = []
    hook = base.model.layers[0].register_forward_hook(
        lambda _m, _i, out: out * math.nan if poisoning else out
    )

    def step_then_poison(step: int, batch) -> None:
        if step == at:
            poisoning.append(True)
        one_step(step, batch)

    try:
        yield step_then_poison
    finally:
        hook.remove()


def train_loop(args, engine, train_step, model, one_step, batch, steps: int, phases: int) -> dict:
    """Run `steps` steps with the instruments on steps 1–4 and the profiler on 6–8; read the
    guard every 10 steps, as the stages' log steps do."""
    cuda = engine.device.type == "cuda"
    result = {"steps_run": 0, "losses": [], "grad_norm": [math.inf, 0.0], "skipped": 0}
    batches: dict[int, object] = {}
    timer_from, started = min(10, steps), None
    step, deadline = 0, time.monotonic() + args.loop_budget
    while step < steps:
        if time.monotonic() > deadline:
            result["stopped_early"] = f"--loop-budget {args.loop_budget}s reached"
            break
        step += 1
        batches[step] = batch(step)
        step = instrumented_step(engine, one_step, batch, batches, step, steps, result)
        if step == timer_from:
            synchronize(cuda)
            started = time.perf_counter()
        result["steps_run"] = step
        if (step % 10 == 0 or step == steps) and not read_guard(engine, train_step, model, batches, result):
            break
    synchronize(cuda)
    timed = result["steps_run"] - timer_from
    if started and timed > 0:
        result["seconds_per_step"] = round((time.perf_counter() - started) / timed, 4)
    if cuda:
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["all_finite"] = "nonfinite" not in result and all(
        math.isfinite(v) for entry in result["losses"] for k, v in entry.items() if k != "step"
    )
    return result


def instrumented_step(engine, one_step, batch, batches: dict, step: int, steps: int, result: dict) -> int:
    """One step (the attention tripwire on step 1, the host-sync counter on 2–4), or steps 6–8
    under the profiler on CUDA; returns the last step taken."""
    from flexora_cli.tripwires import AttentionTripwire, HostSyncCounter

    cuda = engine.device.type == "cuda"
    if step == 1:
        with AttentionTripwire() as wire:
            one_step(step, batches[step])
        result["tripwire"] = {"attention_calls": wire.calls, "violations": wire.violations[:5]}
    elif step in (2, 3, 4):
        with HostSyncCounter(engine.device) as syncs, cuda_sync_warnings(cuda) as cuda_warnings:
            one_step(step, batches[step])
        result.setdefault("host_syncs", []).append(syncs.counts)
        result.setdefault("cuda_sync_warnings", []).extend(cuda_warnings)
    elif step == 6 and cuda and steps >= 8:
        profiled = range(6, 9)
        batches.update({s: batch(s) for s in profiled})
        try:  # the profiler is an instrument: its failure must not cost the run
            result["gpu_busy_share"] = profile(lambda s: one_step(s, batches[s]), profiled)
        except Exception as exc:
            result["gpu_busy_share"] = f"profiler failed: {exc!r}"[:300]
            for again in profiled:
                one_step(again, batches[again])
        return profiled[-1]
    else:
        one_step(step, batches[step])
    return step


def read_guard(engine, train_step, model, batches: dict, result: dict) -> bool:
    """Read the step guard as a stage's log step does (a non-finite step is replayed to name its
    module, through TrainStep.check); False once a step was non-finite."""
    from flexora_cli.nonfinite import locate_nonfinite
    from flexora_cli.step import NonFiniteError

    try:
        readout = train_step.check(lambda s, phase: locate_nonfinite(engine, model, pick(batches[s], phase)))
    except NonFiniteError as exc:
        result["nonfinite"] = str(exc)
        return False
    step = result["steps_run"]
    result["losses"].append({"step": step, **{str(p): round(v, 4) for p, v in readout.losses.items()}})
    if readout.grad_norm:
        low, high = readout.grad_norm
        result["grad_norm"] = [min(result["grad_norm"][0], low), max(result["grad_norm"][1], high)]
    result["skipped"] = readout.skipped
    batches.clear()
    return True


def pinned(engine, batch):
    """As the stages' DataLoader hands batches over on CUDA: in pinned memory."""
    return batch.pin_memory() if engine.device.type == "cuda" else batch


def pick(batch, phase: int):
    return batch[phase] if isinstance(batch, tuple) else batch


def synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


@contextlib.contextmanager
def cuda_sync_warnings(cuda: bool):
    """The warnings of CUDA's sync debug mode ("warn") raised inside the block, as text."""
    caught: list[str] = []
    if not cuda:
        yield caught
        return
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")
    caught += [str(r.message)[:200] for r in records if "synchroniz" in str(r.message)]


def profile(one_step, steps) -> float:
    """Share of the wall time of `steps` during which the GPU ran kernels (1 − idle share)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for step in steps:
            one_step(step)
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = merged_length([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e6
    return round(busy / wall, 3) if wall else 0.0


def merged_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


# -- bench and tests: subprocesses ------------------------------------------------------------


def bench(args, out: Path) -> dict:
    size = "micro" if args.tiny else "1b"
    runs = {
        "batch8": [
            "--batch-size",
            "8",
            "--min-len",
            "64",
            "--max-len",
            "256",
            "--variants",
            "lora_all,lora_all+compile,search,search+compile,trainer,trainer+liger",
        ],
        "batch32": [
            "--batch-size",
            "32",
            "--min-len",
            "256",
            "--max-len",
            "1024",
            "--variants",
            "lora_all,lora_all+compile,trainer,trainer+liger",
        ],
    }
    results = {}
    for name, extra in runs.items():
        path = out / f"bench_{name}.json"
        steps = ["--steps", "2", "--warmup", "2"] if args.tiny else ["--steps", "10", "--warmup", "3"]
        command = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--device", args.device]
        command += ["--size", size, *steps, *extra, "--json", str(path)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.part_timeout, cwd=ROOT)
        results[name] = json.loads(path.read_text()) if path.exists() else {"error": done.stderr[-2000:]}
        results[name]["printed"] = done.stdout[-2500:]
    return results


def gpu_tests(args, out: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        "tests/test_gpu.py",
        "-p",
        "no:cacheprovider",
    ]
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=args.part_timeout, cwd=ROOT, env=env
    )
    return {"exit_code": done.returncode, "tail": (done.stdout + done.stderr)[-1500:]}


def eval_speed(args, out: Path) -> dict:
    path = out / "eval.json"
    shape, dtype = ("64x2", "float32") if args.tiny else ("8b", "bfloat16")
    command = [sys.executable, str(ROOT / "scripts" / "compare_lmeval.py"), "--random-llama", shape]
    command += ["--device", args.device, "--dtype", dtype, "--batch-size", "1"]
    command += ["--limit", str(args.eval_limit), "--json", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.part_timeout, cwd=ROOT)
    result = json.loads(path.read_text()) if path.exists() else {"error": done.stderr[-2000:]}
    return result | {"printed": done.stdout[-2500:]}


def write(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [f"# gpu_check {report['date']}", "", f"machine: {json.dumps(report['machine'])}", ""]
    for part in ("scale", "bench", "tests", "eval"):
        if part in report:
            lines += [
                f"## {part}",
                "",
                "```json",
                json.dumps(report[part], indent=1, default=str)[:6000],
                "```",
                "",
            ]
    (out / "report.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
