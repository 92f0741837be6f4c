"""Exactness of the hypergradients on a tiny float64 Llama: unrolled against central finite
differences of the real optimizer trajectory, darts against unrolled K = 1, first order against
unrolled K = 0; every α̂ gradient sums to 0 (Proposition 1's premise).

transformers' RMSNorm and eager softmax compute in float32 even in a float64 model; they are
patched to stay in float64 here, or the finite differences would measure rounding noise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from flexora_cli.data.collate import Collator, TrainingRow
from flexora_cli.engine import Engine
from flexora_cli.method import LayerGates
from flexora_cli.method.hypergradient import DropoutOff, make_hypergradient
from flexora_cli.settings import Settings
from flexora_cli.step import AnswerLM, TrainStep, adamw_with_schedule, trainable_parameters

LAYERS = 3


@pytest.fixture()
def float64_llama(monkeypatch):
    def rms_norm(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)

    def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
        weights = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = nn.functional.softmax(weights, dim=-1)  # float64 throughout
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", eager_attention)


class Setup:
    """A gated float64 LoRA model, its optimizer at a fixed starting state, and batches."""

    def __init__(self, tmp_path, kind: str, unroll_steps: int = 1, max_grad_norm: float = 0.0, dropout=0.0):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
            attn_implementation="eager",
        )  # fmt: skip
        base = LlamaForCausalLM(config).double().requires_grad_(False)
        lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])
        peft_model = get_peft_model(base, lora).double()
        for name, p in peft_model.named_parameters():  # B = 0 would hide A's part of the terms
            if "lora_B" in name:
                nn.init.normal_(p, std=0.3)
        gates = LayerGates(LAYERS).double()
        gates.attach(peft_model.base_model.model.model.layers)
        with torch.no_grad():
            gates.alpha_hat.copy_(torch.tensor([0.2, -0.3, 0.1], dtype=torch.float64))
        self.model, self.gates = AnswerLM(peft_model, gates), gates
        self.lora = trainable_parameters(peft_model)
        settings = Settings(device="cpu", precision="fp32", tracker="none", out_dir=str(tmp_path))
        settings.search.hypergradient, settings.search.unroll_steps = kind, unroll_steps
        settings.search.max_grad_norm = self.max_grad_norm = max_grad_norm
        self.search = settings.search
        self.optimizer, _ = adamw_with_schedule(self.lora, 0.02, 0.01, "constant", 0.0, 10)
        self.train_step = TrainStep(Engine(settings), self.model, "search")
        collate = Collator(pad_id=0, packed=True, multiple=1)
        generator = torch.Generator().manual_seed(1)
        self.train = [collate(rows(generator, 4)) for _ in range(3)]
        self.val = collate(rows(generator, 4))
        self._warm_up(collate(rows(generator, 4)))
        self.start = self._state()

    def _warm_up(self, batch) -> None:
        """Two real steps first, so Adam's moments are not at their zero start."""
        for step in (1, 2):
            self.lora_step(batch, step)

    def _state(self):
        return [p.detach().clone() for p in self.lora], copy.deepcopy(self.optimizer.state_dict())

    def restore(self, alpha: torch.Tensor) -> None:
        weights, optimizer = self.start
        with torch.no_grad():
            for p, w in zip(self.lora, weights, strict=True):
                p.copy_(w)
            self.gates.alpha_hat.copy_(alpha)
        self.optimizer.load_state_dict(copy.deepcopy(optimizer))

    def lora_step(self, batch, step: int, hypergradient=None) -> None:
        """The search's LoRA phase (SearchStep's first half)."""
        if hypergradient:
            hypergradient.before_lora_step(batch)
        loss = self.train_step.forward_backward(batch)
        norm = self.train_step.update(self.optimizer, self.lora, loss, self.max_grad_norm, step)
        if hypergradient:
            hypergradient.after_lora_step(norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.gates.alpha_hat.grad = None

    def val_loss_after(self, alpha: torch.Tensor, k: int) -> float:
        """F(α) = L_val(w_k(α), α): k real LoRA steps at α, then the α pass's loss."""
        self.restore(alpha)
        for j in range(k):
            self.lora_step(self.train[j], 3 + j)
        with torch.no_grad(), DropoutOff(self.model)():
            return float(mean_loss(self.model, self.val))

    def hypergradient(self, k: int) -> torch.Tensor:
        """The variant's α̂ gradient after k LoRA steps at the starting α."""
        alpha = self.start_alpha
        self.restore(alpha)
        variant = make_hypergradient(
            self.search.hypergradient, self.train_step, self.lora, self.gates, self.optimizer, self.model, self.search
        )  # fmt: skip
        for j in range(k):
            self.lora_step(self.train[j], 3 + j, variant)
        with DropoutOff(self.model)():
            self.train_step.forward_backward(self.val)
        variant.correct(self.train[k - 1] if k else None, self.val)
        gradient = self.gates.alpha_hat.grad.detach().clone()
        self.optimizer.zero_grad(set_to_none=True)
        return gradient

    start_alpha = torch.tensor([0.2, -0.3, 0.1], dtype=torch.float64)

    def finite_differences(self, k: int, h: float = 1e-5) -> torch.Tensor:
        out = torch.zeros(LAYERS, dtype=torch.float64)
        for i in range(LAYERS):
            step = torch.zeros(LAYERS, dtype=torch.float64)
            step[i] = h
            plus = self.val_loss_after(self.start_alpha + step, k)
            minus = self.val_loss_after(self.start_alpha - step, k)
            out[i] = (plus - minus) / (2 * h)
        return out


def rows(generator: torch.Generator, count: int) -> list[dict]:
    """Random rows of 6–11 tokens whose last 2 tokens are the answer."""
    out = []
    for _ in range(count):
        length = int(torch.randint(6, 12, (1,), generator=generator))
        ids = torch.randint(1, 40, (length,), generator=generator).tolist()
        out.append(TrainingRow.of(ids[:-2], ids[-2:]))
    return out


def mean_loss(model: nn.Module, batch) -> torch.Tensor:
    """The step's loss of `batch` (mean per answer token), forward only."""
    parts = [model(**m.model_inputs()) * m.weight for m in batch.micro_batches]
    return sum(parts) / batch.total_tokens


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("k", "max_grad_norm"), [(1, 0.0), (2, 0.0), (2, 0.05)])
def test_unrolled_equals_finite_differences_of_the_real_steps(float64_llama, tmp_path, k, max_grad_norm):
    setup = Setup(tmp_path, "unrolled", unroll_steps=k, max_grad_norm=max_grad_norm)
    exact = setup.hypergradient(k)
    assert relative_error(exact, setup.finite_differences(k)) <= 1e-6
    assert abs(float(exact.sum())) <= 1e-10 * float(exact.abs().sum())
    first_order = Setup(tmp_path, "first_order").hypergradient(k)
    assert relative_error(first_order, exact) > 1e-3  # the LoRA steps' term is not negligible here


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_darts_matches_unrolled_one_step(float64_llama, tmp_path, max_grad_norm):
    darts = Setup(tmp_path, "darts", max_grad_norm=max_grad_norm).hypergradient(1)
    unrolled = Setup(tmp_path, "unrolled", unroll_steps=1, max_grad_norm=max_grad_norm).hypergradient(1)
    assert relative_error(darts, unrolled) <= 1e-4
    assert abs(float(darts.sum())) <= 1e-8 * float(darts.abs().sum())


def test_first_order_is_unrolled_with_no_steps(float64_llama, tmp_path):
    first_order = Setup(tmp_path, "first_order").hypergradient(1)
    unrolled = Setup(tmp_path, "unrolled", unroll_steps=0).hypergradient(1)
    assert relative_error(unrolled, first_order) <= 1e-12
    assert abs(float(first_order.sum())) <= 1e-10 * float(first_order.abs().sum())


def test_replayed_dropout_keeps_unrolled_exact(float64_llama, tmp_path):
    """With LoRA dropout on, the replay reuses each step's masks (RNG state), so the unrolled
    trajectory is the one the optimizer took: it still matches finite differences, whose every
    evaluation reseeds the RNG the same way."""
    setup = Setup(tmp_path, "unrolled", unroll_steps=1, dropout=0.3)
    torch.manual_seed(5)
    exact = setup.hypergradient(1)
    differences = torch.zeros(LAYERS, dtype=torch.float64)
    for i in range(LAYERS):
        step = torch.zeros(LAYERS, dtype=torch.float64)
        step[i] = 1e-5
        values = []
        for sign in (1, -1):
            torch.manual_seed(5)
            values.append(setup.val_loss_after(setup.start_alpha + sign * step, 1))
        differences[i] = (values[0] - values[1]) / 2e-5
    assert relative_error(exact, differences) <= 1e-6


def test_an_unknown_hypergradient_is_an_error_not_a_first_order_search():
    from flexora_cli.errors import ConfigError
    from flexora_cli.method.hypergradient import make_hypergradient
    from flexora_cli.settings import SearchSettings

    with pytest.raises(ConfigError, match="search.hypergradient: 'second' is not one of first_order, darts"):
        make_hypergradient("second", None, [], None, None, None, SearchSettings())
