"""The bundled demo: a tiny Llama-architecture model and a task whose right layers are known.

- A byte-level BPE tokenizer trained on the demo's own words (no download).
- A randomly initialised 8-layer Llama ("base") whose output head is planted with a uniform prior
  over the answer letters, as a pretrained model would have after "Answer:".
- A "teacher" copy with low-rank changes planted in the q/v projections of PLANTED_LAYERS, each
  scaled so that every planted layer moves the answer distribution by the same amount.
- Multiple-choice data in Hellaswag's hub schema whose gold letter is the one the planted changes
  vote for (argmax of teacher minus base log-probabilities), balanced over letters.
- The same records re-cast in PIQA's, Winogrande's and RACE's hub schemas (data_piqa/, ...), for
  exercising every parser and prompt format (their labels carry no planted signal).

LoRA placed on the planted layers can represent the teacher exactly; elsewhere it can only
approximate it — so the search has a right answer: PLANTED_LAYERS. Everything is deterministic
and takes seconds on a CPU. `PlantedTask` describes the task; the demo is DEMO_TASK, an easy one
(the other layers' attention inputs are damped); scripts/planted_study.py builds harder ones.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PLANTED_LAYERS = (2, 5)
NUM_LAYERS = 8
LETTERS = "ABCD"
_FORMAT_VERSION = 6  # bump when the assets change, so cached copies are rebuilt


@dataclass
class PlantedTask:
    """A tiny model and the task planted in it; the signal is weaker the smaller `shift` and the
    closer `other_input_scale` is to 1."""

    num_layers: int = NUM_LAYERS
    planted: tuple[int, ...] = PLANTED_LAYERS
    """Layers whose q/v projections carry the teacher's low-rank changes."""
    shift: float = 3.0
    """Mean |change| of the answer log-probabilities that each planted layer alone causes."""
    other_input_scale: float = 0.03
    """Factor on the attention input norm of the other layers (1: left as initialised)."""
    seed: int = 0
    """Seed of the model's weights and of the planted changes."""
    split_sizes: dict = field(default_factory=lambda: {"train": 2800, "validation": 300, "test": 200})


DEMO_TASK = PlantedTask()


def ensure_assets(directory: str | os.PathLike, task: PlantedTask = DEMO_TASK) -> Path:
    """Build the model (`model/`) and data (`data/`) of `task` in `directory` unless already there."""
    root = Path(directory).expanduser()
    stamp = root / "assets.json"
    wanted = _stamp(task)
    if stamp.exists() and {k: v for k, v in json.loads(stamp.read_text()).items() if k in wanted} == wanted:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        build(tmp, task)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _stamp(task: PlantedTask) -> dict:
    """assets.json: the format version and planted layers; a task's other fields when not the demo's."""
    stamp = {"version": _FORMAT_VERSION, "planted_layers": list(task.planted)}
    return stamp if task == DEMO_TASK else stamp | {"task": json.loads(json.dumps(asdict(task)))}


def build(root: Path, task: PlantedTask = DEMO_TASK) -> None:
    """Write model/, data/{train,validation,test}.jsonl and assets.json under `root`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(task.seed)
    words = _words()
    tokenizer = _tokenizer(words)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=task.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    base = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the demo: only the planted layers' attention sees a full-scale input
        for index, layer in enumerate(base.model.layers):
            if index not in task.planted:
                layer.input_layernorm.weight.mul_(task.other_input_scale)
    letter_ids = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"][-1] for letter in LETTERS]
    rng = random.Random(0)
    probe = [_record(rng, words) for _ in range(256)]
    with torch.no_grad():
        _plant_letter_prior(base, tokenizer, [_prompt(r) for r in probe], letter_ids)
        teacher = _plant_teacher(base, tokenizer, [_prompt(r) for r in probe], letter_ids, task)
    records = _label(base, teacher, tokenizer, words, letter_ids, sum(task.split_sizes.values()))

    base.save_pretrained(root / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "model")
    start = 0
    for split, size in task.split_sizes.items():
        rows = [{**r, "split": split} for r in records[start : start + size]]
        start += size
        for folder, view in (("data", dict), *VIEWS.items()):
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"{split}.jsonl").write_text("".join(json.dumps(view(r)) + "\n" for r in rows))
    (root / "assets.json").write_text(json.dumps(_stamp(task)))


def planted_layers(directory: str | os.PathLike) -> list[int] | None:
    """The planted layers recorded with demo assets, or None for any other model."""
    stamp = Path(directory).expanduser() / "assets.json"
    return json.loads(stamp.read_text())["planted_layers"] if stamp.exists() else None


def _words() -> list[str]:
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "re", "tu", "sa", "ne", "po", "vi", "du", "ga", "he"]
    return sorted({rng.choice(syllables) + rng.choice(syllables) for _ in range(200)})[:48]


def _tokenizer(words: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    scaffold = (
        "demo: x\nQuestion: Which ending makes the most sense?\nA. x\nB. y\nC. z\nD. w\nAnswer: A B C D"
    )
    corpus = [scaffold] * 50 + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _record(rng: random.Random, words: list[str]) -> dict:
    ctx = [rng.choice(words) for _ in range(8)]
    return {
        "ind": 0,
        "activity_label": "demo",
        "ctx_a": " ".join(ctx[:5]) + ".",
        "ctx_b": " ".join(ctx[5:]),
        "ctx": " ".join(ctx[:5]) + ". " + " ".join(ctx[5:]),
        "endings": [" ".join(rng.choice(words) for _ in range(3)) for _ in range(4)],
        "source_id": "flexora-demo",
        "split": "train",
        "split_type": "indomain",
        "label": "",
    }


def _pair(record: dict) -> tuple[list[int], int]:
    """Two ending indices (gold and a distractor) in a record-dependent order, and the gold's place."""
    gold = int(record["label"])
    other = (gold + 1 + record["ind"] % 3) % 4
    order = [gold, other] if record["ind"] % 2 == 0 else [other, gold]
    return order, order.index(gold)


def _piqa(record: dict) -> dict:
    order, gold = _pair(record)
    endings = record["endings"]
    goal = f"{record['activity_label']}: {record['ctx']}"
    return {"goal": goal, "sol1": endings[order[0]], "sol2": endings[order[1]], "label": gold}


def _winogrande(record: dict) -> dict:
    order, gold = _pair(record)
    first_words = [record["endings"][i].split()[0] for i in order]
    rest = " ".join(record["endings"][order[gold]].split()[1:])
    sentence = f"{record['ctx']} _ {rest}."
    return {
        "sentence": sentence,
        "option1": first_words[0],
        "option2": first_words[1],
        "answer": str(gold + 1),
    }


def _race(record: dict) -> dict:
    return {
        "example_id": f"demo{record['ind'] // 3}.txt",
        "article": f"{record['activity_label']}: {record['ctx']}",
        "question": "Which ending makes the most sense?",
        "options": record["endings"],
        "answer": LETTERS[int(record["label"])],
    }


VIEWS = {"data_piqa": _piqa, "data_winogrande": _winogrande, "data_race": _race}
"""Folders of the same records in the other hub schemas."""


def _prompt(record: dict) -> str:
    # Same text as flexora_cli.data.prompts.mcq on the parsed record.
    options = "".join(f"{letter}. {ending}\n" for letter, ending in zip(LETTERS, record["endings"]))
    return f"{record['activity_label']}: {record['ctx']}\nQuestion: Which ending makes the most sense?\n{options}Answer:"


def _last_hidden(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    hidden = model.model(**batch).last_hidden_state
    return hidden[torch.arange(len(prompts)), batch["attention_mask"].sum(1) - 1]


def _letter_logprobs(model, tokenizer, prompts: list[str], letter_ids: list[int]) -> torch.Tensor:
    logits = model.lm_head(_last_hidden(model, tokenizer, prompts))
    return logits[:, letter_ids].log_softmax(-1)


def _plant_letter_prior(model, tokenizer, prompts: list[str], letter_ids: list[int]) -> None:
    """Make the letters likely after "Answer:" (as in a pretrained model) without favouring one."""
    mean_hidden = _last_hidden(model, tokenizer, prompts).mean(0)
    direction = mean_hidden / mean_hidden.dot(mean_hidden)
    weight = model.lm_head.weight
    for token in letter_ids:
        weight[token] = weight[token] - weight[token].dot(mean_hidden) * direction + 12.0 * direction


def _plant_teacher(base, tokenizer, prompts: list[str], letter_ids: list[int], task: PlantedTask):
    """Copy `base` and add rank-2 changes to q/v of the planted layers, equal in effect."""
    generator = torch.Generator().manual_seed(1 + task.seed)
    deltas = {}
    for index in task.planted:
        attention = base.model.layers[index].self_attn
        for name in ("q_proj", "v_proj"):
            out_features, in_features = getattr(attention, name).weight.shape
            u = torch.randn(out_features, 2, generator=generator)
            v = torch.randn(in_features, 2, generator=generator)
            deltas[index, name] = u @ v.T / math.sqrt(in_features)
    reference = _letter_logprobs(base, tokenizer, prompts, letter_ids)
    scales = {}
    for index in task.planted:  # scale each layer's change to move the answer by the same amount
        single = _with_deltas(base, {k: d for k, d in deltas.items() if k[0] == index}, 1.0)
        shift = (_letter_logprobs(single, tokenizer, prompts, letter_ids) - reference).abs().mean()
        scales[index] = task.shift / max(float(shift), 1e-6)
    return _with_deltas(base, {k: d * scales[k[0]] for k, d in deltas.items()}, 1.0)


def _with_deltas(base, deltas: dict, scale: float):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(base.config).eval()
    model.load_state_dict(base.state_dict())
    for (index, name), delta in deltas.items():
        getattr(model.model.layers[index].self_attn, name).weight += scale * delta
    return model


def _label(base, teacher, tokenizer, words, letter_ids, count: int) -> list[dict]:
    """Records whose gold letter is the planted changes' clear vote, balanced over letters."""
    rng = random.Random(5)
    quota = [count // len(LETTERS)] * len(LETTERS)
    records: list[dict] = []

    def votes(candidates: list[dict]) -> torch.Tensor:
        prompts = [_prompt(r) for r in candidates]
        return _letter_logprobs(teacher, tokenizer, prompts, letter_ids) - _letter_logprobs(
            base, tokenizer, prompts, letter_ids
        )

    with torch.no_grad():
        # The changes also shift all answers towards some letters; centring removes that constant
        # bias (any layer could learn it) and keeps the content-dependent part.
        probe_rng = random.Random(4)
        bias = votes([_record(probe_rng, words) for _ in range(512)]).mean(0)
        for _ in range(200):  # bounded: at the usual acceptance rate this takes ~20 rounds
            if len(records) >= count:
                break
            candidates = [_record(rng, words) for _ in range(256)]
            for record, scores in zip(candidates, votes(candidates) - bias):
                top2 = scores.topk(2).values
                gold = int(scores.argmax())
                if top2[0] - top2[1] > 0.2 and quota[gold] > 0:
                    quota[gold] -= 1
                    records.append({**record, "ind": len(records), "label": str(gold)})
    if len(records) < count:
        raise RuntimeError(f"demo data: only {len(records)} of {count} records reached a clear vote")
    random.Random(6).shuffle(records)
    return records
