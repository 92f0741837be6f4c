"""One training step, owned here: the answer loss, backward, clipping and the guarded update.

The search (both its LoRA and its α step), finetune and scripts/bench_train.py all run this code;
its input, the collated micro-batches, is data/collate.py's.

- **Loss on answer positions only.** The hidden states of the positions that predict an answer
  token are gathered and the LM head runs on those alone: no [tokens × vocab] tensor exists for
  context tokens. Packed rows get a block-diagonal causal mask built on the device.
- **Global batches.** Each micro-batch's summed loss is divided by the answer tokens of the whole
  step, and DDP averages, so 1 process and N take the same step.
- **No host sync inside a step.** Losses, gradient norms and finiteness flags stay on the device
  (StepGuard) and are read at log and checkpoint steps; batches arrive collated ahead of the step
  and are copied with non_blocking.
- **Guarded updates.** Gradients are clipped to `max_grad_norm`; a non-finite loss or gradient
  norm sets `found_inf` on the fused AdamW/Adam, whose kernel then skips the update on the
  device. With on_nonfinite=error every later update is skipped too, so the weights stay at the
  last good state until the next read, which replays the failing batch with finiteness hooks
  (nonfinite.locate_nonfinite) and stops the stage with one line naming step, phase and module.
- **One builder per step.** build_lora_step here and method.build_search_step assemble the two
  steps for the stages and every script alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import get_scheduler, set_seed

from flexora_cli.data.collate import Collated, Collator, make_collator
from flexora_cli.errors import TrainingError
from flexora_cli.fsdp import held_bytes, local_norm
from flexora_cli.modeling import accepts_logits_to_keep, causal_lm, logits_at, packs_rows

PHASES = ("LoRA step", "α step")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    set_seed(seed)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adamw_with_schedule(
    params: list[nn.Parameter],
    lr: float,
    weight_decay: float,
    scheduler: str,
    warmup_ratio: float,
    total_steps: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Fused AdamW (one kernel for all tensors; it also honours `found_inf`, see StepGuard) and
    a transformers schedule."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    schedule = get_scheduler(
        scheduler, optimizer, num_warmup_steps=int(warmup_ratio * total_steps), num_training_steps=total_steps
    )
    return optimizer, schedule


# -- the model a training stage wraps ----------------------------------------------------------


def block_causal_mask(
    sequence_ids: torch.Tensor, dtype: torch.dtype | None, window: int | None = None
) -> torch.Tensor:
    """[packs, 1, width, width] mask for packed rows: a token sees the earlier tokens of its own
    row (within `window` when the model has a sliding window): additive in `dtype`, or bool for
    dtype None. Every query row allows at least itself."""
    allowed = (sequence_ids[:, :, None] == sequence_ids[:, None, :]).tril()
    if window:
        allowed = allowed.triu(1 - window)
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


class AnswerLM(nn.Module):
    """The module a training stage hands accelerate (DDP/FSDP wrap it): the LoRA model, the
    search's gates (None in finetune), and forward = the summed cross-entropy of the answers."""

    def __init__(self, lm: nn.Module, gates: nn.Module | None = None):
        super().__init__()
        self.lm, self.gates = lm, gates
        causal = causal_lm(lm)
        self.packed = packs_rows(causal)
        config = causal.config
        implementation = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
        # An additive mask in the model's dtype, built once per forward: eager attention needs one,
        # and SDPA would otherwise convert a bool mask in every layer.
        self._mask_dtype = next(p.dtype for p in causal.parameters() if p.is_floating_point())
        self._builds_mask = "flash" not in implementation  # flash-attention reads packed position_ids
        self._window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        self._keeps_logits = accepts_logits_to_keep(causal)

    def forward(self, targets: torch.Tensor, **batch: torch.Tensor | int | None) -> torch.Tensor:
        """Summed cross-entropy of the answer tokens `targets` (MicroBatch.model_inputs)."""
        gated = self.gates.once_per_forward() if self.gates is not None else contextlib.nullcontext()
        with gated:
            logits = self.answer_logits(**batch)
        return F.cross_entropy(logits, targets, reduction="sum")

    def answer_logits(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        sequence_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        answer_rows: torch.Tensor,
        answer_cols: torch.Tensor,
        first_answer_col: int = 0,
    ) -> torch.Tensor:
        """Logits [K, vocab] (float32, or float64 for a float64 model) of the answer-predicting positions only."""
        causal = causal_lm(self.lm)
        if sequence_ids is not None:  # packed: the backbone, then the head on the gathered states
            mask = (
                block_causal_mask(sequence_ids, self._mask_dtype, self._window) if self._builds_mask else None
            )
            return _at_least_float32(
                logits_at(causal, input_ids, position_ids, mask, answer_rows, answer_cols)
            )
        # Right-padded fallback (model code we cannot reach inside): the model's own logits, from
        # the first answer-predicting column on where it takes logits_to_keep
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        first = first_answer_col if self._keeps_logits else 0
        if first:
            inputs["logits_to_keep"] = input_ids.shape[1] - first
        logits = self.lm(**inputs).logits
        return _at_least_float32(logits[answer_rows, answer_cols - first if first else answer_cols])


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """The loss in float32 for bf16/fp16 models; a float64 model (the exactness tests) stays so."""
    return logits if logits.dtype == torch.float64 else logits.float()


# -- the step ------------------------------------------------------------------------------------


class StepGuard:
    """On-device bookkeeping of a stage's updates: losses, gradient norms, non-finite steps.

    `record` launches a handful of device ops and reads nothing; `read()` reads the whole log
    window at once, at log and checkpoint steps. The window travels in checkpoints, so a
    resumed stage logs what an uninterrupted one would.
    """

    def __init__(self, device: torch.device, on_nonfinite: str = "error", scaled: bool = False):
        self.device = device
        self.on_nonfinite = on_nonfinite
        """error: stop at the next read, every update since skipped; skip: skip such steps, count them."""
        self.scaled = scaled
        """fp16 with a loss scaler: the scaler skips non-finite steps itself (counted here)."""
        self.halted = torch.zeros((), device=device)
        """1.0 once a step was non-finite under on_nonfinite=error: every later update is skipped."""
        self.skipped = 0
        self.window: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        """(step, phase, loss, gradient norm) of each update since the last log step."""

    @property
    def stops(self) -> bool:
        return self.on_nonfinite == "error" and not self.scaled

    def record(self, loss: torch.Tensor, norm: torch.Tensor, step: int, phase: int) -> torch.Tensor:
        """Book one phase's loss and gradient norm; returns the found_inf flag for its update."""
        loss, norm = loss.detach().float(), norm.detach().float()
        self.window.append((step, phase, loss, norm))
        # 0·x is 0 for a finite x and NaN for inf or NaN: 1.0 marks a non-finite loss or norm
        bad = ((loss + norm) * 0).nan_to_num(1.0)
        if self.stops:  # the weights stay at the last good state until the read
            self.halted = torch.maximum(self.halted, bad)
            return self.halted
        return bad

    def read(self, reset: bool = False) -> Readout:
        """The window's figures on the host: one device read. `reset` starts a new window."""
        steps = [(step, phase) for step, phase, _, _ in self.window]
        values = (
            torch.stack([t for _, _, loss, norm in self.window for t in (loss, norm)]).tolist()
            if steps
            else []
        )
        losses, norms = values[0::2], values[1::2]
        bad = [i for i, (loss, norm) in enumerate(zip(losses, norms)) if not math.isfinite(loss + norm)]
        self.skipped += len(bad)
        if reset or bad:
            self.window = []
        finite_losses: dict[int, list[float]] = {}
        for (_, phase), loss in zip(steps, losses):
            if math.isfinite(loss):
                finite_losses.setdefault(phase, []).append(loss)
        mean = {phase: statistics.fmean(values) for phase, values in sorted(finite_losses.items())}
        finite_norms = [n for n in norms if math.isfinite(n)]
        first = steps[bad[0]] + (math.isfinite(losses[bad[0]]),) if bad else None
        return Readout(
            losses=mean,
            grad_norm=(min(finite_norms), max(finite_norms)) if finite_norms else None,
            skipped=self.skipped,
            failed=first if self.stops else None,
        )

    def state_dict(self) -> dict:
        return {"halted": self.halted, "skipped": self.skipped, "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        self.halted, self.skipped = state["halted"].to(self.device), state["skipped"]
        self.window = [
            (s, p, loss.to(self.device), norm.to(self.device)) for s, p, loss, norm in state["window"]
        ]


@dataclass
class Readout:
    """What StepGuard.read() found."""

    losses: dict[int, float]
    """Mean loss per phase over the window's finite losses (a phase with none is absent)."""
    grad_norm: tuple[float, float] | None
    """(min, max) of the finite gradient norms of the window, before clipping."""
    skipped: int
    """Non-finite steps so far (skipped updates)."""
    failed: tuple[int, int, bool] | None
    """(step, phase, loss was finite) of the first non-finite step, when on_nonfinite=error."""


class TrainStep:
    """Forward/backward of global batches and guarded updates, for one stage's wrapped model."""

    def __init__(self, engine, model: nn.Module, stage: str, on_nonfinite: str = "error"):
        self.engine, self.model, self.stage = engine, model, stage
        self.guard = StepGuard(engine.device, on_nonfinite, scaled=engine.accelerator.scaler is not None)

    def forward_backward(self, batch: Collated, count_padding: bool = True) -> torch.Tensor:
        """Forward and backward over this process's micro-batches; returns the global mean loss per
        answer token (a device tensor). Gradients accumulate in .grad. `count_padding`: add the
        batch to the padding report (not for a pass that repeats a batch)."""
        scale = self.engine.num_processes / batch.total_tokens  # DDP averages over processes
        accelerator = self.engine.accelerator
        losses = []
        for index, micro in enumerate(batch.micro_batches):
            micro = micro.to(self.engine.device)
            last = index == len(batch.micro_batches) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(self.model):
                scaled = self.model(**micro.model_inputs()) * (scale * micro.weight)
                accelerator.backward(scaled)
            losses.append(scaled.detach())
        # Σ over micro-batches (and processes) of N·(summed loss)/tokens, ÷ N: the mean per token.
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        if self.engine.num_processes > 1:
            loss = accelerator.reduce(loss, reduction="sum") / self.engine.num_processes
        if count_padding:
            counted = [m for m in batch.micro_batches if m.weight]  # a weight-0 stand-in is not data
            self.engine.padding.add(
                sum(m.real_tokens for m in counted), sum(m.input_ids.numel() for m in counted)
            )
        return loss

    def update(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        loss: torch.Tensor,
        max_grad_norm: float,
        step: int,
        phase: int = 0,
    ) -> torch.Tensor:
        """Clip, then step `optimizer` unless the loss or the gradient norm is non-finite (decided
        on the device through the fused optimizer's found_inf); returns the norm before clipping."""
        clip_to = max_grad_norm if max_grad_norm > 0 else math.inf
        self.engine.average_replicated_gradients(params)
        norm = local_norm(self.engine.accelerator.clip_grad_norm_(params, clip_to))
        found_inf = self.guard.record(loss, norm, step, phase)
        if self.guard.scaled:  # fp16: accelerate's wrapper steps through the loss scaler
            optimizer.step()
            return norm
        # The optimizer itself (not accelerate's wrapper, which looks for optional packages on
        # every step and adds nothing without a scaler), told to skip on the device if non-finite.
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.found_inf = found_inf
        inner.step()
        del inner.found_inf
        return norm

    def check(self, replay, new_window: bool = True) -> Readout:
        """Read the guard (`new_window`: and start a new log window); on a non-finite step under
        on_nonfinite=error, replay its batch to find the first non-finite module and stop the
        stage. `replay(step, phase)` returns that description."""
        readout = self.guard.read(reset=new_window)
        if readout.failed is None:
            return readout
        bad_step, phase, loss_ok = readout.failed
        part = "backward" if loss_ok else "forward"
        where = replay(bad_step, phase)
        raise NonFiniteError(
            f"{self.stage}: non-finite {'gradient' if loss_ok else 'loss'} at step {bad_step} "
            f"({PHASES[phase]}, {part}); {where}; no update was applied from step {bad_step} on"
        )


class NonFiniteError(TrainingError):
    """A non-finite loss or gradient under on_nonfinite=error; the stage adds how to resume."""


# -- the finetune step, and the builder every caller uses --------------------------------------


@dataclass
class BuiltStep:
    """One training step as its builder assembled it: what a loop needs to run and checkpoint it
    (training.TrainingLoop in the stages; the timing loops of scripts/bench_train.py and
    scripts/gpu_check.py)."""

    one_step: Callable[[int, object], None]
    """`one_step(step, batch)`: forward, backward and the guarded update(s) of one global batch."""
    model: nn.Module
    """The wrapped model (DDP or FSDP under several processes) the step trains."""
    train_step: TrainStep
    collate: Collator
    trained: dict[str, nn.Parameter]
    """The parameters a checkpoint saves, by name."""
    stateful: dict[str, object]
    """The optimizers, schedules (and hypergradient state) a checkpoint saves beside them."""
    optimizers: list[torch.optim.Optimizer]
    """Every optimizer the step updates (for held_bytes)."""

    def held_bytes(self) -> dict:
        """What this process holds of the model and the optimizers (fsdp.HeldBytes as JSON)."""
        return dataclasses.asdict(held_bytes(self.model, self.optimizers))


class LoraStep:
    """One finetune step: forward/backward over a global batch, the guarded, clipped update, the
    schedule's step (method.SearchStep is the search's)."""

    def __init__(self, train_step: TrainStep, optimizer, schedule, params: list, max_grad_norm: float):
        self.train_step, self.optimizer, self.schedule = train_step, optimizer, schedule
        self.params, self.max_grad_norm = params, max_grad_norm

    def __call__(self, step: int, batch: Collated) -> None:
        loss = self.train_step.forward_backward(batch)
        self.train_step.update(self.optimizer, self.params, loss, self.max_grad_norm, step)
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_lora_step(engine, model: AnswerLM, settings, total_steps: int, pad_id: int) -> BuiltStep:
    """The finetune step over `model` (LoRA already attached) with settings.finetune's
    optimizer (AdamW), schedule, clipping and non-finite rule."""
    spec = settings.finetune
    model = engine.shard_and_compile(model, settings.model.layers_path, replicated=[])
    params = trainable_parameters(model)
    optimizer, schedule = adamw_with_schedule(
        params, spec.lr, spec.weight_decay, spec.scheduler, spec.warmup_ratio, total_steps
    )
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    collate = make_collator(settings, engine, model, pad_id, spec.grad_accum)
    model, optimizer = engine.prepare(model, optimizer)
    train_step = TrainStep(engine, model, "finetune", spec.on_nonfinite)
    one_step = LoraStep(train_step, optimizer, schedule, params, spec.max_grad_norm)
    stateful = {"optimizer": engine.checkpointable(model, optimizer), "scheduler": schedule}
    return BuiltStep(one_step, model, train_step, collate, trained, stateful, [optimizer])
