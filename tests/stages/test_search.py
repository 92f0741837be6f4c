"""The search stage with each hypergradient: it runs, resumes exactly after an interruption,
and finds the demo's planted layers; Σα̂ stays 0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flexora_cli.config import load
from flexora_cli.demo import PLANTED_LAYERS
from flexora_cli.errors import ConfigError
from flexora_cli.method import SearchStep
from flexora_cli.stages import search
from tests.conftest import compose_config

VARIANTS = {
    "darts": ["search.hypergradient=darts"],
    "unrolled": ["search.hypergradient=unrolled", "search.unroll_steps=2", "model.attn_implementation=eager"],
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_interrupted_search_resumes_bit_identically(tiny_cfg, monkeypatch, variant):
    cfg = tiny_cfg("search.budget=96", "checkpoint_every=2", "search.log_every=1", *VARIANTS[variant])
    reference = search.run(cfg)
    assert reference.hypergradient == variant and reference.steps == 6
    assert all(abs(h["alpha_sum"]) < 1e-6 for h in reference.history)
    shutil.rmtree(cfg.out_dir)

    original = SearchStep.__call__

    def interrupted(self, step, batches):
        if step == 5:
            raise KeyboardInterrupt
        original(self, step, batches)

    monkeypatch.setattr(SearchStep, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search.run(cfg)
    assert (Path(cfg.out_dir) / "search" / "checkpoints" / "step-0000004").is_dir()
    monkeypatch.undo()
    resumed = json.loads((Path(search.run(cfg) and cfg.out_dir) / "search" / "alpha.json").read_text())
    assert resumed["alpha"] == reference.alpha and resumed["history"] == reference.history


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_demo_search_ranks_planted_layers_first(demo_dir, tmp_path, variant):
    torch.manual_seed(0)
    cfg = compose_config("recipe=demo", f"demo_assets={demo_dir}", f"out_dir={tmp_path}", *VARIANTS[variant])
    result = search.run(cfg)
    assert set(result.ranking[: len(PLANTED_LAYERS)]) == set(PLANTED_LAYERS)
    assert abs(result.alpha_sum) < 1e-6


def test_unrolled_refuses_what_it_cannot_differentiate(tiny_cfg):
    with pytest.raises(ConfigError) as failure:
        load(tiny_cfg("search.hypergradient=unrolled", "gradient_checkpointing=true"))
    message = str(failure.value)
    assert "model.attn_implementation=eager, gradient_checkpointing=false" in message
    assert "search.hypergradient=darts" in message
    with pytest.raises(ConfigError, match="search.hypergradient: 'second' is not one of first_order"):
        load(tiny_cfg("search.hypergradient=second"))
    with pytest.raises(ConfigError, match="not with precision=fp16"):
        load(tiny_cfg("search.hypergradient=darts", "precision=fp16"))


def test_alpha_warmup_sgd_and_validation_rows_per_alpha_step(tiny_cfg):
    """search.alpha_warmup_steps: α̂ stays 0 through the LoRA-only steps, then moves;
    alpha_optimizer=sgd: plain gradient steps (Σα̂ = 0); val_batch_size: rows per α step."""
    cfg = tiny_cfg(
        "search.alpha_warmup_steps=2",
        "search.alpha_optimizer=sgd",
        "search.alpha_lr=50",
        "search.val_batch_size=4",
        "search.log_every=1",
    )
    result = search.run(cfg)
    assert (result.steps, result.alpha_steps) == (4, 2)
    assert [all(a == 0 for a in h["alpha"]) for h in result.history] == [True, True, False, False]
    assert all(abs(h["alpha_sum"]) < 1e-6 for h in result.history)
    _, val, _ = search.search_batches(load(cfg), search.load_tokenizer(load(cfg).model))
    assert {len(rows) for rows in val.epoch(0)} == {4}
    with pytest.raises(ConfigError, match="search.alpha_optimizer: 'lbfgs' is not one of adam, sgd"):
        load(tiny_cfg("search.alpha_optimizer=lbfgs"))
