"""Log-likelihood scoring of multiple-choice prompts, and lm-eval-style accuracy metrics; for SFT
data, the held-out response loss and perplexity (response_loss).

A choice's score is the summed log-probability of its continuation tokens after its context
(tokenised as lm-eval does, data/batches.split_tokens). For speed, the choices of one example are
packed into one row: the token prefix they share is computed once, then each choice's remaining
tokens follow as a branch that sees the shared prefix and itself only (a 4-D attention mask, with
position ids restarting after the prefix). For a lettered prompt the branches are single tokens,
so one pass of the context scores every letter. Models whose attention cannot take a custom mask
get one row per choice instead. Rows are sorted by length (longest first, so an out-of-memory
error surfaces on the first batch), right-padded, and only the logits from the first scored
position on are computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate.utils import find_executable_batch_size
from torch import nn
from transformers import PreTrainedTokenizerBase

from flexora_cli.data.batches import split_pairs
from flexora_cli.data.collate import Collator, TrainingRow
from flexora_cli.data.prompts import Prompt
from flexora_cli.modeling import accepts_logits_to_keep, packs_rows
from flexora_cli.step import AnswerLM


@dataclass
class _Row:
    """One forward-pass row: tokens, their positions and branch ids, and what to score."""

    prompt_index: int
    tokens: list[int]
    positions: list[int]
    branches: list[int]
    """-1 for the shared prefix, else the branch's id; a token sees the prefix and its own branch."""
    scored: list[tuple[int, list[int], list[int]]]
    """(choice, row index whose logits predict each target token, target tokens)."""


def _pack(prompt_index: int, pairs: list[tuple[list[int], list[int]]], choices: list[int]) -> _Row:
    """Pack (context ids, continuation ids) pairs for `choices` into one row sharing their prefix."""
    sequences = [context + continuation for context, continuation in pairs]
    shared = 0
    while all(len(s) > shared and s[shared] == sequences[0][shared] for s in sequences):
        shared += 1
    tokens, positions, branches = sequences[0][:shared], list(range(shared)), [-1] * shared
    scored = []
    for branch, (choice, (context, _), sequence) in enumerate(zip(choices, pairs, sequences)):
        offset = len(tokens)
        tokens += sequence[shared:]
        positions += range(shared, len(sequence))
        branches += [branch] * (len(sequence) - shared)
        # Token k of the sequence is predicted by sequence position k-1, which sits in the prefix
        # or at its place in this branch.
        predictors = [
            k - 1 if k - 1 < shared else offset + k - 1 - shared for k in range(len(context), len(sequence))
        ]
        scored.append((choice, predictors, sequence[len(context) :]))
    return _Row(prompt_index, tokens, positions, branches, scored)


def _rows(
    tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], max_length: int, share_prefix: bool
) -> list[_Row]:
    texts = [pair for prompt in prompts for pair in zip(prompt.contexts, prompt.continuations)]
    tokens = iter(split_pairs(tokenizer, texts, max_length))
    rows = []
    for index, prompt in enumerate(prompts):
        pairs = [next(tokens) for _ in prompt.continuations]
        if share_prefix:
            rows.append(_pack(index, pairs, list(range(len(pairs)))))
        else:
            rows += [_pack(index, [pair], [choice]) for choice, pair in enumerate(pairs)]
    return rows


def can_share_prefix(model: nn.Module) -> bool:
    """Whether `model` accepts the packed rows' custom attention mask (modeling.PACKABLE_MODEL_TYPES
    with SDPA or eager attention)."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return packs_rows(model) and implementation in ("sdpa", "eager")


def _batch_inputs(
    batch: list[_Row], pad_id: int, dtype: torch.dtype, packed: bool
) -> dict[str, torch.Tensor]:
    width = max(len(row.tokens) for row in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    positions = torch.arange(width).repeat(len(batch), 1)
    for i, row in enumerate(batch):
        input_ids[i, : len(row.tokens)] = torch.tensor(row.tokens)
        positions[i, : len(row.tokens)] = torch.tensor(row.positions)
    if not packed:
        lengths = torch.tensor([len(row.tokens) for row in batch])
        return {"input_ids": input_ids, "attention_mask": (torch.arange(width) < lengths[:, None]).long()}
    allowed = torch.zeros((len(batch), width, width), dtype=torch.bool)
    for i, row in enumerate(batch):
        branch = torch.tensor(row.branches)
        n = len(row.tokens)
        same_branch = (branch[None, :] == -1) | (branch[None, :] == branch[:, None])
        allowed[i, :n, :n] = same_branch & torch.ones(n, n, dtype=torch.bool).tril()
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows see themselves: no all-masked row
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return {"input_ids": input_ids, "attention_mask": mask[:, None], "position_ids": positions}


@torch.no_grad()
def score(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    batch_size: int | str,
    max_length: int,
    share_prefix: bool | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[list[float]]:
    """Summed log-probability of every continuation of every prompt: scores[prompt][choice].

    `batch_size` is rows per forward pass, or "auto": start at 64 and halve on out-of-memory.
    `share_prefix` None: pack when the model supports it (can_share_prefix). `on_progress` gets
    (rows done, rows in all) after each batch.
    """
    packed = can_share_prefix(model) if share_prefix is None else share_prefix
    rows = sorted(_rows(tokenizer, prompts, max_length, packed), key=lambda r: -len(r.tokens))
    device = next(model.parameters()).device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keeps_logits = accepts_logits_to_keep(model)

    def run_batches(rows_per_pass: int) -> list[list[float]]:
        scores = [[math.nan] * len(p.continuations) for p in prompts]
        for start in range(0, len(rows), rows_per_pass):
            batch = rows[start : start + rows_per_pass]
            inputs = {k: v.to(device) for k, v in _batch_inputs(batch, pad_id, dtype, packed).items()}
            first = min(p[0] for row in batch for _, p, _ in row.scored)
            width = inputs["input_ids"].shape[1]
            if keeps_logits:
                inputs["logits_to_keep"] = width - first
            logits = model(**inputs, use_cache=False).logits  # no cache: nothing is generated
            logits = logits[:, logits.shape[1] - (width - first) :].float()
            for i, row in enumerate(batch):
                for choice, predictors, targets in row.scored:
                    logprobs = logits[i, [p - first for p in predictors]].log_softmax(-1)
                    picked = logprobs.gather(-1, torch.tensor(targets, device=device)[:, None])
                    scores[row.prompt_index][choice] = float(picked.sum())
            if on_progress:
                on_progress(start + len(batch), len(rows))
        return scores

    if batch_size == "auto":
        return find_executable_batch_size(run_batches, starting_batch_size=64)()
    return run_batches(int(batch_size))


def argmax(values: list[float]) -> int:
    """Index of the largest value; ties go to the lowest index (numpy's argmax, as lm-eval)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mean_stderr(correct: list[bool]) -> float:
    """lm-eval's standard error of a mean: sample standard deviation (n-1) / sqrt(n)."""
    n = len(correct)
    if n < 2:
        return 0.0
    p = sum(correct) / n
    return math.sqrt(p * (1 - p) / (n - 1))


def choice_metrics(scores: list[list[float]], prompts: list[Prompt]) -> tuple[dict, list[dict]]:
    """lm-eval's multiple-choice metrics and per-example predictions.

    acc: argmax of the summed log-likelihood. acc_norm (only when every prompt defines choice
    lengths): argmax of log-likelihood ÷ the choice's length in characters.
    """
    golds = [p.gold for p in prompts]
    predicted = [argmax(s) for s in scores]
    correct = [p == g for p, g in zip(predicted, golds)]
    metrics = {"n": len(prompts), "acc": sum(correct) / len(prompts), "acc_stderr": mean_stderr(correct)}
    examples = [{"predicted": p, "scores": s} for p, s in zip(predicted, scores)]
    if all(p.choice_chars for p in prompts):
        normed = [argmax([v / n for v, n in zip(s, p.choice_chars)]) for s, p in zip(scores, prompts)]
        correct_norm = [p == g for p, g in zip(normed, golds)]
        metrics["acc_norm"] = sum(correct_norm) / len(prompts)
        metrics["acc_norm_stderr"] = mean_stderr(correct_norm)
        for example, p in zip(examples, normed):
            example["predicted_norm"] = p
    return metrics, examples


def response_loss(
    model: nn.Module,
    rows: list[TrainingRow],
    pad_id: int,
    batch_size: int | str,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[float, int]:
    """(summed cross-entropy of the trained tokens of `rows`, their count) under `model`, without
    gradients: the training step's own loss (step.AnswerLM) on packed rows sorted by length.
    `batch_size` is rows per forward pass, or "auto": start at 64 and halve on out-of-memory."""
    lm = AnswerLM(model)
    device = next(model.parameters()).device
    collate = Collator(pad_id=pad_id, packed=lm.packed, multiple=8)
    ordered = sorted(rows, key=len, reverse=True)  # the widest first: out-of-memory shows at once

    def run_batches(rows_per_pass: int) -> float:
        total = torch.zeros((), dtype=torch.float64, device=device)
        with torch.inference_mode():
            for start in range(0, len(ordered), rows_per_pass):
                batch = collate(ordered[start : start + rows_per_pass]).micro_batches[0].to(device)
                total += lm(**batch.model_inputs()).double()
                if on_progress:
                    on_progress(start + rows_per_pass, len(ordered))
        return float(total)

    summed = (
        find_executable_batch_size(run_batches, starting_batch_size=64)()
        if batch_size == "auto"
        else run_batches(int(batch_size))
    )
    return summed, sum(row.answer_tokens for row in rows)


def response_metrics(summed: float, tokens: int, rows: int) -> dict:
    """Held-out loss (per response token) and perplexity, as eval/metrics.json holds them."""
    loss = summed / tokens
    return {"n": rows, "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
