"""Rows of any multiple-choice or SFT table → examples, by the dataset config's mapping.

Rows come from `datasets.load_dataset` (a hub id, or local JSONL, CSV or Parquet files) or from a
`datasets.save_to_disk` folder (`load_from_disk`). The built-in tasks (recipes/dataset/) are
instances of the same mapping. A row that breaks it is an error naming the file, the row and the
column; nothing is skipped silently. SFT rows become conversations (data/conversations.py). One labelled split can be cut into seeded train / test parts
(`dataset.partition`, data/partition.py).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from flexora_cli.data.conversations import Conversation, parse_conversations
from flexora_cli.data.partition import PartitionRecord, cut
from flexora_cli.data.rows import LETTERS, Row
from flexora_cli.errors import DataError, first_line
from flexora_cli.settings import ColumnSettings, DatasetSettings

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""File suffix → the `datasets` builder that reads it."""


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question: the prompt pieces, the options and the gold index."""

    context: str
    """Text before the question (passage, scenario); may be empty."""
    question: str
    choices: list[str]
    gold: int
    record: dict = field(default_factory=dict, compare=False, repr=False)
    """The row, for prompt templates that use other columns."""
    where: str = field(default="", compare=False)
    """`file row N` (or `hub_id[split] row N`), for errors."""


def to_example(row: Row, columns: ColumnSettings, num_choices: int | None) -> MCExample:
    """One row through the mapping; `num_choices` (when known) is checked."""
    choices = row.choices(columns.choices)
    if num_choices is not None and len(choices) != num_choices:
        source = columns.choices if isinstance(columns.choices, str) else "choices"
        raise row.fail(
            source,
            f"{len(choices)} choices, expected {num_choices} as in "
            f"{'dataset.columns.num_choices' if columns.num_choices else 'the first row'}",
        )
    if len(choices) > len(LETTERS):
        raise row.fail(str(columns.choices), f"{len(choices)} choices; at most {len(LETTERS)} are supported")
    context = row.text(columns.context, allow_empty=True) if columns.context else ""
    return MCExample(
        context,
        row.text(columns.question),
        choices,
        row.label(columns.label, columns.label_format, choices),
        row.raw,
        row.where,
    )


def parse_rows(columns: ColumnSettings, rows: Iterable[tuple[str, object]]) -> list[MCExample]:
    """Map `(where, row)` pairs to examples; every row needs as many choices as the first."""
    examples: list[MCExample] = []
    for where, raw in rows:
        expected = columns.num_choices or (len(examples[0].choices) if examples else None)
        examples.append(to_example(Row(raw, where), columns, expected))
    return examples


def last_question_per_article(examples: list[MCExample]) -> list[MCExample]:
    """lm-eval's `race` grouping: one example per article (records sharing `example_id`), asking
    its last question with the earlier ones answered in the context, as lm-eval writes them."""
    articles: dict[str, list[MCExample]] = {}
    for example in examples:
        if "example_id" not in example.record or "article" not in example.record:
            raise DataError(
                f"{example.where}: dataset.race_grouping=article needs the 'example_id' and 'article' "
                "columns (ehovy/race schema) to group questions by article; use race_grouping=question"
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
        grouped.append(
            MCExample(text.rstrip("\n"), last.question, last.choices, last.gold, record, last.where)
        )
    return grouped


Example = MCExample | Conversation
"""One example of a split: a multiple-choice question (task mcq) or a conversation (task sft)."""


def load_split(spec: DatasetSettings, split: str) -> list[Example]:
    """All examples of one split: from a save_to_disk folder, local files, or the hub; parsed as
    the dataset's task reads them."""
    if saved_folder(spec):
        local, rows = f"{spec.data_dir}[{split}]", _saved_rows(Path(spec.data_dir), split)
    elif spec.data_files or spec.data_dir:
        local = split_file(spec, split)
        rows = _local_rows(local)
    else:
        local, rows = None, _hub_rows(spec, split)
    examples = parse_conversations(spec.sft, rows) if spec.task == "sft" else parse_rows(spec.columns, rows)
    if spec.race_grouping == "article":
        examples = last_question_per_article(examples)
    if not examples:
        raise DataError(
            f"{local or f'{spec.hub_id}[{split}]'}: split '{split}' is empty; give it at least one row"
        )
    return examples


@dataclass(frozen=True)
class Part:
    """The examples a stage reads, and the partition they were cut by (None: a whole split)."""

    examples: list[Example]
    partition: PartitionRecord | None = None

    def record(self) -> dict | None:
        """The partition as a stage writes it into its outputs."""
        return self.partition.to_json() if self.partition else None


def load_part(spec: DatasetSettings, part: str) -> Part:
    """The training examples (part="train": train_split) or the evaluation examples
    (part="test": eval_split); with dataset.partition, that part of the cut."""
    if spec.partition.split is None:
        return Part(load_split(spec, spec.train_split if part == "train" else spec.eval_split), None)
    return load_parts(spec)[0 if part == "train" else 1]


def load_parts(spec: DatasetSettings) -> tuple[Part, Part]:
    """(load_part(spec, "train"), load_part(spec, "test")), from one read of a partitioned split."""
    partition = spec.partition
    if partition.split is None:
        return load_part(spec, "train"), load_part(spec, "test")
    train, test, record = cut(load_split(spec, partition.split), partition, f"{spec.name}[{partition.split}]")
    return Part(train, record), Part(test, record)


def part_split(spec: DatasetSettings, part: str) -> str:
    """The name reports give the examples of load_part (e.g. validation, or validation:test)."""
    if spec.partition.split:
        return f"{spec.partition.split}:{part}"
    return spec.train_split if part == "train" else spec.eval_split


def saved_folder(spec: DatasetSettings) -> bool:
    """Is dataset.data_dir a `datasets.save_to_disk` folder (a DatasetDict, or one split)?"""
    if spec.data_files or not spec.data_dir:
        return False
    folder = Path(spec.data_dir).expanduser()
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _saved_rows(folder: Path, split: str) -> Iterable[tuple[str, object]]:
    """The rows of `split` in a save_to_disk folder; a one-split folder serves its own split only."""
    datasets = _quiet_datasets()
    folder = folder.expanduser()
    try:
        saved = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets and pyarrow raise many types; all mean "cannot read it"
        raise DataError(
            f"{folder}: not a readable datasets.save_to_disk folder ({first_line(exc)[:160]}); "
            "save it again with save_to_disk, or point dataset.data_dir at another folder"
        ) from exc
    if isinstance(saved, datasets.DatasetDict):
        available = list(saved)
        rows = saved.get(split)
    else:
        available = [saved.split and str(saved.split) or folder.name]
        rows = saved if split in available else None
    if rows is None:
        raise DataError(
            f"{folder} (a save_to_disk folder) has no '{split}' split, only {', '.join(available)}; "
            f"set dataset.train_split / dataset.eval_split to one of those, or cut train and test "
            f"parts from one with dataset.partition.split={available[0]}"
        )
    return ((f"{folder}[{split}] row {index}", dict(row)) for index, row in enumerate(rows, start=1))


def split_file(spec: DatasetSettings, split: str) -> Path:
    """The local file holding `split`: data_files[split], else data_dir/<split>.<jsonl|json|csv|parquet>."""
    if spec.data_files:
        if split not in spec.data_files:
            raise DataError(
                f"dataset.data_files has no '{split}' split (it names {', '.join(spec.data_files)}); "
                f"add {split}: FILE"
            )
        path = Path(spec.data_files[split]).expanduser()
        if not path.is_file():
            raise DataError(f"{path} not found: dataset.data_files.{split} names it; fix the path")
    else:
        found = [p for p in (Path(spec.data_dir) / f"{split}{s}" for s in BUILDERS) if p.is_file()]
        if len(found) != 1:
            problem = "not found" if not found else "is ambiguous"
            raise DataError(
                f"{Path(spec.data_dir) / split}.jsonl {problem}: dataset.data_dir needs one {split}.jsonl, "
                f"{split}.csv or {split}.parquet (or set dataset.data_files, or unset dataset.data_dir "
                f"to load {spec.hub_id or 'a hub dataset'})"
            )
        path = found[0]
    if path.suffix not in BUILDERS:
        raise DataError(f"{path}: unknown file type '{path.suffix}'; use .jsonl, .json, .csv or .parquet")
    return path


def _quiet_datasets():
    import datasets  # imported here: slow

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a parse failure is our one error line
    return datasets


def _local_rows(path: Path) -> Iterable[tuple[str, object]]:
    datasets = _quiet_datasets()
    try:
        rows = datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train")
    except Exception as exc:  # pyarrow and datasets raise many types; all mean "cannot parse"
        if _no_rows(path):
            return []
        raise DataError(_unreadable(path, exc)) from exc
    return ((f"{path} row {index}", row) for index, row in enumerate(rows, start=1))


def _no_rows(path: Path) -> bool:
    """A text file with nothing but blank lines (and, for CSV, a header) holds no rows."""
    if path.suffix == ".parquet":
        return False
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        return False
    return len(lines) <= (1 if path.suffix == ".csv" else 0)


def _unreadable(path: Path, exc: Exception) -> str:
    """One line naming why the file cannot be parsed (the first bad line, for JSON Lines)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as read_error:
        return f"{path}: cannot read ({read_error}); check the file's permissions and encoding (UTF-8)"
    if BUILDERS[path.suffix] == "json":
        for number, line in enumerate(lines, start=1):
            try:
                line.strip() and json.loads(line)
            except json.JSONDecodeError as bad:
                return f"{path}:{number}: not valid JSON ({bad.msg}); one JSON object per line"
    cause = exc.__cause__ or exc
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return f"{path}: cannot be read as {path.suffix[1:].upper()} ({first[:200]}); fix the file"


def _hub_rows(spec: DatasetSettings, split: str) -> Iterable[tuple[str, object]]:
    datasets = _quiet_datasets()
    try:
        rows = datasets.load_dataset(spec.hub_id, spec.hub_config, split=split)
    except Exception as exc:  # the hub client raises many types; all mean "cannot get the data"
        raise DataError(
            f"cannot load {spec.hub_id} ({spec.hub_config or 'default'}) split '{split}' from the hub: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            f"check the id and network, or set dataset.data_dir=DIR with local files"
        ) from exc
    return ((f"{spec.hub_id}[{split}] row {index}", dict(row)) for index, row in enumerate(rows, start=1))


def carve_validation(
    examples: list[Example], val_samples: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split training examples into (train, α-validation), disjoint, with a fixed seed."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val = [examples[i] for i in order[:val_samples]]
    train = [examples[i] for i in order[val_samples:]]
    return train, val
