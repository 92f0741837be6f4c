"""Stage 4a — fine-tune fresh LoRA on the selected layers only; save a standard PEFT adapter.

Unselected layers carry no adapter at all (peft `layers_to_transform`), so the adapter in
finetune/adapter/ loads with plain `PeftModel.from_pretrained(base, dir)`. Backward stops at the
lowest selected layer: nothing below it requires grad. One optimizer step per global batch
(finetune.batch_size examples over all processes, engine.py); a checkpoint's step fixes the data
position.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
import warnings
from pathlib import Path

from omegaconf import DictConfig

from flexora_cli import report
from flexora_cli.data.batches import Batches
from flexora_cli.data.collate import Collated, prefetched
from flexora_cli.data.datasets import Part, load_part
from flexora_cli.data.features import training_rows
from flexora_cli.engine import Engine
from flexora_cli.errors import ConfigError
from flexora_cli.fsdp import HeldBytes
from flexora_cli.manifest import Manifest
from flexora_cli.method import Selection
from flexora_cli.model_card import write_model_card
from flexora_cli.modeling import attach_lora, load_model, load_tokenizer, save_initial_adapter
from flexora_cli.records import FinetuneLog
from flexora_cli.rundir import RunDir
from flexora_cli.settings import Settings
from flexora_cli.stages import locked, setup
from flexora_cli.step import AnswerLM, Readout, build_lora_step, seed_everything
from flexora_cli.training import TrainingLoop


@locked
def run(cfg: DictConfig | Settings) -> FinetuneLog:
    settings, run_dir = setup(cfg)
    spec = settings.finetune
    manifest = Manifest(run_dir)
    manifest.check_overwrite("finetune", settings)
    manifest.check_upstream("select", "finetune", settings)
    layers = Selection.read(run_dir.selection_json, "select", "finetune").layers
    engine = Engine(settings)
    seed_everything(settings.seed)

    tokenizer = load_tokenizer(settings.model)
    part, batches = training_batches(settings, tokenizer)

    base = load_model(settings.model, engine.device, engine.precision)
    peft_model = attach_lora(base, settings.model, settings.lora, layers, settings.gradient_checkpointing)
    scratch = tempfile.TemporaryDirectory(prefix="flexora-")  # this process's, gone with it
    initial = _initial_adapter(peft_model, settings, engine, Path(scratch.name))
    total_steps = planned_steps(spec.epochs, batches)
    built = build_lora_step(engine, AnswerLM(peft_model), settings, total_steps, tokenizer.pad_token_id)
    model, lora_step, schedule = built.model, built.one_step, built.one_step.schedule
    loop = TrainingLoop(
        "finetune", settings, run_dir, engine, built.train_step, built.trained, built.stateful
    )

    # -- loop: one optimizer step per global batch ---------------------------------------------
    started, tokens = time.time(), 0
    epoch, offset = divmod(loop.step, len(batches))
    epochs = itertools.count(epoch)
    global_batches = (rows for e in epochs for rows in batches.epoch(e, offset if e == epoch else 0))

    def one_step(step: int, batch: Collated) -> None:
        nonlocal tokens
        lora_step(step, batch)
        tokens += batch.tokens

    def on_log(step: int, readout: Readout) -> str:
        loss, lr = readout.losses.get(0, math.nan), schedule.get_last_lr()[0]
        loop.record(step, readout, train_loss=loss, lr=lr)
        engine.log({"loss/train": loss, "lr": lr}, step)
        return f"loss {loss:.3f}"

    model.train()
    steps = prefetched(global_batches, built.collate, engine.device.type == "cuda")
    loop.run(steps, total_steps, one_step, on_log, spec.log_every)

    # -- save: a standard PEFT adapter ---------------------------------------------------------
    state = engine.full_state_dict(model)  # every process takes part in the gather (FSDP)
    with run_dir.atomic_dir(run_dir.adapter_dir) as tmp:
        _save_adapter(engine.unwrap(model).lm, tmp, _lm_state(state), initial)
    this_run = time.time() - started  # tokens count this run only
    tokens_per_second = round(tokens / this_run, 1) if this_run else None
    result = finetune_result(layers, lora_step.params, batches, engine, loop, tokens_per_second)
    result.partition, result.held_bytes = part.record(), built.held_bytes()
    write_outputs(run_dir, engine, result)
    write_model_card(run_dir, settings, "finetune")
    loop.finish([run_dir.adapter_dir], inputs=("select",), logs=(run_dir.finetune_log_json,))
    return result


def planned_steps(epochs: float, batches: Batches) -> int:
    """Steps for `epochs` passes over `batches` (at least one); a warning when that is less than
    one epoch, so not every training example is seen."""
    total_steps = max(1, math.ceil(epochs * len(batches)))
    if (seen := batches.examples_in(total_steps)) < len(batches.features):
        report.warn(
            f"finetune: finetune.epochs={epochs} trains {total_steps} step(s) on {seen} of the "
            f"{len(batches.features)} training examples (less than one epoch)"
        )
    return total_steps


def training_batches(settings: Settings, tokenizer) -> tuple[Part, Batches]:
    """The training part (capped by dataset.max_train_samples) as seeded global batches."""
    part = load_part(settings.dataset, "train")
    examples = part.examples[: settings.dataset.max_train_samples]
    features = training_rows(examples, settings.dataset, settings, tokenizer, "finetune")
    return part, Batches(features, settings.finetune.batch_size, settings.seed, settings.group_by_length)


def finetune_result(
    layers: list[int],
    params: list,
    batches: Batches,
    engine: Engine,
    loop: TrainingLoop,
    tokens_per_second: float | None,
) -> FinetuneLog:
    """train_log.json: what was trained and how the run went."""
    return FinetuneLog(
        layers=layers,
        trainable_params=sum(p.numel() for p in params),
        steps=loop.step,
        examples=batches.examples_in(loop.step),
        dataset_examples=len(batches.features),
        seconds=round(loop.seconds(), 2),
        tokens_per_second=tokens_per_second,
        padding_waste=round(engine.padding_waste(), 4),
        num_processes=engine.num_processes,
        precision=engine.precision,
        max_grad_norm=loop.settings.finetune.max_grad_norm,
        nonfinite_steps_skipped=loop.skipped,
        history=loop.history,
    )


def write_outputs(run_dir: RunDir, engine: Engine, result: FinetuneLog) -> None:
    """train_log.json, the loss figure and the closing panel."""
    history = result.history
    run_dir.write_json(run_dir.finetune_log_json, result.to_json())
    if history:
        run_dir.save_figure(run_dir.finetune_loss_png, lambda: report.plot_losses(history, ("train_loss",)))
    facts = [
        f"LoRA on layers {result.layers}: {result.trainable_params:,} parameters",
        f"{result.steps} steps in {result.seconds:.0f}s on {engine.num_processes} process(es), "
        f"{engine.precision}; padding {result.padding_waste:.0%} of tokens",
        HeldBytes(**result.held_bytes).describe(),
    ]
    files = [run_dir.adapter_dir, run_dir.finetune_log_json, run_dir.finetune_loss_png]
    report.result(report.stage_panel("finetune", facts, files + [run_dir.root / "logs" / "finetune"]))


def _initial_adapter(peft_model, settings: Settings, engine: Engine, scratch: Path) -> Path | None:
    """lora.init=pissa|olora: the adapter as initialised, saved for the conversion at the end
    (modeling.save_initial_adapter); None for default init. A resumed run re-initialises alike."""
    if settings.lora.init == "default":
        return None
    if engine.shards_parameters:
        raise ConfigError(
            f"lora.init={settings.lora.init}: not under FSDP (peft converts the adapter from whole "
            "parameters); set distributed=ddp, or use lora.init=default"
        )
    return save_initial_adapter(peft_model, scratch)


def _save_adapter(peft_model, folder: Path, state: dict, initial: Path | None) -> None:
    """A standard PEFT adapter; PiSSA/OLoRA's converted by peft to a plain LoRA (rank 2r) on the
    unmodified base, from the adapter as initialised (`initial`)."""
    if initial is None:
        peft_model.save_pretrained(folder, state_dict=state, safe_serialization=True)
        return
    with warnings.catch_warnings():  # peft's advice to convert, given while converting
        warnings.filterwarnings("ignore", message=".*changes the base weights")
        peft_model.save_pretrained(
            folder, safe_serialization=True, path_initial_model_for_weight_conversion=str(initial)
        )


def _lm_state(state: dict) -> dict:
    """AnswerLM's state dict as the peft model's own (the keys without the `lm.` prefix)."""
    return {key.removeprefix("lm."): value for key, value in state.items()}
