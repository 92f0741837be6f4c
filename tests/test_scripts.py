"""The GPU check and the training benchmark run end to end on a CPU (a dry run of the code paths
a GPU machine runs), and report what their targets count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def script(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    script("scripts/gpu_check.py", "--out", str(tmp_path), "--device", "cpu", "--tiny", "--parts",
           "scale,bench,eval", "--search-steps", "12", "--finetune-steps", "12", "--eval-limit", "10")  # fmt: skip
    report = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "report.md").read_text().startswith("# gpu_check")
    for stage in ("search", "finetune"):
        result = report["scale"][stage]
        assert result["all_finite"] and result["steps_run"] == 12 and result["skipped"] == 0, result
        assert result["tripwire"]["attention_calls"] > 0 and not result["tripwire"]["violations"]
        assert result["host_syncs"] == [{}, {}, {}]
        assert 0 < result["grad_norm"][0] <= result["grad_norm"][1]
    for run in ("batch8", "batch32"):
        results = report["bench"][run]["results"]
        assert results["lora_all"]["syncs"] == 0 and results["trainer"]["tokens_per_s"] > 0
        assert results["lora_all+compile"]["syncs"] == 0  # compile=true runs, and adds no host sync
        assert "missing" in results["trainer+liger"] or results["trainer+liger"]["tokens_per_s"] > 0
    assert report["bench"]["batch8"]["results"]["search"]["syncs"] == 0
    for task in ("hellaswag", "piqa", "winogrande"):  # flexora at its defaults vs lm-eval at batch 1
        scored = report["eval"][task]
        assert scored["n"] == 10 and scored["differing_predictions"] == 0, (task, scored)
        assert scored["flop_ratio"] > 1 and scored["lm_eval_seconds"] > 0


@pytest.mark.slow
def test_gpu_check_dry_run_under_fsdp(tmp_path):
    """The scale part sharded by FSDP2 (one process over gloo): every step finite."""
    script("scripts/gpu_check.py", "--out", str(tmp_path), "--device", "cpu", "--tiny", "--parts", "scale",
           "--search-steps", "12", "--finetune-steps", "12", "--distributed", "fsdp")  # fmt: skip
    scale = json.loads((tmp_path / "report.json").read_text())["scale"]
    assert "error" not in scale, scale.get("error")
    for stage in ("search", "finetune"):
        assert scale[stage]["all_finite"] and scale[stage]["steps_run"] == 12, scale[stage]


@pytest.mark.slow
def test_gpu_check_reports_a_nonfinite_step_as_a_result(tmp_path):
    """A NaN from step 5 on: the loop's guard read at step 10 names step 5 and the first non-finite
    module, and the part records it as a result, not as a broken part."""
    script("scripts/gpu_check.py", "--out", str(tmp_path), "--device", "cpu", "--tiny", "--parts", "scale",
           "--search-steps", "12", "--finetune-steps", "12", "--nonfinite-at", "5")  # fmt: skip
    scale = json.loads((tmp_path / "report.json").read_text())["scale"]
    assert "error" not in scale, scale.get("error")
    for stage in ("search", "finetune"):
        result = scale[stage]
        assert not result["all_finite"] and result["steps_run"] == 10, result
        assert f"{stage}: non-finite loss at step 5 (LoRA step, forward)" in result["nonfinite"], result
        assert "layers.0" in result["nonfinite"]


def test_no_context_logits_at_8b_dimensions():
    """Traced on meta tensors: our step's only [.., vocab] tensor holds the answer tokens."""
    done = script(
        "scripts/bench_train.py", "--trace-8b", "--batch-size", "8", "--min-len", "256", "--max-len", "1024"
    )
    ours, plain = (line for line in done.stdout.splitlines() if line.startswith("| "))
    assert "[(8, 128256)]" in ours  # 8 one-token answers
    assert "(8, 1024, 128256)" in plain or "1024, 128256)" in plain
