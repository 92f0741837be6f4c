"""Pieces shared by the two training stages (search and finetune): setup, loss, optimizers."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import get_scheduler, set_seed

from flexora_cli.errors import TrainingError


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    set_seed(seed)


def answer_loss_sum(
    model: nn.Module, batch: dict, device: torch.device, keep_logits: bool = True
) -> torch.Tensor:
    """Summed cross-entropy over the answer tokens of a left-padded batch (batches.collate_left).

    Only the logits of the answer positions are computed (`logits_to_keep`, where the model takes
    it), which saves the LM head's matmul and memory over the context.
    """
    keep = batch["logits_to_keep"]
    inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "position_ids")}
    if keep_logits:
        inputs["logits_to_keep"] = keep
    logits = model(**inputs, use_cache=False).logits[:, -keep:-1].float()
    labels = batch["labels"][:, 1 - keep :].to(device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")


def check_finite(value: float, stage: str, step: int) -> float:
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
