"""One training step, owned here: collation, the answer loss, backward, clipping and the guarded update.

The search (both its LoRA and its α step), finetune and scripts/bench_train.py all run this code.

- **Padding-free packing.** A micro-batch's rows are concatenated into packs no wider than its
  longest row (rounded up to `pad_to_multiple_of`; or `pack_tokens` when larger); position ids
  restart at 0 for each row and a block-diagonal causal mask (built on the device from per-token
  sequence ids) keeps rows apart. The unused tail of a pack is a sequence of its own, so no
  attention query row is ever fully masked: such rows are where CUDA's SDPA kernels return NaN
  for left-padded batches. Families whose code cannot take
  packed rows (remote code, e.g. ChatGLM3) get right-padded rows instead, which have no fully
  masked rows under a causal mask either (modeling.packs_rows decides).
- **Loss on answer positions only.** The hidden states of the positions that predict an answer
  token are gathered and the LM head runs on those alone: no [tokens × vocab] tensor exists for
  context tokens.
- **Global batches.** A step's rows are sorted by length and dealt to num_processes × grad_accum
  micro-batches; each micro-batch's summed loss is divided by the answer tokens of the whole
  step, and DDP averages, so 1 process and N take the same step.
- **No host sync inside a step.** Losses, gradient norms and finiteness flags stay on the device
  (StepGuard) and are read at log and checkpoint steps; batches are collated on the host ahead
  of the step and copied with non_blocking.
- **Guarded updates.** Gradients are clipped to `max_grad_norm`; a non-finite loss or gradient
  norm sets `found_inf` on the fused AdamW/Adam, whose kernel then skips the update on the
  device. With on_nonfinite=error every later update is skipped too, so the weights stay at the
  last good state until the next read, which replays the failing batch with finiteness hooks
  (locate_nonfinite) and stops the stage with one line naming step, phase and module.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace

import torch
from torch import nn
from torch.nn import functional as F
from transformers import get_scheduler, set_seed

from flexora_cli.errors import TrainingError
from flexora_cli.modeling import accepts_logits_to_keep, causal_lm, packs_rows

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


# -- collation -------------------------------------------------------------------------------


def answer_positions(row: dict) -> list[int]:
    """Positions whose logits predict an answer token (the logit at p predicts token p + 1)."""
    labels = row["labels"]
    return [p - 1 for p in range(1, len(labels)) if labels[p] != -100]


def label_tokens(row: dict) -> int:
    """Answer tokens of one training row (the positions the loss is taken on)."""
    return sum(1 for label in row["labels"] if label != -100)


@dataclass
class MicroBatch:
    """One forward pass's tokens, collated on the host (pinned on CUDA) ahead of the step."""

    input_ids: torch.Tensor
    """[packs or rows, width] token ids."""
    position_ids: torch.Tensor
    """[packs or rows, width], restarting at 0 for each packed row."""
    sequence_ids: torch.Tensor | None
    """Packed: [packs, width] which row of the pack each token belongs to (None when padded)."""
    attention_mask: torch.Tensor | None
    """Right-padded: [rows, width] 1 on real tokens (None when packed)."""
    answer_rows: torch.Tensor
    """[K] the pack/row of each answer-predicting position."""
    answer_cols: torch.Tensor
    """[K] its column."""
    targets: torch.Tensor
    """[K] the answer token each of those positions predicts."""
    weight: float = 1.0
    """0 for the stand-in row of a process whose share of the step is empty."""
    real_tokens: int = 0
    """Tokens of real rows (the rest of input_ids is padding), for the padding-waste report."""
    first_answer_col: int = 0
    """Right-padded: the lowest answer-predicting column (logits are computed from there on)."""

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    def pin_memory(self) -> MicroBatch:
        return replace(self, **{k: v.pin_memory() for k, v in self._tensors().items()})

    def to(self, device: torch.device) -> MicroBatch:
        return replace(self, **{k: v.to(device, non_blocking=True) for k, v in self._tensors().items()})

    def model_inputs(self) -> dict[str, torch.Tensor | int | None]:
        """The keyword arguments of AnswerLM.forward."""
        return {name: getattr(self, name) for name in _MODEL_INPUTS}


_MODEL_INPUTS = (
    "input_ids", "position_ids", "sequence_ids", "attention_mask",
    "answer_rows", "answer_cols", "targets", "first_answer_col",
)  # fmt: skip


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pack_rows(rows: list[dict], pad_id: int, pack_tokens: int, multiple: int) -> MicroBatch:
    """Concatenate `rows` into as few packs as first-fit decreasing finds, each of at most
    max(pack_tokens, the longest row rounded up to `multiple`) tokens. With pack_tokens 0 a pack
    is as wide as padding would make the longest row, so packing never costs more attention than
    padding (which grows with the square of the width) and saves the rows it fills. The tail of
    each pack is padding that forms a sequence of its own (it attends to itself, never to a row,
    and is never scored)."""
    capacity = max(pack_tokens, _round_up(max(len(row["input_ids"]) for row in rows), multiple))
    packs: list[list[dict]] = []
    loads: list[int] = []
    for row in sorted(rows, key=lambda r: -len(r["input_ids"])):
        n = len(row["input_ids"])
        slot = next((i for i, load in enumerate(loads) if load + n <= capacity), None)
        if slot is None:
            packs.append([]), loads.append(0)
            slot = len(packs) - 1
        packs[slot].append(row)
        loads[slot] += n
    width = _round_up(max(loads), multiple)
    # Built as Python lists and converted once: per-row tensor writes cost more than the rows.
    tokens, positions, sequences = [], [], []
    answer_rows, answer_cols, targets = [], [], []
    for p, pack in enumerate(packs):
        offset = 0
        for sequence, row in enumerate(pack):
            n = len(row["input_ids"])
            tokens += row["input_ids"]
            positions += range(n)
            sequences += [sequence] * n
            answers = answer_positions(row)
            answer_rows += [p] * len(answers)
            answer_cols += [offset + k for k in answers]
            targets += [row["labels"][k + 1] for k in answers]
            offset += n
        tokens += [pad_id] * (width - offset)
        positions += range(width - offset)
        sequences += [len(pack)] * (width - offset)
    shape = (len(packs), width)
    return MicroBatch(
        torch.tensor(tokens).view(shape), torch.tensor(positions).view(shape),
        torch.tensor(sequences).view(shape), None,
        torch.tensor(answer_rows), torch.tensor(answer_cols), torch.tensor(targets),
        real_tokens=sum(loads),
    )  # fmt: skip


def pad_rows(rows: list[dict], pad_id: int, multiple: int) -> MicroBatch:
    """Right-padded rows (the fallback for models that cannot take packed rows): under a causal
    mask a padding query still sees its row's real tokens, so no query row is fully masked."""
    width = _round_up(max(len(row["input_ids"]) for row in rows), multiple)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    answer_rows, answer_cols, targets = [], [], []
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        attention_mask[i, :n] = 1
        positions = answer_positions(row)
        answer_rows += [i] * len(positions)
        answer_cols += positions
        targets += [row["labels"][k + 1] for k in positions]
    return MicroBatch(
        input_ids, torch.arange(width).repeat(len(rows), 1), None, attention_mask,
        torch.tensor(answer_rows), torch.tensor(answer_cols), torch.tensor(targets),
        real_tokens=int(attention_mask.sum()), first_answer_col=min(answer_cols),
    )  # fmt: skip


@dataclass
class Collated:
    """This process's micro-batches of one global batch, and the step's answer-token count."""

    micro_batches: list[MicroBatch]
    total_tokens: int
    """Answer tokens of the whole global batch (all processes): the loss's denominator."""
    rows: int
    """Rows of the global batch."""
    tokens: int
    """Tokens of the global batch's rows (for tokens/s)."""

    def pin_memory(self) -> Collated:
        return replace(self, micro_batches=[m.pin_memory() for m in self.micro_batches])


@dataclass
class Collator:
    """Deals a global batch's rows to this process's micro-batches and collates them."""

    pad_id: int
    packed: bool
    """Pack rows (pack_rows) or right-pad them (pad_rows)."""
    pack_tokens: int = 0
    multiple: int = 64
    num_processes: int = 1
    process_index: int = 0
    grad_accum: int = 1

    def __call__(self, rows: list[dict]) -> Collated:
        """Rows sorted by length are dealt in contiguous runs (little padding). A micro-batch left
        empty (fewer rows than micro-batches) runs one row at weight 0, because every process must
        take part in every backward."""
        ordered = sorted(rows, key=lambda row: len(row["input_ids"]))
        parts = self.num_processes * self.grad_accum
        bounds = [len(ordered) * i // parts for i in range(parts + 1)]
        micro_batches = []
        for i in range(self.process_index * self.grad_accum, (self.process_index + 1) * self.grad_accum):
            share, weight = (
                (ordered[bounds[i] : bounds[i + 1]], 1.0) if bounds[i + 1] > bounds[i] else (ordered[:1], 0.0)
            )
            batch = (
                pack_rows(share, self.pad_id, self.pack_tokens, self.multiple)
                if self.packed
                else pad_rows(share, self.pad_id, self.multiple)
            )
            micro_batches.append(replace(batch, weight=weight))
        return Collated(
            micro_batches,
            total_tokens=sum(label_tokens(row) for row in rows),
            rows=len(rows),
            tokens=sum(len(row["input_ids"]) for row in rows),
        )


def prefetched(batches: Iterator[list[dict]], collate: Collator, pin: bool) -> Iterator[Collated]:
    """Collate global batches ahead of the step through a DataLoader (pinned memory on CUDA), in
    the order `batches` yields them (seeded and resumable, data/batches.Batches)."""
    loader = torch.utils.data.DataLoader(
        _IterableBatches(batches), batch_size=None, collate_fn=collate, pin_memory=pin, num_workers=0
    )
    yield from loader


class _IterableBatches(torch.utils.data.IterableDataset):
    def __init__(self, batches: Iterator[list[dict]]):
        self.batches = batches

    def __iter__(self) -> Iterator[list[dict]]:
        return iter(self.batches)


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
            hidden = causal.get_decoder()(
                input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False
            ).last_hidden_state
            return _at_least_float32(causal.get_output_embeddings()(hidden[answer_rows, answer_cols]))
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
        norm = self.engine.accelerator.clip_grad_norm_(params, clip_to)
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


# -- finding where a non-finite value first appears -------------------------------------------


def locate_nonfinite(engine, model: nn.Module, batch: Collated) -> str:
    """Replay `batch` through the wrapped `model` with finiteness hooks on every module; returns
    "first non-finite ..." naming the first module whose output (forward, in execution order) or
    output gradient (backward, in backward order) was non-finite, or the first parameter gradient.
    Gradients it leaves are dropped."""
    inner = engine.unwrap(model)
    found: list[str] = []
    handles = []

    def finite(value) -> bool:
        tensors = [value] if isinstance(value, torch.Tensor) else [
            v for v in (value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else [])
            if isinstance(v, torch.Tensor)
        ]  # fmt: skip
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())

    def watch(name: str, module: nn.Module) -> None:
        def on_output(_module, _inputs, output):
            if not found and not finite(output):
                found.append(f"first non-finite output in {name} ({type(module).__name__})")
            tensor = output if isinstance(output, torch.Tensor) else next(
                (o for o in (output if isinstance(output, (tuple, list)) else []) if isinstance(o, torch.Tensor)), None
            )  # fmt: skip
            if tensor is not None and tensor.requires_grad:
                tensor.register_hook(lambda grad: on_grad(grad))

        def on_grad(grad):
            if not found and not bool(torch.isfinite(grad).all()):
                found.append(f"first non-finite output gradient in {name} ({type(module).__name__})")

        handles.append(module.register_forward_hook(on_output))

    for name, module in inner.named_modules():
        if name:
            watch(name.removeprefix("lm.base_model.model."), module)
    try:
        with engine.accelerator.no_sync(model):
            loss = sum(model(**m.to(engine.device).model_inputs()) * m.weight for m in batch.micro_batches)
            if not found and torch.isfinite(loss):
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        bad = [
            n for n, p in inner.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()
        ]
        found.append(
            f"first non-finite parameter gradient: {bad[0]}"
            if bad
            else "the replay of that batch was finite (a non-deterministic kernel?)"
        )
    for p in inner.parameters():
        p.grad = None
    return found[0]


# -- the finetune step, and the builder every caller uses --------------------------------------


def make_collator(settings, engine, model: nn.Module, pad_id: int, grad_accum: int) -> Collator:
    """A training step's collator: packed rows where the model allows (AnswerLM.packed), this
    process's share of each global batch."""
    return Collator(
        pad_id=pad_id,
        packed=model.packed,
        pack_tokens=settings.pack_tokens,
        multiple=settings.pad_to_multiple_of,
        num_processes=engine.num_processes,
        process_index=engine.process_index,
        grad_accum=grad_accum,
    )


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
    params = trainable_parameters(model)
    optimizer, schedule = adamw_with_schedule(
        params, spec.lr, spec.weight_decay, spec.scheduler, spec.warmup_ratio, total_steps
    )
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    collate = make_collator(settings, engine, model, pad_id, spec.grad_accum)
    model, optimizer = engine.prepare(model, optimizer)
    train_step = TrainStep(engine, model, "finetune", spec.on_nonfinite)
    one_step = LoraStep(train_step, optimizer, schedule, params, spec.max_grad_norm)
    stateful = {"optimizer": optimizer, "scheduler": schedule}
    return BuiltStep(one_step, model, train_step, collate, trained, stateful)
