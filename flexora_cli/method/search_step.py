"""Stage 2 of the method, one step: a LoRA step on a training batch (α fixed), then an α step on
a validation batch (θ fixed, dropout off), with the hypergradient `search.hypergradient` names,
then α̂ is centred (Σα̂ = 0)."""

from __future__ import annotations

import torch

from flexora_cli.data.collate import Collated, make_collator
from flexora_cli.method.gates import LayerGates, gated_lora_model
from flexora_cli.method.hypergradient import DropoutOff, make_hypergradient
from flexora_cli.settings import SearchSettings
from flexora_cli.step import BuiltStep, TrainStep, adamw_with_schedule, trainable_parameters


def search_optimizers(lora: list, gates: LayerGates, search: SearchSettings, total_steps: int) -> tuple:
    """(LoRA AdamW, its cosine schedule, α̂'s optimizer): Adam, as the authors' code, or plain SGD."""
    optimizer, schedule = adamw_with_schedule(
        lora, search.lr, search.weight_decay, "cosine", search.warmup_ratio, total_steps
    )
    if search.alpha_optimizer == "sgd":
        # fused: the step guard skips a non-finite update on the device through found_inf
        return optimizer, schedule, torch.optim.SGD(gates.parameters(), lr=search.alpha_lr, fused=True)
    return optimizer, schedule, torch.optim.Adam(gates.parameters(), lr=search.alpha_lr, fused=True)


def build_search_step(engine, base, settings, total_steps: int, pad_id: int) -> tuple[BuiltStep, LayerGates]:
    """The search step over `base`: LoRA on every layer, gated per layer (the gates returned
    beside the step), the authors' optimizers, settings.search's clipping and non-finite rule."""
    search = settings.search
    model, gates = gated_lora_model(base, settings)
    model = engine.shard_and_compile(model, settings.model.layers_path, replicated=list(gates.parameters()))
    lora = trainable_parameters(model.lm)
    optimizer, schedule, alpha_optimizer = search_optimizers(lora, gates, search, total_steps)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    collate = make_collator(settings, engine, model, pad_id, search.grad_accum)
    model, optimizer, alpha_optimizer = engine.prepare(model, optimizer, alpha_optimizer)
    train_step = TrainStep(engine, model, "search", search.on_nonfinite)
    one_step = SearchStep(train_step, (optimizer, schedule, alpha_optimizer), lora, gates, search)
    stateful = {"optimizer": engine.checkpointable(model, optimizer), "scheduler": schedule}
    stateful["alpha_optimizer"] = alpha_optimizer  # α̂ is whole on every process
    stateful["hypergradient"] = one_step.hypergradient  # unrolled: the last K steps' states
    optimizers = [optimizer, alpha_optimizer]
    return BuiltStep(one_step, model, train_step, collate, trained, stateful, optimizers), gates


class SearchStep:
    """One search step over the wrapped model of `train_step`. Both backward passes are full ones,
    because DDP all-reduces every gradient; the gradients a phase leaves on the other phase's
    parameters are dropped (darts reads the LoRA ones first: they are ∇w' L_val)."""

    def __init__(
        self, train_step: TrainStep, optimizers: tuple, lora: list, gates: LayerGates, search: SearchSettings
    ):
        self.train_step, self.lora, self.gates, self.alpha = train_step, lora, gates, list(gates.parameters())
        self.optimizer, self.schedule, self.alpha_optimizer = optimizers
        self.max_grad_norm, self.alpha_max_grad_norm = search.max_grad_norm, search.alpha_max_grad_norm
        self.alpha_warmup_steps = search.alpha_warmup_steps
        module = train_step.engine.unwrap(train_step.model)
        self.dropout_off = DropoutOff(module)
        self.hypergradient = make_hypergradient(
            search.hypergradient, train_step, lora, gates, self.optimizer, module, search
        )

    def __call__(self, step: int, batches: tuple[Collated, Collated]) -> None:
        train, val = batches
        self.hypergradient.before_lora_step(train)
        loss = self.train_step.forward_backward(train)
        norm = self.train_step.update(self.optimizer, self.lora, loss, self.max_grad_norm, step, phase=0)
        self.hypergradient.after_lora_step(norm)
        self.schedule.step()
        self._zero_grad()
        if step <= self.alpha_warmup_steps:  # LoRA alone first (steps count from 1): gates see trained paths
            return

        with self.dropout_off():
            val_loss = self.train_step.forward_backward(val)
        self.hypergradient.correct(train, val)
        self.train_step.update(
            self.alpha_optimizer, self.alpha, val_loss, self.alpha_max_grad_norm, step, phase=1
        )
        self.gates.center_()
        self._zero_grad()

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.alpha_optimizer.zero_grad(set_to_none=True)
