"""`flexora export` — fold the fine-tuned adapter into the base weights (peft merge_and_unload).

Writes export/model/: a standard transformers model directory (safetensors weights, config,
tokenizer) that loads with `AutoModelForCausalLM.from_pretrained` and needs no peft; with
export.format=gguf also export/model/model-<gguf_type>.gguf, for llama.cpp and Ollama
(gguf_export.py).
"""

from __future__ import annotations

from omegaconf import DictConfig
from peft import PeftModel

from flexora_cli import report
from flexora_cli.engine import Engine
from flexora_cli.errors import ConfigError
from flexora_cli.gguf_export import check_exportable, write_gguf
from flexora_cli.manifest import Manifest
from flexora_cli.modeling import gguf_path, load_model, load_tokenizer
from flexora_cli.settings import Settings
from flexora_cli.stages import locked, setup


@locked
def run(cfg: DictConfig | Settings) -> dict:
    settings, run_dir = setup(cfg)
    manifest = Manifest(run_dir)
    manifest.check_overwrite("export", settings)
    adapter_dir = manifest.require_adapter("export", settings)
    if settings.model.quantization != "none":
        raise ConfigError(
            "export merges into full-precision weights; set model.quantization=none "
            "(the adapter trained on the quantized base still applies)"
        )
    export = settings.export
    gguf_file = run_dir.export_dir / f"model-{export.gguf_type}.gguf" if export.format == "gguf" else None
    if run_dir.writes:  # one merge is enough: the other processes of a launch only wait
        engine = Engine(settings)
        tokenizer = load_tokenizer(settings.model)
        model = load_model(settings.model, engine.device, engine.precision)
        if gguf_file:
            check_exportable(model.config, tokenizer)
        manifest.begin("export", settings)
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        with run_dir.atomic_dir(run_dir.export_dir) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if gguf_file:
                write_gguf(
                    merged, tokenizer, tmp, tmp / gguf_file.name, export.gguf_type, _pre_tokenizer(settings)
                )
        manifest.complete("export", settings, [run_dir.export_dir], inputs=("finetune",))
    facts = [f"adapter merged into {settings.model.name_or_path}; loads with AutoModelForCausalLM, no peft"]
    if gguf_file:
        facts.append(f"{gguf_file.name}: llama-cli -m {gguf_file}, or Ollama: FROM {gguf_file}")
    report.result(report.stage_panel("export", facts, [run_dir.export_dir]))
    return {
        "model_dir": str(run_dir.export_dir),
        "base": settings.model.name_or_path,
        "gguf": str(gguf_file) if gguf_file else None,
    }


def _pre_tokenizer(settings: Settings) -> str:
    """export.gguf_pre_tokenizer, else the base GGUF's (model.gguf_file), else llama.cpp's default."""
    if settings.export.gguf_pre_tokenizer:
        return settings.export.gguf_pre_tokenizer
    if settings.model.gguf_file:
        import gguf

        field = gguf.GGUFReader(gguf_path(settings.model)).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return field.contents()
    return "default"
