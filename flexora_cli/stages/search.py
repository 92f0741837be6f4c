"""Stage 2 — the Flexora search: fit one gate α̂ per layer, write the ranking.

LoRA sits on every layer's target modules, gated by αᵢ = N·softmax(α̂)ᵢ. Each step alternates
  1. a LoRA step on a training batch (α held fixed), with AdamW and a cosine schedule;
  2. an α step on a validation batch carved from the training split (θ held fixed), with Adam.
The α gradient is the direct (first-order) gradient of the validation loss, as in the public code.
Every `checkpoint_every` steps (and on SIGINT/SIGTERM) a checkpoint is written; rerunning the same
command continues from the newest one exactly (checkpoint.py).
Output: search/alpha.json {alpha, ranking, num_layers, history, ...}, alpha.png, loss.png.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from flexora_cli import report
from flexora_cli.checkpoint import Checkpoints, StopRequest
from flexora_cli.data.batches import Batches, training_features
from flexora_cli.data.datasets import carve_validation, load_split
from flexora_cli.data.prompts import build_prompts
from flexora_cli.engine import Engine, StepResult
from flexora_cli.errors import ConfigError
from flexora_cli.gates import GatedModel, LayerGates
from flexora_cli.modeling import (
    attach_lora,
    get_layers,
    load_model,
    load_tokenizer,
    lora_params_per_layer,
)
from flexora_cli.settings import Settings
from flexora_cli.stages import locked, planted_layers, setup
from flexora_cli.training import (
    adamw_with_schedule,
    check_finite,
    seed_everything,
    trainable_parameters,
)


@locked
def run(cfg: DictConfig | Settings) -> dict:
    settings, run_dir = setup(cfg)
    search = settings.search
    engine = Engine(settings)
    seed_everything(settings.seed)

    # -- data: the budget for LoRA steps, a disjoint carve-out for α steps --------------------
    examples = load_split(settings.dataset, settings.dataset.train_split)
    if search.budget + search.val_samples > len(examples):
        raise ConfigError(
            f"search.budget={search.budget} + search.val_samples={search.val_samples} exceeds the "
            f"{len(examples)} examples of {settings.dataset.name}[{settings.dataset.train_split}]; "
            f"lower search.budget or search.val_samples"
        )
    train_pool, val_examples = carve_validation(examples, search.val_samples, settings.seed)
    tokenizer = load_tokenizer(settings.model)

    def batches(subset: list, seed: int) -> Batches:
        features = training_features(tokenizer, build_prompts(subset, settings.format), settings.max_length)
        return Batches(features, search.batch_size, seed, settings.group_by_length)

    train_batches = batches(train_pool[: search.budget], settings.seed)
    val_batches = batches(val_examples, settings.seed + 1)

    # -- model: LoRA on every layer, one gate per layer, wrapped by accelerate (DDP/FSDP) -----
    base = load_model(settings.model, engine.device, engine.precision)
    params_per_layer = lora_params_per_layer(base, settings.model, settings.lora)
    model, gates = gated_lora_model(base, settings)
    total_steps = search.epochs * len(train_batches)
    optimizer, schedule = adamw_with_schedule(
        trainable_parameters(model.lm),
        search.lr,
        search.weight_decay,
        "cosine",
        search.warmup_ratio,
        total_steps,
    )
    alpha_optimizer = torch.optim.Adam(gates.parameters(), lr=search.alpha_lr)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    model, optimizer, alpha_optimizer = engine.prepare(model, optimizer, alpha_optimizer)
    stateful = {"optimizer": optimizer, "scheduler": schedule, "alpha_optimizer": alpha_optimizer}
    checkpoints = Checkpoints(run_dir, "search", settings, trained, stateful | engine.scaler_state(), engine)
    step, history = checkpoints.resume()
    run_dir.begin_stage("search", settings)
    engine.start_tracking("search", settings)

    # -- loop ---------------------------------------------------------------------------------
    first_epoch, offset = divmod(step, len(train_batches))
    val_stream = val_batches.forever(skip=step)
    model.train()
    with report.progress("search", total_steps) as bar, StopRequest() as stop:
        bar.update(0, completed=step)
        for epoch in range(first_epoch, search.epochs):
            for rows in train_batches.epoch(epoch, offset if epoch == first_epoch else 0):
                step += 1
                train, val = alternate_step(
                    engine, model, rows, next(val_stream), search.grad_accum, tokenizer.pad_token_id,
                    (optimizer, schedule, alpha_optimizer), step,
                )  # fmt: skip
                if step % search.log_every == 0 or step == total_steps:
                    alpha = [round(a, 6) for a in gates.alpha_hat.tolist()]
                    history.append(
                        {"step": step, "train_loss": train.loss, "val_loss": val.loss, "alpha": alpha}
                    )
                    layer_alphas = {f"alpha/layer_{i:02d}": a for i, a in enumerate(alpha)}
                    engine.log({"loss/train": train.loss, "loss/val": val.loss, **layer_alphas}, step)
                top = ",".join(str(i) for i in gates.ranking()[:3])
                bar.update(0, advance=1, info=f"loss {train.loss:.3f} val {val.loss:.3f} top {top}")
                checkpoints.after_step(step, history, stop)

    # -- save ---------------------------------------------------------------------------------
    alpha = [float(a) for a in gates.alpha_hat.tolist()]
    result = {
        "alpha": alpha,
        "ranking": gates.ranking(),
        "num_layers": len(alpha),
        "scaled_alpha": [float(a) for a in gates.alphas().tolist()],
        "alpha_sum": math.fsum(alpha),
        "lora_params_per_layer": params_per_layer,
        "steps": total_steps,
        "seconds": round(checkpoints.elapsed(), 2),
        "padding_waste": round(engine.padding_waste(), 4),
        "num_processes": engine.num_processes,
        "precision": engine.precision,
        "history": history,
    }
    run_dir.write_json(run_dir.alpha_json, result)
    positive = [
        i for i, a in enumerate(alpha) if a > 0
    ]  # the paper's rule; select/alpha.png shows the chosen
    run_dir.save_figure(run_dir.alpha_png, lambda: report.plot_alpha(alpha, history, positive))
    run_dir.save_figure(
        run_dir.search_loss_png, lambda: report.plot_losses(history, ("train_loss", "val_loss"))
    )
    run_dir.end_stage("search", steps=total_steps)
    checkpoints.clear()
    engine.end_tracking()

    report.console.print(report.alpha_table(alpha, result["ranking"], planted=planted_layers(settings)))
    facts = [
        f"{total_steps} steps in {result['seconds']:.0f}s on {engine.num_processes} process(es), {engine.precision}",
        f"top layers: {', '.join(map(str, result['ranking'][:5]))}; padding {result['padding_waste']:.0%} of tokens",
    ]
    files = [run_dir.alpha_json, run_dir.alpha_png, run_dir.search_loss_png, run_dir.root / "logs" / "search"]
    report.console.print(report.stage_panel("search", facts, files))
    return result


def gated_lora_model(base: torch.nn.Module, settings: Settings) -> tuple[GatedModel, LayerGates]:
    """LoRA on every layer of `base`, each layer's LoRA paths gated by its α (gates.py)."""
    peft_model = attach_lora(base, settings.model, settings.lora, None, settings.gradient_checkpointing)
    layers = get_layers(peft_model, settings.model.layers_path)
    gates = LayerGates(len(layers)).to(next(base.parameters()).device)
    gates.attach(layers)
    return GatedModel(peft_model, gates), gates


def alternate_step(
    engine: Engine,
    model: torch.nn.Module,
    train_rows: list[dict],
    val_rows: list[dict],
    grad_accum: int,
    pad_id: int,
    optimizers: tuple,
    step: int,
) -> tuple[StepResult, StepResult]:
    """One search step: a LoRA step on `train_rows` (α fixed), then an α step on `val_rows`.

    `optimizers` is (LoRA optimizer, its schedule, α optimizer). The α step's backward is a full
    one because DDP all-reduces every gradient; the LoRA gradients it leaves are dropped.
    """
    optimizer, schedule, alpha_optimizer = optimizers
    train = engine.forward_backward(model, train_rows, grad_accum, pad_id)
    check_finite(train.loss, "search", step)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    alpha_optimizer.zero_grad(set_to_none=True)

    val = engine.forward_backward(model, val_rows, grad_accum, pad_id)
    check_finite(val.loss, "search", step)
    alpha_optimizer.step()
    alpha_optimizer.zero_grad(set_to_none=True)
    optimizer.zero_grad(set_to_none=True)
    return train, val
