"""The training step: packed rows, the answer-only loss, micro-batches and processes, where
backward stops, clipping and the on-device guard."""

from __future__ import annotations

import pytest
import torch

from flexora_cli.config import load
from flexora_cli.data.batches import training_features
from flexora_cli.data.collate import Collator, TrainingRow, pack_rows, pad_rows
from flexora_cli.data.datasets import load_split
from flexora_cli.data.prompts import build_prompts
from flexora_cli.engine import Engine
from flexora_cli.errors import ConfigError
from flexora_cli.method import LayerGates
from flexora_cli.modeling import (
    attach_lora,
    enable_gradient_checkpointing,
    get_layers,
    load_model,
    load_tokenizer,
    resolve_precision,
)
from flexora_cli.step import AnswerLM, TrainStep


@pytest.fixture()
def tiny(tiny_cfg):
    """Settings, tokenizer and 7 completion-format rows of different lengths (multi-token answers)."""
    settings = load(tiny_cfg("format=completion"))
    tokenizer = load_tokenizer(settings.model)
    examples = load_split(settings.dataset, "train")[:7]
    rows = training_features(
        tokenizer, build_prompts(examples, settings.dataset.prompt, "completion"), settings.max_length
    )
    assert len({len(r) for r in rows}) > 1
    return settings, tokenizer, rows


def lora_model(settings, layers=None, seed=0):
    torch.manual_seed(seed)
    model = attach_lora(
        load_model(settings.model, torch.device("cpu"), "fp32"), settings.model, settings.lora, layers
    )
    with torch.no_grad():  # B starts at zero; make every LoRA matrix matter for the gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def gated(settings, seed=0):
    """A LoRA model with gates at a non-trivial α̂, as the search trains it."""
    model = lora_model(settings, seed=seed)
    gates = LayerGates(len(get_layers(model, settings.model.layers_path)))
    gates.attach(get_layers(model, settings.model.layers_path))
    with torch.no_grad():
        gates.alpha_hat.copy_(torch.linspace(-0.5, 0.5, gates.num_layers))
    return AnswerLM(model, gates)


def one_by_one_loss(model, rows) -> torch.Tensor:
    """The plain way: each row alone, unpadded, full logits, through the peft model's own forward."""
    total = torch.zeros(())
    for row in rows:
        logits = model(input_ids=torch.tensor([row.input_ids])).logits[0, :-1]
        labels = torch.tensor(row.labels[1:])
        total = total + torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return total


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_pack_rows_restarts_positions_and_scores_answers_only():
    rows = [
        TrainingRow.of([1, 2], [3]),
        TrainingRow.of([1, 4, 5], [6, 7]),
        TrainingRow.of([1], [8]),
    ]
    batch = pack_rows(rows, pad_id=0, pack_tokens=0, multiple=4)  # capacity 8: [5+3, 2+pad]
    assert batch.input_ids.tolist() == [[1, 4, 5, 6, 7, 1, 2, 3], [1, 8, 0, 0, 0, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch.sequence_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]]
    # the logit at p predicts p + 1: answers 6, 7 of row 2, 3 of row 1, 8 of row 3
    assert list(zip(batch.answer_rows.tolist(), batch.answer_cols.tolist(), batch.targets.tolist())) == [
        (0, 2, 6), (0, 3, 7), (0, 6, 3), (1, 0, 8),
    ]  # fmt: skip
    assert batch.real_tokens == 10 and batch.attention_mask is None
    padded = pad_rows(rows, pad_id=0, multiple=1)
    assert padded.input_ids.tolist() == [[1, 2, 3, 0, 0], [1, 4, 5, 6, 7], [1, 8, 0, 0, 0]]
    assert padded.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert padded.targets.tolist() == [3, 6, 7, 8] and padded.sequence_ids is None


@pytest.mark.parametrize("packing", ["one pack", "several packs", "padded"])
def test_answer_loss_and_gradients_equal_each_row_alone(tiny, packing):
    """float32: the packed (or padded) loss and the LoRA and α gradients equal the one-row-at-a-time
    computation through the model's own forward to 1e-5."""
    settings, tokenizer, rows = tiny
    if packing == "padded":
        batch = pad_rows(rows, tokenizer.pad_token_id, 1)
    else:
        batch = pack_rows(rows, tokenizer.pad_token_id, 0 if packing == "several packs" else 4096, 1)
        assert (batch.input_ids.shape[0] > 1) == (packing == "several packs")
    assert_batch_equals_each_row_alone(settings, rows, batch)


def assert_batch_equals_each_row_alone(settings, rows, batch) -> None:
    """The loss and the LoRA and α gradients of `batch` (the collated `rows`) equal the
    one-row-at-a-time computation through the model's own forward, to 1e-5 (float32)."""
    ours_model = gated(settings)
    ours = ours_model(**batch.model_inputs())
    ours.backward()
    reference_model = gated(settings)
    with reference_model.gates.once_per_forward():
        reference = one_by_one_loss(reference_model.lm, rows)
    reference.backward()
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    expected = gradients(reference_model)
    assert "gates.alpha_hat" in expected
    for name, grad in gradients(ours_model).items():  # to 1e-5 of each tensor's scale
        torch.testing.assert_close(
            grad, expected[name], rtol=0, atol=1e-5 * float(expected[name].abs().max())
        )


@pytest.mark.parametrize("grad_accum", [2, 3, 7, 9])
def test_micro_batches_take_the_same_step(tiny, grad_accum):
    """Any grad_accum (even more micro-batches than rows) gives the gradient of the mean token loss."""
    settings, tokenizer, rows = tiny
    engine = Engine(settings)
    model = AnswerLM(lora_model(settings))
    step = TrainStep(engine, model, "finetune")
    one = step.forward_backward(Collator(tokenizer.pad_token_id, True)(rows))
    expected = gradients(model)
    model.zero_grad()
    split = step.forward_backward(Collator(tokenizer.pad_token_id, True, grad_accum=grad_accum)(rows))
    assert float(split) == pytest.approx(float(one), rel=1e-6)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)
    tokens = sum(r.answer_tokens for r in rows)
    assert float(one) == pytest.approx(float(one_by_one_loss(model.lm, rows).detach()) / tokens, rel=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_stops_at_the_lowest_lora_layer(tiny, checkpointing):
    settings, tokenizer, rows = tiny
    model = lora_model(settings, layers=[5, 6])
    if checkpointing:
        enable_gradient_checkpointing(model)
    needs_grad: dict[int, bool] = {}
    for index, layer in enumerate(get_layers(model, settings.model.layers_path)):
        layer.register_forward_hook(
            lambda _m, _i, out, index=index: needs_grad.__setitem__(
                index, (out[0] if isinstance(out, tuple) else out).requires_grad
            )
        )
    model.train()
    collate = Collator(tokenizer.pad_token_id, True)
    TrainStep(Engine(settings), AnswerLM(model), "finetune").forward_backward(collate(rows))
    assert needs_grad == {i: i >= 5 for i in range(8)}  # layers 0–4 build no graph: no backward there
    reference = lora_model(settings, layers=[5, 6])
    reference.train()
    TrainStep(Engine(settings), AnswerLM(reference), "finetune").forward_backward(collate(rows))
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, gradients(reference)[name], rtol=1e-5, atol=1e-7)


def test_precision_resolution_and_base_dtype(tiny_cfg):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    with pytest.raises(ConfigError, match="precision=fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cpu)
    settings = load(tiny_cfg("precision=bf16", "model.dtype=auto"))
    engine = Engine(settings)
    assert engine.precision == "bf16" and engine.accelerator.mixed_precision == "bf16"
    model = attach_lora(
        load_model(settings.model, cpu, engine.precision), settings.model, settings.lora, None
    )
    weights = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    lora = {p.dtype for p in model.parameters() if p.requires_grad}
    assert weights == {torch.bfloat16} and lora == {
        torch.float32
    }  # frozen base in bf16, LoRA masters in fp32


def test_gates_attach_to_quantized_lora_layers(tiny):
    """QLoRA: peft's bitsandbytes Linear4bit LoRA layers get a gate each, and α gets a gradient."""
    from peft.tuners.lora.bnb import Linear4bit

    from flexora_cli.method import gated_lora_model

    settings, tokenizer, rows = tiny
    settings.model.quantization = "4bit"
    base = load_model(settings.model, torch.device("cpu"), "fp32")
    model, gates = gated_lora_model(base, settings)
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 16 and len(gates._handles) == 16  # q_proj and v_proj of 8 layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    collate = Collator(tokenizer.pad_token_id, True)
    TrainStep(Engine(settings), model, "search").forward_backward(collate(rows))
    grad = gates.alpha_hat.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
