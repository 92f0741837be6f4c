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


@pytest.mark.parametrize(
    ("gguf_type", "atol"), [("f16", 1e-2), pytest.param("q8_0", 0.5, marks=pytest.mark.slow)]
)
def test_export_gguf_reloads_in_transformers_with_the_merged_logits(tiny_cfg, gguf_type, atol):
    """export.format=gguf: the GGUF loads back with transformers (gguf_file=) and its logits
    match the merged safetensors model's (f16 to 1e-2; q8_0, 8-bit blocks, within `atol` and
    the same next-token choice almost everywhere)."""
    import torch

    from flexora_cli.stages import export

    cfg = tiny_cfg("select.layers=[2,5]", "export.format=gguf", f"export.gguf_type={gguf_type}")
    select.run(cfg)
    finetune.run(cfg)
    exported = export.run(cfg)
    model_dir = RunDir(cfg.out_dir).export_dir
    assert exported["gguf"] == str(model_dir / f"model-{gguf_type}.gguf")
    merged = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(
        str(model_dir), gguf_file=f"model-{gguf_type}.gguf", dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), gguf_file=f"model-{gguf_type}.gguf")
    text = "Question: which layer deserves LoRA? Answer: the one the data picks."
    ids = AutoTokenizer.from_pretrained(str(model_dir))(text, return_tensors="pt").input_ids
    assert tokenizer(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        want, got = merged(ids).logits, from_gguf(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
