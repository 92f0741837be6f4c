"""The rows of `flexora compare`'s tables: one per run (dataset × variant × seed), and one per
dataset × variant summarising its runs over seeds (and, for random layers, over draws).

On SFT data the rows carry held-out loss and exact match instead of accuracy (SFT_RUN_COLUMNS).
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
SFT_RUN_COLUMNS = (
    "dataset",
    "variant",
    "layers",
    "trainable_params",
    "loss",
    "perplexity",
    "exact_match",
    "em_flexible",
    "search_s",
    "finetune_s",
)
"""SFT data: held-out response loss and perplexity, and lm-eval's exact match (strict: the
`#### <number>` line; flexible: the last number written) where the eval ran a generative task."""
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
SFT_SUMMARY_COLUMNS = (
    "dataset",
    "variant",
    "runs",
    "layers",
    "trainable_params",
    "loss_mean",
    "loss_std",
    "exact_match_mean",
    "exact_match_std",
    "jaccard",
    "search_s",
    "finetune_s",
)


def is_sft(rows: list[RunRow]) -> bool:
    """Do these runs score SFT data (held-out loss) rather than accuracy?"""
    return any(row.loss is not None for row in rows)


def run_columns(rows: list[RunRow]) -> tuple[str, ...]:
    return SFT_RUN_COLUMNS if is_sft(rows) else RUN_COLUMNS


def summary_columns(rows: list[SummaryRow]) -> tuple[str, ...]:
    sft = any(row.loss_mean is not None for row in rows)
    return SFT_SUMMARY_COLUMNS if sft else SUMMARY_COLUMNS


@dataclass(frozen=True)
class RunRow:
    """One run's result: a variant trained with one seed, scored on the test rows."""

    dataset: str
    variant: str
    """base, flexora, lora_all, top_<k> or random_<draw>."""
    layers: list[int]
    trainable_params: int
    acc: float | None
    """Multiple choice; None for SFT data."""
    acc_stderr: float | None
    n: int
    search_s: float | None
    finetune_s: float | None
    seed: int | None = None
    """The training seed (None: the run's own seed, a one-seed compare)."""
    acc_norm: float | None = None
    loss: float | None = None
    """SFT: held-out loss per response token."""
    perplexity: float | None = None
    exact_match: float | None = None
    """SFT with a generative lm-eval task: exact match, strict (gsm8k: the `#### <number>` line)."""
    em_flexible: float | None = None
    """The same, flexible (gsm8k: the last number in the response)."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def group(self) -> str:
        """The summary row this run belongs to: random draws pool into one."""
        return "random" if self.variant.startswith("random_") else self.variant

    def cells(self, columns: tuple[str, ...] = RUN_COLUMNS) -> list[str]:
        values = self.to_json()
        values["variant"] = self.variant if self.seed is None else f"{self.variant} (seed {self.seed})"
        values["layers"] = ",".join(str(i) for i in self.layers) or "–"
        values["trainable_params"] = f"{self.trainable_params:,}"
        values["search_s"], values["finetune_s"] = seconds(self.search_s), seconds(self.finetune_s)
        return [_cell(values[column]) for column in columns]


@dataclass(frozen=True)
class SummaryRow:
    """A variant over its runs on one dataset."""

    dataset: str
    variant: str
    runs: int
    layers: float
    """Mean number of layers with LoRA."""
    trainable_params: float
    acc_mean: float | None
    acc_std: float | None
    """Sample std of the runs' accuracies (0 for one run)."""
    acc_stderr: float | None
    """Mean binomial stderr of one run's accuracy (sqrt(p(1-p)/(n-1)), as lm-eval)."""
    n: int
    jaccard: float | None
    """Mean pairwise Jaccard index of the selected layer sets across seeds (None: one run, or
    layers that do not depend on the seed)."""
    search_s: float | None
    finetune_s: float | None
    loss_mean: float | None = None
    loss_std: float | None = None
    exact_match_mean: float | None = None
    exact_match_std: float | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def cells(self, columns: tuple[str, ...] = SUMMARY_COLUMNS) -> list[str]:
        values = self.to_json()
        values["runs"], values["layers"] = str(self.runs), f"{self.layers:.1f}"
        values["trainable_params"] = f"{self.trainable_params:,.0f}"
        values["jaccard"] = "–" if self.jaccard is None else f"{self.jaccard:.2f}"
        values["search_s"], values["finetune_s"] = seconds(self.search_s), seconds(self.finetune_s)
        return [_cell(values[column]) for column in columns]


def _cell(value) -> str:
    """Metrics to 4 decimals, missing ones as –, the rest as they are."""
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summarise(rows: list[RunRow]) -> list[SummaryRow]:
    """One SummaryRow per dataset × variant group, in the order the runs first appear."""
    groups: dict[tuple[str, str], list[RunRow]] = {}
    for row in rows:
        groups.setdefault((row.dataset, row.group), []).append(row)
    return [_summary(dataset, variant, runs) for (dataset, variant), runs in groups.items()]


def _summary(dataset: str, variant: str, runs: list[RunRow]) -> SummaryRow:
    seed_dependent = variant not in ("base", "lora_all")  # their layers are the same on every seed
    acc_mean, acc_std = _mean_std([r.acc for r in runs])
    loss_mean, loss_std = _mean_std([r.loss for r in runs])
    em_mean, em_std = _mean_std([r.exact_match for r in runs])
    return SummaryRow(
        dataset=dataset,
        variant=variant,
        runs=len(runs),
        layers=statistics.fmean(len(r.layers) for r in runs) if variant != "base" else 0.0,
        trainable_params=statistics.fmean(r.trainable_params for r in runs),
        acc_mean=acc_mean,
        acc_std=acc_std,
        acc_stderr=_mean(r.acc_stderr for r in runs),
        n=runs[0].n,
        jaccard=mean_jaccard([r.layers for r in runs]) if seed_dependent and len(runs) > 1 else None,
        search_s=_mean(r.search_s for r in runs),
        finetune_s=_mean(r.finetune_s for r in runs),
        loss_mean=loss_mean,
        loss_std=loss_std,
        exact_match_mean=em_mean,
        exact_match_std=em_std,
    )


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample std; 0 for one value) of the values present; (None, None) when none is."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else 0.0


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
    columns = (*run_columns(rows), "seed", "n") + (() if is_sft(rows) else ("acc_norm",))
    writer.writerow(columns)
    for row in rows:
        values = row.to_json()
        writer.writerow([" ".join(map(str, row.layers)) if k == "layers" else values[k] for k in columns])
    return out.getvalue()
