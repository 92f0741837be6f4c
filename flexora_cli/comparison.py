"""The rows of `flexora compare`'s tables: one per run (dataset × variant × seed), and one per
dataset × variant summarising its runs over seeds (and, for random layers, over draws).

The spread over seeds (the std of the runs' accuracies) says how much a variant's result depends on
the training seed; the binomial stderr says how much it depends on which test rows were drawn.
The two are reported side by side, as neither stands in for the other. The Jaccard index of
Flexora's selected sets across seeds says how stable the selection is.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import statistics
from dataclasses import dataclass

RUN_COLUMNS = (
    "dataset",
    "variant",
    "layers",
    "trainable_params",
    "acc",
    "acc_stderr",
    "search_s",
    "finetune_s",
)
SUMMARY_COLUMNS = (
    "dataset",
    "variant",
    "runs",
    "layers",
    "trainable_params",
    "acc_mean",
    "acc_std",
    "acc_stderr",
    "jaccard",
    "search_s",
    "finetune_s",
)


@dataclass(frozen=True)
class RunRow:
    """One run's result: a variant trained with one seed, scored on the test rows."""

    dataset: str
    variant: str
    """base, flexora, lora_all, top_<k> or random_<draw>."""
    layers: list[int]
    trainable_params: int
    acc: float
    acc_stderr: float
    n: int
    search_s: float | None
    finetune_s: float | None
    seed: int | None = None
    """The training seed (None: the run's own seed, a one-seed compare)."""
    acc_norm: float | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def group(self) -> str:
        """The summary row this run belongs to: random draws pool into one."""
        return "random" if self.variant.startswith("random_") else self.variant

    def cells(self) -> list[str]:
        return [
            self.dataset,
            self.variant if self.seed is None else f"{self.variant} (seed {self.seed})",
            ",".join(str(i) for i in self.layers) or "–",
            f"{self.trainable_params:,}",
            f"{self.acc:.4f}",
            f"{self.acc_stderr:.4f}",
            seconds(self.search_s),
            seconds(self.finetune_s),
        ]


@dataclass(frozen=True)
class SummaryRow:
    """A variant over its runs on one dataset."""

    dataset: str
    variant: str
    runs: int
    layers: float
    """Mean number of layers with LoRA."""
    trainable_params: float
    acc_mean: float
    acc_std: float
    """Sample std of the runs' accuracies (0 for one run)."""
    acc_stderr: float
    """Mean binomial stderr of one run's accuracy (sqrt(p(1-p)/(n-1)), as lm-eval)."""
    n: int
    jaccard: float | None
    """Mean pairwise Jaccard index of the selected layer sets across seeds (None: one run, or
    layers that do not depend on the seed)."""
    search_s: float | None
    finetune_s: float | None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def cells(self) -> list[str]:
        return [
            self.dataset,
            self.variant,
            str(self.runs),
            f"{self.layers:.1f}",
            f"{self.trainable_params:,.0f}",
            f"{self.acc_mean:.4f}",
            f"{self.acc_std:.4f}",
            f"{self.acc_stderr:.4f}",
            "–" if self.jaccard is None else f"{self.jaccard:.2f}",
            seconds(self.search_s),
            seconds(self.finetune_s),
        ]


def summarise(rows: list[RunRow]) -> list[SummaryRow]:
    """One SummaryRow per dataset × variant group, in the order the runs first appear."""
    groups: dict[tuple[str, str], list[RunRow]] = {}
    for row in rows:
        groups.setdefault((row.dataset, row.group), []).append(row)
    return [_summary(dataset, variant, runs) for (dataset, variant), runs in groups.items()]


def _summary(dataset: str, variant: str, runs: list[RunRow]) -> SummaryRow:
    accs = [r.acc for r in runs]
    seed_dependent = variant not in ("base", "lora_all")  # their layers are the same on every seed
    return SummaryRow(
        dataset=dataset,
        variant=variant,
        runs=len(runs),
        layers=statistics.fmean(len(r.layers) for r in runs) if variant != "base" else 0.0,
        trainable_params=statistics.fmean(r.trainable_params for r in runs),
        acc_mean=statistics.fmean(accs),
        acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
        acc_stderr=statistics.fmean(r.acc_stderr for r in runs),
        n=runs[0].n,
        jaccard=mean_jaccard([r.layers for r in runs]) if seed_dependent and len(runs) > 1 else None,
        search_s=_mean(r.search_s for r in runs),
        finetune_s=_mean(r.finetune_s for r in runs),
    )


def jaccard(a: list[int], b: list[int]) -> float:
    """|a ∩ b| / |a ∪ b| (1 for two empty sets)."""
    union = set(a) | set(b)
    return len(set(a) & set(b)) / len(union) if union else 1.0


def mean_jaccard(sets: list[list[int]]) -> float:
    """The mean Jaccard index over every pair of `sets`."""
    return statistics.fmean(jaccard(a, b) for a, b in itertools.combinations(sets, 2))


def _mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def runs_csv(rows: list[RunRow]) -> str:
    """The per-run table as CSV (layers space-separated), with seed and n columns."""
    out = io.StringIO()
    writer = csv.writer(out)
    columns = (*RUN_COLUMNS, "seed", "n", "acc_norm")
    writer.writerow(columns)
    for row in rows:
        values = row.to_json()
        writer.writerow([" ".join(map(str, row.layers)) if k == "layers" else values[k] for k in columns])
    return out.getvalue()
