"""No attention query row is ever fully masked, in any phase, for any packable family and
attention implementation; and no host sync happens inside a training step.

CUDA's SDPA kernels can return NaN for a fully masked row where CPU returns zeros (the NaN of a
Llama-3-8B search at step 29), so these tests inspect the masks handed to attention, which is
the same on every device, instead of the values.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from flexora_cli.config import load
from flexora_cli.data.batches import training_features
from flexora_cli.data.collate import Collator, TrainingRow
from flexora_cli.data.datasets import load_split
from flexora_cli.data.prompts import build_prompts
from flexora_cli.engine import Engine
from flexora_cli.method import LayerGates
from flexora_cli.modeling import load_tokenizer
from flexora_cli.scoring import score
from flexora_cli.step import AnswerLM, TrainStep, adamw_with_schedule, trainable_parameters
from flexora_cli.tripwires import AttentionTripwire, HostSyncCounter, fully_masked_rows

FAMILIES = ("llama", "mistral", "gemma", "qwen2")
SHAPE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
)  # fmt: skip


def tiny_family(family: str, vocab: int, attention: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=vocab, **SHAPE)
    config._attn_implementation = attention
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def demo_rows(demo_dir):
    """Ragged completion-format rows of the demo, one cut to 33 tokens (a padded width % 32 == 1)."""
    from tests.conftest import compose_config

    settings = load(compose_config("recipe=demo", f"demo_assets={demo_dir}"))
    tokenizer = load_tokenizer(settings.model)
    examples = load_split(settings.dataset, "train")[:12]
    prompts = build_prompts(examples, settings.dataset.prompt, "completion")
    rows = training_features(tokenizer, prompts, 128)
    lettered = training_features(tokenizer, build_prompts(examples[:1], settings.dataset.prompt, "mcq"), 128)[
        0
    ]
    assert max(len(r) for r in rows) < 33 < len(lettered)
    rows.append(TrainingRow(lettered.input_ids[-33:], lettered.labels[-33:]))
    return tokenizer, rows, prompts


def search_model(lm):
    peft_model = get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    layers = peft_model.base_model.model.model.layers
    gates = LayerGates(len(layers))
    gates.attach(layers)
    return AnswerLM(peft_model, gates)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_no_fully_masked_row_in_search_finetune_and_eval(demo_rows, family, attention):
    tokenizer, rows, prompts = demo_rows
    model = search_model(tiny_family(family, len(tokenizer), attention))
    assert model.packed
    model.train()
    for grad_accum in (1, 3):  # one pack, and several micro-batches of different widths
        for micro in Collator(tokenizer.pad_token_id, True, multiple=1, grad_accum=grad_accum)(
            rows
        ).micro_batches:
            with AttentionTripwire() as wire:
                model(**micro.model_inputs()).backward()  # a search/finetune step's forward
            assert wire.calls and not wire.violations, wire.violations
    assert model.gates.alpha_hat.grad is not None
    model.eval()
    for share_prefix in (True, False):
        with AttentionTripwire() as wire:
            scores = score(model.lm, tokenizer, prompts, 4, 128, share_prefix=share_prefix)
        assert wire.calls and not wire.violations, (share_prefix, wire.violations)
        assert all(torch.isfinite(torch.tensor(s)).all() for s in scores)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_right_padded_fallback_has_no_fully_masked_row(demo_rows, attention):
    tokenizer, rows, _ = demo_rows
    model = search_model(tiny_family("llama", len(tokenizer), attention))
    micro = Collator(tokenizer.pad_token_id, packed=False, multiple=1)(rows).micro_batches[0]
    assert micro.attention_mask is not None and micro.attention_mask.shape[1] == 33
    with AttentionTripwire() as wire:
        model(**micro.model_inputs()).backward()
    assert wire.calls and not wire.violations, wire.violations


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_tripwire_catches_left_padding(demo_rows, attention):
    """The collation of before (left padding with a padding mask) trips it."""
    tokenizer, rows, _ = demo_rows
    lm = tiny_family("llama", len(tokenizer), attention)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row.input_ids)
        attention_mask[i, width - len(row) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with AttentionTripwire() as wire:
        lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    assert wire.violations


def test_fully_masked_rows_reads_bool_and_additive_masks():
    allowed = torch.tensor([[True, False], [False, False]])
    assert fully_masked_rows(allowed) == 1
    additive = torch.zeros(2, 2).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert fully_masked_rows(additive) == 1


@pytest.mark.parametrize("stage", ["search", "finetune"])
def test_a_training_step_makes_no_host_sync(tiny_cfg, demo_rows, stage):
    """Counted over three steps of each phase (the count, not a time, is deterministic)."""
    tokenizer, rows, _ = demo_rows
    settings = load(tiny_cfg())
    engine = Engine(settings)
    model = search_model(tiny_family("llama", len(tokenizer), "sdpa"))
    if stage == "finetune":
        model = AnswerLM(model.lm)
    lora = trainable_parameters(model.lm)
    optimizer, schedule = adamw_with_schedule(lora, 1e-3, 0.0, "constant", 0.0, 10)
    optimizers = [optimizer] + (
        [torch.optim.Adam(model.gates.parameters(), fused=True)] if model.gates else []
    )
    model, *optimizers = engine.prepare(model, *optimizers)
    train_step = TrainStep(engine, model, stage)
    batch = Collator(tokenizer.pad_token_id, True)(rows)
    model.train()
    with HostSyncCounter() as syncs:
        for step in (1, 2, 3):
            for phase, optimizer in enumerate(optimizers):
                loss = train_step.forward_backward(batch)
                params = lora if phase == 0 else list(engine.unwrap(model).gates.parameters())
                train_step.update(optimizer, params, loss, 1.0, step, phase)
                optimizer.zero_grad(set_to_none=True)
            schedule.step()
    assert syncs.total == 0, syncs.counts
    readout = train_step.guard.read()
    assert (
        readout.failed is None and readout.skipped == 0 and set(readout.losses) == set(range(len(optimizers)))
    )
