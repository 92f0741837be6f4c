"""lm_evaluator.py: lm-eval's results read into the built-in scorer's layout, and the refusals
made before any model loads (the end-to-end run is tests/test_own_data.py's)."""

from __future__ import annotations

import pytest

from flexora_cli import lm_evaluator
from flexora_cli.errors import ConfigError
from flexora_cli.records import Score


def test_metric_keys_drop_the_none_filter_and_keep_the_others():
    raw = {"acc,none": 0.5, "acc_stderr,none": 0.02, "exact_match,flexible-extract": 0.25, "alias": "piqa"}
    metrics = lm_evaluator._metrics(raw)
    assert metrics == {"acc": 0.5, "acc_stderr": 0.02, "exact_match,flexible-extract": 0.25}
    score = Score.from_json({**metrics, "n": 40})  # what metrics.json holds for this variant
    assert (score.acc, score.acc_stderr, score.n) == (0.5, 0.02, 40)
    assert score.others == {"exact_match,flexible-extract": 0.25} and score.to_json() == {**metrics, "n": 40}


def test_a_loglikelihood_sample_becomes_scores_and_a_prediction():
    sample = {"filtered_resps": [[-3.5, False], [-1.25, True], [-1.25, False]]}
    assert lm_evaluator._prediction(sample) == {
        "predicted": 1,
        "scores": [-3.5, -1.25, -1.25],
    }  # ties: lowest
    generative = {"filtered_resps": ["42"], "resps": [["6 * 7 = 42\n#### 42"]]}  # lm-eval 0.4's shapes
    assert lm_evaluator._prediction(generative) == {"responses": ["42"], "generated": ["6 * 7 = 42\n#### 42"]}


def test_several_processes_are_refused_before_the_model_loads(tiny_cfg):
    from flexora_cli.config import load

    settings = load(tiny_cfg("eval.evaluator=lm_eval", "eval.tasks=[piqa]"))
    with pytest.raises(ConfigError, match=r"runs in one process"):
        lm_evaluator.task_manager(settings, num_processes=2)
