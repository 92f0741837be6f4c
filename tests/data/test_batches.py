"""Training batches: seeded, resumable, every example once per epoch, length-grouped; left padding."""

from __future__ import annotations

import random

from flexora_cli.data.batches import Batches
from flexora_cli.data.collate import TrainingRow


def features(n: int, seed: int = 0) -> list[TrainingRow]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        context, answer = rng.randint(1, 60), rng.randint(1, 4)
        rows.append(TrainingRow.of([7] * context, [5] * answer))
    return rows


def padding(batches: list[list[dict]]) -> float:
    slots = sum(len(b) * max(len(r) for r in b) for b in batches)
    return 1 - sum(len(r) for b in batches for r in b) / slots


def test_each_epoch_holds_every_example_once_in_a_seeded_order():
    for grouped in (True, False):
        batches = Batches(features(203), 8, seed=3, group_by_length=grouped)
        first, again, second = (
            batches.order(0),
            Batches(features(203), 8, 3, grouped).order(0),
            batches.order(1),
        )
        assert sorted(i for b in first for i in b) == list(range(203)) and len(first) == len(batches) == 26
        assert first == again and first != second
        assert list(batches.epoch(0, skip=5))[0] == [batches.features[i] for i in first[5]]


def test_length_grouping_cuts_padding():
    rows = features(800)
    grouped, plain = (list(Batches(rows, 8, 0, g).epoch(0)) for g in (True, False))
    assert padding(grouped) < 0.2 * padding(plain)
