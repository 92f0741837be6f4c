"""The CUDA paths: bf16 and fp16 mixed precision, and QLoRA on the GPU. Marked `gpu` (opt-in:
`pytest -m gpu` or `make test-all` on a CUDA machine); the CPU runs of the same code are in the
default suite (test_engine, stages/test_pipeline)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexora_cli.checkpoint import Checkpoints
from flexora_cli.config import load
from flexora_cli.engine import Engine
from flexora_cli.rundir import RunDir
from flexora_cli.stages import run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_every_stage(tiny_cfg, precision):
    cfg = tiny_cfg("device=cuda", f"precision={precision}", "model.dtype=auto")
    results = run.run(cfg)
    assert results["search"].precision == precision
    assert all(math.isfinite(a) for a in results["search"].alpha)
    adapter = load_file(str(Path(cfg.out_dir) / "finetune" / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in adapter.values()} == {torch.float32}  # LoRA masters stay fp32
    assert 0 <= results["eval"].score("demo", "adapter").acc <= 1


def test_fp16_checkpoints_keep_the_loss_scaler(tiny_cfg):
    settings = load(tiny_cfg("device=cuda", "precision=fp16"))
    engine = Engine(settings)
    stateful = engine.scaler_state()
    assert set(stateful) == {"scaler"}
    checkpoints = Checkpoints(
        RunDir(settings.out_dir), "search", settings, {"w": torch.ones(2)}, stateful, engine
    )
    path = checkpoints.save(1, [])
    _, state = checkpoints.load(path)
    assert state["scaler"]["scale"] == stateful["scaler"].get_scale()


def test_qlora_runs_every_stage_on_cuda(tiny_cfg):
    cfg = tiny_cfg("device=cuda", "model.quantization=4bit")
    results = run.run(cfg)
    assert results["search"].precision == "bf16" and any(abs(a) > 1e-4 for a in results["search"].alpha)
    assert results["eval"].score("demo", "adapter").n == 40
