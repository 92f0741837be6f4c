"""The Flexora gates: αᵢ = N·softmax(α̂)ᵢ multiplies each LoRA path exactly once."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from flexora_cli.method import LayerGates, ranking


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)

    def forward(self, x):
        return x + self.q_proj(x) + self.v_proj(x)


class Stack(nn.Module):
    def __init__(self, width: int = 6, depth: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def lora_stack(seed: int = 0, variant: str = "lora", init="default"):
    torch.manual_seed(seed)
    config = LoraConfig(
        init_lora_weights=True if init == "default" else init,
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj"],
        use_rslora=variant == "rslora",
        use_dora=variant == "dora",
    )
    model = get_peft_model(Stack(), config)
    for name, param in model.named_parameters():  # non-zero B so the LoRA path contributes
        if "lora_B" in name:
            nn.init.normal_(param, std=0.5)
    return model


@pytest.mark.parametrize(
    ("variant", "init"),
    [("lora", "default"), ("rslora", "default"), ("dora", "default"), ("lora", "pissa"), ("lora", "olora")],
)
def test_alpha_zero_is_plain_lora(variant, init):
    """α = 1 reproduces plain PEFT output exactly, for every lora.variant and lora.init."""
    model = lora_stack(variant=variant, init=init)
    x = torch.randn(4, 6)
    plain = model(x)
    gates = LayerGates(3)
    assert gates.attach(model.base_model.model.layers) == 6  # q and v in each of 3 layers
    assert torch.equal(gates.alphas(), torch.ones(3))
    assert torch.allclose(model(x), plain, atol=0, rtol=0)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_gate_scales_each_lora_output_exactly_once(variant):
    """α once, not α² or α·(input). Not on DoRA: there the gate would scale B A x but not the
    weight norm DoRA divides by, so the adapter's effect does not scale by α (see below)."""
    model = lora_stack(variant=variant)
    layer = model.base_model.model.layers[1]
    x = torch.randn(4, 6)
    base_out = layer.q_proj.base_layer(x)
    lora_delta = layer.q_proj(x) - base_out
    gates = LayerGates(3)
    gates.attach(model.base_model.model.layers)
    with torch.no_grad():
        gates.alpha_hat.copy_(torch.tensor([0.3, 1.1, -0.2]))
    alpha = gates.alphas()[1]
    assert not torch.isclose(alpha, torch.tensor(1.0))
    gated_delta = layer.q_proj(x) - base_out
    assert torch.allclose(gated_delta, alpha * lora_delta, atol=1e-6) == (variant != "dora")
    assert torch.allclose(layer.q_proj.base_layer(x), base_out)  # W x untouched
    gates.detach()
    assert torch.allclose(layer.q_proj(x) - base_out, lora_delta, atol=1e-6)


def test_the_search_gates_plain_lora_in_place_of_dora():
    """So the search gates plain LoRA when lora.variant=dora (finetune trains DoRA); rslora's
    scaling is gated like any other."""
    from flexora_cli.method.gates import gated_lora
    from flexora_cli.settings import LoraSettings

    assert gated_lora(LoraSettings(variant="dora")).variant == "lora"
    assert gated_lora(LoraSettings(variant="rslora")).variant == "rslora"
    # PiSSA/OLoRA move part of the base weight into the adapter: a gate on it would scale the base
    for init in ("pissa", "olora"):
        assert gated_lora(LoraSettings(init=init)) == LoraSettings(init="default")


def test_alphas_sum_to_num_layers():
    gates = LayerGates(5)
    with torch.no_grad():
        gates.alpha_hat.copy_(torch.randn(5))
    assert gates.alphas().sum().item() == pytest.approx(5.0, rel=1e-6)


def adam_alpha_steps(center: bool, steps: int = 40) -> LayerGates:
    """α steps as the search takes them (fused Adam, lr 0.01), centred after each or not."""
    model = lora_stack()
    gates = LayerGates(3)
    gates.attach(model.base_model.model.layers)
    optimizer = torch.optim.Adam([gates.alpha_hat], lr=0.01, fused=True)
    torch.manual_seed(1)
    for _ in range(steps):
        loss = model(torch.randn(8, 6)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        grad = gates.alpha_hat.grad
        # softmax's gradient sums to 0 (up to float32 rounding: a few ulp of each term) ...
        assert abs(grad.sum().item()) < 1e-5 * grad.abs().sum().item()
        optimizer.step()
        if center:
            before = gates.alphas().clone()
            gates.center_()
            assert torch.allclose(gates.alphas(), before, atol=1e-6)  # ... centring changes no αᵢ
    return gates


def test_proposition_1_holds_under_adam_once_centred():
    drifted = adam_alpha_steps(center=False)
    assert abs(drifted.alpha_hat.sum().item()) > 0.05  # Adam's per-coordinate steps break it
    centred = adam_alpha_steps(center=True)
    assert abs(centred.alpha_hat.sum().item()) < 1e-6
    assert torch.allclose(centred.alpha_hat, drifted.alpha_hat - drifted.alpha_hat.mean(), atol=1e-5)


def test_ranking_orders_by_alpha_hat_then_index():
    assert ranking([0.1, 0.5, 0.1, -0.7]) == [1, 0, 2, 3]
