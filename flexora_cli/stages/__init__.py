"""One module per stage, each with a plain `run(cfg)`; `setup` is what they all start with."""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from flexora_cli import demo, report
from flexora_cli.config import load
from flexora_cli.errors import FlexoraError, TrainingError
from flexora_cli.manifest import Manifest
from flexora_cli.rundir import LAUNCH_FAILURE, RunDir, is_main_process
from flexora_cli.settings import Settings


def setup(cfg: DictConfig | Settings) -> tuple[Settings, RunDir]:
    """Typed, validated settings and the run directory; builds the demo assets when asked."""
    settings = load(cfg)
    report.configure(settings.quiet, main_process=is_main_process(), json_on_stdout=settings.print_json)
    if settings.demo_assets and settings.demo_task == "smollm2":
        from flexora_cli import smollm2_demo

        smollm2_demo.ensure_assets(settings.demo_assets, settings.model)
    elif settings.demo_assets:
        demo.ensure_assets(settings.demo_assets)
    return settings, RunDir(settings.out_dir, plots=settings.plots)


def planted_layers(settings: Settings) -> list[int] | None:
    """The demo's known right answer (None for real models)."""
    return demo.planted_layers(settings.demo_assets) if settings.demo_assets else None


def locked(stage_run: Callable[[DictConfig | Settings], dict]) -> Callable[[DictConfig | Settings], dict]:
    """Run a stage holding its run directory's lock (RunDir.lock); a failure is noted in the
    manifest, and in a multi-process launch every process ends with the failing one's error."""

    @functools.wraps(stage_run)
    def run(cfg: DictConfig | Settings) -> dict:
        settings = load(cfg)  # composed and validated once; the stage's setup() gets it as is
        run_dir = RunDir(settings.out_dir)
        with run_dir.lock():
            try:
                result = stage_run(settings)
            except (FlexoraError, KeyboardInterrupt, RuntimeError) as exc:
                error = _launch_error(run_dir, exc)
                Manifest(run_dir).mark_failed(error)
                if error is exc:
                    raise
                raise error from None
        _wait_for_other_processes()  # the next stage reads what the main process just wrote
        return result

    return run


_STARTED = time.time()


def _launch_error(run_dir: RunDir, exc: BaseException) -> BaseException:
    """The error this process ends with. In a multi-process launch, the first process to fail
    leaves its error in out_dir/.failed; the others (stopped by the launcher or by a broken
    collective) end with that same error, so every log names the cause. Elsewhere: `exc`."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return exc
    path = run_dir.root / LAUNCH_FAILURE
    if isinstance(exc, FlexoraError) and not _shared_failure(path, wait=0):
        try:  # O_EXCL: the first failure wins
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as handle:
                json.dump({"message": str(exc), "exit_code": exc.exit_code, "time": time.time()}, handle)
            return exc
        except OSError:
            pass
    shared = _shared_failure(path, wait=5.0)
    if shared is not None:
        error = TrainingError(shared["message"])
        error.exit_code = shared["exit_code"]
        return error
    if isinstance(exc, RuntimeError):  # a collective broken by a process that died without a word
        text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip())  # gloo's "[source:line]" prefix
        first = text.splitlines()[0].split(". ")[0][:160] if text else type(exc).__name__
        return TrainingError(
            f"another process of this launch stopped without an error message ({first}); see its log"
        )
    return exc


def _shared_failure(path: Path, wait: float) -> dict | None:
    """The launch's first error (out_dir/.failed, written since this process started), waiting up
    to `wait` seconds for it to appear."""
    deadline = time.monotonic() + wait
    while True:
        try:
            failure = json.loads(path.read_text())
            if failure["time"] >= _STARTED - 1:
                return failure
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def _wait_for_other_processes() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
