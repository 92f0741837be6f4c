"""engine.py: the launch-failure protocol (one process's error becomes every process's line), a
scoring engine's own precision, and the emulated-bf16 warning's test."""

from __future__ import annotations

import torch

from flexora_cli import engine, modeling
from flexora_cli.engine import Engine, launch_error
from flexora_cli.errors import ConfigError, TrainingError
from flexora_cli.rundir import LAUNCH_FAILURE, RunDir


def test_one_process_ends_with_its_own_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    error = ConfigError("bad")
    assert launch_error(RunDir(tmp_path), error) is error
    assert not (tmp_path / LAUNCH_FAILURE).exists()


def test_the_first_failure_of_a_launch_is_every_process_s_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    tmp_path.mkdir(exist_ok=True)
    first = ConfigError("search: the first process failed here")
    assert launch_error(RunDir(tmp_path), first) is first  # it claims .failed
    # A peer stopped by the launcher or a broken collective ends with that same line and exit code.
    peer = launch_error(RunDir(tmp_path), RuntimeError("[gloo.cc:12] Connection closed by peer"))
    assert isinstance(peer, TrainingError)
    assert str(peer) == str(first) and peer.exit_code == first.exit_code == 2
    # A later failure of its own does not replace the first one.
    later = launch_error(RunDir(tmp_path), TrainingError("a second failure"))
    assert str(later) == str(first)


def test_a_peer_that_died_without_a_word_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(engine, "_wait_for_launch_failure", lambda run_dir, wait: None)  # none will come
    error = launch_error(RunDir(tmp_path), RuntimeError("[gloo.cc:12] Connection closed by peer. more"))
    assert str(error) == (
        "another process of this launch stopped without an error message (Connection closed by peer); "
        "see its log"
    )


def test_a_scoring_engine_scores_in_its_own_precision_in_a_bf16_process(tiny_cfg):
    from flexora_cli.config import load

    settings = load(tiny_cfg("precision=bf16"))
    training = Engine(settings)
    scoring = Engine(settings, scoring_precision="fp32")  # accelerate's state stays bf16: no error
    assert (training.precision, scoring.precision) == ("bf16", "fp32")
    assert scoring.accelerator.mixed_precision == "bf16"


def test_bf16_is_emulated_only_on_a_cpu_without_native_bf16(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert modeling.emulates_bf16(cpu, "bf16")
    assert not modeling.emulates_bf16(cpu, "fp32") and not modeling.emulates_bf16(cuda, "bf16")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert not modeling.emulates_bf16(cpu, "bf16")


def test_bf16_if_native_trains_in_bf16_only_where_the_device_computes_it(monkeypatch):
    """The real-data recipes' precision: bf16 with AVX512-BF16 or AMX, fp32 where bf16 is emulated."""
    cpu = torch.device("cpu")
    for native, resolved in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert modeling.resolve_precision("bf16_if_native", cpu) == resolved
        assert modeling.native_bf16(cpu) is native
