"""method/search_step.py through its builder, on the demo's tiny Llama: the LoRA-only warm-up, the
α step and its centring (Σα̂ = 0), and both α optimizers."""

from __future__ import annotations

import math

import pytest
import torch

from flexora_cli.config import load
from flexora_cli.data.collate import TrainingRow
from flexora_cli.engine import Engine
from flexora_cli.method import build_search_step
from flexora_cli.modeling import load_model


def batches(count: int, rows: int = 4) -> list[list[TrainingRow]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        batch = []
        for _ in range(rows):
            length = int(torch.randint(6, 14, (1,), generator=generator))
            ids = torch.randint(3, 100, (length,), generator=generator).tolist()
            batch.append(TrainingRow.of(ids[:-1], ids[-1:]))
        out.append(batch)
    return out


def built_search(tiny_cfg, *overrides: str, steps: int = 4):
    settings = load(tiny_cfg(*overrides))
    engine = Engine(settings)
    torch.manual_seed(0)
    base = load_model(settings.model, engine.device, engine.precision)
    return build_search_step(engine, base, settings, steps, pad_id=0)


@pytest.mark.parametrize("alpha_optimizer", ["adam", "sgd"])
def test_warmup_steps_train_lora_alone_then_alpha_moves_and_stays_centred(tiny_cfg, alpha_optimizer):
    lr = "0.01" if alpha_optimizer == "adam" else "20"
    built, gates = built_search(
        tiny_cfg, "search.alpha_warmup_steps=2", f"search.alpha_optimizer={alpha_optimizer}",
        f"search.alpha_lr={lr}", "search.lr=0.01",
    )  # fmt: skip
    lora_b = [p for name, p in built.model.named_parameters() if "lora_B" in name]
    train, val = batches(4), batches(4)
    built.model.train()
    for step in (1, 2):
        built.one_step(step, (built.collate(train[step - 1]), built.collate(val[step - 1])))
        assert torch.count_nonzero(gates.alpha_hat) == 0  # no α step during the warm-up
    assert all(torch.count_nonzero(b) > 0 for b in lora_b)  # but LoRA moved off B = 0
    built.one_step(3, (built.collate(train[2]), built.collate(val[2])))
    alpha = gates.alpha_hat.detach().double()
    assert torch.count_nonzero(alpha) == alpha.numel()  # the first α step moved every gate
    assert math.isclose(float(alpha.sum()), 0.0, abs_tol=1e-6)  # centred: Proposition 1
    readout = built.train_step.check(lambda step, phase: "unused")
    assert set(readout.losses) == {0, 1} and readout.skipped == 0  # both phases ran, finite
