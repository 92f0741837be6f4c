"""Layers and LoRA targets come from the model settings — tested on ChatGLM3's module layout."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from flexora_cli.errors import ModelError
from flexora_cli.method import LayerGates
from flexora_cli.modeling import attach_lora, get_layers, lora_params_per_layer
from flexora_cli.settings import LoraSettings, ModelSettings


class GLMBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.self_attention = nn.Module()
        self.self_attention.query_key_value = nn.Linear(width, 3 * width)
        self.self_attention.dense = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.self_attention.query_key_value(x).chunk(3, dim=-1)
        return x + self.self_attention.dense(q * k + v)


class ChatGLMLike(nn.Module):
    """transformer.encoder.layers[i].self_attention.query_key_value, as in THUDM/chatglm3-6b."""

    def __init__(self, width: int = 8, depth: int = 4):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.layers = nn.ModuleList(GLMBlock(width) for _ in range(depth))

    def forward(self, x):
        for layer in self.transformer.encoder.layers:
            x = layer(x)
        return x

    def prepare_inputs_for_generation(self, *args, **kwargs):  # as the real ChatGLM causal-LM class has
        raise NotImplementedError


GLM = ModelSettings(
    name="glm", name_or_path="x", layers_path="transformer.encoder.layers", target_modules=["query_key_value"]
)
LORA = LoraSettings(r=2, alpha=4, dropout=0.0)


def lora_layers(model) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for index, layer in enumerate(get_layers(model, GLM.layers_path)):
        names = [n for n, m in layer.named_modules() if isinstance(m, LoraLayer)]
        if names:
            found[index] = names
    return found


def test_chatglm_layout_layers_and_params():
    model = ChatGLMLike()
    assert len(get_layers(model, GLM.layers_path)) == 4
    assert lora_params_per_layer(model, GLM, LORA) == [2 * (8 + 24)] * 4


def test_lora_only_on_selected_layers_of_chatglm_layout():
    peft_model = attach_lora(ChatGLMLike(), GLM, LORA, layers=[1, 3])
    assert lora_layers(peft_model) == {
        1: ["self_attention.query_key_value"],
        3: ["self_attention.query_key_value"],
    }
    assert peft_model.peft_config["default"].layers_to_transform == [1, 3]


def test_gates_attach_to_chatglm_layout():
    peft_model = attach_lora(ChatGLMLike(), GLM, LORA, layers=None)
    gates = LayerGates(4)
    assert gates.attach(get_layers(peft_model, GLM.layers_path)) == 4
    loss = peft_model.get_base_model()(torch.randn(3, 8)).sum()  # LoRA is injected in place
    loss.backward()
    assert gates.alpha_hat.grad is not None


def test_wrong_layout_is_a_clear_error():
    with pytest.raises(ModelError, match="no attribute path 'model.layers'"):
        get_layers(ChatGLMLike(), "model.layers")
    with pytest.raises(ModelError, match="no module named"):
        lora_params_per_layer(
            ChatGLMLike(), ModelSettings(layers_path=GLM.layers_path, target_modules=["q_proj"]), LORA
        )


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_save_as_plain_lora_on_the_unmodified_base(init, demo_dir, tmp_path):
    """lora.init=pissa|olora moves part of W into the adapter; the saved adapter (rank 2r) on the
    original base must give the trained model's output (peft's conversion, as finetune saves)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flexora_cli.modeling import save_initial_adapter

    def base():
        return AutoModelForCausalLM.from_pretrained(f"{demo_dir}/model", dtype=torch.float32).eval()

    spec = ModelSettings(name_or_path=f"{demo_dir}/model")
    model = attach_lora(base(), spec, LoraSettings(r=4, init=init, dropout=0.0), [1, 3]).eval()
    initial = save_initial_adapter(model, tmp_path)
    torch.manual_seed(0)
    with torch.no_grad():  # "training": move every adapter weight
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        trained = model(ids).logits
    model.save_pretrained(str(tmp_path / "adapter"), path_initial_model_for_weight_conversion=str(initial))
    reloaded = PeftModel.from_pretrained(base(), str(tmp_path / "adapter")).eval()
    assert (
        reloaded.peft_config["default"].r == 8 and reloaded.peft_config["default"].init_lora_weights is True
    )
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, trained, atol=1e-4)
        assert not torch.allclose(base()(ids).logits, trained, atol=1e-3)  # the adapter matters
