"""Mid-stage checkpoints: everything a training stage needs to continue exactly where it stopped.

A checkpoint is a folder `<stage>/checkpoints/step-NNNNNNN/` written atomically:
- `weights.safetensors`: the trainable tensors (LoRA matrices, and α̂ in the search), whole;
- or, under distributed=fsdp, `shards/`: the same tensors and the optimizer's state as DCP writes
  them, each process its own shards (fsdp.save_shards), resharded for any process count;
- `state.pt`: the other optimizer and scheduler states, the step, the loss history, every RNG
  state (python, numpy, torch, CUDA) and the settings the stage ran with; read with
  weights_only=True;
- `files.json`: the size and sha256 of every file, checked before any is trusted.
The data position follows from the step (batch orders are seeded per epoch), so it is not stored.
A damaged newest checkpoint is reported in one line and the previous kept one is used instead.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flexora_cli import fsdp
from flexora_cli.errors import ConfigError, DamagedArtifactError, FlexoraError
from flexora_cli.manifest import file_problems, fingerprint, settings_differences, stage_settings
from flexora_cli.rundir import RunDir
from flexora_cli.settings import Settings

if TYPE_CHECKING:
    from flexora_cli.engine import Engine


def rng_state() -> dict:
    """Every RNG's state, in types that torch.load(weights_only=True) accepts."""
    version, internal, python_gauss = random.getstate()
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": list(internal),
        "python_version": version,
        "python_gauss": python_gauss,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() captured."""
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


WEIGHTS = "weights.safetensors"
SHARDS = "shards"


class Checkpoints:
    """The checkpoints of one training stage, over the live objects they save and restore.

    `trained`: the parameters the stage trains (by name); `stateful`: optimizers, schedulers and
    the fp16 loss scaler. Every process loads a checkpoint; only the main one writes them. The
    step and global batch size fix the data position, so any process count can resume.
    """

    def __init__(
        self,
        run_dir: RunDir,
        stage: str,
        settings: Settings,
        trained: dict[str, torch.nn.Parameter],
        stateful: dict[str, Any],
        engine: Engine | None = None,
    ):
        self.run_dir, self.stage, self.settings = run_dir, stage, settings
        self.trained, self.stateful, self.engine = trained, stateful, engine
        self.dir = run_dir.checkpoints_dir(stage)
        self.sharded = engine is not None and engine.fsdp
        """Whether the tensors go through DCP as shards (distributed=fsdp) or whole into safetensors."""
        self.seconds_before, self._clock = 0.0, time.monotonic()

    def elapsed(self) -> float:
        """Training seconds of the stage so far, the runs before a resume included."""
        return self.seconds_before + time.monotonic() - self._clock

    def kept(self) -> list[Path]:
        """The checkpoints on disk, oldest first."""
        return sorted(self.dir.glob("step-*")) if self.dir.is_dir() else []

    def latest(self) -> Path | None:
        found = self.kept()
        return found[-1] if found else None

    def resume(self) -> tuple[int, list[dict]]:
        """Load the newest usable checkpoint into the live objects: (step, history); (0, []) when
        none. force=true discards existing checkpoints instead.
        """
        from flexora_cli import report

        if self.settings.force:
            self.clear()
        if self.engine is not None and self.engine.sharded_by_accelerate:
            report.warn(
                f"{self.stage}: no mid-stage checkpoints under accelerate's FSDP plugin (use "
                f"distributed=fsdp instead); an interrupted stage starts over"
            )
            return 0, []
        started, damaged = time.perf_counter(), []
        for path in reversed(self.kept()):
            try:
                tensors, state = self.load(path)
                break
            except DamagedArtifactError as exc:
                report.warn(f"{exc}; trying the checkpoint before it")
                damaged.append(path)
        else:
            if damaged:
                raise DamagedArtifactError(
                    f"{self.stage}: every kept checkpoint is damaged ({', '.join(p.name for p in damaged)} in "
                    f"{self.dir}); add force=true to start {self.stage} over"
                )
            return 0, []
        with torch.no_grad():  # in place: the optimizers keep their references
            for name, whole in tensors.items():
                self.trained[name].copy_(whole.to(self.trained[name].device, self.trained[name].dtype))
        for name, obj in self.stateful.items():
            if name in state:  # the others were loaded with the shards
                obj.load_state_dict(state[name])
        self.seconds_before, self._clock = state.get("seconds", 0.0), time.monotonic()
        report.console.print(
            f"{self.stage}: resuming from {path} (step {state['step']}, "
            f"loaded in {time.perf_counter() - started:.2f}s)"
        )
        return state["step"], state["history"]

    def stop_requested(self, stop: StopRequest) -> bool:
        """Whether a stop signal reached any process (all processes then stop after this step)."""
        requested = stop.signal is not None
        return self.engine.any_process(requested) if self.engine is not None else requested

    def due(self, step: int) -> bool:
        """Whether `step` writes a periodic checkpoint."""
        return step % self.settings.checkpoint_every == 0

    def after_step(self, step: int, history: list[dict], stop: StopRequest, requested: bool) -> None:
        """Save every `checkpoint_every` steps, or now when a stop was `requested` (then stop)."""
        if self.engine is not None and self.engine.sharded_by_accelerate:
            if requested:
                raise Interrupted(f"{self.stage}: stopped after step {step} (no checkpoint under FSDP)")
            return
        if not self.due(step) and not requested:
            return
        saved = self.save(step, history)
        if requested:
            stop.stop(self.stage, step, saved)

    def save(self, step: int, history: list[dict]) -> Path:
        """Write checkpoint `step` atomically, then keep only the newest `keep_checkpoints`."""
        path = self.dir / f"step-{step:07d}"
        if not self.sharded and not self.run_dir.writes:
            return path  # whole tensors: the main process writes everything alone
        sharded = self._sharded_objects()
        state = self._state(step, history, exclude=sharded) if self.run_dir.writes else None
        with self.run_dir.atomic_dir(path) as tmp:
            if self.sharded:  # every process writes its shards into the main process's folder
                fsdp.save_shards(self._live(sharded), fsdp.main_process_path(tmp) / SHARDS)
            if self.run_dir.writes:
                if not self.sharded:
                    whole = {k: v.detach().cpu().contiguous() for k, v in self.trained.items()}
                    save_file(whole, str(tmp / WEIGHTS))
                torch.save(state, tmp / "state.pt")
                files = fingerprint(sorted(f for f in tmp.rglob("*") if f.is_file()), tmp)
                (tmp / "files.json").write_text(json.dumps(files, indent=2))
        if self.run_dir.writes:
            for old in sorted(self.dir.glob("step-*"))[: -self.settings.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def _state(self, step: int, history: list[dict], exclude: dict[str, Any]) -> dict[str, Any]:
        """state.pt's contents: the stateful objects not in `exclude` (saved as shards), the
        step, history, training seconds, RNG states and the stage's settings."""
        return {
            **{n: o.state_dict() for n, o in self.stateful.items() if n not in exclude},
            "history": history,
            "step": step,
            "seconds": self.elapsed(),
            "rng": rng_state(),
            "settings": stage_settings(self.stage, self.settings),
        }

    def _sharded_objects(self) -> dict[str, Any]:
        """The stateful objects whose state is saved as shards (under distributed=fsdp)."""
        return {n: o for n, o in self.stateful.items() if isinstance(o, fsdp.ShardedOptimizerState)}

    def _live(self, sharded: dict[str, Any]) -> dict[str, Any]:
        """What DCP saves and loads in place: the trained tensors (detached views of the live
        parameters) and the sharded objects."""
        return {"trained": {k: v.detach() for k, v in self.trained.items()}, **sharded}

    def load(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and state of a checkpoint; refuses one made with other settings
        (ConfigError) and reports a damaged one (DamagedArtifactError)."""
        problems = _checkpoint_problems(path)
        if problems:
            raise DamagedArtifactError(
                f"{self.stage}: checkpoint {path} is damaged ({'; '.join(problems[:2])})"
            )
        state = torch.load(path / "state.pt", weights_only=True)
        differing = settings_differences(state["settings"], stage_settings(self.stage, self.settings))
        if differing:
            raise ConfigError(
                f"{path} was made with other settings ({'; '.join(differing[:6])}); rerun with the "
                f"same settings to resume, or add force=true to start {self.stage} over"
            )
        if self.sharded != (path / SHARDS).is_dir():
            held = (
                "whole tensors (distributed=auto or ddp)" if not (path / SHARDS).is_dir() else "FSDP shards"
            )
            raise ConfigError(
                f"{path} holds {held}, which distributed={self.settings.distributed} cannot resume; rerun "
                f"with the distributed= it was made with, or add force=true to start {self.stage} over"
            )
        if self.sharded:  # straight into the live shards; nothing whole is left to copy
            fsdp.load_shards(self._live(self._sharded_objects()), path / SHARDS)
            tensors = {}
        else:
            tensors = load_file(str(path / WEIGHTS))
            if missing := sorted(set(self.trained) - set(tensors)):
                raise DamagedArtifactError(f"{self.stage}: checkpoint {path} lacks {', '.join(missing[:3])}")
        set_rng_state(state["rng"])
        return tensors, state

    def clear(self) -> None:
        if self.run_dir.writes:
            shutil.rmtree(self.dir, ignore_errors=True)


def _checkpoint_problems(path: Path) -> list[str]:
    """Why a checkpoint folder cannot be trusted ([] when its files match files.json)."""
    try:
        files = json.loads((path / "files.json").read_text())
    except FileNotFoundError:
        return ["files.json is missing"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return ["files.json is unreadable"]
    return file_problems(files, path, "the checkpoint")


class Interrupted(FlexoraError):
    """The user stopped a stage (SIGINT/SIGTERM); a checkpoint was written first (exit 130)."""

    exit_code = 130


class StopRequest:
    """Turns SIGINT/SIGTERM into a request the training loop honours after its current step.

    A second signal stops at once (the last periodic checkpoint still holds).
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def stop(self, stage: str, step: int, checkpoint: Path) -> None:
        name = signal.Signals(self.signal).name if self.signal is not None else "a signal to another process"
        raise Interrupted(
            f"{stage}: stopped by {name} after step {step}; checkpoint {checkpoint} written; "
            f"rerun the same command to resume"
        )
