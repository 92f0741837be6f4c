"""Stage 2 — the Flexora search, as a recipe: setup → train → save.

The method itself (gates, the alternating LoRA/α step, the hypergradients, the ranking) lives in
flexora_cli/method/; this module loads the data and model, runs the checkpointed loop and writes
search/alpha.json (method.SearchResult), alpha.png and loss.png. Every `checkpoint_every` steps
(and on SIGINT/SIGTERM) a checkpoint is written; rerunning the same command continues from the
newest one exactly (checkpoint.py).
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from flexora_cli import report
from flexora_cli.data.batches import Batches
from flexora_cli.data.collate import prefetched
from flexora_cli.data.datasets import carve_validation, load_part, part_split
from flexora_cli.data.features import training_rows
from flexora_cli.engine import Engine
from flexora_cli.errors import ConfigError
from flexora_cli.fsdp import HeldBytes
from flexora_cli.manifest import Manifest
from flexora_cli.method import (
    LayerGates,
    SearchResult,
    build_search_step,
    hypergradient,
    noise_warning,
    ranking,
)
from flexora_cli.method.selection import positive_layers
from flexora_cli.modeling import load_model, load_tokenizer, lora_params_per_layer
from flexora_cli.rundir import RunDir
from flexora_cli.settings import Settings
from flexora_cli.stages import locked, planted_layers, setup
from flexora_cli.step import Readout, seed_everything
from flexora_cli.training import TrainingLoop


@locked
def run(cfg: DictConfig | Settings) -> SearchResult:
    # -- setup: data; LoRA on every layer, gated per layer; optimizers; the step; the loop -------
    settings, run_dir = setup(cfg)
    Manifest(run_dir).check_overwrite("search", settings)
    search = settings.search
    engine = Engine(settings)
    hypergradient.check_launch(search.hypergradient, engine)
    seed_everything(settings.seed)
    tokenizer = load_tokenizer(settings.model)
    train_batches, val_batches, partition = search_batches(settings, tokenizer)
    base = load_model(settings.model, engine.device, engine.precision)
    params_per_layer = lora_params_per_layer(base, settings.model, settings.lora)
    total_steps = search.epochs * len(train_batches)
    built, gates = build_search_step(engine, base, settings, total_steps, tokenizer.pad_token_id)
    model, train_step, collate = built.model, built.train_step, built.collate
    loop = TrainingLoop("search", settings, run_dir, engine, train_step, built.trained, built.stateful)

    # -- train: a LoRA step on a training batch, then an α step on a validation batch -----------
    def on_log(step: int, readout: Readout) -> str:
        train_loss, val_loss = readout.losses.get(0, math.nan), readout.losses.get(1, math.nan)
        alpha = [round(a, 6) for a in gates.alpha_hat.tolist()]
        alpha_sum = float(gates.alpha_hat.detach().double().sum())  # Proposition 1: 0
        loop.record(step, readout, train_loss=train_loss, val_loss=val_loss, alpha=alpha, alpha_sum=alpha_sum)
        engine.log({"loss/train": train_loss, "loss/val": val_loss, **alpha_scalars(alpha)}, step)
        return f"loss {train_loss:.3f} val {val_loss:.3f} top {','.join(map(str, ranking(alpha)[:3]))}"

    pairs = step_pairs(train_batches, val_batches, search.epochs, loop.step)
    steps = prefetched(pairs, lambda pair: (collate(pair[0]), collate(pair[1])), engine.device.type == "cuda")
    model.train()
    loop.run(steps, total_steps, built.one_step, on_log, search.log_every, lambda pair, phase: pair[phase])

    # -- save -----------------------------------------------------------------------------------
    result = search_result(gates, params_per_layer, settings, engine, loop, loop.seconds())
    result.partition, result.held_bytes = partition, built.held_bytes()
    write_outputs(settings, run_dir, engine, result)
    loop.finish([run_dir.alpha_json])
    return result


def search_result(
    gates: LayerGates,
    params_per_layer: list[int],
    settings: Settings,
    engine: Engine,
    loop: TrainingLoop,
    seconds: float,
) -> SearchResult:
    """What the search found (the gates now) and how it ran."""
    search = settings.search
    alpha = [float(a) for a in gates.alpha_hat.tolist()]
    return SearchResult(
        alpha=alpha,
        ranking=ranking(alpha),
        scaled_alpha=[float(a) for a in gates.alphas().tolist()],
        alpha_sum=math.fsum(alpha),
        lora_params_per_layer=params_per_layer,
        hypergradient=search.hypergradient,
        unroll_steps=search.unroll_steps if search.hypergradient == "unrolled" else 0,
        steps=loop.step,
        alpha_steps=max(0, loop.step - search.alpha_warmup_steps),
        seconds=round(seconds, 2),
        padding_waste=round(engine.padding_waste(), 4),
        num_processes=engine.num_processes,
        precision=engine.precision,
        max_grad_norm=search.max_grad_norm,
        nonfinite_steps_skipped=loop.skipped,
        history=loop.history,
    )


def step_pairs(train: Batches, val: Batches, epochs: int, done: int):
    """(training rows, validation rows) for every step after the first `done` (a resumed run)."""
    first_epoch, offset = divmod(done, len(train))
    val_stream = val.forever(skip=done)
    for epoch in range(first_epoch, epochs):
        for rows in train.epoch(epoch, offset if epoch == first_epoch else 0):
            yield rows, next(val_stream)


def alpha_scalars(alpha: list[float]) -> dict[str, float]:
    """The trackers' per-layer α̂ curves."""
    return {f"alpha/layer_{i:02d}": a for i, a in enumerate(alpha)}


def search_batches(settings: Settings, tokenizer) -> tuple[Batches, Batches, dict | None]:
    """The budget's training batches for LoRA steps, a disjoint validation carve-out's batches
    for α steps (seeded), both from the training part, and that part's partition record."""
    search = settings.search
    part = load_part(settings.dataset, "train")
    examples = part.examples
    if search.budget + search.val_samples > len(examples):
        raise ConfigError(
            f"search.budget={search.budget} + search.val_samples={search.val_samples} exceeds the "
            f"{len(examples)} examples of {settings.dataset.name}[{part_split(settings.dataset, 'train')}]; "
            f"lower search.budget or search.val_samples"
        )
    train_pool, val_examples = carve_validation(examples, search.val_samples, settings.seed)

    def batches(subset: list, batch_size: int, seed: int) -> Batches:
        features = training_rows(subset, settings.dataset, settings, tokenizer, "search")
        return Batches(features, batch_size, seed, settings.group_by_length)

    train = batches(train_pool[: search.budget], search.batch_size, settings.seed)
    val = batches(val_examples, search.val_batch_size or search.batch_size, settings.seed + 1)
    return train, val, part.record()


def write_outputs(settings: Settings, run_dir: RunDir, engine: Engine, result: SearchResult) -> None:
    """alpha.json, the α̂ and loss figures, and the closing table and panel."""
    run_dir.write_json(run_dir.alpha_json, result.to_json())
    positive = positive_layers(result.alpha)  # the paper's rule; select/alpha.png: the chosen
    run_dir.save_figure(run_dir.alpha_png, lambda: report.plot_alpha(result.alpha, result.history, positive))
    run_dir.save_figure(
        run_dir.search_loss_png, lambda: report.plot_losses(result.history, ("train_loss", "val_loss"))
    )
    report.result(report.alpha_table(result.alpha, result.ranking, planted=planted_layers(settings)))
    if warning := noise_warning(result.alpha_step_count, result.alpha):
        report.warn(f"search: {warning}")
    facts = [
        f"{result.steps} steps in {result.seconds:.0f}s on {engine.num_processes} process(es), "
        f"{engine.precision}; hypergradient {result.hypergradient}",
        f"top layers: {', '.join(map(str, result.ranking[:5]))}; padding {result.padding_waste:.0%} of tokens",
        HeldBytes(**result.held_bytes).describe(),
    ]
    files = [run_dir.alpha_json, run_dir.alpha_png, run_dir.search_loss_png, run_dir.root / "logs" / "search"]
    report.result(report.stage_panel("search", facts, files))
