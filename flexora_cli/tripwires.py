"""Device-independent instruments for what CPU timings cannot show: fully masked attention rows,
host-device syncs and aten ops per step. The tests, scripts/bench_train.py and
scripts/gpu_check.py use them. Each is a torch mode: it sees every call made inside it, on any
device.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SOFTMAXES = {torch.softmax, F.softmax, torch.Tensor.softmax}


def fully_masked_rows(mask: torch.Tensor) -> int:
    """Query rows of an attention mask (bool: True = may attend; float: additive) with no key."""
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return int((~allowed.any(dim=-1)).sum())


class AttentionTripwire(TorchFunctionMode):
    """Records every attention call whose mask has a query row that may attend to no key.

    SDPA: the `attn_mask` handed to F.scaled_dot_product_attention (is_causal alone never has
    one). Eager attention: a softmax whose input row is all at the masked value (≤ finfo.min/2).
    CUDA kernels may return NaN for such rows where CPU returns zeros, so a CPU test must check
    the masks, not the values.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.violations: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if mask is not None and (rows := fully_masked_rows(mask)):
                self.violations.append(f"scaled_dot_product_attention: {rows} fully masked query rows")
        elif (
            func in _SOFTMAXES and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point()
        ):
            scores = args[0]
            if scores.ndim == 4:  # [batch, heads, queries, keys]: attention scores
                self.calls += 1
                rows = int((scores.amax(dim=-1) <= torch.finfo(scores.dtype).min / 2).sum())
                if rows:
                    self.violations.append(f"eager softmax: {rows} fully masked query rows")
        return func(*args, **kwargs)


_SYNCING_METHODS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__float__: "__float__",
    torch.Tensor.__int__: "__int__",
    torch.Tensor.__bool__: "__bool__",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
}


class HostSyncCounter(TorchFunctionMode):
    """Counts the calls that make the host wait for the device: reading a value (item, tolist,
    float/int/bool of a tensor, numpy), copying to the CPU (cpu, or a blocking .to('cpu') of a
    device tensor).

    On a CPU run nothing waits, but the same reads would on a GPU: the count is the proxy (there
    `.to(device)` cannot be told from a host copy, so only `.cpu()` counts). On a GPU run, reads
    of tensors that live on the CPU anyway are not counted.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.counts: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _SYNCING_METHODS.get(func)
        if name is None and func is torch.Tensor.to and args[0].device.type != "cpu":
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            blocking = not kwargs.get("non_blocking", False)
            if blocking and isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
                name = "to(cpu)"  # a blocking copy to the host (on a CPU run `.to` moves nothing)
        if name is not None and isinstance(args[0], torch.Tensor) and self._on_device(args[0]):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **kwargs)

    def _on_device(self, tensor: torch.Tensor) -> bool:
        return self.device.type == "cpu" or tensor.device.type != "cpu"


class OpCounter(TorchDispatchMode):
    """Counts aten ops (views excluded) — a device-independent stand-in for kernel launches —
    split into forward, backward (run by autograd) and optimizer (inside Optimizer.step)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = {"forward": 0, "backward": 0, "optimizer": 0}
        self._in_optimizer = False
        self._hooks: list = []

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._hooks = [
            register_optimizer_step_pre_hook(lambda *_: setattr(self, "_in_optimizer", True)),
            register_optimizer_step_post_hook(lambda *_: setattr(self, "_in_optimizer", False)),
        ]
        return super().__enter__()

    def __exit__(self, *exc_info):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc_info)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.overloadpacket in _SHAPE_ONLY or func.namespace == "profiler"):
            if self._in_optimizer:
                phase = "optimizer"
            elif torch._C._current_autograd_node() is not None:
                phase = "backward"
            else:
                phase = "forward"
            self.counts[phase] += 1
        return func(*args, **(kwargs or {}))


_SHAPE_ONLY = {
    torch.ops.aten.detach,
    torch.ops.aten.alias,
    torch.ops.aten.lift_fresh,
    torch.ops.aten._unsafe_view,
}
"""Ops that launch no kernel (metadata only), besides the view ops (OpOverload.is_view)."""


class VocabTensors(TorchDispatchMode):
    """Records the shape of every tensor an op creates (views excluded) whose last dimension is
    `vocab`: logits. Run on meta tensors, a step at 8B dimensions allocates nothing."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor) and tensor.ndim and tensor.shape[-1] == self.vocab:
                    self.shapes.add(tuple(tensor.shape))
        return out
