"""The stages' typed records: what finetune and eval wrote, and the manifest's entries. Every
reader goes through these classes (a damaged or foreign file is one `error:` line), never through
string keys; the method's own records, SearchResult and Selection, are in method/results.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexora_cli.errors import DamagedArtifactError
from flexora_cli.rundir import read_json


class JsonRecord:
    """to_json / from_json / read for a dataclass whose fields are JSON values."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, source: Path | str = "the file", stage: str | None = None):
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}  # fmt: skip
        missing = sorted(required - set(data)) if isinstance(data, dict) else ["(not an object)"]
        if missing:
            raise DamagedArtifactError(
                f"{source} lacks {', '.join(missing)}: it is damaged or from an older flexora; "
                f"rerun {f'`flexora {stage}`' if stage else 'the stage that writes it'} with force=true"
            )
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def read(cls, path: Path, stage: str, this_stage: str):
        """The record `stage` wrote at `path`, for `this_stage` (one clear line when missing)."""
        return cls.from_json(read_json(path, stage, this_stage), path, stage)


@dataclass(kw_only=True)
class TrainingRun(JsonRecord):
    """How a training stage ran: what search/alpha.json and finetune/train_log.json share."""

    steps: int
    seconds: float
    """Training seconds, the runs before a resume included."""
    padding_waste: float
    num_processes: int
    precision: str
    max_grad_norm: float
    nonfinite_steps_skipped: int
    history: list[dict] = field(default_factory=list)
    """Every log step's figures: step, the losses, grad_norm (and the search's α̂ and Σα̂)."""
    held_bytes: dict | None = None
    """Parameter and optimizer-state bytes the main process held, counted from its tensors (its
    shards under distributed=fsdp), beside the whole model's (fsdp.HeldBytes as JSON)."""
    partition: dict | None = None
    """dataset.partition's record (data.partition.PartitionRecord) when the rows were cut from one
    split; None: the whole train split."""


@dataclass
class FinetuneLog(TrainingRun):
    """finetune/train_log.json: what was trained and how the run went."""

    layers: list[int]
    trainable_params: int
    examples: int
    """Examples the steps saw (epochs × the training rows, or fewer for a fraction of an epoch)."""
    dataset_examples: int
    """Training rows in the part finetune read."""
    tokens_per_second: float | None


@dataclass
class Score:
    """One variant's scores on one dataset (metrics.json's results[dataset][variant])."""

    n: int
    acc: float | None = None
    acc_stderr: float | None = None
    acc_norm: float | None = None
    """lm-eval's acc_norm (the log-likelihood per character), where the task defines it."""
    acc_norm_stderr: float | None = None
    seconds: float | None = None
    loss: float | None = None
    """SFT: the mean cross-entropy per response token on the held-out rows."""
    perplexity: float | None = None
    """SFT: exp(loss)."""
    tokens: int | None = None
    """SFT: the response tokens the loss is taken over."""
    others: dict[str, float] = field(default_factory=dict)
    """Any other metric lm-eval reported for the task, by its name."""

    @classmethod
    def from_json(cls, data: dict) -> Score:
        names = {f.name for f in dataclasses.fields(cls)} - {"others"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, others={k: v for k, v in data.items() if k not in names})

    def to_json(self) -> dict[str, Any]:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "others" and v is not None}
        return fields | self.others


@dataclass
class EvalMetrics(JsonRecord):
    """eval/metrics.json: every dataset × variant's scores, and what scored them."""

    model: str
    format: str | None
    """The prompt format the built-in scorer used (None under lm-eval)."""
    variants: dict[str, str | None]
    """Variant → its adapter folder (None for the base)."""
    splits: dict[str, str]
    """Dataset → the split scored (`validation:test` for a partition's test part)."""
    results: dict[str, dict[str, Any]]
    """Dataset → variant → Score (JSON objects in the file)."""
    evaluator: str = "flexora"
    """flexora, or `lm-eval <version>`."""
    partitions: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.results = {
            dataset: {v: s if isinstance(s, Score) else Score.from_json(s) for v, s in scores.items()}
            for dataset, scores in self.results.items()
        }

    def score(self, dataset: str, variant: str) -> Score:
        return self.results[dataset][variant]

    def others(self, variant: str, metric: str) -> float | None:
        """The first value of lm-eval's `metric` (e.g. `exact_match,strict-match`) that any
        dataset or task reports for `variant` (None: none does)."""
        values = [s[variant].others.get(metric) for s in self.results.values() if variant in s]
        return next((v for v in values if v is not None), None)

    def to_json(self) -> dict[str, Any]:
        results = {d: {v: s.to_json() for v, s in scores.items()} for d, scores in self.results.items()}
        return {**dataclasses.asdict(self), "results": results}


@dataclass
class ManifestEntry(JsonRecord):
    """One stage folder's entry in manifest.json (and, once complete, its outputs.json)."""

    status: str
    """running, complete, failed or interrupted."""
    config_hash: str
    """manifest.stage_hash of the settings it ran with."""
    started: str | None = None
    ended: str | None = None
    pid: int | None = None
    folder: str | None = None
    """Its folder in out_dir (eval/<digest> for an eval with other eval settings)."""
    settings: dict | None = None
    """The settings its outputs depend on (manifest.stage_settings)."""
    inputs: dict[str, str | None] = field(default_factory=dict)
    """Upstream stage → the digest of its outputs this one was built from."""
    files: dict[str, dict] = field(default_factory=dict)
    """Output path → {size, sha256}."""
    digest: str | None = None
    """The digest of its outputs (logs left out) that downstream stages record as their input."""
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    """What the stage reported on completion (e.g. steps, accuracies), stored flat in the file."""

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @classmethod
    def from_json(cls, data: Any, source: Path | str = "the manifest", stage: str | None = None):
        names = {f.name for f in dataclasses.fields(cls)} - {"summary"}
        entry = super().from_json(data, source, stage)
        entry.summary = {k: v for k, v in data.items() if k not in names}
        return entry

    def to_json(self) -> dict[str, Any]:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "summary" and v is not None}
        return fields | self.summary
