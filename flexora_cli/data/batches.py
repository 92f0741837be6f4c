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
    """(context ids, continuation ids), the context cut from the left to fit `max_length`."""
    whole = tokenizer(context + continuation)["input_ids"]
    context_len = len(tokenizer(context)["input_ids"])
    if context_len >= len(whole):  # the continuation merged into the context's last token
        context_len = len(whole) - 1
    context_ids, continuation_ids = whole[:context_len], whole[context_len:]
    keep = max_length - len(continuation_ids)
    if len(context_ids) > keep:
        context_ids = context_ids[:1] + context_ids[len(context_ids) - keep + 1 :]  # keep BOS/first token
    return context_ids, continuation_ids


def training_features(
    tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], max_length: int
) -> list[dict]:
    """input_ids and labels (-100 on the context) for the gold continuation of each prompt."""
    features = []
    for prompt in prompts:
        context_ids, answer_ids = split_tokens(
            tokenizer, prompt.context, prompt.continuations[prompt.gold], max_length
        )
        features.append(
            {"input_ids": context_ids + answer_ids, "labels": [-100] * len(context_ids) + answer_ids}
        )
    return features


class Batches:
    """Shuffled, padded training batches with a resumable position in a seeded order."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, features: list[dict], batch_size: int, seed: int):
        self.features, self.batch_size, self.seed = features, batch_size, seed
        self.collate = DataCollatorForSeq2Seq(
            tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt"
        )

    def __len__(self) -> int:
        return -(-len(self.features) // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        order = list(range(len(self.features)))
        random.Random(self.seed + epoch).shuffle(order)
        for start in range(0, len(order), self.batch_size):
            chunk = [self.features[i] for i in order[start : start + self.batch_size]]
            yield self.collate([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in chunk])

    def forever(self) -> Iterator[dict[str, torch.Tensor]]:
        """Cycle through epochs (for the α step's validation batches)."""
        epoch = 0
        while True:
            yield from self.epoch(epoch)
            epoch += 1
