"""Checkpoints: RNG round trip, refusal on other settings, and kill/resume giving identical results."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flexora_cli.checkpoint import Checkpoints, rng_state, set_rng_state
from flexora_cli.config import load
from flexora_cli.errors import ConfigError
from flexora_cli.rundir import RunDir


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_checkpoint_from_other_settings_is_refused(tiny_cfg):
    settings = load(tiny_cfg())
    run_dir = RunDir(settings.out_dir)
    Checkpoints(run_dir, "search", settings, {"w": torch.ones(2)}, {}).save(3, [])
    other = load(tiny_cfg("lora=r8", "search.lr=0.5"))
    checkpoints = Checkpoints(run_dir, "search", other, {"w": torch.ones(2)}, {})
    with pytest.raises(
        ConfigError, match=r"lora\.r: 4 then, 8 now.*search\.lr: 0\.001 then, 0\.5 now.*force=true"
    ):
        checkpoints.load(checkpoints.latest())


def test_keeps_only_the_newest_checkpoints(tiny_cfg):
    settings = load(tiny_cfg("keep_checkpoints=2"))
    weight = torch.zeros(2)
    checkpoints = Checkpoints(RunDir(settings.out_dir), "finetune", settings, {"w": weight}, {})
    for step in (1, 2, 3):
        weight.fill_(float(step))
        checkpoints.save(step, [])
    assert [p.name for p in sorted(checkpoints.dir.iterdir())] == ["step-0000002", "step-0000003"]
    tensors, state = checkpoints.load(checkpoints.latest())
    assert state["step"] == 3 and tensors["w"].tolist() == [3.0, 3.0]


def test_elapsed_seconds_carry_over_a_resume(tiny_cfg, monkeypatch):
    settings = load(tiny_cfg())
    run_dir = RunDir(settings.out_dir)
    first = Checkpoints(run_dir, "search", settings, {"w": torch.ones(2)}, {})
    first.seconds_before = 100.0  # as if 100 s had been trained before this checkpoint
    first.save(3, [])
    second = Checkpoints(run_dir, "search", settings, {"w": torch.zeros(2)}, {})
    assert second.resume() == (3, [])
    clock = second._clock
    monkeypatch.setattr(time, "monotonic", lambda: clock + 2.5)  # 2.5 s of this run, then read
    assert second.elapsed() == pytest.approx(102.5)
    assert second.trained["w"].tolist() == [1.0, 1.0]


def _flexora(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flexora_cli.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(pattern: str, root: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not list(root.glob(pattern)):
        assert process.poll() is None, (
            f"finished before {pattern} appeared: {process.communicate()[1][-2000:]}"
        )
        assert time.time() < deadline, f"no {pattern} after {timeout}s"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", ["false", "true"], ids=["eager", "compiled"])
def test_kill_and_resume_is_bit_identical(demo_dir, tmp_path, compiled):
    """kill -9 mid-search, SIGTERM mid-finetune, resumed each time: α̂ and the adapter as an
    uninterrupted run's, bit for bit; with compile=true too (a resumed process compiles afresh,
    and dynamic shapes pick its graphs by shape alone, not by what ran before)."""
    args = [
        f"compile={compiled}",
        "recipe=demo",
        f"demo_assets={demo_dir}",
        "search.budget=480",
        "search.val_samples=64",
        "finetune.epochs=0.4",
        "eval.limit=16",
        "checkpoint_every=3",
        "keep_checkpoints=1",
    ]
    reference = _flexora("run", *args, f"out_dir={tmp_path / 'reference'}")
    assert reference.wait() == 0, reference.communicate()[1][-2000:]

    out = tmp_path / "interrupted"
    run = [*args, f"out_dir={out}"]
    first = _flexora("run", *run)  # kill -9 in the middle of the search
    _wait_for("search/checkpoints/step-*", out, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (out / "search" / "alpha.json").exists()

    second = _flexora("run", *run)  # resumes the search; SIGTERM in the middle of finetune
    _wait_for("finetune/checkpoints/step-*", out, second)
    second.send_signal(signal.SIGTERM)
    _, err = second.communicate()
    assert second.returncode == 130, err[-2000:]
    assert "resuming from" in err and "stale lock" in err
    assert "stopped by SIGTERM after step" in " ".join(err.split())
    assert not (out / "finetune" / "adapter").exists()
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    assert manifest["search"]["status"] == "complete" and manifest["finetune"]["status"] == "interrupted"

    third = _flexora("run", *run)
    _, err = third.communicate()
    assert third.returncode == 0, err[-2000:]
    assert "search already complete" in " ".join(err.split()) and "resuming from" in err

    ours, theirs = (
        json.loads((d / "search" / "alpha.json").read_text()) for d in (out, tmp_path / "reference")
    )
    assert ours["alpha"] == theirs["alpha"] and ours["ranking"] == theirs["ranking"]
    assert ours["history"] == theirs["history"]
    adapter, expected = (
        load_file(str(d / "finetune" / "adapter" / "adapter_model.safetensors"))
        for d in (out, tmp_path / "reference")
    )
    assert adapter.keys() == expected.keys()
    assert all(torch.equal(adapter[k], expected[k]) for k in adapter)
    assert not (out / "search" / "checkpoints").exists() and not (out / ".lock").exists()
    assert os.listdir(out / "finetune" / "adapter")
