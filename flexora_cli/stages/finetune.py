"""Stage 4a — fine-tune fresh LoRA on the selected layers only; save a standard PEFT adapter.

Unselected layers carry no adapter at all (peft `layers_to_transform`), so the adapter in
finetune/adapter/ loads with plain `PeftModel.from_pretrained(base, dir)`. Backward stops at the
lowest selected layer: nothing below it requires grad. One optimizer step per global batch
(finetune.batch_size examples over all processes, engine.py); a checkpoint's step fixes the data
position.
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
from flexora_cli.engine import Engine
from flexora_cli.modeling import attach_lora, load_model, load_tokenizer
from flexora_cli.rundir import read_json
from flexora_cli.settings import Settings
from flexora_cli.stages import locked, setup
from flexora_cli.training import (
    adamw_with_schedule,
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
    engine = Engine(settings)
    seed_everything(settings.seed)

    examples = load_split(settings.dataset, settings.dataset.train_split)[
        : settings.dataset.max_train_samples
    ]
    tokenizer = load_tokenizer(settings.model)
    features = training_features(tokenizer, build_prompts(examples, settings.format), settings.max_length)
    batches = Batches(features, spec.batch_size, settings.seed, settings.group_by_length)

    base = load_model(settings.model, engine.device, engine.precision)
    peft_model = attach_lora(base, settings.model, settings.lora, layers, settings.gradient_checkpointing)
    params = trainable_parameters(peft_model)
    total_steps = max(1, math.ceil(spec.epochs * len(batches)))
    optimizer, schedule = adamw_with_schedule(
        params, spec.lr, spec.weight_decay, spec.scheduler, spec.warmup_ratio, total_steps
    )
    trained = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    model, optimizer = engine.prepare(peft_model, optimizer)
    stateful = {"optimizer": optimizer, "scheduler": schedule} | engine.scaler_state()
    checkpoints = Checkpoints(run_dir, "finetune", settings, trained, stateful, engine)
    step, history = checkpoints.resume()
    run_dir.begin_stage("finetune", settings)
    engine.start_tracking("finetune", settings)

    # -- loop: one optimizer step per global batch ---------------------------------------------
    started, tokens = time.time(), 0
    epoch, offset = divmod(step, len(batches))
    model.train()
    with report.progress("finetune", total_steps) as bar, StopRequest() as stop:
        bar.update(0, completed=step)
        while step < total_steps:
            for rows in batches.epoch(epoch, offset):
                result = engine.forward_backward(model, rows, spec.grad_accum, tokenizer.pad_token_id)
                step += 1
                check_finite(result.loss, "finetune", step)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                tokens += sum(len(row["input_ids"]) for row in rows)
                if step % spec.log_every == 0 or step == total_steps:
                    lr = schedule.get_last_lr()[0]
                    history.append({"step": step, "train_loss": result.loss, "lr": lr})
                    engine.log({"loss/train": result.loss, "lr": lr}, step)
                bar.update(0, advance=1, info=f"loss {result.loss:.3f}")
                checkpoints.after_step(step, history, stop)
                if step >= total_steps:
                    break
            epoch, offset = epoch + 1, 0

    state = engine.full_state_dict(model)  # every process takes part in the gather (FSDP)
    with run_dir.atomic_dir(run_dir.adapter_dir) as tmp:
        engine.unwrap(model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
    seconds, this_run = checkpoints.elapsed(), time.time() - started  # tokens count this run only
    result = {
        "layers": layers,
        "trainable_params": sum(p.numel() for p in params),
        "steps": total_steps,
        "examples": len(examples),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / this_run, 1) if this_run else None,
        "padding_waste": round(engine.padding_waste(), 4),
        "num_processes": engine.num_processes,
        "precision": engine.precision,
        "history": history,
    }
    run_dir.write_json(run_dir.finetune_log_json, result)
    if history:
        run_dir.save_figure(run_dir.finetune_loss_png, lambda: report.plot_losses(history, ("train_loss",)))
    run_dir.end_stage("finetune", steps=total_steps)
    checkpoints.clear()
    engine.end_tracking()
    facts = [
        f"LoRA on layers {layers}: {result['trainable_params']:,} parameters",
        f"{total_steps} steps in {seconds:.0f}s on {engine.num_processes} process(es), {engine.precision}; "
        f"padding {result['padding_waste']:.0%} of tokens",
    ]
    files = [
        run_dir.adapter_dir,
        run_dir.finetune_log_json,
        run_dir.finetune_loss_png,
        run_dir.root / "logs" / "finetune",
    ]
    report.console.print(report.stage_panel("finetune", facts, files))
    return result
