"""Log-likelihood scoring of multiple-choice continuations, batched.

Each choice is scored as the summed log-probability of its continuation tokens after the context.
When every choice is a single token after the same context (lettered MCQ), one forward pass of the
context scores them all. Sequences are sorted by length, left-padded (with explicit position ids,
so padding never shifts positions) and only the logits of the scored positions are kept.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from flexora_cli.data.batches import split_tokens
from flexora_cli.data.prompts import Prompt


@dataclass
class _Sequence:
    prompt_index: int
    choice_indices: list[int]
    """Choices scored from this sequence: one (full continuation) or all (single-token choices)."""
    tokens: list[int]
    targets: list[list[int]]
    """Per choice, the tokens scored at the sequence's last len(targets[k]) positions."""
    context_only: bool
    """True when `tokens` is the shared context and every target is one next token."""


def _sequences(tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], max_length: int) -> list[_Sequence]:
    sequences = []
    for index, prompt in enumerate(prompts):
        parts = [split_tokens(tokenizer, prompt.context, c, max_length) for c in prompt.continuations]
        contexts = {tuple(context) for context, _ in parts}
        if len(contexts) == 1 and all(len(continuation) == 1 for _, continuation in parts):
            choices = list(range(len(parts)))
            sequences.append(_Sequence(index, choices, parts[0][0], [c for _, c in parts], context_only=True))
        else:
            for choice, (context, continuation) in enumerate(parts):
                sequences.append(
                    _Sequence(index, [choice], context + continuation, [continuation], context_only=False)
                )
    return sequences


@torch.no_grad()
def score(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    batch_size: int,
    max_length: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Summed log-probability of every continuation of every prompt: scores[prompt][choice]."""
    device = next(model.parameters()).device
    accepts = set(inspect.signature(model.forward).parameters) | set(
        inspect.signature(getattr(model, "get_base_model", lambda: model)().forward).parameters
    )
    scores = [[0.0] * len(p.continuations) for p in prompts]
    sequences = sorted(_sequences(tokenizer, prompts, max_length), key=lambda s: -len(s.tokens))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(s.tokens) for s in batch)
        # Positions to keep: the last (continuation length) inputs predict the scored tokens.
        keep = max(max(len(t) for t in s.targets) for s in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            input_ids[row, width - len(seq.tokens) :] = torch.tensor(seq.tokens)
            mask[row, width - len(seq.tokens) :] = 1
        inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
        if "position_ids" in accepts:
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        if "logits_to_keep" in accepts:
            inputs["logits_to_keep"] = keep + 1
        logits = model(**inputs).logits[:, -(keep + 1) :].float()
        # logits[:, j] predicts the token after input position j; for single-token choices of a
        # context-only sequence the prediction is at the last position.
        for row, seq in enumerate(batch):
            for choice, target in zip(seq.choice_indices, seq.targets):
                step_logits = logits[row, -1:] if seq.context_only else logits[row, -len(target) - 1 : -1]
                logprobs = step_logits.log_softmax(-1)
                picked = logprobs.gather(-1, torch.tensor(target, device=logprobs.device).unsqueeze(-1))
                scores[seq.prompt_index][choice] = float(picked.sum())
        if on_batch:
            on_batch(len(batch))
    return scores


def accuracy(scores: list[list[float]], golds: list[int]) -> tuple[list[int], float, float]:
    """(predictions, accuracy, standard error); ties go to the lowest index."""
    predictions = [max(range(len(s)), key=lambda i: (s[i], -i)) for s in scores]
    n = len(golds)
    acc = sum(p == g for p, g in zip(predictions, golds)) / n
    stderr = (acc * (1 - acc) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return predictions, acc, stderr
