"""Scoring equals a plain, unbatched log-likelihood computation; metrics follow lm-eval."""

from __future__ import annotations

import math

import pytest
import torch

from flexora_cli.data.batches import split_tokens
from flexora_cli.data.prompts import Prompt
from flexora_cli.modeling import load_model, load_tokenizer
from flexora_cli.scoring import (
    _rows,
    can_share_prefix,
    choice_metrics,
    mean_stderr,
    score,
    token_budget_passes,
)
from flexora_cli.settings import ModelSettings


def reference(model, tokenizer, context, continuation):
    context_ids, continuation_ids = split_tokens(tokenizer, context, continuation, 10_000)
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(float(logprobs[len(context_ids) - 1 + i, t]) for i, t in enumerate(continuation_ids))


def shared(context, continuations, gold):
    return Prompt([context] * len(continuations), continuations, gold)


PROMPTS = [
    shared("demo: kalo duvi\nAnswer:", [" A", " B", " C", " D"], 1),  # single-token letters
    shared("demo: kalo", [" duvi kalo hene", " ga", " lopo lopo"], 0),  # multi-token choices
    shared("demo: hene lodu lolo lopo kapo gami kare hega\nAnswer:", [" A", " B"], 1),
    Prompt(["The kalo", "The duvi hene"], [" went lopo.", " went lopo."], 0),  # partial scoring
    shared("demo: kalo ", ["duvi", "duvi"], 0),  # trailing space moves; identical choices
    shared("", [" kalo", " duvi hene"], 1),  # empty context: BOS conditions
]


@pytest.fixture(scope="module")
def tiny(demo_dir):
    spec = ModelSettings(name_or_path=f"{demo_dir}/model", dtype="float32")
    return load_tokenizer(spec), load_model(spec, torch.device("cpu"), "fp32")


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize(("batch_size", "batch_tokens"), [(1, 10**6), (64, 10**6), ("auto", 1), ("auto", 24)])
def test_scores_match_unbatched_reference(tiny, share_prefix, batch_size, batch_tokens):
    """One row per pass, all in one pass, and token budgets that cut passes at several widths."""
    tokenizer, model = tiny
    scores = score(model, tokenizer, PROMPTS, batch_size, 512, share_prefix, batch_tokens=batch_tokens)
    with torch.no_grad():
        for prompt, row in zip(PROMPTS, scores):
            for context, continuation, value in zip(prompt.contexts, prompt.continuations, row):
                assert value == pytest.approx(reference(model, tokenizer, context, continuation), abs=1e-4)


def test_tiny_llama_packs_prefixes(tiny):
    assert can_share_prefix(tiny[1])


def test_rows_feed_no_last_token_and_the_head_reads_scored_positions_only(tiny):
    """A choice's last token predicts nothing: a lettered prompt's row is its context alone, and
    the LM head runs on exactly one position per scored token."""
    tokenizer, model = tiny
    rows = _rows(tokenizer, PROMPTS, 512, share_prefix=True)
    context_ids, _ = split_tokens(tokenizer, PROMPTS[0].contexts[0], " A", 512)
    assert rows[0].tokens == context_ids and rows[0].branches == [-1] * len(context_ids)
    sequences = [
        split_tokens(tokenizer, c, k, 512) for c, k in zip(PROMPTS[1].contexts, PROMPTS[1].continuations)
    ]
    # The choices differ from their first token on: the context once, then each choice but its last token.
    assert len(rows[1].tokens) == len(sequences[0][0]) + sum(len(k) - 1 for _, k in sequences)
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, i, o: head_rows.append(i[0].shape[0])
    )
    try:
        score(model, tokenizer, PROMPTS, "auto", 512, share_prefix=True)
    finally:
        hook.remove()
    scored_tokens = sum(len(k) for row in rows for _, _, k in row.scored)
    assert sum(head_rows) == scored_tokens


@pytest.mark.parametrize(
    ("lengths", "max_rows", "max_tokens", "expected"),
    [
        ([10, 8, 8, 5, 5, 5, 2], None, 20, [(0, 2), (2, 4), (4, 8)]),  # 2×10, 2×8, then 4×5 (3 left)
        ([10, 8, 8, 5, 5, 5, 2], 2, 20, [(0, 2), (2, 4), (4, 6), (6, 8)]),  # the row cap binds
        ([30, 4, 4], None, 20, [(0, 1), (1, 6)]),  # a row over the budget goes alone
        ([], None, 20, []),
    ],
)
def test_token_budget_passes(lengths, max_rows, max_tokens, expected):
    passes = token_budget_passes(lengths, max_rows, max_tokens)
    assert [(p.start, p.stop) for p in passes] == expected
    for p in passes:  # every pass fits the budget, or is one row
        width = lengths[p.start]
        assert len(lengths[p]) == 1 or len(lengths[p]) * width <= max_tokens


def test_metrics_match_hand_computed_values():
    prompts = [
        Prompt(["c"] * 2, [" a", " bbbb"], 1, [1, 4]),
        Prompt(["c"] * 2, [" aa", " b"], 0, [2, 1]),
        Prompt(["c"] * 2, [" a", " b"], 0, [1, 1]),
        Prompt(["c"] * 2, [" a", " bbb"], 1, [1, 3]),
    ]
    scores = [[-2.0, -4.0], [-3.0, -2.0], [-1.0, -1.0], [-1.0, -6.0]]
    metrics, examples = choice_metrics(scores, prompts)
    # acc: argmax of sums → [0, 1, 0 (tie → lowest), 0]; gold [1, 0, 0, 1] → 1/4 correct.
    assert [e["predicted"] for e in examples] == [0, 1, 0, 0]
    assert metrics["acc"] == 0.25
    # acc_norm: sums ÷ characters → [-2, -1], [-1.5, -2], [-1, -1], [-1, -2] → [1, 0, 0, 0] → 3/4.
    assert [e["predicted_norm"] for e in examples] == [1, 0, 0, 0]
    assert metrics["acc_norm"] == 0.75
    # lm-eval's stderr: sqrt(p(1-p)/(n-1)).
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 / 3))
    assert metrics["acc_norm_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert metrics["n"] == 4


def test_acc_norm_is_absent_where_undefined():
    metrics, examples = choice_metrics([[0.0, -1.0]], [Prompt(["a", "b"], [" c", " c"], 0)])
    assert "acc_norm" not in metrics and "predicted_norm" not in examples[0]
    assert metrics["acc_stderr"] == 0.0 and mean_stderr([True, False]) == pytest.approx(0.5)
