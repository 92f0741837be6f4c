"""Examples → the training rows search, finetune and the SFT eval run on, by the dataset's task:
mcq trains on the gold choice's continuation in the run's prompt format, sft on the assistant
turns. Rows cut to max_length are reported in one line, never silently."""

from __future__ import annotations

from flexora_cli import report
from flexora_cli.data.batches import training_features
from flexora_cli.data.collate import TrainingRow
from flexora_cli.data.datasets import Example
from flexora_cli.data.prompts import model_prompts
from flexora_cli.data.sft import sft_rows
from flexora_cli.settings import DatasetSettings, Settings


def training_rows(
    examples: list[Example], dataset: DatasetSettings, settings: Settings, tokenizer, stage: str
) -> list[TrainingRow]:
    """Each example's row: tokens, and labels -100 wherever no loss is taken."""
    if dataset.task == "sft":
        rows, truncation = sft_rows(examples, tokenizer, settings.model, settings.max_length)
        if message := truncation.describe(settings.max_length):
            report.warn(f"{stage}: {dataset.name}: {message}")
        return rows
    prompts = model_prompts(examples, dataset, settings.format, tokenizer, settings.model)
    return training_features(tokenizer, prompts, settings.max_length)
