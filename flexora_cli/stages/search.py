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
from flexora_cli.data.batches import Batches, training_features
from flexora_cli.data.datasets import carve_validation, load_split
from flexora_cli.data.prompts import build_prompts
from flexora_cli.engine import Engine
from flexora_cli.errors import ConfigError
from flexora_cli.gates import LayerGates, ranking
from flexora_cli.modeling import (
    attach_lora,
    get_layers,
    load_model,
    load_tokenizer,
    lora_params_per_layer,
)
from flexora_cli.rundir import RunDir
from flexora_cli.settings import Settings
from flexora_cli.stages import collator, locked, planted_layers, setup
from flexora_cli.step import (
    AnswerLM,
    Collated,
    Readout,
    TrainStep,
    adamw_with_schedule,
    prefetched,
    seed_everything,
    trainable_parameters,
)
from flexora_cli.training import TrainingLoop


@locked
def run(cfg: DictConfig | Settings) -> dict:
    settings, run_dir = setup(cfg)
    search = settings.search
    engine = Engine(settings)
    seed_everything(settings.seed)
    tokenizer = load_tokenizer(settings.model)
    train_batches, val_batches = search_batches(settings, tokenizer)

    # -- model: LoRA on every layer, one gate per layer, wrapped by accelerate (DDP/FSDP) -----
    base = load_model(settings.model, engine.device, engine.precision)
    params_per_layer = lora_params_per_layer(base, settings.model, settings.lora)
    model, gates = gated_lora_model(base, settings)
    lora = trainable_parameters(model.lm)
    total_steps = search.epochs * len(train_batches)
    optimizer, schedule = adamw_with_schedule(
        lora, search.lr, search.weight_decay, "cosine", search.warmup_ratio, total_steps
    )
    alpha_optimizer = torch.optim.Adam(gates.parameters(), lr=search.alpha_lr, fused=True)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    collate = collator(settings, engine, model, tokenizer.pad_token_id, search.grad_accum)
    model, optimizer, alpha_optimizer = engine.prepare(model, optimizer, alpha_optimizer)
    stateful = {"optimizer": optimizer, "scheduler": schedule, "alpha_optimizer": alpha_optimizer}
    loop = TrainingLoop("search", settings, run_dir, engine, model, trained, stateful, search.on_nonfinite)

    # -- loop: a LoRA step on a training batch, then an α step on a validation batch -----------
    first_epoch, offset = divmod(loop.step, len(train_batches))
    val_stream = val_batches.forever(skip=loop.step)
    pairs = (
        (rows, next(val_stream))
        for epoch in range(first_epoch, search.epochs)
        for rows in train_batches.epoch(epoch, offset if epoch == first_epoch else 0)
    )
    steps = prefetched(pairs, lambda pair: (collate(pair[0]), collate(pair[1])), engine.device.type == "cuda")
    phases = AlternatingStep(loop.train_step, (optimizer, schedule, alpha_optimizer), lora, gates, search)

    def on_log(step: int, readout: Readout) -> str:
        train_loss, val_loss = readout.losses.get(0, math.nan), readout.losses.get(1, math.nan)
        alpha = [round(a, 6) for a in gates.alpha_hat.tolist()]
        loop.record(step, readout, train_loss=train_loss, val_loss=val_loss, alpha=alpha)
        layer_alphas = {f"alpha/layer_{i:02d}": a for i, a in enumerate(alpha)}
        engine.log({"loss/train": train_loss, "loss/val": val_loss, **layer_alphas}, step)
        return f"loss {train_loss:.3f} val {val_loss:.3f} top {','.join(map(str, ranking(alpha)[:3]))}"

    model.train()
    loop.run(steps, total_steps, phases, on_log, search.log_every, lambda pair, phase: pair[phase])
    seconds = loop.finish()

    # -- save ---------------------------------------------------------------------------------
    alpha = [float(a) for a in gates.alpha_hat.tolist()]
    result = {
        "alpha": alpha,
        "ranking": ranking(alpha),
        "num_layers": len(alpha),
        "scaled_alpha": [float(a) for a in gates.alphas().tolist()],
        "alpha_sum": math.fsum(alpha),
        "lora_params_per_layer": params_per_layer,
        "steps": total_steps,
        "seconds": round(seconds, 2),
        "padding_waste": round(engine.padding_waste(), 4),
        "num_processes": engine.num_processes,
        "precision": engine.precision,
        "max_grad_norm": search.max_grad_norm,
        "nonfinite_steps_skipped": loop.skipped,
        "history": loop.history,
    }
    write_outputs(settings, run_dir, engine, result)
    return result


def search_batches(settings: Settings, tokenizer) -> tuple[Batches, Batches]:
    """The budget's training batches for LoRA steps, and a disjoint validation carve-out's
    batches for α steps (seeded)."""
    search = settings.search
    examples = load_split(settings.dataset, settings.dataset.train_split)
    if search.budget + search.val_samples > len(examples):
        raise ConfigError(
            f"search.budget={search.budget} + search.val_samples={search.val_samples} exceeds the "
            f"{len(examples)} examples of {settings.dataset.name}[{settings.dataset.train_split}]; "
            f"lower search.budget or search.val_samples"
        )
    train_pool, val_examples = carve_validation(examples, search.val_samples, settings.seed)

    def batches(subset: list, seed: int) -> Batches:
        features = training_features(tokenizer, build_prompts(subset, settings.format), settings.max_length)
        return Batches(features, search.batch_size, seed, settings.group_by_length)

    return batches(train_pool[: search.budget], settings.seed), batches(val_examples, settings.seed + 1)


def write_outputs(settings: Settings, run_dir: RunDir, engine: Engine, result: dict) -> None:
    """alpha.json, the α̂ and loss figures, and the closing table and panel."""
    alpha, history = result["alpha"], result["history"]
    run_dir.write_json(run_dir.alpha_json, result)
    positive = [i for i, a in enumerate(alpha) if a > 0]  # the paper's rule; select/alpha.png: the chosen
    run_dir.save_figure(run_dir.alpha_png, lambda: report.plot_alpha(alpha, history, positive))
    run_dir.save_figure(
        run_dir.search_loss_png, lambda: report.plot_losses(history, ("train_loss", "val_loss"))
    )
    report.console.print(report.alpha_table(alpha, result["ranking"], planted=planted_layers(settings)))
    facts = [
        f"{result['steps']} steps in {result['seconds']:.0f}s on {engine.num_processes} process(es), "
        f"{engine.precision}",
        f"top layers: {', '.join(map(str, result['ranking'][:5]))}; padding {result['padding_waste']:.0%} "
        f"of tokens",
    ]
    files = [run_dir.alpha_json, run_dir.alpha_png, run_dir.search_loss_png, run_dir.root / "logs" / "search"]
    report.console.print(report.stage_panel("search", facts, files))


def gated_lora_model(base: torch.nn.Module, settings: Settings) -> tuple[AnswerLM, LayerGates]:
    """LoRA on every layer of `base`, each layer's LoRA paths gated by its α (gates.py), as the
    module the step trains (the gates inside it, so DDP averages α̂'s gradient like LoRA's)."""
    peft_model = attach_lora(base, settings.model, settings.lora, None, settings.gradient_checkpointing)
    layers = get_layers(peft_model, settings.model.layers_path)
    gates = LayerGates(len(layers)).to(next(base.parameters()).device)
    gates.attach(layers)
    return AnswerLM(peft_model, gates), gates


class AlternatingStep:
    """One search step: a LoRA step on the training batch (α fixed), then an α step on the
    validation batch (θ fixed). Both backward passes are full ones, because DDP all-reduces every
    gradient; the gradients a phase leaves on the other phase's parameters are dropped."""

    def __init__(self, train_step: TrainStep, optimizers: tuple, lora: list, gates: LayerGates, search):
        self.train_step, self.lora, self.alpha = train_step, lora, list(gates.parameters())
        self.optimizer, self.schedule, self.alpha_optimizer = optimizers
        self.max_grad_norm, self.alpha_max_grad_norm = search.max_grad_norm, search.alpha_max_grad_norm

    def __call__(self, step: int, batches: tuple[Collated, Collated]) -> None:
        train, val = batches
        loss = self.train_step.forward_backward(train)
        self.train_step.update(self.optimizer, self.lora, loss, self.max_grad_norm, step, phase=0)
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.alpha_optimizer.zero_grad(set_to_none=True)

        val_loss = self.train_step.forward_backward(val)
        self.train_step.update(
            self.alpha_optimizer, self.alpha, val_loss, self.alpha_max_grad_norm, step, phase=1
        )
        self.alpha_optimizer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
