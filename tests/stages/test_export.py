"""`flexora export`: the adapter merged into a plain transformers model that predicts alike."""

from __future__ import annotations

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexora_cli.config import load
from flexora_cli.rundir import RunDir
from flexora_cli.stages import finetune, select
from tests.conftest import flat


def test_export_merges_into_a_plain_model_that_predicts_alike(tiny_cfg, demo_dir):
    from flexora_cli.data.datasets import load_split
    from flexora_cli.data.prompts import build_prompts
    from flexora_cli.scoring import score
    from flexora_cli.stages import export

    cfg = tiny_cfg("select.layers=[2,5]")
    select.run(cfg)
    finetune.run(cfg)
    exported = export.run(cfg)
    model_dir = RunDir(cfg.out_dir).export_dir
    assert exported["model_dir"] == str(model_dir) and (model_dir / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))  # the tokenizer travels with it
    base = AutoModelForCausalLM.from_pretrained(f"{demo_dir}/model")
    adapted = PeftModel.from_pretrained(base, str(RunDir(cfg.out_dir).adapter_dir)).eval()
    prompts = build_prompts(load_split(load(cfg).dataset, "validation")[:30], load(cfg).dataset.prompt, "mcq")
    assert flat(score(merged, tokenizer, prompts, 8, 128)) == pytest.approx(
        flat(score(adapted, tokenizer, prompts, 8, 128)), abs=1e-4
    )
