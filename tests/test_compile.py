"""compile=true (modeling.compile_layers, regional torch.compile of the decoder layers): the
compiled step takes the eager step's values (loss, LoRA and α̂ gradients), with no graph break,
and the number of compiled graphs stays bounded however many steps and shapes follow.

Counts and equalities only; what compiling buys in time is scripts/bench_train.py's to measure.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from flexora_cli.data.collate import Collator, TrainingRow
from flexora_cli.modeling import compile_layers
from flexora_cli.stages import search
from tests.test_tripwires import FAMILIES, search_model, tiny_family

GRAPH_VARIANTS = 12
"""Compiled graphs a training stage may make: the first layer (its input needs no gradient) or
another, × the LoRA pass or the α pass (dropout off), × the first shape, any later one (dynamic),
or a single pack (dynamic shapes specialise a size of 1). Widths and pack counts beyond those
share a graph: the count does not grow with steps."""


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own graphs and breaks."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def micro_batches(seed: int = 0) -> list:
    """Three packed micro-batches of other widths and pack counts (one of them a single pack)."""
    generator = torch.Generator().manual_seed(seed)

    def rows(lengths):
        return [
            TrainingRow(torch.randint(3, 90, (n,), generator=generator).tolist(), [-100] * (n - 1) + [5])
            for n in lengths
        ]

    collate = Collator(0, True, multiple=8, grad_accum=1)
    lengths = [(17, 23, 31, 12), (40, 9, 33), (28,)] if seed == 0 else [(50, 7, 21, 44, 13), (61, 18), (11,)]
    return [collate(rows(widths)).micro_batches[0] for widths in lengths]


def gated_model(family: str):
    """A tiny gated LoRA model of `family` whose LoRA B is not zero (else α̂'s gradient is)."""
    torch.manual_seed(1)
    model = search_model(tiny_family(family, 100, "sdpa"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return model


def loss_and_gradients(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch.model_inputs())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow  # inductor compiles ~10 graphs per family: over a minute on 2 cores
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_step_equals_eager(family):
    """Loss, LoRA gradients and α̂'s gradient to 1e-5 in float32, in both phases (training, and
    the α pass with dropout off), over micro-batches of six shapes, with no graph break; the
    last three shapes (new widths and pack counts) compile nothing new."""
    eager, compiled = gated_model(family), gated_model(family)
    compile_layers(compiled.lm, "model.layers")
    graphs = []
    for seed in (0, 1):
        compare_phases(eager, compiled, micro_batches(seed))
        graphs.append(counters["stats"]["unique_graphs"])
    assert dict(counters["graph_break"]) == {}
    assert graphs[0] == graphs[1] <= GRAPH_VARIANTS


def compare_phases(eager, compiled, batches: list) -> None:
    for training in (True, False):
        eager.train(training), compiled.train(training)
        for batch in batches:
            expected_loss, expected = loss_and_gradients(eager, batch)
            loss, gradients = loss_and_gradients(compiled, batch)
            torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
            assert gradients.keys() == expected.keys() and "gates.alpha_hat" in gradients
            assert expected["gates.alpha_hat"].abs().max() > 1e-4  # a gradient worth comparing
            for name, gradient in gradients.items():
                torch.testing.assert_close(gradient, expected[name], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_search_of_100_steps_equals_eager_with_bounded_graphs(tiny_cfg, tmp_path):
    """A 100-step search compiled: the eager run's α̂ to 1e-5, no graph break, and no more
    graphs than GRAPH_VARIANTS over every width and pack count its batches take."""
    budget = ["search.budget=800", "search.batch_size=8", "search.val_samples=64", "search.log_every=25"]
    compiled = search.run(tiny_cfg(*budget, "compile=true"))
    assert compiled.steps == 100
    assert dict(counters["graph_break"]) == {}
    assert 0 < counters["stats"]["unique_graphs"] <= GRAPH_VARIANTS
    eager = search.run(tiny_cfg(*budget, f"out_dir={tmp_path / 'eager'}"))
    torch.testing.assert_close(torch.tensor(compiled.alpha), torch.tensor(eager.alpha), rtol=0, atol=1e-5)
