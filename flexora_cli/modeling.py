"""Load models and tokenizers, find the layer list, attach LoRA — all from the model settings.

Nothing here knows Llama's names: the layer list is `ModelSettings.layers_path` (e.g.
`model.layers`, or `transformer.encoder.layers` for ChatGLM3) and the LoRA targets are
`ModelSettings.target_modules` (e.g. q_proj/v_proj, or query_key_value).
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from flexora_cli.errors import ConfigError, ModelError
from flexora_cli.settings import LoraSettings, ModelSettings

# peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` on every wrap and load.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but this machine has no CUDA device; use device=cpu or device=auto")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32, bf16 or fp16 for `precision` on `device` (auto: bf16 on CUDA, fp32 on CPU;
    bf16_if_native: bf16 where `device` computes it natively, else fp32)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16_if_native":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision=fp16 needs a CUDA GPU; use precision=fp32 (or bf16) on CPU")
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise ConfigError("precision=bf16 is not supported by this GPU; use precision=fp16 or fp32")
    return precision


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU with bf16, or a CPU with bf16 dot
    products (AVX512-BF16 or AMX). On other CPUs oneDNN emulates bf16: a SmolLM2 search step took
    87 s against fp32's 3 s on an AVX2 CPU, while with AVX512-BF16 bf16 trains 1.9x faster than
    fp32 (docs/benchmarks.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def emulates_bf16(device: torch.device, precision: str) -> bool:
    """True for bf16 on a CPU that emulates it (see native_bf16)."""
    return precision == "bf16" and device.type == "cpu" and not native_bf16(device)


def resolve_dtype(spec: ModelSettings, device: torch.device, precision: str) -> torch.dtype:
    """The frozen base's dtype: model.dtype, or (auto) the dtype of the resolved `precision`."""
    if spec.dtype == "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if spec.dtype == "float16" and device.type == "cpu":
        raise ConfigError("model.dtype=float16 is not supported for training on CPU; use float32 or bfloat16")
    if spec.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("model.dtype=bfloat16 is not supported by this GPU; use float16 or float32")
    return _DTYPES[spec.dtype]


PACKABLE_MODEL_TYPES = ("llama", "mistral", "gemma", "qwen2", "qwen3")
"""transformers' own architectures whose attention takes a custom 4-D mask with explicit position
ids and whose logits are the LM head of the last hidden state (no soft-capping or scaling): the
training step packs their rows and the scorer shares their choices' prefix. Others (e.g. ChatGLM3's
remote code) get right-padded rows and their own forward."""


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a peft wrapper (or `model` itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def packs_rows(model: nn.Module) -> bool:
    """Whether the training step may pack rows for `model` (see PACKABLE_MODEL_TYPES)."""
    config = getattr(causal_lm(model), "config", None)
    return getattr(config, "model_type", None) in PACKABLE_MODEL_TYPES


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the transformers model inside `model` (any wrapper) can compute only the last logits."""
    from transformers import PreTrainedModel

    base = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """Logits [K, vocab] at the K positions (rows, cols) only: the backbone of a packable model
    (packs_rows) on the whole input, then its LM head on the gathered hidden states, so no
    [tokens × vocab] tensor exists for the positions nobody reads."""
    causal = causal_lm(model)
    hidden = causal.get_decoder()(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    return causal.get_output_embeddings()(hidden[rows, cols])


def quantization_config(spec: ModelSettings, compute_dtype: torch.dtype):
    """bitsandbytes settings for a QLoRA base (None for a full-precision base): NF4 with double
    quantisation computing in `compute_dtype` (bf16 on CUDA by default), or LLM.int8.

    bitsandbytes runs on CUDA, and (0.48 and later) on CPU, which is how the tests run QLoRA.
    """
    if spec.quantization == "none":
        return None
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.quantization={spec.quantization} needs bitsandbytes; "
            f'install it with `pip install "flexora-cli[quant]"` or use model.quantization=none'
        )
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_tokenizer(spec: ModelSettings):
    from transformers import AutoTokenizer

    _check_local_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_dir(spec),
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            **hub_access(spec),
        )
    except Exception as exc:  # transformers raises OSError/ValueError/... for every "cannot load"
        raise ModelError(_load_failure("tokenizer", spec, exc)) from exc
    if tokenizer.pad_token is None:  # Llama-3 and Mistral ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(spec: ModelSettings, device: torch.device, precision: str) -> nn.Module:
    """The base causal LM in eval mode on `device`, weights frozen, in the dtype of `precision`
    (resolve_precision) unless model.dtype names one."""
    from transformers import AutoModelForCausalLM

    _check_local_path(spec)
    dtype = resolve_dtype(spec, device, precision)
    quantization = quantization_config(spec, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir(spec),
            revision=spec.revision,
            **hub_access(spec),
            dtype=dtype,
            quantization_config=quantization,
            attn_implementation=spec.attn_implementation,
            device_map={"": _device_map_target(device)} if quantization else None,
            trust_remote_code=spec.trust_remote_code,
            use_safetensors=None if spec.trust_remote_code else True,
        )
    except Exception as exc:
        raise ModelError(_load_failure("model", spec, exc)) from exc
    model.requires_grad_(False)
    get_layers(model, spec.layers_path)  # fail early, with the settings' names, if the layout differs
    return (model if quantization else model.to(device)).eval()  # bitsandbytes placed it already


def _device_map_target(device: torch.device) -> int | str:
    """Where bitsandbytes should place a quantized model: this process's GPU, or the CPU."""
    return (device.index or 0) if device.type == "cuda" else "cpu"


def get_layers(model: nn.Module, layers_path: str) -> nn.ModuleList:
    """The transformer layer list at `layers_path`, looked up inside any peft wrapper."""
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    node = root
    for part in layers_path.split("."):
        if not hasattr(node, part):
            raise ModelError(
                f"model has no attribute path '{layers_path}' (stopped at '{part}'); "
                f"set model.layers_path to the model's layer list (e.g. model.layers)"
            )
        node = getattr(node, part)
    if not isinstance(node, nn.ModuleList) or len(node) == 0:
        raise ModelError(f"'{layers_path}' is not a non-empty list of layers; fix model.layers_path")
    return node


COMPILED_VARIANTS = 64
"""Compiled graphs allowed per layer code object (dynamo's recompile_limit, 8 by default): the
layers' variants multiply, e.g. the first layer (its input needs no gradient) and the others,
training and the α pass (dropout off), eval without gradients, PEFT's active adapter, layers
with and without LoRA, and a single pack beside several (dynamic shapes specialise a size of 1)."""


def compile_layers(model: nn.Module, layers_path: str) -> None:
    """Regional torch.compile, as torchtune compiles layer by layer: each decoder layer at
    `layers_path` compiled in place (nn.Module.compile). dynamo inlines nn.Modules, so the
    layers share their compiled graphs (they differ only in parameters, which are graph
    inputs); the LoRA paths and the gates' hooks run inside the compiled region."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_VARIANTS)
    for layer in get_layers(model, layers_path):
        layer.compile(dynamic=True)


def lora_config(spec: ModelSettings, lora: LoraSettings, layers: list[int] | None) -> LoraConfig:
    """LoRA on `spec.target_modules`, restricted to `layers` (None: every layer)."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(spec.target_modules),
        use_rslora=lora.variant == "rslora",
        init_lora_weights=True if lora.init == "default" else lora.init,
        use_dora=lora.variant == "dora",
        layers_to_transform=sorted(layers) if layers is not None else None,
        layers_pattern=spec.layers_path.split(".")[-1] if layers is not None else None,
        task_type="CAUSAL_LM",
    )


def attach_lora(
    model: nn.Module,
    spec: ModelSettings,
    lora: LoraSettings,
    layers: list[int] | None,
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters on the target modules of `layers` only (None: all),
    then turn on gradient checkpointing if asked (after peft, see enable_gradient_checkpointing)."""
    try:
        peft_model = get_peft_model(model, lora_config(spec, lora, layers))
    except ValueError as exc:
        raise ModelError(
            f"cannot attach LoRA to {list(spec.target_modules)}: {str(exc).splitlines()[0]}; "
            f"set model.target_modules to linear modules of this model"
        ) from exc
    if gradient_checkpointing:
        enable_gradient_checkpointing(peft_model)
    return peft_model


def save_initial_adapter(peft_model: PeftModel, directory: Path) -> Path:
    """A PiSSA/OLoRA adapter as initialised, before any step: what peft's save_pretrained needs
    (path_initial_model_for_weight_conversion) to turn the trained adapter into a plain LoRA on the
    unmodified base. Saved as init_lora_weights=True, so loading it does not decompose the base again."""
    config = peft_model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        peft_model.save_pretrained(str(directory / "initial_adapter"), safe_serialization=True)
    finally:
        config.init_lora_weights = init
    return directory / "initial_adapter"


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in backward (non-reentrant activation checkpointing).

    transformers also hooks the embeddings so that their output requires grad, which would run
    backward through every layer. Non-reentrant checkpointing does not need it, so the hook is
    removed again and backward still stops at the lowest layer that carries LoRA.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"gradient_checkpointing=true: {type(base).__name__} does not support it; "
            f"set gradient_checkpointing=false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.disable_input_require_grads()


def lora_params_per_layer(model: nn.Module, spec: ModelSettings, lora: LoraSettings) -> list[int]:
    """Trainable LoRA parameters each layer would get: r · (in + out) per target linear module,
    plus DoRA's magnitude vector (out) with lora.variant=dora."""
    magnitude = 1 if lora.variant == "dora" else 0
    counts = []
    for layer in get_layers(model, spec.layers_path):
        total = 0
        for name, module in layer.named_modules():
            if name.split(".")[-1] in spec.target_modules and hasattr(module, "in_features"):
                total += lora.r * (module.in_features + module.out_features) + magnitude * module.out_features
        counts.append(total)
    if not any(counts):
        raise ModelError(
            f"no module named {list(spec.target_modules)} inside the layers at '{spec.layers_path}'; "
            f"set model.target_modules to linear modules of this model"
        )
    return counts


def lora_params_per_layer_of(spec: ModelSettings, lora: LoraSettings) -> list[int]:
    """LoRA parameters per layer of the model `spec` names, from its config alone (meta device, no
    weights loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_local_path(spec)
    try:
        config = AutoConfig.from_pretrained(
            model_dir(spec),
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            **hub_access(spec),
        )
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    except Exception as exc:
        raise ModelError(_load_failure("model config", spec, exc)) from exc
    return lora_params_per_layer(skeleton, spec, lora)


def model_dir(spec: ModelSettings) -> str:
    """Where transformers loads the model from: model.name_or_path, or for a GGUF checkpoint
    (model.gguf_file) its de-quantized safetensors copy, made once (gguf_cache_dir)."""
    if not spec.gguf_file:
        return spec.name_or_path
    source = gguf_path(spec)
    cache = gguf_cache_dir(source)
    if not (cache / "config.json").is_file():
        _convert_gguf(source, cache)
    return str(cache)


def gguf_path(spec: ModelSettings) -> Path:
    """The GGUF file model.gguf_file names (a path, or a file name inside model.name_or_path)."""
    path = Path(spec.gguf_file).expanduser()
    if not path.is_absolute():
        path = Path(spec.name_or_path).expanduser() / path
    if not path.is_file():
        raise ModelError(
            f"model.gguf_file: {path} not found; point model.name_or_path at the folder that holds it "
            f"(or give model.gguf_file as a full path)"
        )
    return path


def gguf_cache_dir(source: Path) -> Path:
    """The converted copy's folder, keyed by the GGUF file's sha256 (a changed file converts anew)."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flexora" / "gguf"
    stat = source.stat()
    return root / f"{source.stem}-{_sha256(str(source.resolve()), stat.st_size, stat.st_mtime_ns)[:16]}"


@functools.lru_cache(maxsize=8)
def _sha256(path: str, _size: int, _mtime_ns: int) -> str:
    """A file's sha256, once per process for a given size and modification time (a stage loads
    the tokenizer, the config and the model: one read of a multi-GB file, not three)."""
    from flexora_cli.rundir import sha256_of

    return sha256_of(path)


def _convert_gguf(source: Path, cache: Path) -> None:
    """De-quantize `source` through transformers (float32) and save it and its tokenizer as a plain
    model. A GGUF-loaded model refuses save_pretrained, so its weights go into a model built from
    its config without the quantization entry."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexora_cli import report
    from flexora_cli.rundir import atomic_directory

    report.console.print(
        f"model: converting {source} once into {cache} (de-quantizing; 20 s for 135M parameters on 2 cores)"
    )
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load the GGUF checkpoint {source}: {reason}; it needs the gguf package "
            f"(pip install gguf) and an architecture transformers can read from GGUF"
        ) from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    with atomic_directory(cache) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def _check_local_path(spec: ModelSettings) -> None:
    if spec.gguf_file:
        gguf_path(spec)  # raises when missing
        return
    path = Path(spec.name_or_path).expanduser()
    looks_local = spec.name_or_path.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.exists():
        raise ModelError(
            f"model path {spec.name_or_path} does not exist; check model.name_or_path (a folder saved "
            f"with save_pretrained, or a hub id such as meta-llama/Meta-Llama-3-8B)"
        )
    if looks_local and not (path / "config.json").is_file():
        raise ModelError(
            f"model.name_or_path={spec.name_or_path} is not a model directory (no config.json); "
            f"point it at a folder saved with save_pretrained, or at a hub id"
        )


def hub_access(spec: ModelSettings) -> dict:
    """from_pretrained's hub options: local files only when offline (HF_HUB_OFFLINE=1, or the hub
    unreachable), so a missing model fails at once instead of after minutes of retries."""
    if spec.gguf_file or Path(spec.name_or_path).expanduser().exists():
        return {}
    return {"local_files_only": True} if hub_offline() else {}


@functools.cache
def hub_offline() -> bool:
    """HF_HUB_OFFLINE set, or huggingface.co unreachable within 3 s (checked once per process;
    behind a proxy the hub's own client decides)."""
    import socket

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    endpoint = constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = endpoint.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=3).close()
        return False
    except OSError:
        return True


def _load_failure(what: str, spec: ModelSettings, exc: Exception) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if hub_access(spec):
        return (
            f"cannot load the {what} '{spec.name_or_path}': it is not in the local Hugging Face cache "
            f"and the hub is offline (HF_HUB_OFFLINE=1 or unreachable); download it on a machine with "
            f"network access (huggingface-cli download {spec.name_or_path}) or point model.name_or_path "
            f"at a local folder"
        )
    return (
        f"cannot load the {what} '{spec.name_or_path}': {reason}; check model.name_or_path "
        f"(a hub id needs network access or a local cache)"
    )
