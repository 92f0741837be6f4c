"""The `flexora` command: help, Hydra's own flags, and one-line errors with exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flexora_cli.cli import main


def flexora(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flexora_cli.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_stages(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for stage in ("search", "select", "finetune", "eval", "run"):
        assert f"  {stage} " in out


def test_cfg_job_prints_the_composed_config():
    done = flexora("eval", "recipe=llama3_piqa", "--cfg", "job")
    assert done.returncode == 0, done.stderr
    assert (
        "name_or_path: meta-llama/Meta-Llama-3-8B" in done.stdout
        and "out_dir: runs/llama3_piqa" in done.stdout
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["fly"], 2, "unknown stage 'fly'"),
        (["search", "recipe=nope"], 2, "valid options for recipe: chatglm3_piqa, demo, gemma_piqa"),
        (["search", "model=gpt9"], 2, "valid options for model: chatglm3_6b, gemma_7b, llama3_8b"),
        (["search", "serach.budget=5"], 2, "no such setting"),
        (["search", "select.rule=best"], 2, "select.rule: 'best' is not one of positive, top_k, budget"),
        (["search", "lora.r=0", "device=tpu"], 2, "lora.r: must be > 0, got 0; device: 'tpu'"),
        (["select", "recipe=demo", "select.layers=[2,2]"], 2, "duplicate indices"),
        (["search", "seed=abc"], 2, "seed: Value 'abc' of type 'str' could not be converted to Integer"),
        (["search", "search.budget=[1,2"], 2, "cannot parse the override 'search.budget=[1,2' (no viable"),
        (
            ["run", "-m", "recipe=demo", "lora=r8,r99"],
            2,
            "Could not find 'lora/r99'; valid options for lora: r16",
        ),
    ],
)
def test_bad_input_is_one_line_with_exit_code(args, code, message, capsys):
    assert main(args) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err


def test_missing_artifact_from_the_command_line(tmp_path):
    done = flexora("select", "recipe=llama3_piqa", f"out_dir={tmp_path}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: select needs")
    assert "`flexora search`" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_dataset_and_adapter_lists_expand_for_eval():
    from flexora_cli.cli import expand_shorthands

    assert expand_shorthands("eval", ["dataset=[piqa, hellaswag]", "adapters=[runs/a,runs/b]", "seed=1"]) == [
        "dataset=piqa",
        "eval.datasets=[piqa,hellaswag]",
        "eval.adapters=[runs/a,runs/b]",
        "seed=1",
    ]
    assert expand_shorthands("search", ["dataset=piqa"]) == ["dataset=piqa"]
    assert expand_shorthands("compare", ["dataset=[piqa,race_high]"]) == [
        "dataset=piqa",
        "compare.datasets=[piqa,race_high]",
    ]


def test_swept_keys_name_each_multirun_job():
    from flexora_cli.cli import _swept_keys

    args = ["-m", "recipe=demo", "lora=r4,r8", "seed=range(1,3)", "eval.datasets=[a,b]", "search=budget_1k"]
    assert _swept_keys(args) == ["lora", "seed"]
    assert _swept_keys(["recipe=demo", "lora=r4,r8"]) == []  # not a multirun


def test_dataset_list_outside_eval_is_one_clear_error(capsys):
    assert main(["search", "recipe=demo", "dataset=[piqa,hellaswag]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "error: dataset=[piqa,hellaswag]: several datasets work with `flexora eval` and `flexora compare` only"
    )
    assert len(err.splitlines()) == 1


def test_print_json_puts_the_result_on_stdout(demo_dir, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flexora_cli.cli",
            "select",
            "recipe=demo",
            f"demo_assets={demo_dir}",
            f"out_dir={tmp_path}",
            "select.layers=[2,5]",
            "print_json=true",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["layers"] == [2, 5]


def test_offline_a_missing_hub_model_fails_at_once_with_one_line(demo_dir, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    from flexora_cli import modeling
    from flexora_cli.settings import ModelSettings

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    modeling.hub_offline.cache_clear()
    try:
        spec = ModelSettings(name="x", name_or_path="nobody/no-such-model")
        assert modeling.hub_access(spec) == {"local_files_only": True}  # no hub requests, no retries
        args = ["search", "recipe=demo", f"demo_assets={demo_dir}", "model.name_or_path=nobody/no-such-model"]
        assert main([*args, f"out_dir={tmp_path / 'run'}"]) == 2
    finally:
        modeling.hub_offline.cache_clear()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "error: cannot load the tokenizer 'nobody/no-such-model': it is not in the local Hugging Face "
        "cache and the hub is offline"
    )
    assert not (tmp_path / "run").exists()
