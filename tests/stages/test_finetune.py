"""finetune's own options on the tiny demo: lora.init's conversion, and the adapter's model card."""

from __future__ import annotations

import json

import pytest

from flexora_cli import cli
from flexora_cli.config import load
from flexora_cli.errors import ConfigError
from flexora_cli.stages import run as pipeline
from tests.conftest import compose_config


def test_olora_run_saves_a_plain_lora_with_a_model_card(tiny_cfg, tmp_path):
    pipeline.run(tiny_cfg("lora.init=olora", "select.rule=top_k", "select.k=2"))
    adapter = tmp_path / "run" / "finetune" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    # the demo trains r=4, alpha=8: ΔW = BA − B₀A₀ is a rank-8 LoRA at the same alpha/r
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    card = (adapter / "README.md").read_text()
    selection = json.loads((tmp_path / "run" / "select" / "selection.json").read_text())
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert f"{len(selection['layers'])} of the 8 layers: {selection['layers']}" in card
    ranking = [line for line in card.splitlines() if line.startswith("| ") and line.count("|") == 5][1:]
    assert len(ranking) == 8 and sum("✓" in line for line in ranking) == 2
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert "## Evaluation (mcq format)" in card
    assert (
        f"| demo | validation | adapter | 40 | {metrics['results']['demo']['adapter']['acc']:.4f} ± " in card
    )
    # eval rewrote the card; the adapter still verifies, so nothing reruns
    assert cli.main(["run", "recipe=demo", *_same(tiny_cfg)]) == 0


def _same(tiny_cfg) -> list[str]:
    cfg = tiny_cfg("lora.init=olora", "select.rule=top_k", "select.k=2")
    keys = ["demo_assets", "out_dir"]
    quick = [f"{k}={cfg[k]}" for k in keys]
    return quick + [
        "search.budget=64", "search.val_samples=32", "search.log_every=2", "finetune.epochs=0.5",
        "dataset.max_train_samples=128", "eval.limit=40", "lora.init=olora", "select.rule=top_k", "select.k=2",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.init=pissa", "lora.variant=dora"], "lora.init=pissa: not with lora.variant=dora"),
        (["lora.init=olora", "model.quantization=4bit"], "lora.init=olora: not with model.quantization=4bit"),
        (["lora.init=loftq"], "lora.init: 'loftq' is not one of default, pissa, olora"),
    ],
)
def test_lora_init_combinations_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(compose_config("recipe=demo", "demo_assets=/x", *overrides))
