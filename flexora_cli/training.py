"""Pieces shared by the two training stages (search and finetune): setup, loss, optimizers."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import get_scheduler, set_seed

from flexora_cli.errors import TrainingError


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    set_seed(seed)


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Mean cross-entropy on the answer tokens (the context is labelled -100)."""
    batch = {key: value.to(device) for key, value in batch.items()}
    return model(**batch).loss


def check_finite(loss: torch.Tensor, stage: str, step: int) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(
            f"{stage}: loss is {value} at step {step}; stopped (checkpoints of earlier steps are kept); "
            f"lower the learning rate and rerun with force=true"
        )
    return value


def adamw_with_schedule(
    params: list[nn.Parameter],
    lr: float,
    weight_decay: float,
    scheduler: str,
    warmup_ratio: float,
    total_steps: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = get_scheduler(
        scheduler, optimizer, num_warmup_steps=int(warmup_ratio * total_steps), num_training_steps=total_steps
    )
    return optimizer, schedule


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
