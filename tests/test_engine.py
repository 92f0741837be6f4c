"""The training step: left-padded answer-only loss, micro-batches and processes, where backward stops."""

from __future__ import annotations

import pytest
import torch

from flexora_cli.data.batches import collate_left, training_features
from flexora_cli.data.datasets import load_split
from flexora_cli.data.prompts import build_prompts
from flexora_cli.engine import Engine
from flexora_cli.errors import ConfigError
from flexora_cli.modeling import (
    attach_lora,
    enable_gradient_checkpointing,
    get_layers,
    load_model,
    load_tokenizer,
    resolve_precision,
)
from flexora_cli.settings import load
from flexora_cli.training import answer_loss_sum


@pytest.fixture()
def tiny(tiny_cfg):
    """Settings, tokenizer and 7 completion-format rows of different lengths (multi-token answers)."""
    settings = load(tiny_cfg("format=completion"))
    tokenizer = load_tokenizer(settings.model)
    examples = load_split(settings.dataset, "train")[:7]
    rows = training_features(tokenizer, build_prompts(examples, "completion"), settings.max_length)
    assert len({len(r["input_ids"]) for r in rows}) > 1
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


def one_by_one_loss(model, rows) -> torch.Tensor:
    """The plain way: each row alone, unpadded, full logits."""
    total = torch.zeros(())
    for row in rows:
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(row["labels"][1:])
        total = total + torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return total.detach()


@pytest.mark.parametrize("keep_logits", [True, False])
def test_left_padded_answer_loss_equals_each_row_alone(tiny, keep_logits):
    settings, tokenizer, rows = tiny
    model = lora_model(settings)
    batch = collate_left(rows, tokenizer.pad_token_id)
    ours = answer_loss_sum(model, batch, torch.device("cpu"), keep_logits).detach()
    assert float(ours) == pytest.approx(float(one_by_one_loss(model, rows)), rel=1e-5)


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("grad_accum", [2, 3, 7, 9])
def test_micro_batches_take_the_same_step(tiny, grad_accum):
    """Any grad_accum (even more micro-batches than rows) gives the gradient of the mean token loss."""
    settings, tokenizer, rows = tiny
    engine = Engine(settings)
    model = lora_model(settings)
    one = engine.forward_backward(model, rows, 1, tokenizer.pad_token_id)
    expected = gradients(model)
    model.zero_grad()
    split = engine.forward_backward(model, rows, grad_accum, tokenizer.pad_token_id)
    assert split.loss == pytest.approx(one.loss, rel=1e-6) and split.tokens == one.tokens
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)
    tokens = sum(sum(1 for label in r["labels"] if label != -100) for r in rows)
    assert one.loss == pytest.approx(float(one_by_one_loss(model, rows)) / tokens, rel=1e-5)


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
    Engine(settings).forward_backward(model, rows, 1, tokenizer.pad_token_id)
    assert needs_grad == {i: i >= 5 for i in range(8)}  # layers 0–4 build no graph: no backward there
    reference = lora_model(settings, layers=[5, 6])
    reference.train()
    Engine(settings).forward_backward(reference, rows, 1, tokenizer.pad_token_id)
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

    from flexora_cli.stages.search import gated_lora_model

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
    Engine(settings).forward_backward(model, rows, 1, tokenizer.pad_token_id)
    grad = gates.alpha_hat.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
