"""Training speed and memory: Flexora's search and finetune steps against plain LoRA and against
PEFT + transformers Trainer, measured side by side in one run.

Every variant trains the same randomly initialised Llama (saved once, loaded by each), on the same
synthetic rows (mcq-like: a context of random length, a one-token answer), with the same global
batch, LoRA settings, precision and device. Each variant runs in its own subprocess, so its peak
memory is its own. Printed: step times, tokens/s, peak memory, MFU on CUDA, and the ratios:

  search step ÷ LoRA step (all layers)         goal ≤ 2.1
  LoRA on half the layers ÷ on all layers      goal ≤ 0.75  (top half; and every other layer)
  finetune tokens/s ÷ PEFT + Trainer           goal ≥ 1.2
  search peak memory ÷ LoRA finetune           goal ≤ 1.15

    python scripts/bench_train.py                                   # CPU, ~40M-parameter Llama
    python scripts/bench_train.py --device cuda --size 1b           # bf16 on a GPU
    python scripts/bench_train.py --device cuda --size 1b --quantization 4bit   # QLoRA
    # where the time is dispatch: an 8B-shaped stack (32 layers) at width 64, eager vs compiled
    python scripts/bench_train.py --size micro --layers 32 --variants lora_all,lora_all+compile,search,search+compile,trainer

A variant's `+compile` runs it with compile=true (regional torch.compile of the decoder layers);
`trainer+liger` is the Trainer row with Liger's kernels (`use_liger_kernel`), printed as not
installed where liger-kernel (and a CUDA device for its Triton kernels) is missing.
`torchtune` (and `torchtune+compile`) is torchtune 0.6.1's LoRA single-device step on the same
rows and weights (measure_torchtune). Its torchao 0.10 cannot share an environment with PEFT,
which refuses torchao < 0.16, so it lives in a folder of its own:

    pip install --no-deps --target /tmp/tt torchtune==0.6.1 torchao==0.10.0 sentencepiece tiktoken blobfile kagglehub
    python scripts/bench_train.py --size micro --variants lora_all,torchtune,lora_all+compile,torchtune+compile --torchtune-path /tmp/tt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    "8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
    ),
    # The overhead floor: so small that a step's time is Python and dispatch, as on a GPU.
    "micro": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4,
    ),
    # ~40M parameters: small enough for a 2-core CPU, big enough to be compute-bound.
    "40m": dict(
        vocab_size=16000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8,
    ),
    # Llama-3.2-1B's shape.
    "1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
    ),
}  # fmt: skip
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
VARIANTS = ("lora_all", "half_top", "half_spread", "search", "trainer")
"""The default rows; each also runs compiled as `<name>+compile`, and `trainer+liger` is a peer."""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=SIZES, default="40m")
    parser.add_argument("--layers", type=int, help="override the size's number of decoder layers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", help="fp32, bf16, fp16 or auto (bf16 on CUDA)")
    parser.add_argument("--quantization", default="none", choices=("none", "4bit", "8bit"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--cudnn-attention", action="store_true", help="let SDPA use cuDNN (flexora's setting)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak, for MFU")
    parser.add_argument("--json", help="also write the results and ratios to this JSON file")
    parser.add_argument(
        "--trace-8b", action="store_true", help="only trace one step's largest tensors at Llama-3-8B dims"
    )
    parser.add_argument(
        "--torchtune-path",
        help="a folder holding torchtune 0.6.1 and torchao 0.10 (pip install --target), put on the path "
        "of the torchtune row only: PEFT refuses torchao < 0.16 wherever it can be imported",
    )
    parser.add_argument("--run-variant", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_variant:
        print(json.dumps(measure(args)))
        return
    if args.trace_8b:
        trace_8b(args)
        return

    with tempfile.TemporaryDirectory() as scratch:
        args.model_dir = build_model(args, Path(scratch))
        results = {}
        for variant in args.variants.split(","):
            command = [sys.executable, __file__, *sys.argv[1:], "--run-variant", variant]
            command += ["--model-dir", args.model_dir]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode and "OutOfMemoryError" in done.stderr:
                results[variant] = {"oom": True}  # a result of its own row; the others still run
            elif done.returncode:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            else:
                results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{variant:12s} {results[variant]}", file=sys.stderr)
    report(args, results)


def shape(args: argparse.Namespace) -> dict:
    """The Llama config of `--size`, with `--layers` decoder layers when given."""
    return SIZES[args.size] | ({"num_hidden_layers": args.layers} if args.layers else {})


def build_model(args: argparse.Namespace, scratch: Path) -> str:
    """A random-init Llama of `--size`, saved once so every variant loads identical weights
    (built on the device, in bf16 there: a 1B model initialises in seconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **shape(args))
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(scratch / "model", safe_serialization=True)
    return str(scratch / "model")


def synthetic_rows(args: argparse.Namespace, vocab: int, count: int, seed: int) -> list:
    """Rows of min-len..max-len random tokens, the last one the answer (data/collate.TrainingRow)."""
    from flexora_cli.data.collate import TrainingRow

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(args.min_len, args.max_len + 1, (1,), generator=generator))
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        rows.append(TrainingRow.of(ids[:-1], ids[-1:]))
    return rows


def measure(args: argparse.Namespace) -> dict:
    """Time `--steps` steps of one variant after `--warmup`, in this (fresh) process."""
    from flexora_cli.data.batches import Batches
    from flexora_cli.settings import LoraSettings, ModelSettings, Settings

    variant, _, option = args.run_variant.partition("+")
    settings = Settings(
        model=ModelSettings(name_or_path=args.model_dir, quantization=args.quantization),
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
        device=args.device,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        cudnn_attention=args.cudnn_attention,
        compile=option == "compile",
    )
    total = args.warmup + args.steps
    vocab = shape(args)["vocab_size"]
    train = Batches(synthetic_rows(args, vocab, total * args.batch_size, 1), args.batch_size, 0)
    val = Batches(synthetic_rows(args, vocab, total * args.batch_size, 2), args.batch_size, 1)
    batches, val_batches = list(train.epoch(0)), list(val.epoch(0))
    if variant == "trainer":
        return measure_trainer(args, settings, [row for batch in batches for row in batch], option == "liger")
    if variant == "torchtune":
        return measure_torchtune(args, batches, option == "compile")

    from flexora_cli.engine import Engine
    from flexora_cli.modeling import load_model

    engine = Engine(settings)
    base = load_model(settings.model, engine.device, engine.precision)
    layers = base.config.num_hidden_layers
    picked = {"lora_all": None, "half_top": range(layers // 2, layers), "half_spread": range(0, layers, 2)}
    built = training_step(engine, base, settings, variant, picked.get(variant), total)
    one_step, collate = built.one_step, built.collate
    shapes = set()

    def collated(rows: list):
        batch = collate(rows)
        shapes.update(tuple(m.input_ids.shape) for m in batch.micro_batches)
        return batch

    if variant == "search":
        result = timed(args, lambda i: (collated(batches[i]), collated(val_batches[i])), one_step, batches)
    else:
        result = timed(args, lambda i: collated(batches[i]), one_step, batches)
    return result | {"distinct_shapes": len(shapes), "forwards": (2 if variant == "search" else 1) * total}


def training_step(engine, base, settings, variant: str, layers, total: int):
    """flexora's search or finetune step, built as the stages build it (method.build_search_step,
    step.build_lora_step); the finetune step at a constant lr 1e-4, as the Trainer row runs."""
    import dataclasses

    from flexora_cli.method import build_search_step
    from flexora_cli.modeling import attach_lora
    from flexora_cli.step import AnswerLM, build_lora_step

    if variant == "search":
        return build_search_step(engine, base, settings, total, pad_id=0)[0]
    lora_layers = list(layers) if layers is not None else None
    model = AnswerLM(
        attach_lora(base, settings.model, settings.lora, lora_layers, settings.gradient_checkpointing)
    )
    constant = dataclasses.replace(
        settings.finetune, lr=1e-4, weight_decay=0.0, scheduler="constant", warmup_ratio=0.0
    )
    return build_lora_step(engine, model, dataclasses.replace(settings, finetune=constant), total, pad_id=0)


def measure_trainer(args: argparse.Namespace, settings, rows: list, liger: bool = False) -> dict:
    """PEFT + transformers Trainer on the same rows: the setup a user of LLaMA-Factory-like tools
    runs; with `liger`, patched with Liger's kernels ({"missing": why} where they cannot run)."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback

    from flexora_cli.modeling import load_model as load_base
    from flexora_cli.modeling import lora_config, resolve_device, resolve_precision
    from flexora_cli.tripwires import HostSyncCounter, OpCounter

    device = resolve_device(args.device)
    if liger and (missing := liger_missing(device)):
        return {"missing": missing}
    precision = resolve_precision(args.precision, device)
    base = load_base(settings.model, device, precision)
    model = get_peft_model(base, lora_config(settings.model, settings.lora, None))
    marks: list[float] = []
    syncs, ops = HostSyncCounter(device), OpCounter()

    class Clock(TrainerCallback):
        """Counts the last warm-up step (as `timed` does for ours), then times the rest."""

        def on_step_begin(self, _args, state, _control, **_kwargs):
            if state.global_step == args.warmup - 1:
                syncs.__enter__(), ops.__enter__()

        def on_step_end(self, _args, state, _control, **_kwargs):
            if state.global_step == args.warmup:
                ops.__exit__(None, None, None), syncs.__exit__(None, None, None)
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            if state.global_step == args.warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()

    training_args = trainer_arguments(args, device, precision, liger)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list([dataclasses.asdict(row) for row in rows]),  # Trainer reads dicts
        data_collator=DataCollatorForSeq2Seq(_pad_only_tokenizer(), padding=True, label_pad_token_id=-100),
        callbacks=[Clock()],
    )
    setup_rss = _rss_mb()
    trainer.train()
    seconds = marks[-1] - marks[args.warmup - 1]
    result = _summary(args, rows, seconds, setup_rss, device)
    return result | {"syncs": syncs.total, "sync_calls": syncs.counts, "ops": ops.counts}


def measure_torchtune(args: argparse.Namespace, batches: list[list], compiled: bool) -> dict:
    """torchtune's LoRA single-device step on the same rows: its Llama-3 LoRA model at --size's
    shape with the saved weights, LoRA r=8 α=16 on q_proj and v_proj, the rows of each step packed
    by its PackedDataset into packs as wide as our packs, its chunked cross-entropy, fused AdamW
    at a constant 1e-4, and (+compile) its regional compile_model and compile_loss."""
    import importlib.util

    if args.torchtune_path:
        sys.path.insert(0, args.torchtune_path)
    if importlib.util.find_spec("torchtune") is None:
        return {"missing": "torchtune not installed (--torchtune-path)"}
    from torchtune import training
    from torchtune.data import padded_collate_packed
    from torchtune.datasets import PackedDataset
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from flexora_cli.modeling import resolve_device, resolve_precision

    device = resolve_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[resolve_precision(args.precision, device)]
    model = _torchtune_model(args).to(device=device, dtype=dtype)
    set_trainable_params(model, get_adapter_params(model))
    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    if compiled:
        training.compile_model(model, verbose=False)
        loss_fn = training.compile_loss(loss_fn, verbose=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    width = -(-args.max_len // 64) * 64  # our collator's pack width: the longest row, to 64

    def collate(index: int) -> dict:
        rows = [{"tokens": row.input_ids, "labels": row.labels} for row in batches[index]]
        packs = PackedDataset(rows, max_seq_len=width, padding_idx=0)
        return {k: v.to(device) for k, v in padded_collate_packed(list(packs)).items()}

    def one_step(_step: int, batch: dict) -> None:
        labels = batch.pop("labels")  # shifted by one, as the recipe does
        labels = torch.hstack((labels[..., 1:], torch.full_like(labels[..., :1], -100)))
        logits = model(batch["tokens"], mask=batch["mask"], input_pos=batch["input_pos"])
        loss_fn(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(args, collate, one_step, batches)


def _torchtune_model(args: argparse.Namespace):
    """torchtune's LoRA Llama of --size's shape (Llama-3.2's builder where the embeddings are tied)
    holding the weights build_model saved, converted by torchtune's own hf_to_tune."""
    from safetensors.torch import load_file
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.llama3 import lora_llama3
    from torchtune.models.llama3_2._component_builders import lora_llama3_2

    config = shape(args)
    tied = config.get("tie_word_embeddings", False)
    builder = lora_llama3_2 if tied else lora_llama3
    model = builder(
        ["q_proj", "v_proj"],
        vocab_size=config["vocab_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        embed_dim=config["hidden_size"],
        intermediate_dim=config["intermediate_size"],
        max_seq_len=4096,
        norm_eps=1e-6,  # transformers' LlamaConfig defaults, which build_model saved
        rope_base=10_000,
        lora_rank=8,
        lora_alpha=16,
        **({"scale_factor": 1} if tied else {}),
    )
    weights = {
        k: v
        for part in sorted(Path(args.model_dir).glob("*.safetensors"))
        for k, v in load_file(part).items()
    }
    heads, kv_heads, width = (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["hidden_size"],
    )
    missing, unexpected = model.load_state_dict(hf_to_tune(weights, heads, kv_heads, width), strict=False)
    assert not unexpected and all("lora" in name for name in missing), (missing, unexpected)
    return model


def liger_missing(device: torch.device) -> str:
    """Why the Liger row cannot run here ("" when it can)."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel not installed"
    return "" if device.type == "cuda" else "Liger's Triton kernels need a CUDA device"


def trainer_arguments(args: argparse.Namespace, device, precision: str, liger: bool = False):
    """Trainer's arguments for the peer row: our batch, steps and precision, constant lr, no
    logging or saving, grouped by length as our batches are (and Liger's kernels, if asked)."""
    from transformers import TrainingArguments

    grouping = (
        {"train_sampling_strategy": "group_by_length"}
        if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__
        else {"group_by_length": True}
    )
    return TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=args.gradient_checkpointing,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_liger_kernel=liger,
        **grouping,
    )


def _pad_only_tokenizer():
    """A tokenizer good for padding token ids (id 0), which is all DataCollatorForSeq2Seq asks."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>")


def timed(args: argparse.Namespace, collate, one_step, batches: list[list]) -> dict:
    """Warm up, count one step's host syncs and aten ops (collation excluded, as the Trainer's
    data loader is), then time `--steps` steps (collation included)."""
    from flexora_cli.tripwires import HostSyncCounter, OpCounter

    device = torch.device(args.device if args.device != "auto" else "cuda")
    setup_rss = _rss_mb()  # before any step: the growth is activations, gradients, optimizer state
    for index in range(args.warmup - 1):
        one_step(index + 1, collate(index))
    batch = collate(args.warmup - 1)
    with HostSyncCounter(device) as syncs, OpCounter() as ops:
        one_step(args.warmup, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for index in range(args.warmup, args.warmup + args.steps):
        one_step(index + 1, collate(index))
    if device.type == "cuda":
        torch.cuda.synchronize()
    rows = [row for batch in batches for row in batch]
    result = _summary(args, rows, time.perf_counter() - started, setup_rss, device)
    return result | {"syncs": syncs.total, "sync_calls": syncs.counts, "ops": ops.counts}


def _summary(args, rows: list, seconds: float, setup_rss: float, device: torch.device) -> dict:
    tokens_per_row = sum(len(r) for r in rows) / len(rows)
    tokens = tokens_per_row * args.batch_size * args.steps
    result = {
        "step_s": seconds / args.steps,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": _rss_mb(peak=True),
        "rss_growth_mb": _rss_mb(peak=True) - setup_rss,
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _rss_mb(peak: bool = False) -> float:
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def layer_params(config) -> int:
    """Parameters of the decoder layers (attention and MLP weights) of a Llama config."""
    kv = config.hidden_size * config.num_key_value_heads // config.num_attention_heads
    return config.num_hidden_layers * (
        2 * config.hidden_size**2
        + 2 * config.hidden_size * kv
        + 3 * config.hidden_size * config.intermediate_size
    )


def report(args: argparse.Namespace, results: dict[str, dict]) -> None:
    """Print the table and the ratios (and write them to --json)."""
    from transformers import LlamaConfig

    config = LlamaConfig(**shape(args))
    embed = config.vocab_size * config.hidden_size
    print(
        f"\nmodel: random Llama {args.size}, {layer_params(config) / 1e6:.1f}M layer + {embed / 1e6:.1f}M embedding params"
    )
    print(
        f"device {args.device}, precision {args.precision}, quantization {args.quantization}, "
        f"batch {args.batch_size}, lengths {args.min_len}-{args.max_len}, {args.steps} timed steps\n"
    )
    memory_key = "peak_gpu_mb" if args.device.startswith("cuda") else "rss_growth_mb"
    print_results(results, memory_key)
    ratios = print_ratios(results, memory_key)
    mfu = print_mfu(args, config, results) if args.device.startswith("cuda") else {}
    if args.json:
        Path(args.json).write_text(
            json.dumps({"results": results, "ratios": ratios, "mfu_4n": mfu}, indent=1)
        )


def print_results(results: dict[str, dict], memory_key: str) -> None:
    """One markdown row per variant."""
    print(f"| variant | step s | tokens/s | {memory_key} | host syncs/step | aten ops fwd/bwd/opt | shapes |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if r.get("oom") or r.get("missing"):
            why = "OOM" if r.get("oom") else f"not run: {r['missing']}"
            print(f"| {name} | {why} | – | – | – | – | – |")
            continue
        ops = "/".join(str(r["ops"][k]) for k in ("forward", "backward", "optimizer"))
        shapes = f"{r['distinct_shapes']} in {r['forwards']} forwards" if "distinct_shapes" in r else "–"
        print(
            f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r[memory_key]:.0f} | {r['syncs']} "
            f"| {ops} | {shapes} |"
        )


def print_ratios(results: dict[str, dict], memory_key: str) -> dict[str, float]:
    """Each variant against its peer in this run, beside the goal it is measured against."""
    ratios = {}

    def ratio(a: str, b: str, key, goal: str) -> None:
        ran = [results.get(x) for x in (a, b)]
        if all(r is not None and not r.get("oom") and not r.get("missing") for r in ran):
            value = key(results[a]) / key(results[b])
            ratios[f"{a} / {b} ({goal.split('(')[-1].rstrip(')')})"] = round(value, 3)
            print(f"{a} ÷ {b}: {value:.2f}   goal {goal}")

    def ops(r: dict) -> int:
        return sum(r["ops"].values())

    print()
    ratio("search", "lora_all", lambda r: r["step_s"], "≤ 2.05 (step time)")
    ratio("search", "lora_all", ops, "≤ 2.1 (aten ops)")
    ratio("half_top", "lora_all", lambda r: r["step_s"], "≤ 0.75 (step time)")
    ratio("half_spread", "lora_all", lambda r: r["step_s"], "≤ 0.75 (step time)")
    ratio(
        "lora_all",
        "trainer",
        lambda r: r["tokens_per_s"],
        "≥ 1.3 CPU, ≥ 1.5 GPU batch 8, ≥ 1.2 batch 32 (tokens/s)",
    )
    ratio("lora_all", "trainer", ops, "≤ 1 (aten ops)")
    ratio("search", "lora_all", lambda r: r[memory_key], "≤ 1.15 (memory)")
    for name in ("lora_all", "search"):
        ratio(f"{name}+compile", name, lambda r: r["step_s"], "< 1 (step time)")
    ratio("search+compile", "lora_all+compile", lambda r: r["step_s"], "≤ 2.05 (step time)")
    ratio("lora_all+compile", "trainer", lambda r: r["tokens_per_s"], "≥ 1.2 (tokens/s)")
    ratio("lora_all+compile", "trainer+liger", lambda r: r["tokens_per_s"], "≥ 1.2 (tokens/s)")
    ratio("lora_all", "torchtune", lambda r: r["tokens_per_s"], "≥ 1.2 (tokens/s)")
    ratio("lora_all+compile", "torchtune+compile", lambda r: r["tokens_per_s"], "≥ 1.2 (tokens/s)")
    return ratios


def print_mfu(args: argparse.Namespace, config, results: dict[str, dict]) -> dict[str, float]:
    """4N-MFU per variant on CUDA: LoRA on a frozen base costs forward 2N + backward 2N (input
    gradients only) per token, plus attention's 8·layers·hidden·seq."""
    device_name = torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device_name)
    if peak is None:
        print(f"MFU: unknown peak for {device_name}; pass --peak-tflops")
        return {}
    seq = (args.min_len + args.max_len) / 2
    flops_per_token = 4 * layer_params(config) + 8 * config.num_hidden_layers * config.hidden_size * seq
    print(f"\n{device_name}, dense bf16 peak {peak / 1e12:.0f} TFLOPs (4N convention)")
    mfu = {}
    for name, r in results.items():
        if not r.get("oom") and not r.get("missing"):
            mfu[name] = round(flops_per_token * r["tokens_per_s"] / peak, 4)
            print(f"4N-MFU {name}: {mfu[name]:.1%}")
    return mfu


def trace_8b(args: argparse.Namespace) -> None:
    """The largest tensor of one LoRA step at Llama-3-8B dimensions, ours against a plain forward
    with labels (what PEFT + Trainer runs), on meta tensors: nothing is allocated."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from flexora_cli.data.collate import pack_rows, pad_rows
    from flexora_cli.modeling import lora_config
    from flexora_cli.settings import LoraSettings, ModelSettings
    from flexora_cli.step import AnswerLM
    from flexora_cli.tripwires import VocabTensors

    config = LlamaConfig(**SIZES["8b"])
    with torch.device("meta"):
        base = LlamaForCausalLM(config).to(torch.bfloat16).requires_grad_(False)
    lora = get_peft_model(base, lora_config(ModelSettings(name_or_path="8b"), LoraSettings(), None))
    rows = synthetic_rows(args, config.vocab_size, args.batch_size, 0)
    answers = sum(row.answer_tokens for row in rows)
    print(f"Llama-3-8B dims on meta tensors: batch {args.batch_size}, {answers} answer tokens")
    ours = pack_rows(rows, 0, 0, 64)
    padded = pad_rows(rows, 0, 64)  # traced without a padding mask: shapes are what matter here
    plain_inputs = {"input_ids": padded.input_ids, "labels": padded.input_ids}
    for name, model, inputs in (
        ("flexora (packed, answer-only head)", AnswerLM(lora), ours.model_inputs()),
        ("plain forward with labels (PEFT + Trainer)", lora, plain_inputs),
    ):
        inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with VocabTensors(config.vocab_size) as trace:
            out = model(**inputs)
            (out if isinstance(out, torch.Tensor) else out.loss).backward()
        head = (config.hidden_size, config.vocab_size)  # the LM head's own weight (gradient)
        shapes = sorted(trace.shapes - {head, head[::-1]})
        largest = max((math.prod(shape) * 4 for shape in shapes), default=0)
        print(f"| {name} | [.., vocab] tensors {shapes} | largest {largest / 2**20:.1f} MiB in fp32 |")


def peak_flops(device_name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None)


if __name__ == "__main__":
    main()
