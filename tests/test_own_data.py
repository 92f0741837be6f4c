"""Issue 18's user: their own CSV of questions with four lettered answers, an instruct model's
chat template, DoRA, the whole pipeline, then lm-eval on an ARC-format task read from local files."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest

from flexora_cli import cli
from flexora_cli.data.datasets import load_split
from flexora_cli.errors import DataError
from flexora_cli.settings import ColumnSettings, DatasetSettings

QUICK = [
    "recipe=demo",
    "search.budget=64",
    "search.val_samples=32",
    "search.log_every=2",
    "finetune.epochs=0.5",
    "dataset.max_train_samples=96",
    "eval.limit=24",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ARC_TASK = """task: arc_easy_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def demo_rows(demo_dir: str, split: str) -> list[dict]:
    lines = (Path(demo_dir) / "data" / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def write_quiz(folder: Path, demo_dir: str, split: str, rows: int) -> Path:
    """The demo's questions as a user's CSV: passage, question, A–D, answer letter."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["passage", "question", "A", "B", "C", "D", "answer"])
        for row in demo_rows(demo_dir, split)[:rows]:
            label = "ABCD"[int(row["label"])]
            writer.writerow([row["ctx"], "Which ending fits?", *row["endings"], label])
    return folder / f"{split}.csv"


def user_setup(tmp_path: Path, demo_dir: str) -> list[str]:
    """A quiz dataset config in the user's own config folder, and an instruct copy of the demo
    model (its tokenizer with a chat template); the overrides that use them."""
    data = tmp_path / "quiz"
    write_quiz(data, demo_dir, "train", 200)
    write_quiz(data, demo_dir, "validation", 40)
    conf = tmp_path / "conf" / "dataset"
    conf.mkdir(parents=True)
    (conf / "quiz.yaml").write_text(
        f"defaults: [custom, _self_]\nname: quiz\ndata_dir: {data}\ncolumns:\n  context: passage\n  question: question\n"
        "  choices: [A, B, C, D]\n  label: answer\n  label_format: letter\n"
    )
    model = tmp_path / "instruct"
    shutil.copytree(Path(demo_dir) / "model", model)
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return [
        f"demo_assets={demo_dir}",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "dataset=quiz",
        f"model.name_or_path={model}",
        "model.chat_template=true",
    ]


def test_own_csv_with_chat_template_and_dora_then_lm_eval(demo_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    run = tmp_path / "run"
    overrides = [*QUICK, *user_setup(tmp_path, demo_dir), f"out_dir={run}"]
    assert cli.main(["run", *overrides, "lora.variant=dora"]) == 0
    config = json.loads((run / "finetune" / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert (
        set(metrics["results"]["quiz"]) == {"base", "adapter"}
        and metrics["results"]["quiz"]["base"]["n"] == 24
    )
    out = capsys.readouterr().out
    assert "Accuracy (mcq format)" in out and "quiz" in out  # results on stdout

    arc = tmp_path / "arc" / "test.jsonl"
    arc.parent.mkdir()
    with open(arc, "w") as out_file:
        for i, row in enumerate(demo_rows(demo_dir, "validation")[:16]):
            choices = {"text": row["endings"], "label": list("ABCD")}
            item = {
                "id": str(i),
                "question": row["ctx"],
                "choices": choices,
                "answerKey": "ABCD"[int(row["label"])],
            }
            out_file.write(json.dumps(item) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "arc_easy_local.yaml").write_text(ARC_TASK.format(data=json.dumps(str(arc))))
    lm_eval_args = [
        "evaluator=lm_eval",
        "tasks=[arc_easy_local]",
        f"eval.include_path={tasks}",
        "eval.batch_size=8",
    ]
    assert cli.main(["eval", *overrides, "lora.variant=dora", *lm_eval_args]) == 0
    [folder] = [p.parent for p in (run / "eval").glob("*/metrics.json")]  # beside the run's own eval
    summary = json.loads((folder / "metrics.json").read_text())
    assert summary["evaluator"].startswith("lm-eval ") and summary["splits"] == {"arc_easy_local": "test"}
    result = summary["results"]["arc_easy_local"]
    assert set(result) == {"base", "adapter"} and result["adapter"]["n"] == 16
    assert {"acc", "acc_stderr", "acc_norm"} <= set(result["adapter"])
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(len(r["adapter"]["scores"]) == 4 for r in rows)
    assert any(r["adapter"]["scores"] != r["base"]["scores"] for r in rows)  # the adapter was active
    assert "Accuracy (lm-eval 0.4" in capsys.readouterr().out


def test_lm_eval_missing_is_one_line(demo_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    args = [
        "eval",
        *QUICK,
        f"demo_assets={demo_dir}",
        f"out_dir={tmp_path}",
        "evaluator=lm_eval",
        "tasks=[arc_easy]",
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("error: eval.evaluator=lm_eval needs lm-evaluation-harness")
        and "pip install" in err[-1]
    )


def quiz_spec(folder: Path, **columns) -> DatasetSettings:
    mapping = {"question": "question", "choices": ["A", "B", "C", "D"], "label": "answer", **columns}
    return DatasetSettings(name="quiz", data_dir=str(folder), columns=ColumnSettings(**mapping))


def write_csv(folder: Path, rows: list[list], header=("question", "A", "B", "C", "D", "answer")) -> None:
    folder.mkdir(exist_ok=True)
    with open(folder / "train.csv", "w", newline="") as out:
        csv.writer(out).writerows([header, *rows])


@pytest.mark.parametrize(
    ("label_format", "answer", "gold"),
    [("letter", "c", 2), ("index", "2", 2), ("number", "3", 2), ("text", "Lyon", 2)],
)
def test_label_formats(tmp_path, label_format, answer, gold):
    write_csv(tmp_path, [["Capital?", "Paris", "Nice", "Lyon", "1999", answer]])
    [example] = load_split(quiz_spec(tmp_path, label_format=label_format), "train")
    assert example.gold == gold and example.choices == ["Paris", "Nice", "Lyon", "1999"]


BAD_ROWS = [
    (["Q2", "a", "b", "c", "d", "E"], "row 2, column 'answer': label 'E' out of range, expected A, B, C, D"),
    (["Q2", "a", "b", "c", "", "A"], "row 2, column 'D': empty"),
    (["", "a", "b", "c", "d", "A"], "row 2, column 'question': empty"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_bad_csv_row_names_file_row_and_column(tmp_path, row, message):
    write_csv(tmp_path, [["Q1", "a", "b", "c", "d", "B"], row])
    with pytest.raises(DataError) as info:
        load_split(quiz_spec(tmp_path, label_format="letter"), "train")
    assert str(info.value).startswith(f"{tmp_path / 'train.csv'} row 2, ") and message in str(info.value)


def test_wrong_number_of_choices_in_a_list_column(tmp_path):
    rows = [{"q": "Q1", "options": ["a", "b", "c"], "gold": 0}, {"q": "Q2", "options": ["a", "b"], "gold": 1}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DatasetSettings(
        name="x",
        data_dir=str(tmp_path),
        columns=ColumnSettings(question="q", choices="options", label="gold"),
    )
    with pytest.raises(
        DataError, match=r"train.jsonl row 2, column 'options': 2 choices, expected 3 as in the first row"
    ):
        load_split(spec, "train")


def test_parquet_and_data_files(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(
        {
            "question": ["Q1", "Q2"],
            "A": ["a", "x"],
            "B": ["b", "y"],
            "C": ["c", "z"],
            "D": ["d", "w"],
            "answer": ["B", "D"],
        }
    )
    frame.to_parquet(tmp_path / "dev.parquet")
    spec = quiz_spec(tmp_path, label_format="letter")
    spec.data_files = {"train": str(tmp_path / "dev.parquet")}
    assert [e.gold for e in load_split(spec, "train")] == [1, 3]
    with pytest.raises(
        DataError,
        match=r"dataset.data_files has no 'validation' split \(it names train\); add validation: FILE",
    ):
        load_split(spec, "validation")
