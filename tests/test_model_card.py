"""model_card.py: the adapter's card, written from the run's typed records as they exist so far."""

from __future__ import annotations

import pytest

from flexora_cli.config import load
from flexora_cli.errors import DamagedArtifactError
from flexora_cli.method import SearchResult, Selection
from flexora_cli.model_card import write_model_card
from flexora_cli.records import EvalMetrics, FinetuneLog
from flexora_cli.rundir import MODEL_CARD, RunDir

ALPHA = [0.3, -0.2, 0.1, -0.2]


def _records(run_dir: RunDir) -> None:
    search = SearchResult(
        alpha=ALPHA, ranking=[0, 2, 1, 3], scaled_alpha=[1.0] * 4, alpha_sum=0.0,
        lora_params_per_layer=[10] * 4, hypergradient="first_order", unroll_steps=0, steps=60,
        seconds=1.0, padding_waste=0.0, num_processes=1, precision="fp32", max_grad_norm=1.0,
        nonfinite_steps_skipped=0,
    )  # fmt: skip
    run_dir.write_json(run_dir.alpha_json, search.to_json())
    selection = Selection(layers=[0, 2], rule="positive", trainable_params=20, num_layers=4,
                          all_layers_params=40, ranking=[0, 2, 1, 3])  # fmt: skip
    run_dir.write_json(run_dir.selection_json, selection.to_json())


def test_card_grows_with_the_records(tiny_cfg):
    settings = load(tiny_cfg())
    run_dir = RunDir(settings.out_dir)
    _records(run_dir)
    write_model_card(run_dir, settings, "finetune")
    card = (run_dir.adapter_dir / MODEL_CARD).read_text()
    assert card.startswith("---\nbase_model: ") and "2 of the 4 layers: [0, 2]" in card
    assert "| 1 | 0 | +0.3000 | ✓ |" in card and "| 3 | 1 | -0.2000 |  |" in card  # the ranking table
    assert "Not evaluated yet" in card

    log = FinetuneLog(layers=[0, 2], trainable_params=20, steps=7, examples=56, dataset_examples=56,
                      seconds=2.0, tokens_per_second=None, padding_waste=0.1, num_processes=1,
                      precision="fp32", max_grad_norm=1.0, nonfinite_steps_skipped=0)  # fmt: skip
    run_dir.write_json(run_dir.finetune_log_json, log.to_json())
    metrics = EvalMetrics(model="m", format="mcq", variants={"base": None, "adapter": "a"},
                          splits={"demo": "validation"},
                          results={"demo": {"base": {"n": 40, "acc": 0.25, "acc_stderr": 0.07},
                                            "adapter": {"n": 40, "acc": 0.5, "acc_stderr": 0.08}}})  # fmt: skip
    run_dir.write_json(run_dir.metrics_json, metrics.to_json())
    write_model_card(run_dir, settings, "eval")
    card = (run_dir.adapter_dir / MODEL_CARD).read_text()
    assert "- 7 steps on 56 examples" in card
    assert (
        "## Evaluation (mcq format)" in card
        and "| demo | validation | adapter | 40 | 0.5000 ± 0.0800 | – |" in card
    )


def test_a_damaged_training_log_is_one_line(tiny_cfg):
    settings = load(tiny_cfg())
    run_dir = RunDir(settings.out_dir)
    _records(run_dir)
    run_dir.write_json(run_dir.finetune_log_json, {"layers": [0, 2]})
    with pytest.raises(DamagedArtifactError, match=r"train_log.json lacks .*steps.*rerun `flexora finetune`"):
        write_model_card(run_dir, settings, "eval")
