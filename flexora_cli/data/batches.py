"""Tokenisation of (context, continuation) pairs and padded batches.

The continuation's tokens are those of tokenize(context + continuation) past the context's own
tokens (the lm-eval-harness convention), so training targets and scored choices tokenise alike.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from flexora_cli.data.prompts import Prompt


def split_tokens(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str, max_length: int
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one pair; see split_pairs."""
    return split_pairs(tokenizer, [(context, continuation)], max_length)[0]


def split_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per (context, continuation) pair, tokenised in bulk.

    As lm-eval does: trailing spaces of the context move to the continuation, the continuation's
    ids are those of tokenize(context + continuation) past len(tokenize(context)), and an empty
    context becomes the BOS (else EOS) token. Contexts too long for `max_length` lose tokens from
    the left, after the first (BOS) token.
    """
    moved = []
    for context, continuation in pairs:
        stripped = context.rstrip()
        moved.append((stripped, context[len(stripped) :] + continuation))
    contexts = sorted({context for context, _ in moved if context})
    context_ids = dict(zip(contexts, tokenizer(contexts)["input_ids"])) if contexts else {}
    wholes = iter(tokenizer([c + k for c, k in moved if c])["input_ids"] if context_ids else [])
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    split = []
    for context, continuation in moved:
        if context:
            whole = next(wholes)
            # min(): the continuation may merge into the context's last token; keep one to score.
            cut = min(len(context_ids[context]), len(whole) - 1)
            ids = (whole[:cut], whole[cut:])
        else:
            ids = ([prefix], tokenizer(continuation, add_special_tokens=False)["input_ids"])
        context_part, continuation_part = ids
        keep = max_length - len(continuation_part)
        if len(context_part) > keep:
            context_part = context_part[:1] + context_part[len(context_part) - keep + 1 :]
        split.append((context_part, continuation_part))
    return split


def training_features(
    tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], max_length: int
) -> list[dict]:
    """input_ids and labels (-100 on the context) for the gold continuation of each prompt."""
    pairs = [(prompt.contexts[prompt.gold], prompt.continuations[prompt.gold]) for prompt in prompts]
    return [
        {"input_ids": context_ids + answer_ids, "labels": [-100] * len(context_ids) + answer_ids}
        for context_ids, answer_ids in split_pairs(tokenizer, pairs, max_length)
    ]


class Batches:
    """Shuffled, padded training batches with a resumable position in a seeded order."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, features: list[dict], batch_size: int, seed: int):
        self.features, self.batch_size, self.seed = features, batch_size, seed
        self.collate = DataCollatorForSeq2Seq(
            tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt"
        )

    def __len__(self) -> int:
        return -(-len(self.features) // self.batch_size)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one epoch in its seeded order, from batch `skip` on (to resume)."""
        order = list(range(len(self.features)))
        random.Random(self.seed + epoch).shuffle(order)
        for start in range(skip * self.batch_size, len(order), self.batch_size):
            chunk = [self.features[i] for i in order[start : start + self.batch_size]]
            yield self.collate([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in chunk])

    def forever(self, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Cycle through epochs (for the α step's validation batches), from batch `skip` on."""
        epoch, skip = divmod(skip, len(self))
        while True:
            yield from self.epoch(epoch, skip)
            epoch, skip = epoch + 1, 0
