"""The Flexora gates: one hyperparameter α̂ᵢ per transformer layer.

Every LoRA path of layer i computes  W x + αᵢ · s · B A x  with  αᵢ = N · softmax(α̂)ᵢ.
α̂ starts at 0, so αᵢ = 1 and the gated model equals plain LoRA. The gate multiplies the output
of each LoRA `A` projection (a forward hook on `lora_A`): B(αᵢ A x) = αᵢ B A x, and the tensor
autograd keeps for α's gradient is then the rank-r A x, not a hidden-size one, so the search
needs little more memory than LoRA. The base path W x is untouched.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn


class LayerGates(nn.Module):
    """α̂ for N layers, and the hooks that apply αᵢ to every LoRA path of layer i."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.alpha_hat = nn.Parameter(torch.zeros(num_layers))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def num_layers(self) -> int:
        return self.alpha_hat.numel()

    def alphas(self) -> torch.Tensor:
        """αᵢ = N · softmax(α̂)ᵢ (all ones at α̂ = 0)."""
        return self.num_layers * torch.softmax(self.alpha_hat, dim=0)

    def attach(self, layers: nn.ModuleList, adapter_name: str = "default") -> int:
        """Gate every LoRA module inside `layers[i]` by αᵢ; returns the number of gated paths."""
        if len(layers) != self.num_layers:
            raise ValueError(f"{len(layers)} layers but {self.num_layers} gates")
        gated = 0
        for index, layer in enumerate(layers):
            for module in layer.modules():
                if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                    hook = self._make_hook(index)
                    self._handles.append(module.lora_A[adapter_name].register_forward_hook(hook))
                    gated += 1
        return gated

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, index: int):
        def scale_lora_output(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            alpha = self.alphas()[index]
            return output * alpha.to(output.dtype)

        return scale_lora_output

    def ranking(self) -> list[int]:
        """Layer indices, highest α̂ first (ties: lower index first)."""
        values = self.alpha_hat.detach().float().cpu().tolist()
        return sorted(range(len(values)), key=lambda i: (-values[i], i))


class GatedModel(nn.Module):
    """The LoRA model and its gates as one module, so DDP averages α̂'s gradient like LoRA's."""

    def __init__(self, lm: nn.Module, gates: LayerGates):
        super().__init__()
        self.lm, self.gates = lm, gates

    def forward(self, **inputs):
        return self.lm(**inputs)
