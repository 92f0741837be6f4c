"""Collation: typed training rows → the micro-batches one training step runs on.

- **Padding-free packing.** A micro-batch's rows are concatenated into packs no wider than its
  longest row (rounded up to `pad_to_multiple_of`; or `pack_tokens` when larger); position ids
  restart at 0 for each row, and the per-token sequence ids let the model build a block-diagonal
  causal mask on the device (step.block_causal_mask). The unused tail of a pack is a sequence of
  its own, so no attention query row is ever fully masked: such rows are where CUDA's SDPA kernels
  return NaN for left-padded batches. Families whose code cannot take packed rows (remote code,
  e.g. ChatGLM3) get right-padded rows instead, which have no fully masked rows under a causal
  mask either (modeling.packs_rows decides).
- **Global batches.** A step's rows are sorted by length and dealt to num_processes × grad_accum
  micro-batches; each step knows the answer tokens of the whole global batch (its loss's
  denominator), so 1 process and N take the same step.
- Batches are collated on the host ahead of the step (a DataLoader; pinned memory on CUDA).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import torch
from torch import nn


@dataclass(frozen=True)
class TrainingRow:
    """One training example as tokens: the prompt, then the answer the loss is taken on."""

    input_ids: list[int]
    labels: list[int]
    """input_ids with -100 on the prompt (no loss there)."""

    @classmethod
    def of(cls, prompt_ids: list[int], answer_ids: list[int]) -> TrainingRow:
        return cls(prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids)

    def __len__(self) -> int:
        return len(self.input_ids)

    def answer_positions(self) -> list[int]:
        """Positions whose logits predict an answer token (the logit at p predicts token p + 1)."""
        return [p - 1 for p in range(1, len(self.labels)) if self.labels[p] != -100]

    def answer_targets(self) -> list[int]:
        """The answer tokens, in the order of answer_positions()."""
        return [self.labels[p + 1] for p in self.answer_positions()]

    @property
    def answer_tokens(self) -> int:
        """Answer tokens (the positions the loss is taken on)."""
        return sum(1 for label in self.labels if label != -100)


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


def pack_rows(rows: list[TrainingRow], pad_id: int, pack_tokens: int, multiple: int) -> MicroBatch:
    """Concatenate `rows` into as few packs as first-fit decreasing finds, each of at most
    max(pack_tokens, the longest row rounded up to `multiple`) tokens. With pack_tokens 0 a pack
    is as wide as padding would make the longest row, so packing never costs more attention than
    padding (which grows with the square of the width) and saves the rows it fills. The tail of
    each pack is padding that forms a sequence of its own (it attends to itself, never to a row,
    and is never scored)."""
    capacity = max(pack_tokens, _round_up(max(len(row) for row in rows), multiple))
    packs: list[list[TrainingRow]] = []
    loads: list[int] = []
    for row in sorted(rows, key=lambda r: -len(r)):
        n = len(row)
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
            n = len(row)
            tokens += row.input_ids
            positions += range(n)
            sequences += [sequence] * n
            answers = row.answer_positions()
            answer_rows += [p] * len(answers)
            answer_cols += [offset + k for k in answers]
            targets += row.answer_targets()
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


def pad_rows(rows: list[TrainingRow], pad_id: int, multiple: int) -> MicroBatch:
    """Right-padded rows (the fallback for models that cannot take packed rows): under a causal
    mask a padding query still sees its row's real tokens, so no query row is fully masked."""
    width = _round_up(max(len(row) for row in rows), multiple)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    answer_rows, answer_cols, targets = [], [], []
    for i, row in enumerate(rows):
        n = len(row)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        attention_mask[i, :n] = 1
        positions = row.answer_positions()
        answer_rows += [i] * len(positions)
        answer_cols += positions
        targets += row.answer_targets()
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

    def __call__(self, rows: list[TrainingRow]) -> Collated:
        """Rows sorted by length are dealt in contiguous runs (little padding). A micro-batch left
        empty (fewer rows than micro-batches) runs one row at weight 0, because every process must
        take part in every backward."""
        ordered = sorted(rows, key=lambda row: len(row))
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
            total_tokens=sum(row.answer_tokens for row in rows),
            rows=len(rows),
            tokens=sum(len(row) for row in rows),
        )


def prefetched(batches: Iterator[list[TrainingRow]], collate: Collator, pin: bool) -> Iterator[Collated]:
    """Collate global batches ahead of the step through a DataLoader (pinned memory on CUDA), in
    the order `batches` yields them (seeded and resumable, data/batches.Batches)."""
    loader = torch.utils.data.DataLoader(
        _IterableBatches(batches), batch_size=None, collate_fn=collate, pin_memory=pin, num_workers=0
    )
    yield from loader


class _IterableBatches(torch.utils.data.IterableDataset):
    def __init__(self, batches: Iterator[list[TrainingRow]]):
        self.batches = batches

    def __iter__(self) -> Iterator[list[TrainingRow]]:
        return iter(self.batches)


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
