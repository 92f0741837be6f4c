"""The loop both training stages share (search and finetune): resume → steps → finish.

A stage builds its data, model and optimizers, then hands them to TrainingLoop, which owns the
checkpoints, the progress bar, stop signals, the trackers, and the reads of the step's on-device
figures (StepGuard) at log and checkpoint steps. Only there does the host wait for the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from flexora_cli import report
from flexora_cli.checkpoint import Checkpoints, StopRequest
from flexora_cli.engine import Engine
from flexora_cli.errors import inject_fault
from flexora_cli.manifest import Manifest
from flexora_cli.nonfinite import locate_nonfinite
from flexora_cli.rundir import RunDir
from flexora_cli.settings import Settings
from flexora_cli.step import NonFiniteError, Readout, TrainStep


class TrainingLoop:
    """Checkpointed, resumable steps of one training stage over a wrapped model."""

    def __init__(
        self,
        stage: str,
        settings: Settings,
        run_dir: RunDir,
        engine: Engine,
        train_step: TrainStep,
        trained: dict[str, nn.Parameter],
        stateful: dict[str, Any],
    ):
        self.stage, self.settings, self.run_dir = stage, settings, run_dir
        self.engine, self.model, self.train_step = engine, train_step.model, train_step
        # The guard's log window and skip count travel in checkpoints: a resumed stage logs alike.
        stateful = stateful | engine.scaler_state() | {"guard": self.train_step.guard}
        self.checkpoints = Checkpoints(run_dir, stage, settings, trained, stateful, engine)
        self.step, self.history = self.checkpoints.resume()
        self.skipped = 0
        """Non-finite steps skipped so far (on_nonfinite=skip, or fp16's scaler), as of the last read."""
        self.manifest = Manifest(run_dir)
        self.manifest.begin(stage, settings)
        engine.start_tracking(stage, settings)

    def run(
        self,
        batches: Iterator[Any],
        total_steps: int,
        one_step: Callable[[int, Any], None],
        on_log: Callable[[int, Readout], str],
        log_every: int,
        phase_batch: Callable[[Any, int], Any] = lambda batch, _phase: batch,
    ) -> None:
        """Run `one_step(step, batch)` for each batch until `total_steps`.

        Every `log_every` steps, at checkpoints and at the end, the step's figures are read;
        `on_log(step, readout)` records them and returns the progress bar's text. A non-finite
        step under on_nonfinite=error is replayed (`phase_batch(batch, phase)` picks what the
        failing phase ran on) and stops the stage with where it happened and how to resume.
        """
        recent: dict[int, Any] = {}  # the batches since the last read, for the replay
        anomaly = torch.autograd.detect_anomaly() if self.settings.debug else contextlib.nullcontext()
        info = ""
        with report.progress(self.stage, total_steps) as bar, StopRequest() as stop, anomaly:
            bar.update(0, completed=self.step)
            for batch in batches:
                if self.step >= total_steps:
                    break
                self.step += 1
                recent[self.step] = batch
                one_step(self.step, batch)
                inject_fault(self.stage, self.step, self.engine.process_index)
                requested = self.checkpoints.stop_requested(stop)
                logging = self.step % log_every == 0 or self.step == total_steps
                if logging or requested or self.checkpoints.due(self.step):
                    readout = self._read(lambda step, phase: phase_batch(recent[step], phase), logging)
                    recent.clear()
                    if logging:
                        info = on_log(self.step, readout)
                bar.update(0, advance=1, info=info)
                self.checkpoints.after_step(self.step, self.history, stop, requested)

    def _read(self, batch_of: Callable[[int, int], Any], new_window: bool) -> Readout:
        def replay(step: int, phase: int) -> str:
            return locate_nonfinite(self.engine, self.model, batch_of(step, phase))

        try:
            readout = self.train_step.check(replay, new_window)
            self.skipped = readout.skipped
            return readout
        except NonFiniteError as exc:
            latest = self.checkpoints.latest()
            resume = (
                f"the last good checkpoint is {latest}: rerun the same command to resume from it"
                if latest
                else "no checkpoint was written before it: a rerun starts the stage over"
            )
            raise NonFiniteError(
                f"{exc}; {resume} once the cause is fixed (lower {self.stage}.lr, check the data, or "
                f"add {self.stage}.on_nonfinite=skip to skip such steps)"
            ) from None

    def record(self, step: int, readout: Readout, **values: float | list) -> None:
        """Append to the history: the step, `values`, and the window's gradient-norm range."""
        norms = {"grad_norm": list(readout.grad_norm)} if readout.grad_norm else {}
        self.history.append({"step": step, **values, **norms})

    def seconds(self) -> float:
        """Training seconds of the stage, the runs before a resume included."""
        return self.checkpoints.elapsed()

    def finish(self, outputs: list, inputs: tuple[str, ...] = (), logs: tuple = ()) -> None:
        """Once the stage's `outputs` (and `logs`) are written: mark it complete with their
        fingerprint (Manifest.complete), then drop its checkpoints (not before, so a kill in
        between resumes) and close the tracker."""
        self.manifest.complete(self.stage, self.settings, outputs, inputs, logs=logs, steps=self.step)
        self.checkpoints.clear()
        self.engine.end_tracking()
