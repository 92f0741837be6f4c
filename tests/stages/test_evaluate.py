"""`flexora eval` on the demo's tiny Llama: several datasets and adapters, both prompt formats, and
scoring in fp32 after bf16 training in one process."""

from __future__ import annotations

import json

import pytest

from flexora_cli.rundir import RunDir
from flexora_cli.stages import evaluate, finetune, run, select
from tests.conftest import flat


def test_eval_completion_format_several_datasets_and_adapters(tiny_cfg, demo_dir, tmp_path):
    first, second = tiny_cfg("out_dir=" + str(tmp_path / "a")), tiny_cfg("out_dir=" + str(tmp_path / "b"))
    for cfg, layers in ((first, "[2,5]"), (second, "[0]")):
        cfg.select.layers = [int(i) for i in layers.strip("[]").split(",")]
        select.run(cfg)
        finetune.run(cfg)
    cfg = tiny_cfg(
        "eval.format=completion",
        "eval.datasets=[demo,demo_piqa]",
        f"eval.adapters=[{tmp_path / 'a'},{tmp_path / 'b'}]",
        "eval.limit=12",
    )
    summary = evaluate.run(cfg)
    assert summary.format == "completion"
    assert set(summary.results) == {"demo", "demo_piqa"}
    for result in summary.results.values():
        assert set(result) == {"base", "a", "b"}
        assert all(s.n == 12 and s.acc_norm is not None for s in result.values())
    # Adapters differ, so their scores do; the base is the base whichever adapter is loaded.
    rows = [json.loads(line) for line in RunDir(cfg.out_dir).predictions_jsonl.read_text().splitlines()]
    assert len(rows) == 24 and any(r["a"]["scores"] != r["b"]["scores"] for r in rows)
    before = RunDir(cfg.out_dir).metrics_json.read_bytes()
    alone = evaluate.run(tiny_cfg("eval.format=completion", "eval.adapters=[]", "eval.limit=12"))
    assert RunDir(cfg.out_dir).metrics_json.read_bytes() == before  # other eval settings: kept
    (beside,) = RunDir(cfg.out_dir).stage_dir("eval").glob("*/predictions.jsonl")
    base_rows = [json.loads(line) for line in beside.read_text().splitlines()]
    assert alone.score("demo", "base").acc == summary.score("demo", "base").acc
    assert flat(r["base"]["scores"] for r in base_rows) == pytest.approx(
        flat(r["base"]["scores"] for r in rows[:12])
    )


def test_train_in_completion_format_evaluate_in_both(tiny_cfg):
    cfg = tiny_cfg("dataset=demo_winogrande", "format=completion", "select.layers=[1]")
    select.run(cfg)
    tuned = finetune.run(cfg)
    assert tuned.steps > 0
    completion = evaluate.run(cfg).results["demo_winogrande"]
    assert completion["adapter"].acc_norm is None  # partial scoring: acc only, as lm-eval
    lettered = evaluate.run(
        tiny_cfg("dataset=demo_winogrande", "format=completion", "select.layers=[1]", "eval.format=mcq")
    )
    assert lettered.format == "mcq" and lettered.score("demo_winogrande", "adapter").n == 40


def test_train_in_bf16_and_score_in_fp32_in_one_process(tiny_cfg, tmp_path):
    """The real-data recipes' split: search and finetune autocast to bf16, eval.precision=fp32
    scores with fp32 weights in the same process (accelerate's state cannot change its mixed
    precision, and scoring needs none), so the base scores exactly as an fp32-only eval does."""
    results = run.run(tiny_cfg("precision=bf16", "eval.precision=fp32"))
    assert results["search"].precision == "bf16"
    out = RunDir(tiny_cfg().out_dir).root
    assert json.loads(out.joinpath("finetune", "train_log.json").read_text())["precision"] == "bf16"
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a new command: an fp32 process
    fp32_only = tiny_cfg("eval.adapters=[]", f"out_dir={tmp_path / 'fp32'}")
    evaluate.run(fp32_only)
    scores = [
        [json.loads(line)["base"]["scores"] for line in (root / "eval" / "predictions.jsonl").open()]
        for root in (out, RunDir(fp32_only.out_dir).root)
    ]
    assert scores[0] == scores[1]
