"""Hub or local-JSONL records → multiple-choice examples, one parser per hub schema.

A record that breaks its schema is an error naming the file, line and field; nothing is skipped
silently. Local files are `<data_dir>/<split>.jsonl` in exactly the hub's schema.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from flexora_cli.errors import DataError
from flexora_cli.settings import DatasetSettings


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question: the prompt pieces, the options and the gold index."""

    schema: str
    """The hub schema the record came from (hellaswag, piqa, winogrande, race)."""
    context: str
    """Text before the question (passage, scenario); may be empty."""
    question: str
    choices: list[str]
    gold: int
    record: dict = field(default_factory=dict, compare=False, repr=False)
    """The raw record, for prompt formats that need schema-specific fields (already validated)."""


class _Record:
    """Typed field access that reports `where: field 'x': problem`."""

    def __init__(self, raw: object, where: str):
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        self.raw, self.where = raw, where

    def fail(self, key: str, problem: str) -> DataError:
        return DataError(f"{self.where}: field '{key}': {problem}")

    def text(self, key: str, allow_empty: bool = False) -> str:
        if key not in self.raw:
            raise self.fail(key, "missing")
        value = self.raw[key]
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise self.fail(key, "empty")
        return value

    def texts(self, key: str, count: int) -> list[str]:
        if key not in self.raw:
            raise self.fail(key, "missing")
        value = self.raw[key]
        if not isinstance(value, list) or len(value) != count or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"expected a list of {count} strings, got {json.dumps(value)[:80]}")
        return value

    def label(self, key: str, valid: list[str]) -> int:
        """Index of the label among `valid` (ints and digit strings are accepted alike)."""
        if key not in self.raw:
            raise self.fail(key, "missing")
        value = str(self.raw[key]).strip()
        if value not in valid:
            shown = self.raw[key]
            hint = " (unlabelled split? evaluate on a labelled one)" if value in ("", "-1", "None") else ""
            raise self.fail(key, f"label {shown!r} out of range, expected one of {', '.join(valid)}{hint}")
        return valid.index(value)


def _hellaswag(rec: _Record) -> MCExample:
    context = f"{rec.text('activity_label')}: {rec.text('ctx')}"
    endings = rec.texts("endings", 4)
    rec.text("ctx_a"), rec.text("ctx_b", allow_empty=True)  # the completion format's context
    return MCExample(
        "hellaswag",
        context,
        "Which ending makes the most sense?",
        endings,
        rec.label("label", ["0", "1", "2", "3"]),
        rec.raw,
    )


def _piqa(rec: _Record) -> MCExample:
    return MCExample(
        "piqa",
        "",
        rec.text("goal"),
        [rec.text("sol1"), rec.text("sol2")],
        rec.label("label", ["0", "1"]),
        rec.raw,
    )


def _winogrande(rec: _Record) -> MCExample:
    sentence = rec.text("sentence")
    if sentence.count("_") != 1:
        raise rec.fail("sentence", f"expected exactly one '_' blank, found {sentence.count('_')}")
    options = [rec.text("option1"), rec.text("option2")]
    return MCExample(
        "winogrande",
        sentence,
        "Which option best fills the blank (_)?",
        options,
        rec.label("answer", ["1", "2"]),
        rec.raw,
    )


def _race(rec: _Record) -> MCExample:
    options = rec.texts("options", 4)
    gold = rec.label("answer", ["A", "B", "C", "D"])
    return MCExample("race", f"Article: {rec.text('article')}", rec.text("question"), options, gold, rec.raw)


PARSERS: dict[str, Callable[[_Record], MCExample]] = {
    "hellaswag": _hellaswag,
    "piqa": _piqa,
    "winogrande": _winogrande,
    "race": _race,
}


def parse_records(schema: str, records: Iterable[tuple[str, object]]) -> list[MCExample]:
    """Parse `(where, raw_record)` pairs with the schema's parser."""
    parser = PARSERS[schema]
    return [parser(_Record(raw, where)) for where, raw in records]


def last_question_per_article(examples: list[MCExample]) -> list[MCExample]:
    """lm-eval's `race` grouping: one example per article (records sharing `example_id`), asking
    its last question with the earlier ones answered in the context, as lm-eval writes them."""
    articles: dict[str, list[MCExample]] = {}
    for example in examples:
        if "example_id" not in example.record:
            raise DataError(
                "dataset.race_grouping=article needs the 'example_id' field (ehovy/race schema) to "
                "group questions by article; use race_grouping=question for these records"
            )
        articles.setdefault(example.record["example_id"], []).append(example)
    grouped = []
    for questions in articles.values():
        *earlier, last = questions
        text = f"Article: {last.record['article']}\n\n"
        for problem in earlier:
            answer = problem.choices[problem.gold]
            if problem.question[-6:] == "  _  .":  # a cloze question: fill the blank inline
                text += problem.question[:-5] + answer + "\n"
            else:
                text += f"Question: {problem.question}\nAnswer: {answer}\n"
        record = {**last.record, "lm_eval_text": text + last.question}
        grouped.append(MCExample("race", text.rstrip("\n"), last.question, last.choices, last.gold, record))
    return grouped


def load_split(spec: DatasetSettings, split: str) -> list[MCExample]:
    """All examples of one split, from `spec.data_dir` if set, else from the hub."""
    records = _local_records(spec, split) if spec.data_dir else _hub_records(spec, split)
    examples = parse_records(spec.schema, records)
    if spec.schema == "race" and spec.race_grouping == "article":
        examples = last_question_per_article(examples)
    if not examples:
        source = Path(spec.data_dir) / f"{split}.jsonl" if spec.data_dir else f"{spec.hub_id}[{split}]"
        raise DataError(f"{source}: split '{split}' is empty; give it at least one record")
    return examples


def _local_records(spec: DatasetSettings, split: str) -> Iterable[tuple[str, object]]:
    path = Path(spec.data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(
            f"{path} not found: dataset.data_dir needs {split}.jsonl in the {spec.schema} hub schema "
            f"(or unset dataset.data_dir to load {spec.hub_id or 'the hub dataset'})"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: cannot read ({exc}); check the file's permissions and encoding (UTF-8)"
        ) from exc
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg}); one JSON object per line") from exc
    return records


def _hub_records(spec: DatasetSettings, split: str) -> Iterable[tuple[str, object]]:
    import datasets  # imported here: slow, and not needed for local files

    try:
        rows = datasets.load_dataset(spec.hub_id, spec.hub_config, split=split)
    except Exception as exc:  # the hub client raises many types; all mean "cannot get the data"
        raise DataError(
            f"cannot load {spec.hub_id} ({spec.hub_config or 'default'}) split '{split}' from the hub: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            f"check the id and network, or set dataset.data_dir=DIR with local JSONL files"
        ) from exc
    return ((f"{spec.hub_id}[{split}] row {index}", dict(row)) for index, row in enumerate(rows))


def carve_validation(
    examples: list[MCExample], val_samples: int, seed: int
) -> tuple[list[MCExample], list[MCExample]]:
    """Split training examples into (train, α-validation), disjoint, with a fixed seed."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val = [examples[i] for i in order[:val_samples]]
    train = [examples[i] for i in order[val_samples:]]
    return train, val
