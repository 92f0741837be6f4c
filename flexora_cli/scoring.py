"""Log-likelihood scoring of multiple-choice prompts, and lm-eval-style accuracy metrics; for SFT
data, the held-out response loss and perplexity (response_loss).

A choice's score is the summed log-probability of its continuation tokens after its context
(tokenised as lm-eval does, data/batches.split_tokens). On a CPU the forward pass is bound by its
matrix products, so the time is the tokens read; the scorer reads as few as give lm-eval's numbers:

- **Shared prefix.** The choices of one example are packed into one row: the token prefix they
  share is computed once, then each choice's remaining tokens follow as a branch that sees the
  shared prefix and itself only (a 4-D attention mask, with position ids restarting after the
  prefix). For a lettered prompt the branches are empty: one pass of the context scores every
  letter.
- **No token nobody reads.** A choice's last token predicts nothing, so it is not fed; the LM head
  runs only on the positions that predict a scored token (modeling.logits_at).
- **Token-budget passes.** Rows sorted by length (longest first, so an out-of-memory error surfaces
  on the first pass) join a forward pass while rows × the widest row's tokens fit the budget, so
  short rows go many to a pass and long ones few, with little padding.

Models whose attention cannot take a custom mask get one right-padded row per choice and their own
forward instead (logits from the first scored column on).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from accelerate.utils import find_executable_batch_size
from torch import nn
from transformers import PreTrainedTokenizerBase

from flexora_cli.data.batches import split_pairs
from flexora_cli.data.collate import Collator, TrainingRow
from flexora_cli.data.prompts import Prompt
from flexora_cli.modeling import accepts_logits_to_keep, logits_at, packs_rows
from flexora_cli.settings import CPU_PASS_TOKENS
from flexora_cli.step import AnswerLM

_T = TypeVar("_T")


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
    """Pack (context ids, continuation ids) pairs for `choices` into one row sharing their prefix.

    A sequence's last token predicts nothing, so each row holds the sequences without it."""
    sequences = [context + continuation for context, continuation in pairs]
    fed = [sequence[:-1] for sequence in sequences]
    shared = 0
    while all(len(s) > shared and s[shared] == fed[0][shared] for s in fed):
        shared += 1
    tokens, positions, branches = fed[0][:shared], list(range(shared)), [-1] * shared
    scored = []
    for branch, (choice, (context, _), sequence) in enumerate(zip(choices, pairs, fed)):
        offset = len(tokens)
        tokens += sequence[shared:]
        positions += range(shared, len(sequence))
        branches += [branch] * (len(sequence) - shared)
        # Token k of the sequence is predicted by position k-1, which sits in the prefix or at its
        # place in this branch.
        predictors = [
            k - 1 if k - 1 < shared else offset + k - 1 - shared
            for k in range(len(context), len(sequence) + 1)
        ]
        scored.append((choice, predictors, sequences[branch][len(context) :]))
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


def tokens_read(
    tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], max_length: int, share_prefix: bool
) -> tuple[int, int]:
    """(tokens the backbone reads, positions the LM head reads) when score() scores `prompts`.
    With share_prefix False the backbone reads what lm-eval's HFLM feeds too: each choice alone,
    without its last token (lm-eval then runs the head on every one of them)."""
    rows = _rows(tokenizer, prompts, max_length, share_prefix)
    return sum(len(row.tokens) for row in rows), sum(len(t) for row in rows for _, _, t in row.scored)


def token_budget_passes(lengths: list[int], max_rows: int | None, max_tokens: int) -> list[slice]:
    """The forward passes over rows sorted longest first (`lengths` descending): each takes rows
    while their count × the first (widest) row's length ≤ `max_tokens` and their count ≤
    `max_rows` (None: no row cap); a row longer than the budget goes alone."""
    passes, start = [], 0
    while start < len(lengths):
        fit = max(1, max_tokens // max(lengths[start], 1))
        fit = min(fit, max_rows) if max_rows else fit
        passes.append(slice(start, start + fit))
        start += fit
    return passes


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


@dataclass
class _Scored:
    """Every scored position of one pass, flattened: where it is, what it predicts, whose it is."""

    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    choice_ids: torch.Tensor
    """[K] which (prompt, choice) of `owners` each position's log-probability adds to."""
    owners: list[tuple[int, int]]

    @classmethod
    def of(cls, batch: list[_Row]) -> _Scored:
        rows, cols, targets, choice_ids, owners = [], [], [], [], []
        for i, row in enumerate(batch):
            for choice, predictors, scored_tokens in row.scored:
                rows += [i] * len(predictors)
                cols += predictors
                targets += scored_tokens
                choice_ids += [len(owners)] * len(predictors)
                owners.append((row.prompt_index, choice))
        return cls(*(torch.tensor(v) for v in (rows, cols, targets, choice_ids)), owners)


@dataclass(frozen=True)
class _Model:
    """What every pass needs to know of the model, read once per score() call."""

    module: nn.Module
    device: torch.device
    dtype: torch.dtype
    packed: bool
    keeps_logits: bool

    @classmethod
    def of(cls, model: nn.Module, packed: bool) -> _Model:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return cls(model, next(model.parameters()).device, dtype, packed, accepts_logits_to_keep(model))


@torch.no_grad()
def _pass_logprobs(scorer: _Model, batch: list[_Row], pad_id: int) -> list[tuple[tuple[int, int], float]]:
    """One forward pass: ((prompt, choice), summed log-probability) for every choice of `batch`."""
    model, device, packed = scorer.module, scorer.device, scorer.packed
    inputs = {k: v.to(device) for k, v in _batch_inputs(batch, pad_id, scorer.dtype, packed).items()}
    scored = _Scored.of(batch)
    rows, cols = scored.rows.to(device), scored.cols.to(device)
    if packed:
        logits = logits_at(
            model, inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"], rows, cols
        )
    else:
        width, first = inputs["input_ids"].shape[1], int(scored.cols.min())
        if scorer.keeps_logits:
            inputs["logits_to_keep"] = width - first
        logits = model(**inputs, use_cache=False).logits  # no cache: nothing is generated
        logits = logits[rows, cols - (first if "logits_to_keep" in inputs else 0)]
    picked = logits.float().log_softmax(-1).gather(-1, scored.targets.to(device)[:, None])[:, 0]
    # Summed per choice in float64 (lm-eval sums in float32, in another order).
    sums = torch.zeros(len(scored.owners), dtype=torch.float64, device=device)
    sums.index_add_(0, scored.choice_ids.to(device), picked.double())
    return list(zip(scored.owners, sums.tolist()))


def score(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    batch_size: int | str,
    max_length: int,
    share_prefix: bool | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    batch_tokens: int = CPU_PASS_TOKENS,
) -> list[list[float]]:
    """Summed log-probability of every continuation of every prompt: scores[prompt][choice].

    A forward pass holds at most `batch_size` rows and `batch_tokens` tokens (rows × the widest
    row, token_budget_passes); batch_size "auto": no row cap, and the token budget halves on
    out-of-memory. `share_prefix` None: pack when the model supports it (can_share_prefix).
    `on_progress` gets (rows done, rows in all) after each pass.
    """
    packed = can_share_prefix(model) if share_prefix is None else share_prefix
    rows = sorted(_rows(tokenizer, prompts, max_length, packed), key=lambda r: -len(r.tokens))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    max_rows = None if batch_size == "auto" else int(batch_size)
    scorer = _Model.of(model, packed)

    def run_passes(budget: int) -> list[list[float]]:
        scores = [[math.nan] * len(p.continuations) for p in prompts]
        for part in token_budget_passes([len(r.tokens) for r in rows], max_rows, budget):
            for (prompt, choice), value in _pass_logprobs(scorer, rows[part], pad_id):
                scores[prompt][choice] = value
            if on_progress:
                on_progress(min(part.stop, len(rows)), len(rows))
        return scores

    return _within_budget(run_passes, batch_size, batch_tokens)


def _within_budget(run_passes: Callable[[int], _T], batch_size: int | str, batch_tokens: int) -> _T:
    """run_passes(token budget): once at `batch_tokens`, or with batch_size auto from there,
    halving the budget on out-of-memory."""
    if batch_size == "auto":
        return find_executable_batch_size(run_passes, starting_batch_size=batch_tokens)()
    return run_passes(batch_tokens)


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
    batch_tokens: int = CPU_PASS_TOKENS,
) -> tuple[float, int]:
    """(summed cross-entropy of the trained tokens of `rows`, their count) under `model`, without
    gradients: the training step's own loss (step.AnswerLM) on packed rows sorted by length, in
    passes as score() makes them (batch_size, batch_tokens, auto)."""
    lm = AnswerLM(model)
    device = next(model.parameters()).device
    collate = Collator(pad_id=pad_id, packed=lm.packed, multiple=8)
    ordered = sorted(rows, key=len, reverse=True)  # the widest first: out-of-memory shows at once
    max_rows = None if batch_size == "auto" else int(batch_size)

    def run_passes(budget: int) -> float:
        total = torch.zeros((), dtype=torch.float64, device=device)
        with torch.inference_mode():
            for part in token_budget_passes([len(row) for row in ordered], max_rows, budget):
                batch = collate(ordered[part]).micro_batches[0].to(device)
                total += lm(**batch.model_inputs()).double()
                if on_progress:
                    on_progress(min(part.stop, len(ordered)), len(ordered))
        return float(total)

    return _within_budget(run_passes, batch_size, batch_tokens), sum(row.answer_tokens for row in rows)


def response_metrics(summed: float, tokens: int, rows: int) -> dict:
    """Held-out loss (per response token) and perplexity, as eval/metrics.json holds them."""
    loss = summed / tokens
    return {"n": rows, "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
