"""Stage 4a — fine-tune fresh LoRA on the selected layers only; save a standard PEFT adapter.

Unselected layers carry no adapter at all (peft `layers_to_transform`), so the adapter in
finetune/adapter/ loads with plain `PeftModel.from_pretrained(base, dir)`.
"""

from __future__ import annotations

import math
import time

from omegaconf import DictConfig

from flexora_cli import report
from flexora_cli.checkpoint import Checkpoints, StopRequest
from flexora_cli.data.batches import Batches, training_features
from flexora_cli.data.datasets import load_split
from flexora_cli.data.prompts import build_prompts
from flexora_cli.modeling import attach_lora, load_model, load_tokenizer, resolve_device
from flexora_cli.rundir import read_json
from flexora_cli.settings import Settings
from flexora_cli.stages import locked, setup
from flexora_cli.training import (
    adamw_with_schedule,
    answer_loss,
    check_finite,
    seed_everything,
    trainable_parameters,
)


@locked
def run(cfg: DictConfig | Settings) -> dict:
    settings, run_dir = setup(cfg)
    spec = settings.finetune
    layers = read_json(run_dir.selection_json, "select", "finetune")["layers"]
    run_dir.check_upstream("select", "finetune", settings)
    device = resolve_device(settings.device)
    seed_everything(settings.seed)

    examples = load_split(settings.dataset, settings.dataset.train_split)[
        : settings.dataset.max_train_samples
    ]
    tokenizer = load_tokenizer(settings.model)
    features = training_features(tokenizer, build_prompts(examples, settings.format), settings.max_length)
    batches = Batches(tokenizer, features, spec.batch_size, settings.seed)

    model = attach_lora(load_model(settings.model, device), settings.model, settings.lora, layers)
    params = trainable_parameters(model)
    total_steps = max(1, math.ceil(spec.epochs * len(batches) / spec.grad_accum))
    optimizer, schedule = adamw_with_schedule(
        params, spec.lr, spec.weight_decay, spec.scheduler, spec.warmup_ratio, total_steps
    )
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizers = {"optimizer": optimizer, "scheduler": schedule}
    checkpoints = Checkpoints(run_dir, "finetune", settings, trained, optimizers)
    step, history = checkpoints.resume()
    run_dir.begin_stage("finetune", settings)

    # -- loop: checkpoints fall on optimizer steps, so the data position is step × grad_accum ----
    micro, started, running = step * spec.grad_accum, time.time(), 0.0
    epoch, offset = divmod(micro, len(batches))
    model.train()
    with report.progress("finetune", total_steps) as bar, StopRequest() as stop:
        bar.update(0, completed=step)
        while step < total_steps:
            for batch in batches.epoch(epoch, offset):
                loss = answer_loss(model, batch, device) / spec.grad_accum
                running += check_finite(loss, "finetune", step + 1)
                loss.backward()
                micro += 1
                if micro % spec.grad_accum:
                    continue
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % spec.log_every == 0 or step == total_steps:
                    history.append({"step": step, "train_loss": running, "lr": schedule.get_last_lr()[0]})
                bar.update(0, advance=1, info=f"loss {running:.3f}")
                running = 0.0
                checkpoints.after_step(step, history, stop)
                if step >= total_steps:
                    break
            epoch, offset = epoch + 1, 0

    with run_dir.atomic_dir(run_dir.adapter_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    result = {
        "layers": layers,
        "trainable_params": sum(p.numel() for p in params),
        "steps": total_steps,
        "examples": len(examples),
        "seconds": round(time.time() - started, 2),
        "history": history,
    }
    run_dir.write_json(run_dir.finetune_log_json, result)
    if history:
        run_dir.save_figure(run_dir.finetune_loss_png, report.plot_losses(history, ("train_loss",)))
    run_dir.end_stage("finetune", steps=total_steps)
    checkpoints.clear()
    report.console.print(
        f"finetune: LoRA on layers {layers} ({result['trainable_params']:,} parameters), {total_steps} steps; "
        f"wrote {run_dir.adapter_dir}"
    )
    return result
