"""Tokenisation of (context, continuation) pairs, and the seeded order of training batches.

The continuation's tokens are those of tokenize(context + continuation) past the context's own
tokens (the lm-eval-harness convention), so training targets and scored choices tokenise alike.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from transformers import PreTrainedTokenizerBase

from flexora_cli.data.collate import TrainingRow
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
) -> list[TrainingRow]:
    """The training row (loss on the answer only) of each prompt's gold continuation."""
    pairs = [(prompt.contexts[prompt.gold], prompt.continuations[prompt.gold]) for prompt in prompts]
    return [TrainingRow.of(context, answer) for context, answer in split_pairs(tokenizer, pairs, max_length)]


class Batches:
    """Global training batches (lists of rows) in a seeded, resumable order.

    With `group_by_length`, each window of 50 batches' worth of shuffled examples is sorted by
    length before it is cut into batches, and the batches are then shuffled: batches hold
    examples of similar length (little padding) in an order that is still random.
    """

    def __init__(self, features: list[TrainingRow], batch_size: int, seed: int, group_by_length: bool = True):
        self.features, self.batch_size, self.seed = features, batch_size, seed
        self.group_by_length = group_by_length

    def __len__(self) -> int:
        return -(-len(self.features) // self.batch_size)

    def order(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch` as lists of feature indices."""
        rng = random.Random(self.seed + epoch)
        order = list(range(len(self.features)))
        rng.shuffle(order)
        if self.group_by_length:
            window = 50 * self.batch_size
            length = {i: len(self.features[i]) for i in order}
            order = [
                i
                for start in range(0, len(order), window)
                for i in sorted(order[start : start + window], key=length.__getitem__)
            ]
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if self.group_by_length:
            rng.shuffle(batches)
        return batches

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[list[TrainingRow]]:
        """The batches of one epoch in its seeded order, from batch `skip` on (to resume)."""
        for indices in self.order(epoch)[skip:]:
            yield [self.features[i] for i in indices]

    def examples_in(self, steps: int) -> int:
        """How many examples the first `steps` batches hold (the last batch of an epoch may be short)."""
        epochs, offset = divmod(steps, len(self))
        return epochs * len(self.features) + sum(len(b) for b in self.order(epochs)[:offset])

    def forever(self, skip: int = 0) -> Iterator[list[TrainingRow]]:
        """Cycle through epochs (for the α step's validation batches), from batch `skip` on."""
        epoch, skip = divmod(skip, len(self))
        while True:
            yield from self.epoch(epoch, skip)
            epoch, skip = epoch + 1, 0
