"""Each dataset parser on records in the exact hub schema, and on broken ones."""

from __future__ import annotations

import json

import pytest

from flexora_cli.config import dataset_preset
from flexora_cli.data.datasets import carve_validation, load_split
from flexora_cli.data.prompts import mcq
from flexora_cli.errors import DataError
from flexora_cli.settings import ColumnSettings

HELLASWAG = {
    "ind": 24,
    "activity_label": "Roof shingle removal",
    "ctx_a": "A man is sitting on a roof.",
    "ctx_b": "he",
    "ctx": "A man is sitting on a roof. he",
    "endings": [
        "is using wrap to wrap a pair of skis.",
        "is ripping level tiles off.",
        "is holding a rubik's cube.",
        "starts pulling up roofing on a roof.",
    ],
    "source_id": "activitynet~v_-JhWjGDPHMY",
    "split": "val",
    "split_type": "indomain",
    "label": "3",
}
PIQA = {
    "goal": "How do I ready a guinea pig cage for it's new occupants?",
    "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips.",
    "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material.",
    "label": 0,
}
WINOGRANDE = {
    "sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
    "option1": "Sarah",
    "option2": "Maria",
    "answer": "1",
}
RACE = {
    "example_id": "high10024.txt",
    "article": "Last week I talked with some of my students.",
    "question": "What did the writer talk about?",
    "options": ["Work", "Students", "Food", "Weather"],
    "answer": "B",
}
RECORDS = {
    "hellaswag": (HELLASWAG, 3, 4),
    "piqa": (PIQA, 0, 2),
    "winogrande": (WINOGRANDE, 0, 2),
    "race_high": (RACE, 1, 4),
}


def write_split(tmp_path, rows, split="train"):
    (tmp_path / f"{split}.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    )
    return tmp_path


def spec(task, data_dir, **changes):
    """The built-in task's config, reading local files."""
    return dataset_preset(task, data_dir=str(data_dir), **changes)


@pytest.mark.parametrize("schema", list(RECORDS))
def test_schema_exact_record_parses(schema, tmp_path):
    record, gold, n_choices = RECORDS[schema]
    [example] = load_split(spec(schema, write_split(tmp_path, [record])), "train")
    assert example.gold == gold
    assert len(example.choices) == n_choices
    prompt = mcq(example, spec(schema, tmp_path).prompt)
    assert len(set(prompt.contexts)) == 1 and prompt.contexts[0].endswith("Answer:")
    assert prompt.continuations == [" A", " B", " C", " D"][:n_choices]
    for choice in example.choices:
        assert choice in prompt.contexts[0]


def test_hellaswag_context_and_piqa_question():
    [h] = load_split(spec("hellaswag", _dir(HELLASWAG)), "train")
    assert h.context == "Roof shingle removal: A man is sitting on a roof. he"
    [p] = load_split(spec("piqa", _dir(PIQA)), "train")
    assert p.question == PIQA["goal"] and p.choices == [PIQA["sol1"], PIQA["sol2"]]


def _dir(record):
    import tempfile
    from pathlib import Path

    return write_split(Path(tempfile.mkdtemp()), [record])


BROKEN = [
    ("hellaswag", {**HELLASWAG, "label": "7"}, "column 'label': label '7' out of range"),
    ("hellaswag", {**HELLASWAG, "label": ""}, "unlabelled split"),
    ("hellaswag", {**HELLASWAG, "endings": ["a", "b"]}, "column 'endings': 2 choices, expected 4"),
    ("piqa", {k: v for k, v in PIQA.items() if k != "sol2"}, "column 'sol2': empty"),  # null in a table
    ("piqa", {**PIQA, "label": 2}, "column 'label': label 2 out of range"),
    ("winogrande", {**WINOGRANDE, "answer": "3"}, "column 'answer': label '3' out of range, expected 1, 2"),
    ("race_high", {**RACE, "answer": "E"}, "column 'answer': label 'E' out of range"),
    ("race_high", {**RACE, "question": [5]}, "column 'question': expected text"),
    ("race_high", {**RACE, "question": " "}, "column 'question': empty"),
]


@pytest.mark.parametrize(("task", "record", "message"), BROKEN)
def test_broken_row_names_file_row_and_column(task, record, message, tmp_path):
    write_split(tmp_path, [RECORDS[task][0], record])
    with pytest.raises(DataError) as info:
        load_split(spec(task, tmp_path), "train")
    assert f"{tmp_path / 'train.jsonl'} row 2, " in str(info.value)
    assert message in str(info.value)


def test_column_missing_from_the_file(tmp_path):
    write_split(tmp_path, [PIQA])
    with pytest.raises(
        DataError, match=r"row 1, column 'question': missing \(the row has goal, sol1, sol2, label\)"
    ):
        load_split(spec("piqa", tmp_path, columns=ColumnSettings(choices=["sol1", "sol2"])), "train")


def test_template_column_names_the_template(tmp_path):
    record = {k: v for k, v in HELLASWAG.items() if k != "activity_label"}
    with pytest.raises(
        DataError, match=r"row 1, template '\{\{ activity_label \}\}: .*'activity_label' is undefined"
    ):
        load_split(spec("hellaswag", write_split(tmp_path, [record])), "train")


def test_invalid_json_line(tmp_path):
    write_split(tmp_path, [PIQA, "{not json"])
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON"):
        load_split(spec("piqa", tmp_path), "train")


def test_missing_file_and_empty_split(tmp_path):
    with pytest.raises(DataError, match=r"validation.jsonl not found"):
        load_split(spec("piqa", tmp_path), "validation")
    (tmp_path / "validation.csv").write_text("goal,sol1,sol2,label\n")
    with pytest.raises(DataError, match="split 'validation' is empty"):
        load_split(spec("piqa", tmp_path), "validation")
    write_split(tmp_path, [PIQA], "validation")
    with pytest.raises(
        DataError, match=r"validation.jsonl is ambiguous: dataset.data_dir needs one validation.jsonl"
    ):
        load_split(spec("piqa", tmp_path), "validation")
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(DataError, match="split 'train' is empty"):
        load_split(spec("piqa", tmp_path), "train")


def test_carve_validation_is_disjoint_and_seeded(tmp_path):
    rows = [{**PIQA, "goal": f"goal {i}"} for i in range(50)]
    examples = load_split(spec("piqa", write_split(tmp_path, rows)), "train")
    train, val = carve_validation(examples, 10, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert not {e.question for e in train} & {e.question for e in val}
    assert [e.question for e in carve_validation(examples, 10, seed=3)[1]] == [e.question for e in val]
