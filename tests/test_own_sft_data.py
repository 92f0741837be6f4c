"""Issue 28's user: their own alpaca JSONL (a base model) and `messages` JSONL (an instruct
model's chat template) through `flexora run` with only a dataset config, as the README shows;
then lm-eval's gsm8k task on the run's held-out rows."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from flexora_cli import cli
from flexora_cli.method import SearchResult
from flexora_cli.records import EvalMetrics, FinetuneLog
from tests.test_own_data import CHAT_TEMPLATE, QUICK, demo_rows

ALPACA_CONFIG = """defaults: [custom, _self_]
name: recipes_sft
task: sft
data_dir: {data}
sft:
  format: alpaca
  instruction: question
  output: answer
"""
MESSAGES_CONFIG = """defaults: [custom, _self_]
name: chats
task: sft
data_dir: {data}
sft:
  format: messages
"""


def write_rows(folder: Path, demo_dir: str, chat: bool) -> None:
    """The demo's questions as a user's SFT data: the context asks, the gold ending answers."""
    folder.mkdir(parents=True)
    for split, count in (("train", 200), ("validation", 24)):
        with open(folder / f"{split}.jsonl", "w") as out:
            for row in demo_rows(demo_dir, split)[:count]:
                answer = row["endings"][int(row["label"])]
                record = (
                    {
                        "messages": [
                            {"role": "user", "content": row["ctx"]},
                            {"role": "assistant", "content": answer},
                        ]
                    }
                    if chat
                    else {"question": row["ctx"], "answer": f"{answer}\n#### {int(row['label']) + 1}"}
                )
                out.write(json.dumps(record) + "\n")


def user_config(tmp_path: Path, demo_dir: str, chat: bool) -> list[str]:
    """The user's data and dataset config (and, for chat data, an instruct copy of the demo model)."""
    write_rows(tmp_path / "data", demo_dir, chat)
    conf = tmp_path / "conf" / "dataset"
    conf.mkdir(parents=True)
    name = "chats" if chat else "recipes_sft"
    (conf / f"{name}.yaml").write_text(
        (MESSAGES_CONFIG if chat else ALPACA_CONFIG).format(data=tmp_path / "data")
    )
    overrides = [
        f"demo_assets={demo_dir}",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        f"dataset={name}",
    ]
    if chat:
        model = tmp_path / "instruct"
        shutil.copytree(Path(demo_dir) / "model", model)
        (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        overrides += [f"model.name_or_path={model}", "model.chat_template=true"]
    return overrides


def check_trained(run: Path, dataset: str, rows: int = 24) -> EvalMetrics:
    """Every stage wrote real outputs, and the adapter lowered the held-out response loss."""
    searched = SearchResult.read(run / "search" / "alpha.json", "search", "test")
    assert searched.steps == 4 and all(math.isfinite(a) for a in searched.alpha) and searched.alpha_steps > 0
    finetuned = FinetuneLog.read(run / "finetune" / "train_log.json", "finetune", "test")
    assert finetuned.steps == 3 and (run / "finetune" / "adapter" / "adapter_model.safetensors").is_file()
    metrics = EvalMetrics.read(run / "eval" / "metrics.json", "eval", "test")
    base, adapter = metrics.score(dataset, "base"), metrics.score(dataset, "adapter")
    assert base.n == adapter.n == rows and base.tokens == adapter.tokens > rows
    assert math.isfinite(base.loss) and adapter.loss < base.loss
    assert adapter.perplexity == pytest.approx(math.exp(adapter.loss)) and base.acc is None
    return metrics


def test_messages_jsonl_trains_through_every_stage(demo_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["run", *QUICK, *user_config(tmp_path, demo_dir, chat=True), f"out_dir={run}"]) == 0
    check_trained(run, "chats")
    out = capsys.readouterr().out
    assert "Scores (flexora)" in out and "chats" in out and "ppl" in out


@pytest.mark.slow  # 21-27 s; the messages run above keeps every stage on SFT data in the default run
def test_alpaca_jsonl_trains_then_gsm8k_scores_the_heldout_rows(demo_dir, tmp_path, capsys):
    """A base model (no chat template): Alpaca's prompt; eval both ways: the held-out loss, then
    lm-eval's own gsm8k task (prompt, generation, filters) on the same held-out rows."""
    pytest.importorskip("lm_eval")
    run = tmp_path / "run"
    lm_eval = [
        "evaluator=both",
        "tasks=[gsm8k]",
        "eval.task_rows=heldout",
        "eval.num_fewshot=0",
        "max_length=320",
    ]
    quick = [arg for arg in QUICK if not arg.startswith("eval.limit")] + ["eval.limit=8"]
    args = ["run", *quick, *user_config(tmp_path, demo_dir, chat=False), f"out_dir={run}", *lm_eval]
    assert cli.main(args) == 0
    metrics = check_trained(run, "recipes_sft", rows=8)
    assert metrics.evaluator.startswith("flexora + lm-eval 0.4")
    for variant in ("base", "adapter"):
        scored = metrics.score("gsm8k_heldout", variant)
        assert scored.n == 8 and {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(
            scored.others
        )
    tasks = run / "eval" / "lm_eval_tasks"
    config = (tasks / "gsm8k_heldout.yaml").read_text()
    assert "lm_eval/tasks/gsm8k/gsm8k.yaml" in config and "dataset_path: json" in config
    heldout = [json.loads(line) for line in (tasks / "test.jsonl").read_text().splitlines()]
    assert heldout == [
        json.loads(line) for line in (tmp_path / "data" / "validation.jsonl").read_text().splitlines()
    ]
    rows = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    generated = [r for r in rows if r["dataset"] == "gsm8k_heldout"]
    assert len(generated) == 8 and all(isinstance(r["adapter"]["generated"][0], str) for r in generated)
    out = capsys.readouterr().out
    assert "gsm8k_heldout" in out and "exact_match" in out
