"""Batched scoring equals a plain, unbatched log-likelihood computation."""

from __future__ import annotations

import torch

from flexora_cli.data.batches import split_tokens
from flexora_cli.data.prompts import Prompt
from flexora_cli.modeling import load_model, load_tokenizer
from flexora_cli.scoring import accuracy, score
from flexora_cli.settings import ModelSettings


def reference(model, tokenizer, context, continuation):
    context_ids, continuation_ids = split_tokens(tokenizer, context, continuation, 10_000)
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(float(logprobs[len(context_ids) - 1 + i, t]) for i, t in enumerate(continuation_ids))


def test_batched_scores_match_unbatched(demo_dir):
    spec = ModelSettings(name_or_path=f"{demo_dir}/model", dtype="float32")
    tokenizer, model = load_tokenizer(spec), load_model(spec, torch.device("cpu"))
    prompts = [
        Prompt("demo: kalo duvi\nAnswer:", [" A", " B", " C", " D"], 1),  # single-token fast path
        Prompt("demo: kalo", [" duvi kalo hene", " ga", " lopo lopo"], 0),  # multi-token choices
        Prompt("demo: hene lodu lolo lopo kapo gami kare hega\nAnswer:", [" A", " B"], 1),
    ]
    with torch.no_grad():
        scores = score(model, tokenizer, prompts, batch_size=2, max_length=512)
        for prompt, row in zip(prompts, scores):
            for continuation, value in zip(prompt.continuations, row):
                assert abs(value - reference(model, tokenizer, prompt.context, continuation)) < 1e-4


def test_accuracy_ties_go_to_lowest_index_and_stderr():
    predictions, acc, stderr = accuracy([[1.0, 1.0], [0.0, 2.0], [3.0, 1.0], [0.0, 0.5]], [0, 1, 1, 1])
    assert predictions == [0, 1, 0, 1]
    assert acc == 0.75 and abs(stderr - (0.75 * 0.25 / 3) ** 0.5) < 1e-12
