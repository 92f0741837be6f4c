"""The real-model demo: SmolLM2-135M-Instruct and a task it writes itself, with a planted answer.

- Contexts and endings are written by SmolLM2: each of TOPICS' openings is continued by seeded
  sampling; the continuation's first words extend the context and the next words are the true
  ending. The other three endings are other examples' (natural text, not about this context).
- A teacher is SmolLM2 with rank-2 changes in the q/v projections of PLANTED (3 of 30 layers, none
  at the ends), scaled up until the teacher's choice differs from the base model's on at least half
  of a probe set.
- The gold answer is the teacher's choice: the ending with the highest summed log-likelihood after
  the context (lm-eval's hellaswag acc), in Hellaswag's hub schema (data/*.jsonl).

So LoRA on the planted layers can reproduce the teacher and the search has a known answer, on a
real pretrained model with a real tokenizer. Built on first use (about 5 minutes on 2 CPU cores,
with a progress bar) and cached; deterministic for a given machine and library versions.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from flexora_cli import report
from flexora_cli.scoring import argmax
from flexora_cli.settings import ModelSettings

PLANTED = (8, 15, 22)
SPLIT_SIZES = {"train": 480, "validation": 160}
_VERSION = 1
TOPICS = [
    "Making a cup of tea", "Planting tomatoes in a garden", "Changing a flat bicycle tyre",
    "Packing for a weekend trip", "Baking bread at home", "Training a puppy to sit",
    "Cleaning a kitchen after dinner", "Learning to swim", "Writing a birthday card",
    "Walking in the mountains", "Fixing a leaking tap", "Painting a small room",
    "Cooking pasta for friends", "Studying for an exam", "Feeding birds in winter",
    "Moving into a new flat", "Repairing a wooden chair", "Running a first marathon",
    "Taking a photo at sunset", "Buying vegetables at a market", "Building a sandcastle",
    "Reading a story to a child", "Washing a car by hand", "Setting up a tent",
    "Making a paper airplane", "Brewing coffee in the morning", "Knitting a scarf",
    "Catching a train on time", "Decorating a cake", "Sorting clothes for the laundry",
    "Picking apples in autumn", "Teaching a friend to play chess",
]  # fmt: skip


def ensure_assets(directory: str | Path, model: ModelSettings) -> Path:
    """Build data/ (and assets.json) for `model` (SmolLM2) in `directory` unless already there."""
    from flexora_cli.rundir import atomic_directory

    root = Path(directory).expanduser()
    stamp = {"version": _VERSION, "planted_layers": list(PLANTED), "splits": SPLIT_SIZES}
    stamp_file = root / "assets.json"
    if stamp_file.exists() and _subset(json.loads(stamp_file.read_text()), stamp):
        return root
    with atomic_directory(root) as tmp:
        build(tmp, model, stamp)
    return root


def _subset(found: dict, wanted: dict) -> bool:
    return all(found.get(k) == v for k, v in wanted.items())


def build(root: Path, spec: ModelSettings, stamp: dict) -> None:
    """Write data/{train,validation}.jsonl and assets.json under `root`."""
    from flexora_cli.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(spec)
    base = load_model(spec, torch.device("cpu"), "fp32")
    total = sum(SPLIT_SIZES.values())
    with report.progress("smollm2 demo: writing", total) as bar:
        records = _write_records(base, tokenizer, total, lambda n: bar.update(0, advance=n))
    with report.progress("smollm2 demo: teacher", len(records)) as bar:
        teacher, scale, disagreement = _plant_teacher(base, tokenizer, records[:64])
        teacher_scores = _scores(teacher, tokenizer, records, lambda n: bar.update(0, advance=n))
    for record, scores in zip(records, teacher_scores):
        record["label"] = str(argmax(scores))
    start = 0
    (root / "data").mkdir(parents=True)
    for split, size in SPLIT_SIZES.items():
        rows = [{**r, "split": split} for r in records[start : start + size]]
        start += size
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    facts = {"teacher_scale": scale, "probe_disagreement": disagreement}
    (root / "assets.json").write_text(json.dumps(stamp | facts))


def _write_records(model, tokenizer, count: int, advance) -> list[dict]:
    """Hellaswag-schema records whose context and true ending SmolLM2 wrote (seeded sampling)."""
    torch.manual_seed(0)
    texts: list[tuple[str, str, str]] = []  # (topic, context, true ending)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last real token
    try:
        while len(texts) < count:
            topics = [TOPICS[(len(texts) + i) % len(TOPICS)] for i in range(32)]
            batch = tokenizer([f"{t}. First," for t in topics], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(
                    **batch, do_sample=True, temperature=0.9, top_p=0.95, max_new_tokens=28,
                    pad_token_id=tokenizer.pad_token_id,
                )  # fmt: skip
            for topic, ids in zip(topics, out[:, batch["input_ids"].shape[1] :]):
                words = tokenizer.decode(ids, skip_special_tokens=True).replace("\n", " ").split()
                if len(words) >= 12 and len(texts) < count:
                    texts.append((topic, " ".join(["First,", *words[:-8]]), " ".join(words[-8:])))
                    advance(1)
    finally:
        tokenizer.padding_side = side
    rng = random.Random(0)
    records = []
    for index, (topic, context, ending) in enumerate(texts):
        others = rng.sample([t[2] for i, t in enumerate(texts) if i != index], 3)
        endings = [ending, *others]
        rng.shuffle(endings)
        records.append({
            "ind": index, "activity_label": topic, "ctx_a": context, "ctx_b": "", "ctx": context,
            "endings": endings, "source_id": "flexora-smollm2-demo", "split": "train",
            "split_type": "indomain", "label": "",
        })  # fmt: skip
    return records


def _scores(model, tokenizer, records: list[dict], advance=None) -> list[list[float]]:
    """Per-choice summed log-likelihoods, as `flexora eval format=completion` scores them."""
    from flexora_cli.config import dataset_preset
    from flexora_cli.data.datasets import parse_rows
    from flexora_cli.data.prompts import build_prompts
    from flexora_cli.scoring import score

    hellaswag = dataset_preset("hellaswag")
    rows = [(f"record {i}", {**r, "label": "0"}) for i, r in enumerate(records)]
    prompts = build_prompts(parse_rows(hellaswag.columns, rows), hellaswag.prompt, "completion")
    done = [0]

    def progress(rows: int, _total: int) -> None:
        if advance is not None:
            advance(rows - done[0])
            done[0] = rows

    with torch.no_grad():
        return score(model, tokenizer, prompts, 32, 256, on_progress=progress)


def _plant_teacher(base, tokenizer, probe: list[dict]):
    """A copy of `base` with rank-2 q/v changes in PLANTED, scaled (doubling) until its choice
    differs from the base's on at least half of `probe`; (teacher, scale, disagreement)."""
    import copy

    generator = torch.Generator().manual_seed(1)
    deltas = {}
    for index in PLANTED:
        attention = base.model.layers[index].self_attn
        for name in ("q_proj", "v_proj"):
            weight = getattr(attention, name).weight
            u = torch.randn(weight.shape[0], 2, generator=generator)
            v = torch.randn(weight.shape[1], 2, generator=generator)
            deltas[index, name] = (u @ v.T) * weight.std() / math.sqrt(2)
    picks = [argmax(s) for s in _scores(base, tokenizer, probe)]
    teacher = copy.deepcopy(base)
    scale, disagreement = 0.25, 0.0
    while disagreement < 0.5 and scale <= 64:
        with torch.no_grad():
            for (index, name), delta in deltas.items():
                target = getattr(teacher.model.layers[index].self_attn, name).weight
                target.copy_(getattr(base.model.layers[index].self_attn, name).weight + scale * delta)
        chosen = [argmax(s) for s in _scores(teacher, tokenizer, probe)]
        disagreement = sum(a != b for a, b in zip(picks, chosen)) / len(probe)
        if disagreement < 0.5:
            scale *= 2
    return teacher, scale, disagreement
