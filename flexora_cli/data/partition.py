"""Seeded, disjoint, stratified train / test parts of one labelled split (`dataset.partition`).

The cut depends only on the rows' content and the partition's settings: rows are put in the order
of a hash of their content (not the file's order), shuffled with the partition's own seed within
each label (rows without one, SFT conversations, form one group), and then drawn label by label
in proportion (systematic stratified sampling), so that every prefix of the draw holds each
label's share to within one row. The train part is the
draw's first rows, the test part the next ones. The same settings give the same parts on any
machine; a changed seed or size gives other parts, and the row-id hashes in `PartitionRecord`
(written by every stage) tell which.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from typing import Protocol, TypeVar

from flexora_cli.errors import DataError
from flexora_cli.settings import PartitionSettings


class Recorded(Protocol):
    record: dict


Row = TypeVar("Row", bound=Recorded)


@dataclass(frozen=True)
class PartitionRecord:
    """Which rows each part holds, as written into search, finetune and eval's outputs."""

    split: str
    """The split that was cut."""
    seed: int
    stratified: bool
    rows: int
    """Rows in the split."""
    train: int
    """Rows in the train part."""
    test: int
    """Rows in the test part."""
    train_ids_sha256: str
    """sha256 of the train part's sorted row ids (each a hash of the row's content)."""
    test_ids_sha256: str

    def to_json(self) -> dict:
        return asdict(self)


def row_id(record: dict) -> str:
    """A row's identity: the sha256 of its content (column → value), independent of file order."""
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def part_sizes(spec: PartitionSettings, rows: int, where: str) -> tuple[int, int]:
    """(train, test) row counts for a split of `rows` rows; sizes it cannot hold are an error."""

    def size(value) -> int | None:
        if value is None:
            return None
        return round(value * rows) if isinstance(value, float) else int(value)

    train, test = size(spec.train), size(spec.test)
    train = rows - test if train is None else train
    test = rows - train if test is None else test
    if train < 1 or test < 1 or train + test > rows:
        raise DataError(
            f"{where}: dataset.partition train={spec.train}, test={spec.test} asks for {train} + {test} "
            f"rows of the {rows} that split '{spec.split}' has; give smaller sizes (each part needs >= 1 row)"
        )
    return train, test


def cut(
    examples: list[Row], spec: PartitionSettings, where: str
) -> tuple[list[Row], list[Row], PartitionRecord]:
    """(train part, test part, record) of one split's examples; each part in the split's order."""
    n_train, n_test = part_sizes(spec, len(examples), where)
    ids = [row_id(example.record) for example in examples]
    by_content = sorted(range(len(examples)), key=lambda i: (ids[i], i))
    groups: dict[int | None, list[int]] = {}
    for i in by_content:
        groups.setdefault(getattr(examples[i], "gold", None) if spec.stratify else None, []).append(i)
    rng = random.Random(spec.seed)
    draw_keys: list[tuple[float, int, int]] = []
    for label in sorted(groups, key=lambda g: -1 if g is None else g):
        members = groups[label]
        rng.shuffle(members)
        draw_keys += [
            ((j + 0.5) / len(members), -1 if label is None else label, i) for j, i in enumerate(members)
        ]
    draw = [i for *_, i in sorted(draw_keys)]
    train, test = sorted(draw[:n_train]), sorted(draw[n_train : n_train + n_test])
    record = PartitionRecord(
        split=spec.split or "",
        seed=spec.seed,
        stratified=spec.stratify,
        rows=len(examples),
        train=n_train,
        test=n_test,
        train_ids_sha256=_ids_hash(ids[i] for i in train),
        test_ids_sha256=_ids_hash(ids[i] for i in test),
    )
    return [examples[i] for i in train], [examples[i] for i in test], record


def _ids_hash(ids) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
