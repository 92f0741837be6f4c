"""The guarded training loop: a non-finite step is never applied, is named precisely, and the
stage resumes from the last good checkpoint; clipping and skipping."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexora_cli.data.collate import Collator
from flexora_cli.engine import Engine
from flexora_cli.errors import TrainingError
from flexora_cli.stages import finetune, search, select
from flexora_cli.step import AnswerLM, TrainStep, adamw_with_schedule, trainable_parameters
from tests.conftest import poison_layer
from tests.test_step import lora_model, tiny  # noqa: F401  (fixture)

QUICK = ("search.budget=160", "search.val_samples=32", "checkpoint_every=2", "search.log_every=2")


def poisoned(monkeypatch, from_call: int, until_call: int | None = None, backward: bool = False) -> list:
    """Poison decoder layer 3 of the search's model (conftest.poison_layer); returns the models."""
    loaded: list = []
    poison = poison_layer(search.load_model, 3, from_call, until_call, backward, loaded)
    monkeypatch.setattr(search, "load_model", poison)
    return loaded


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize(
    ("from_call", "backward", "expected"),
    [
        (9, False, "non-finite loss at step 5 (LoRA step, forward); first non-finite output in model.layers.3 "),
        (10, False, "non-finite loss at step 5 (α step, forward); first non-finite output in model.layers.3 "),
        (9, True, "non-finite gradient at step 5 (LoRA step, backward); first non-finite output gradient in model.layers.3 "),
    ],
)  # fmt: skip
def test_a_non_finite_step_is_named_not_applied_and_resumable(
    tiny_cfg, monkeypatch, from_call, backward, expected
):
    """Each search step runs 2 forwards (LoRA, then α): call 9 is step 5's LoRA step, 10 its α step.
    The guard is read at step 6 (log_every 2), which then stops the stage."""
    cfg = tiny_cfg(*QUICK)
    loaded = poisoned(monkeypatch, from_call, backward=backward)
    with pytest.raises(TrainingError) as failure:
        search.run(cfg)
    message = str(failure.value)
    checkpoint = Path(cfg.out_dir) / "search" / "checkpoints" / "step-0000004"
    assert expected in message, message
    assert f"the last good checkpoint is {checkpoint}: rerun the same command to resume" in message
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["step-0000002", "step-0000004"]

    # No update from step 5 on: LoRA as at step 4, or step 4 plus step 5's finite LoRA update
    saved = load_file(str(checkpoint / "weights.safetensors"))
    live = lora_weights(loaded[0])
    moved = any(
        not torch.equal(live[n.removeprefix("lm.base_model.model.")], t)
        for n, t in saved.items()
        if "lora_" in n
    )
    assert moved == (from_call == 10)
    assert all(torch.isfinite(t).all() for t in live.values())

    monkeypatch.undo()  # the rerun, without the poison, resumes at step 4 and completes
    result = search.run(cfg)
    assert result.steps == 10 and result.nonfinite_steps_skipped == 0
    assert all(math.isfinite(a) for a in result.alpha)


def test_on_nonfinite_skip_skips_and_counts(tiny_cfg, monkeypatch):
    poisoned(monkeypatch, 9, until_call=10)  # both phases of step 5
    result = search.run(tiny_cfg(*QUICK, "search.on_nonfinite=skip"))
    assert result.nonfinite_steps_skipped == 2
    assert all(math.isfinite(a) for a in result.alpha)
    assert all(math.isfinite(h["train_loss"]) for h in result.history)


def test_max_grad_norm_clips_and_reports_the_norm_before(tiny):  # noqa: F811
    settings, tokenizer, rows = tiny
    engine = Engine(settings)
    model = AnswerLM(lora_model(settings))
    params = trainable_parameters(model)
    optimizer, _ = adamw_with_schedule(params, 1e-3, 0.0, "constant", 0.0, 10)
    step = TrainStep(engine, model, "finetune")
    batch = Collator(tokenizer.pad_token_id, True)(rows)
    loss = step.forward_backward(batch) * 1e4  # a huge gradient
    for p in params:
        p.grad *= 1e4
    before = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    step.update(optimizer, params, loss, 1.0, step=1)
    after = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    assert before > 100 and after == pytest.approx(1.0, rel=1e-4)
    low, high = step.guard.read().grad_norm
    assert low == high == pytest.approx(before, rel=1e-4)


def test_max_grad_norm_is_recorded(tiny_cfg):
    cfg = tiny_cfg("select.layers=[2,5]", "finetune.max_grad_norm=0.5")
    select.run(cfg)
    result = finetune.run(cfg)
    assert result.max_grad_norm == 0.5 and result.nonfinite_steps_skipped == 0
    config = (Path(cfg.out_dir) / "finetune" / "config.yaml").read_text()
    assert "max_grad_norm: 0.5" in config
    log = json.loads((Path(cfg.out_dir) / "finetune" / "train_log.json").read_text())
    assert all(0 < h["grad_norm"][0] <= h["grad_norm"][1] for h in log["history"])
