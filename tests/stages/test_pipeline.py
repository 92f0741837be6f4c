"""Each stage alone and `run` on the demo's tiny Llama model, asserting the artifacts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from flexora_cli.errors import ConfigError, MissingArtifactError
from flexora_cli.rundir import RunDir
from flexora_cli.settings import load
from flexora_cli.stages import evaluate, finetune, run, search, select


def test_stages_one_by_one(tiny_cfg, demo_dir):
    cfg = tiny_cfg()
    run_dir = RunDir(cfg.out_dir)

    with pytest.raises(MissingArtifactError, match="`flexora search`"):
        select.run(cfg)

    searched = search.run(cfg)
    alpha = json.loads(run_dir.alpha_json.read_text())
    assert alpha["num_layers"] == 8 and len(alpha["alpha"]) == 8
    assert sorted(alpha["ranking"]) == list(range(8))
    assert alpha["ranking"] == sorted(range(8), key=lambda i: -alpha["alpha"][i])
    assert alpha["alpha_sum"] == pytest.approx(sum(alpha["alpha"]))  # (Σα̂ = 0 only under SGD: test_gates)
    assert any(abs(a) > 1e-3 for a in alpha["alpha"])
    assert alpha["history"] and all(
        math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in alpha["history"]
    )
    assert searched["steps"] == 4  # budget 64 / batch 16
    assert run_dir.alpha_png.stat().st_size > 0 and run_dir.search_loss_png.stat().st_size > 0
    assert (run_dir.stage_dir("search") / "config.yaml").exists()

    selected = select.run(cfg)
    on_disk = json.loads(run_dir.selection_json.read_text())
    assert on_disk["layers"] == sorted(i for i in range(8) if alpha["alpha"][i] > 0) == selected["layers"]
    assert on_disk["rule"] == "positive"
    assert on_disk["trainable_params"] == sum(alpha["lora_params_per_layer"][i] for i in on_disk["layers"])

    tuned = finetune.run(cfg)
    adapter = json.loads((run_dir.adapter_dir / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == on_disk["layers"]
    assert tuned["trainable_params"] == on_disk["trainable_params"]

    metrics = evaluate.run(cfg)
    assert metrics == json.loads(run_dir.metrics_json.read_text())
    assert (
        metrics["n"] == 40
        and 0 <= metrics["base"]["accuracy"] <= 1
        and 0 <= metrics["adapter"]["accuracy"] <= 1
    )
    rows = [json.loads(line) for line in run_dir.predictions_jsonl.read_text().splitlines()]
    assert len(rows) == 40
    for row in rows:
        for variant in ("base", "adapter"):
            scores = row[variant]["scores"]
            assert len(scores) == 4 and row[variant]["predicted"] == scores.index(max(scores))
    assert sum(r["adapter"]["predicted"] == r["gold"] for r in rows) == metrics["adapter"]["correct"]

    manifest = json.loads(run_dir.manifest_json.read_text())
    assert {
        s: manifest["stages"][s]["status"] for s in ("search", "select", "finetune", "eval")
    } == dict.fromkeys(("search", "select", "finetune", "eval"), "complete")


def test_adapter_loads_with_plain_peft_only_on_selected_layers(tiny_cfg, demo_dir):
    cfg = tiny_cfg("select.layers=[1,6]")
    select.run(cfg)
    finetune.run(cfg)
    base = AutoModelForCausalLM.from_pretrained(f"{demo_dir}/model")
    model = PeftModel.from_pretrained(base, str(RunDir(cfg.out_dir).adapter_dir))
    adapted = {
        int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_A" in n
    }
    assert adapted == {1, 6}
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # it trained


def test_run_all_then_skip_complete(tiny_cfg, capsys):
    cfg = tiny_cfg("select.rule=top_k", "select.k=3")
    results = run.run(cfg)
    assert set(results) == {"search", "select", "finetune", "eval"}
    assert len(results["select"]["layers"]) == 3
    assert run.run(cfg) == {}  # everything complete with the same settings
    assert "already complete" in capsys.readouterr().err
    changed = run.run(tiny_cfg("select.rule=top_k", "select.k=2"))
    assert set(changed) == {"select", "finetune", "eval"}  # search is upstream of the change


def test_explicit_layers_bypass_the_search(tiny_cfg):
    results = run.run(tiny_cfg("select.layers=all"))
    assert "search" not in results
    assert results["select"]["layers"] == list(range(8)) and results["select"]["rule"] == "explicit"


def test_bad_inputs_are_clear(tiny_cfg):
    with pytest.raises(ConfigError, match="select.layers: \\[9\\] out of range for a model with 8 layers"):
        select.run(tiny_cfg("select.layers=[1,9]"))
    with pytest.raises(ConfigError, match="search.budget=9999 .* exceeds"):
        search.run(tiny_cfg("search.budget=9999"))
    with pytest.raises(ConfigError, match="duplicate indices"):
        load(tiny_cfg("select.layers=[1,1]"))
    with pytest.raises(MissingArtifactError, match="`flexora finetune`"):
        evaluate.run(tiny_cfg())


def test_demo_search_ranks_planted_layers_on_top(demo_dir, tmp_path):
    from flexora_cli.demo import PLANTED_LAYERS
    from tests.conftest import compose_config

    torch.manual_seed(0)
    cfg = compose_config("recipe=demo", f"demo_assets={demo_dir}", f"out_dir={tmp_path}")
    ranking = search.run(cfg)["ranking"]
    assert set(ranking[: len(PLANTED_LAYERS)]) == set(PLANTED_LAYERS)
    assert select.run(cfg)["layers"] == sorted(PLANTED_LAYERS)
