"""FSDP2 driven directly (`distributed=fsdp`): torch's `fully_shard`, one unit per decoder layer
plus the root, the way torchtune's distributed recipes shard.

accelerate still starts the processes and gives the device; the model is sharded here instead of
by accelerate's FSDP plugin, which refuses a machine without an accelerator (so FSDP runs, and is
tested, on CPU over gloo). What this module owns:

- **Sharding.** Each decoder layer is one unit, so its frozen weights and its LoRA matrices are
  gathered together for its forward and freed after; the root unit holds the embeddings, the
  final norm and the LM head. On CUDA the units gather bf16 parameters and reduce gradients in
  fp32 (MixedPrecisionPolicy).
- **Replicated parameters.** The search's α̂ (a few floats) is left out of every unit: each
  process holds all of it, and its gradient is averaged across processes by
  `average_replicated_gradients`, as FSDP averages the LoRA gradients, so Σα̂ = 0 stays exact on
  every process.
- **Sharded checkpoints.** Mid-stage checkpoints go through torch.distributed.checkpoint (DCP):
  each process writes only its shards of the LoRA matrices and of their optimizer state
  (`save_shards`, `ShardedOptimizerState`), and DCP reshards them when another process count
  resumes (`load_shards`). Only the trained parameters are saved, never the frozen base.
- **Whole tensors out.** The final adapter is gathered into whole tensors (`full_model_state`),
  as torchtune's LoRA recipes save adapters: a plain PEFT adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def ensure_process_group(device: torch.device) -> None:
    """A one-process group when nothing launched several (FSDP needs a group even for one)."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=0, world_size=1, store=dist.HashStore())


def shard(model: nn.Module, layers: nn.ModuleList, device: torch.device, replicated: list[nn.Parameter]):
    """Shard `model` in place: one unit per entry of `layers`, then the root (without
    `replicated`, which every process keeps whole). Returns the model (now an FSDPModule)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=set(replicated))


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


@dataclass
class HeldBytes:
    """Bytes of parameters and optimizer state one process holds, counted from its tensors (its
    shards under FSDP), beside the whole model's parameter bytes."""

    params: int
    optimizer: int
    model_params: int

    def describe(self) -> str:
        share = f" ({self.params / self.model_params:.0%} of the model's)" if self.model_params else ""
        return (
            f"this process holds {self.params / 2**20:,.1f} MiB of parameters{share} and "
            f"{self.optimizer / 2**20:,.1f} MiB of optimizer state"
        )


def held_bytes(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> HeldBytes:
    """What this process holds of `model` and `optimizers` (HeldBytes)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if is_sharded(t) else t

    params = list(model.parameters())
    states = [
        v for opt in optimizers for state in opt.state.values() for v in state.values() if torch.is_tensor(v)
    ]
    return HeldBytes(
        params=sum(local(p).numel() * p.element_size() for p in params),
        optimizer=sum(local(v).numel() * v.element_size() for v in states),
        model_params=sum(p.numel() * p.element_size() for p in params),
    )


def local_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s total norm as a plain tensor (over sharded gradients it is a DTensor)."""
    return norm.full_tensor() if is_sharded(norm) else norm


@torch.no_grad()
def average_replicated_gradients(params: list[nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of the parameters FSDP leaves whole (α̂): FSDP averages the
    sharded ones itself. One flat all-reduce for all of them."""
    grads = [p.grad for p in params if p.grad is not None and not is_sharded(p)]
    if not grads or dist.get_world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for grad, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(chunk.view_as(grad))


class ShardedOptimizerState:
    """A sharded model's optimizer as a checkpoint sees it (DCP's Stateful): its state as DTensor
    shards keyed by parameter name, so each process saves and loads only its own shards, and DCP
    reshards them when another process count resumes."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state)


def save_shards(state: dict, folder: Path) -> None:
    """Every process writes its shards of `state` (tensors, DTensors, ShardedOptimizerState) to
    `folder` through DCP: one file per process, and `.metadata`, written by the main process once
    every other has written (so when the main process returns, the folder is whole)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=folder)


def load_shards(state: dict, folder: Path) -> None:
    """Load `folder` (save_shards) into the live tensors and objects of `state`, in place; DCP
    reads whichever saved shards overlap this process's, for any process count."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=folder)


def main_process_path(path: Path) -> Path:
    """The main process's `path` on every process (e.g. the temp folder it writes a checkpoint in)."""
    shared = [str(path)]
    dist.broadcast_object_list(shared, src=0)
    return Path(shared[0])


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters as whole CPU tensors, by name, on every process (frozen weights
    left out: the adapter is what is saved)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)  # on every process
    return {name: tensor.cpu() for name, tensor in get_model_state_dict(model, options=options).items()}
