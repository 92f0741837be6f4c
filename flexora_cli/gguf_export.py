"""The merged model as one GGUF file, for llama.cpp and Ollama (`flexora export export.format=gguf`).

Written with the `gguf` package's writer (llama.cpp's own Python package), the way llama.cpp's
convert_hf_to_gguf.py writes a Llama-family model:
- hyperparameters under `llama.*`; the tokenizer as a byte-level BPE vocabulary (`gpt2`), its
  merges, special token ids and chat template (gguf.SpecialVocab reads them from the tokenizer
  files the export already wrote);
- tensors under GGUF's names (gguf.get_tensor_name_map); the q and k projections permuted from
  transformers' rotary layout to GGML's (transformers reverses it on load);
- matrices in the asked type (f16; q8_0 where the rows divide into 32-value blocks, f16
  otherwise; or f32), vectors (norms) in f32, as llama.cpp keeps them. The file holds exactly
  the rounded weights: transformers' logits from an f16 GGUF equal the merged model's with its
  matrices rounded to f16 (tests); f16 rounding itself moves SmolLM2's logits by up to 0.05.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from flexora_cli.errors import ConfigError

GGUF_TYPES = ("f16", "q8_0", "f32")
ARCHITECTURES = ("llama", "mistral")  # llama.cpp reads both as its `llama` architecture


def check_exportable(config, tokenizer) -> None:
    """Refuse (ConfigError, one line) a model this module cannot write as a GGUF."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            "export.format=gguf needs the gguf package; pip install gguf (or flexora-cli[smollm2])"
        )
    if config.model_type not in ARCHITECTURES:
        raise ConfigError(
            f"GGUF export covers {', '.join(ARCHITECTURES)} models, not {config.model_type}; use "
            f"export.format=safetensors and llama.cpp's convert_hf_to_gguf.py on export/model"
        )
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":  # llama.cpp's converter writes extra tensors for scaled rope
        raise ConfigError(
            f"GGUF export writes plain rotary embeddings, not rope_type={rope_type}; use "
            f"export.format=safetensors and llama.cpp's convert_hf_to_gguf.py on export/model"
        )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str()).get("model", {}) if backend is not None else {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConfigError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style: Llama 3, SmolLM), not this "
            "one; use export.format=safetensors and llama.cpp's convert_hf_to_gguf.py on export/model"
        )


def write_gguf(model, tokenizer, tokenizer_dir: Path, path: Path, gguf_type: str, pre_tokenizer: str) -> None:
    """Write `model` (a merged transformers model, check_exportable) to `path` with `tokenizer`,
    whose files are saved in `tokenizer_dir`; `pre_tokenizer` is llama.cpp's name for its
    pre-tokenizer."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    _hyperparameters(writer, model.config, gguf_type)
    _tokenizer(writer, tokenizer, tokenizer_dir, model.config.vocab_size, pre_tokenizer)
    for name, tensor in _tensors(model):
        _add_tensor(writer, name, tensor, gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _hyperparameters(writer, config, gguf_type: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(getattr(config, "_name_or_path", "") or "flexora merged model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    file_type = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "f32": gguf.LlamaFileType.ALL_F32,
    }[gguf_type]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tokenizer(writer, tokenizer, tokenizer_dir: Path, vocab_size: int, pre_tokenizer: str) -> None:
    """Tokens by id (padded to the model's vocabulary as llama.cpp's converter pads), their types,
    then merges, special ids and chat template (read from the files in `tokenizer_dir`)."""
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = {index for index in tokenizer.added_tokens_decoder}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index in special:
            types.append(gguf.TokenType.CONTROL)
        elif index in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def _tensors(model):
    """(GGUF name, tensor) for every weight; q/k permuted, a tied LM head left out."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the embedding matrix for the head when output.weight is absent
        if hf_name.endswith("q_proj.weight"):
            tensor = _permute(tensor, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = _permute(tensor, config.num_key_value_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(
                f"GGUF export: no GGUF name for the tensor {hf_name}; use export.format=safetensors"
            )
        yield name, tensor


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotary layout (halves) to GGML's (interleaved pairs), per head."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _add_tensor(writer, name: str, tensor: torch.Tensor, gguf_type: str) -> None:
    import gguf

    data = tensor.detach().float().cpu().numpy()
    if data.ndim == 1 or gguf_type == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif (
        gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0
    ):
        quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, data.astype(np.float16))
