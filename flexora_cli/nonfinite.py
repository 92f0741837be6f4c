"""Where a non-finite value first appears: the replay of a failing step's batch with finiteness
hooks on every module, which the training loop runs when a step's guard (step.StepGuard) reads a
non-finite loss or gradient under on_nonfinite=error, so the stage stops naming the module."""

from __future__ import annotations

import torch
from torch import nn

from flexora_cli.data.collate import Collated


def locate_nonfinite(engine, model: nn.Module, batch: Collated) -> str:
    """Replay `batch` through the wrapped `model` with finiteness hooks on every module; returns
    "first non-finite ..." naming the first module whose output (forward, in execution order) or
    output gradient (backward, in backward order) was non-finite, or the first parameter gradient.
    Gradients it leaves are dropped."""
    inner = engine.unwrap(model)
    found: list[str] = []
    handles = []

    def finite(value) -> bool:
        tensors = [value] if isinstance(value, torch.Tensor) else [
            v for v in (value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else [])
            if isinstance(v, torch.Tensor)
        ]  # fmt: skip
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())

    def watch(name: str, module: nn.Module) -> None:
        def on_output(_module, _inputs, output):
            if not found and not finite(output):
                found.append(f"first non-finite output in {name} ({type(module).__name__})")
            tensor = output if isinstance(output, torch.Tensor) else next(
                (o for o in (output if isinstance(output, (tuple, list)) else []) if isinstance(o, torch.Tensor)), None
            )  # fmt: skip
            if tensor is not None and tensor.requires_grad:
                tensor.register_hook(lambda grad: on_grad(grad))

        def on_grad(grad):
            if not found and not bool(torch.isfinite(grad).all()):
                found.append(f"first non-finite output gradient in {name} ({type(module).__name__})")

        handles.append(module.register_forward_hook(on_output))

    for name, module in inner.named_modules():
        if name:
            watch(name.removeprefix("lm.base_model.model."), module)
    try:
        with engine.accelerator.no_sync(model):
            loss = sum(model(**m.to(engine.device).model_inputs()) * m.weight for m in batch.micro_batches)
            if not found and torch.isfinite(loss):
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        bad = [
            n for n, p in inner.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()
        ]
        found.append(
            f"first non-finite parameter gradient: {bad[0]}"
            if bad
            else "the replay of that batch was finite (a non-deterministic kernel?)"
        )
    for p in inner.parameters():
        p.grad = None
    return found[0]
