"""accelerate under every stage: the device, mixed precision, the processes, the trackers.

The same command runs as one process (`flexora search ...`) or as many
(`accelerate launch --num_processes 8 -m flexora_cli search ...`, or torchrun): DDP by default,
FSDP2 with distributed=fsdp (fsdp.py; docs/distributed.md). The training step itself (global batches dealt to processes and
micro-batches, the loss, the guarded update) is step.py's. The launch's size and the protocol by
which one process's failure becomes every process's one `error:` line (launch_error) are here too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flexora_cli import fsdp, report
from flexora_cli.errors import ConfigError, FlexoraError, TrainingError
from flexora_cli.modeling import compile_layers, emulates_bf16, get_layers, resolve_device, resolve_precision
from flexora_cli.rundir import RunDir
from flexora_cli.settings import Settings, flatten

_ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def resolve_tracker(tracker: str) -> str | None:
    """accelerate's tracker name for `tracker` (auto: tensorboard when installed), or None."""
    installed = {name: importlib.util.find_spec(name) is not None for name in ("tensorboard", "wandb")}
    if tracker == "auto":
        return "tensorboard" if installed["tensorboard"] else None
    if tracker != "none" and not installed[tracker]:
        raise ConfigError(
            f"tracker={tracker} needs the {tracker} package; pip install {tracker}, or tracker=none"
        )
    return None if tracker == "none" else tracker


def _hparams(settings: Settings) -> dict:
    """The settings as `a.b: value`, lists and None as text (what TensorBoard's hparams take)."""
    flat = flatten(dataclasses.asdict(settings))
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


@dataclass
class PaddingMeter:
    """Real and padded token slots of this process's micro-batches (padding waste = 1 − real/slots)."""

    real: int = 0
    slots: int = 0

    def add(self, real: int, slots: int) -> None:
        self.real += real
        self.slots += slots


class Engine:
    """accelerate's Accelerator plus what the stages ask of it: device, processes, steps."""

    def __init__(self, settings: Settings, scoring_precision: str | None = None):
        """`scoring_precision` (eval.precision): an engine that scores in that precision, which is
        the weights' dtype alone, as scoring autocasts nothing; accelerate's process-wide mixed
        precision is left as this process has it, so `flexora run` can train in bf16 and score
        in fp32 in one process."""
        from accelerate import Accelerator

        wanted = resolve_device(settings.device)
        self.precision = resolve_precision(scoring_precision or settings.precision, wanted)
        if emulates_bf16(wanted, self.precision):
            report.warn(
                "precision=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is emulated, "
                "many times slower than fp32; add precision=fp32 (or bf16_if_native)"
            )
        self.tracker = resolve_tracker(settings.tracker)
        try:
            self.accelerator = Accelerator(
                mixed_precision=None if scoring_precision else _ACCELERATE_PRECISION[self.precision],
                cpu=wanted.type == "cpu",
                log_with=self.tracker,
                project_dir=str(Path(settings.out_dir) / "logs"),
            )
        except (RuntimeError, ValueError) as exc:  # e.g. an FSDP launch on a machine without GPUs
            reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"accelerate cannot start with this launch: {reason}; check the `accelerate launch` "
                f"flags or config file (docs/distributed.md)"
            ) from exc
        self.fsdp = settings.distributed == "fsdp" and scoring_precision is None
        """Training under FSDP2, driven by fsdp.py (not accelerate's FSDP plugin); scoring keeps
        whole models."""
        self.compile = settings.compile
        """Compile the decoder layers: the training step's (shard_and_compile) and eval's."""
        self._check_distributed(settings.distributed, settings.model.quantization)
        if wanted.type == "cuda":  # process-wide, so activation recomputation in backward obeys it too
            torch.backends.cuda.enable_cudnn_sdp(settings.cudnn_attention)
        self.padding = PaddingMeter()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    def _check_distributed(self, distributed: str, quantization: str) -> None:
        """Refuse a launch that contradicts `distributed`, or that it cannot run (one line each)."""
        if self.sharded_by_accelerate and distributed != "auto":
            raise ConfigError(
                f"distributed={distributed} but the launch's accelerate config already asks for "
                f"accelerate's FSDP plugin; drop that config, or set distributed=auto"
            )
        if self.fsdp and quantization != "none":
            raise ConfigError(
                f"distributed=fsdp cannot shard model.quantization={quantization}: FSDP2 has no "
                f"support for bitsandbytes' packed weights; use distributed=ddp for QLoRA, or "
                f"model.quantization=none"
            )
        if self.fsdp and self.precision == "fp16":
            raise ConfigError("distributed=fsdp has no fp16 loss scaler; use precision=bf16 (or fp32)")
        if self.fsdp and self.compile:
            raise ConfigError(
                "compile=true with distributed=fsdp has not been checked (FSDP2's hooks inside the "
                "compiled layers); use one of them, or distributed=ddp with compile=true"
            )

    @property
    def sharded_by_accelerate(self) -> bool:
        """Under accelerate's FSDP plugin (an accelerate config), where mid-stage checkpoints are
        off; distributed=fsdp writes sharded ones (fsdp.py)."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    @property
    def shards_parameters(self) -> bool:
        """True under FSDP: a process holds a shard of each parameter, not the whole."""
        return self.fsdp or self.sharded_by_accelerate

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The wrapped model's whole state dict (gathered from the shards under FSDP; under
        distributed=fsdp the trainable parameters only, on every process)."""
        if self.fsdp:
            return fsdp.full_model_state(model)
        return self.accelerator.get_state_dict(model)

    def shard_and_compile(
        self, model: nn.Module, layers_path: str, replicated: list[nn.Parameter]
    ) -> nn.Module:
        """Under distributed=fsdp, shard `model` (an AnswerLM) in place, one unit per layer at
        `layers_path`, `replicated` kept whole (fsdp.shard); with compile=true, compile each of
        those layers (modeling.compile_layers). Before the optimizers are built: sharding
        replaces the parameters."""
        if self.compile:
            compile_layers(model.lm, layers_path)
        if not self.fsdp:
            return model
        return fsdp.shard(model, get_layers(model.lm, layers_path), self.device, replicated)

    def prepare(self, model: nn.Module, *optimizers: torch.optim.Optimizer):
        """DDP/FSDP-wrap the model and make the optimizers loss-scaling aware (fp16); under
        distributed=fsdp the model is already sharded (shard) and both come back as they are.

        Schedulers stay unprepared: steps here are global, so they advance once per step.
        """
        if self.fsdp:
            return (model, *optimizers)
        return self.accelerator.prepare(model, *optimizers)

    def checkpointable(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """What a checkpoint saves of `optimizer`: under distributed=fsdp its state as shards
        (fsdp.ShardedOptimizerState), else the optimizer itself."""
        return fsdp.ShardedOptimizerState(model, optimizer) if self.fsdp else optimizer

    def average_replicated_gradients(self, params: list[nn.Parameter]) -> None:
        """Under distributed=fsdp, average across processes the gradients FSDP does not (α̂);
        DDP has averaged every gradient already."""
        if self.fsdp:
            fsdp.average_replicated_gradients(params)

    def scaler_state(self) -> dict:
        """The fp16 loss scaler, for checkpoints ({} when there is none)."""
        return {"scaler": self.accelerator.scaler} if self.accelerator.scaler is not None else {}

    def padding_waste(self) -> float:
        """Share of token slots that were padding, over every process's micro-batches so far."""
        counts = torch.tensor([self.padding.real, self.padding.slots], device=self.device)
        if self.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        real, slots = counts.tolist()
        return 1.0 - real / slots if slots else 0.0

    def any_process(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any (e.g. a stop signal reached one)."""
        if self.num_processes == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    # -- experiment tracking (accelerate's trackers; the main process logs) ---------------------
    def start_tracking(self, stage: str, settings: Settings) -> None:
        """Open the tracker's run for `stage` (TensorBoard: out_dir/logs/<stage>/) with the settings."""
        if self.tracker:
            self.accelerator.init_trackers(stage, config=_hparams(settings))

    def log(self, values: dict[str, float], step: int) -> None:
        if self.tracker:
            self.accelerator.log(values, step=step)

    def end_tracking(self) -> None:
        # Not Accelerator.end_training(): that also ends the process group the next stage needs.
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)


# -- a multi-process launch: its size, and how one process's failure reaches the others --------
_STARTED = time.time()


def launch_size() -> int:
    """Processes in this launch, as the launcher (torchrun, `accelerate launch`) set WORLD_SIZE:
    known before accelerate starts, e.g. when the config fails to load. Engine.num_processes is
    accelerate's reading of the same launch."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_error(run_dir: RunDir, exc: BaseException) -> BaseException:
    """The error this process ends with. In a multi-process launch the first process to fail
    leaves its error in out_dir/.failed; the others (stopped by the launcher or by a broken
    collective) end with that same error, so every log names the cause. Elsewhere: `exc`."""
    if launch_size() == 1:
        return exc
    first = isinstance(exc, FlexoraError) and run_dir.launch_failure(_STARTED - 1) is None
    if first and run_dir.claim_launch_failure(str(exc), exc.exit_code):
        return exc
    shared = _wait_for_launch_failure(run_dir, wait=5.0)
    if shared is not None:
        error = TrainingError(shared["message"])
        error.exit_code = shared["exit_code"]
        return error
    if isinstance(exc, RuntimeError):  # a collective broken by a process that died without a word
        text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip())  # gloo's "[source:line]" prefix
        reason = text.splitlines()[0].split(". ")[0][:160] if text else type(exc).__name__
        return TrainingError(
            f"another process of this launch stopped without an error message ({reason}); see its log"
        )
    return exc


def _wait_for_launch_failure(run_dir: RunDir, wait: float) -> dict | None:
    """The launch's first error, waiting up to `wait` seconds for the failing process to write it."""
    deadline = time.monotonic() + wait
    while (failure := run_dir.launch_failure(_STARTED - 1)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return failure


def wait_for_other_processes() -> None:
    """A barrier across the launch (the next stage reads what the main process just wrote)."""
    if launch_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
