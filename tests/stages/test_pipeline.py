"""Each stage alone and `run` on the demo's tiny Llama model, asserting the artifacts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from flexora_cli.config import load
from flexora_cli.errors import ConfigError, MissingArtifactError
from flexora_cli.rundir import RunDir
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
    assert abs(alpha["alpha_sum"]) < 1e-6 and abs(sum(alpha["alpha"])) < 1e-6  # Proposition 1, under Adam
    assert all(abs(h["alpha_sum"]) < 1e-6 for h in alpha["history"])  # after every logged step
    assert alpha["hypergradient"] == "first_order" and alpha["unroll_steps"] == 0
    assert any(abs(a) > 1e-3 for a in alpha["alpha"])
    assert alpha["history"] and all(
        math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in alpha["history"]
    )
    assert searched.steps == 4  # budget 64 / batch 16
    assert run_dir.alpha_png.stat().st_size > 0 and run_dir.search_loss_png.stat().st_size > 0
    assert (run_dir.stage_dir("search") / "config.yaml").exists()

    selected = select.run(cfg)
    on_disk = json.loads(run_dir.selection_json.read_text())
    assert on_disk["layers"] == sorted(i for i in range(8) if alpha["alpha"][i] > 0) == selected.layers
    assert on_disk["rule"] == "positive"
    assert run_dir.selection_png.stat().st_size > 0
    assert on_disk["trainable_params"] == sum(alpha["lora_params_per_layer"][i] for i in on_disk["layers"])

    tuned = finetune.run(cfg)
    adapter = json.loads((run_dir.adapter_dir / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == on_disk["layers"]
    assert tuned.trainable_params == on_disk["trainable_params"]

    summary = evaluate.run(cfg)
    assert summary.to_json() == json.loads(run_dir.metrics_json.read_text())
    demo = summary.results["demo"]
    assert summary.format == "mcq" and summary.splits == {"demo": "validation"}
    assert demo["base"].n == demo["adapter"].n == 40
    assert demo["adapter"].acc_norm is None  # letters: acc only
    assert "acc_norm" not in json.loads(run_dir.metrics_json.read_text())["results"]["demo"]["adapter"]
    rows = [json.loads(line) for line in run_dir.predictions_jsonl.read_text().splitlines()]
    assert len(rows) == 40
    for row in rows:
        for variant in ("base", "adapter"):
            scores = row[variant]["scores"]
            assert len(scores) == 4 and row[variant]["predicted"] == scores.index(max(scores))
    for variant in ("base", "adapter"):
        assert sum(r[variant]["predicted"] == r["gold"] for r in rows) / 40 == demo[variant].acc

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
    assert len(results["select"].layers) == 3
    assert run.run(cfg) == {}  # everything complete with the same settings
    assert "already complete" in capsys.readouterr().err
    with pytest.raises(
        ConfigError, match=r"select: .* other settings \(select.k: 3 then, 2 now\); add force=true"
    ):
        run.run(tiny_cfg("select.rule=top_k", "select.k=2"))  # never replaces a result silently
    select.run(tiny_cfg("select.rule=top_k", "select.k=2", "force=true"))
    changed = run.run(tiny_cfg("select.rule=top_k", "select.k=2"))
    assert set(changed) == {"finetune", "eval"}  # built from the replaced selection: stale
    err = " ".join(capsys.readouterr().err.split())
    assert "finetune runs again: built from select outputs that have changed since" in err


def test_explicit_layers_bypass_the_search(tiny_cfg):
    results = run.run(tiny_cfg("select.layers=all"))
    assert "search" not in results
    assert results["select"].layers == list(range(8)) and results["select"].rule == "explicit"


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
    ranking = search.run(cfg).ranking
    assert set(ranking[: len(PLANTED_LAYERS)]) == set(PLANTED_LAYERS)
    assert select.run(cfg).layers == sorted(PLANTED_LAYERS)


def test_force_redoes_complete_stages(tiny_cfg):
    run.run(tiny_cfg("select.layers=[3]"))
    assert run.run(tiny_cfg("select.layers=[3]")) == {}
    assert set(run.run(tiny_cfg("select.layers=[3]", "force=true"))) == {"select", "finetune", "eval"}


def test_live_lock_refuses_and_stale_lock_is_taken_over(tiny_cfg, capsys):
    import os
    import subprocess
    import sys

    from flexora_cli.errors import RunLockedError

    cfg = tiny_cfg("select.layers=[3]")
    root = RunDir(cfg.out_dir).root
    root.mkdir(parents=True)
    (root / ".lock").write_text(f"{os.getppid()}\n")  # the test runner's parent: alive
    with pytest.raises(RunLockedError, match=f"in use by flexora process {os.getppid()}"):
        select.run(cfg)
    assert sorted(p.name for p in root.iterdir()) == [".lock"]  # nothing written

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (root / ".lock").write_text(f"{gone.pid}\n")
    assert select.run(cfg).layers == [3]
    assert f"stale lock {root / '.lock'} (process {gone.pid} is gone)" in " ".join(
        capsys.readouterr().err.split()
    )
    assert not (root / ".lock").exists()


def test_failed_stage_leaves_no_run_directory(tiny_cfg):
    cfg = tiny_cfg("select.layers=[1,9]")
    with pytest.raises(ConfigError):
        select.run(cfg)
    assert not RunDir(cfg.out_dir).root.exists()


def test_tensorboard_logs_and_no_plots(tiny_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg("tracker=tensorboard", "plots=false")
    search.run(cfg)
    out = RunDir(cfg.out_dir).root
    events = EventAccumulator(str(out / "logs" / "search"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss/train", "loss/val", "alpha/layer_00", "alpha/layer_07"} <= set(tags)
    logged = [e.value for e in events.Scalars("alpha/layer_05")]
    history = json.loads((out / "search" / "alpha.json").read_text())["history"]
    assert logged == pytest.approx([h["alpha"][5] for h in history])
    assert not list(out.rglob("*.png"))


def test_qlora_runs_every_stage_on_the_4bit_base(tiny_cfg):
    """bitsandbytes' CPU backend: NF4 base, LoRA on its Linear4bit layers, gated in the search."""
    cfg = tiny_cfg("model.quantization=4bit")
    results = run.run(cfg)
    assert len(results["search"].alpha) == 8 and math.isfinite(results["search"].alpha_sum)
    assert any(abs(a) > 1e-4 for a in results["search"].alpha)  # the gates on quantized layers learn
    adapter = results["eval"].score("demo", "adapter")
    assert adapter.n == 40 and 0 <= adapter.acc <= 1


def test_dora_finetune_after_a_plain_lora_search(tiny_cfg):
    """lora.variant=dora: the search gates plain LoRA, finetune trains DoRA on the selected
    layers, and eval loads the DoRA adapter; the selection counts DoRA's magnitude vectors."""
    results = run.run(tiny_cfg("lora.variant=dora", "select.rule=top_k", "select.k=2"))
    adapter = json.loads((RunDir(tiny_cfg().out_dir).adapter_dir / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True and adapter["layers_to_transform"] == results["select"].layers
    assert results["finetune"].trainable_params == results["select"].trainable_params
    assert results["eval"].score("demo", "adapter").n == 40
