"""The Flexora gates: one hyperparameter α̂ᵢ per transformer layer.

Every LoRA path of layer i computes  W x + αᵢ · s · B A x  with  αᵢ = N · softmax(α̂)ᵢ.
α̂ starts at 0, so αᵢ = 1 and the gated model equals plain LoRA. The gate multiplies the output
of each LoRA `A` projection (a forward hook on `lora_A`): B(αᵢ A x) = αᵢ B A x, and the tensor
autograd keeps for α's gradient is then the rank-r A x, not a hidden-size one, so the search
needs little more memory than LoRA. The base path W x is untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from flexora_cli.modeling import attach_lora, get_layers
from flexora_cli.settings import LoraSettings, Settings
from flexora_cli.step import AnswerLM


class LayerGates(nn.Module):
    """α̂ for N layers, and the hooks that apply αᵢ to every LoRA path of layer i."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.alpha_hat = nn.Parameter(torch.zeros(num_layers))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._current: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.alpha_hat.numel()

    def alphas(self) -> torch.Tensor:
        """αᵢ = N · softmax(α̂)ᵢ (all ones at α̂ = 0)."""
        return self.num_layers * torch.softmax(self.alpha_hat, dim=0)

    def attach(self, layers: nn.ModuleList, adapter_name: str = "default") -> int:
        """Gate every LoRA module inside `layers[i]` by αᵢ; returns the number of gated paths.

        Every path gets the same hook, and finds its layer in a tensor attribute (`flexora_layer`),
        so the layers stay alike to torch.compile: one compiled graph serves all of them
        (a per-layer closure or int would be guarded on, and recompile each layer)."""
        if len(layers) != self.num_layers:
            raise ValueError(f"{len(layers)} layers but {self.num_layers} gates")
        hook, gated = self._scale_lora_output, 0
        for index, layer in enumerate(layers):
            where = torch.tensor([index], device=self.alpha_hat.device)
            for module in layer.modules():
                if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                    lora_a = module.lora_A[adapter_name]
                    lora_a.flexora_layer = where  # a plain attribute: not in the adapter's state dict
                    self._handles.append(lora_a.register_forward_hook(hook))
                    gated += 1
        return gated

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def once_per_forward(self) -> Iterator[None]:
        """Compute α = N·softmax(α̂) once for a whole forward (the gradient still flows to α̂).
        Outside (e.g. activation recomputation in backward) each hook computes α itself, to the
        same value."""
        self._current = self.alphas()
        try:
            yield
        finally:
            self._current = None

    def _scale_lora_output(self, module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        alphas = self._current if self._current is not None else self.alphas()
        # index_select, not alphas[i]: a tensor index would be read on the host (a graph break);
        # the 0-dim float32 result keeps the output's dtype (bf16 stays bf16)
        return output * alphas.index_select(0, module.flexora_layer).squeeze(0)

    @torch.no_grad()
    def center_(self) -> None:
        """Subtract the mean of α̂ (on the device, no sync). Softmax is shift-invariant, so no αᵢ
        changes; it restores the paper's Proposition 1 (Σα̂ = 0), which Adam's per-coordinate steps
        break, so that α̂ᵢ > 0 keeps meaning "above the mean"."""
        self.alpha_hat.sub_(self.alpha_hat.mean())


def gated_lora(lora: LoraSettings) -> LoraSettings:
    """The LoRA the search gates: DoRA becomes plain LoRA (its weight norm would stay ungated,
    LoraSettings.variant), and PiSSA/OLoRA default-initialised LoRA (their adapter holds part of
    the base weight, LoraSettings.init); rslora keeps its scaling, which the gate multiplies."""
    return dataclasses.replace(
        lora, variant="lora" if lora.variant == "dora" else lora.variant, init="default"
    )


def gated_lora_model(base: nn.Module, settings: Settings) -> tuple[AnswerLM, LayerGates]:
    """LoRA on every layer of `base`, each layer's LoRA paths gated by its α, as the
    module the step trains (the gates inside it, so DDP averages α̂'s gradient like LoRA's)."""
    peft_model = attach_lora(
        base, settings.model, gated_lora(settings.lora), None, settings.gradient_checkpointing
    )
    layers = get_layers(peft_model, settings.model.layers_path)
    gates = LayerGates(len(layers)).to(next(base.parameters()).device)
    gates.attach(layers)
    return AnswerLM(peft_model, gates), gates
