"""The catalogue of bad inputs (docs/errors.md): each one is a single `error:` line naming the
problem and the fix, exit code 2 (usage/config) or 1 (runtime), no traceback, and no new or changed
files (a runtime failure may leave its stage's config.yaml and manifest entry, the run's log)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from safetensors.torch import save_file

from flexora_cli import cli, config
from flexora_cli.method import SearchResult, ranking


@dataclass
class Case:
    args: list[str]
    message: str
    """The start of the error line, after `error: `; {run}, {data} and {tmp} are filled in."""
    exit_code: int = 2
    prepare: Callable[[Path, Path], None] | None = None
    """Called with (tmp folder, demo assets) before the command, to set up the situation."""
    stage: str = "search"
    extra: list[str] = field(default_factory=list)


def _data(tmp: Path, demo: Path, *rows: object, split: str = "train") -> None:
    (tmp / "data").mkdir(exist_ok=True)
    body = b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows)
    (tmp / "data" / f"{split}.jsonl").write_bytes(body)


def _record(demo: Path) -> dict:
    return json.loads((demo / "data" / "train.jsonl").read_text().splitlines()[0])


def _searched(alpha: list[float], config: bool = False) -> Callable[[Path, Path], None]:
    def prepare(tmp: Path, demo: Path) -> None:
        search = tmp / "run" / "search"
        search.mkdir(parents=True)
        content = SearchResult(
            alpha=alpha, ranking=ranking(alpha), scaled_alpha=[1.0] * len(alpha), alpha_sum=sum(alpha),
            lora_params_per_layer=[896] * len(alpha), hypergradient="first_order", unroll_steps=0,
            steps=1, seconds=1.0, padding_waste=0.0, num_processes=1, precision="fp32",
            max_grad_norm=1.0, nonfinite_steps_skipped=0,
        )  # fmt: skip
        (search / "alpha.json").write_text(json.dumps(content.to_json()))
        if config:  # as if searched with another LoRA rank
            from omegaconf import OmegaConf

            from flexora_cli.config import load
            from tests.conftest import compose_config

            other = load(
                compose_config("recipe=demo", f"demo_assets={demo}", f"out_dir={tmp / 'run'}", "lora=r8")
            )
            (search / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(other)))

    return prepare


def _foreign_adapter(tmp: Path, demo: Path) -> None:
    adapter = tmp / "other"
    adapter.mkdir()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B",
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    import torch

    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 4096),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(4096, 4),
        },
        str(adapter / "adapter_model.safetensors"),
    )


def _live_lock(tmp: Path, demo: Path) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / ".lock").write_text(f"{os.getppid()}\n")


def _broken_recipe(tmp: Path, demo: Path) -> None:
    shutil.copytree(config.recipes_dir(), tmp / "recipes")
    (tmp / "recipes" / "recipe" / "broken.yaml").write_text("# @package _global_\nsearch: {budget: [1,\n")


def _without_bitsandbytes(tmp: Path, demo: Path) -> None:
    """Marker: the test hides the bitsandbytes package (as on a machine without the quant extra)."""


def _nan_at_step_3(tmp: Path, demo: Path) -> None:
    """Marker: the test makes layer 3's output NaN from its 5th forward on (step 3's LoRA step)."""


def _disk_full(tmp: Path, demo: Path) -> None:
    """Marker: the test makes every fsync fail with ENOSPC."""


SFT_CHAT = ["dataset.data_dir={tmp}/data", "dataset.task=sft", "dataset.sft.format=messages"]
HI = {"role": "user", "content": "Hi"}

CASES = {
    "unknown stage": Case(
        ["serch"], "unknown stage 'serch'; use one of: search, select, finetune, eval, run"
    ),
    "unknown recipe": Case(
        ["recipe=llama9"],
        "In 'config': Could not find 'recipe/llama9'; valid options for recipe: chatglm3_piqa, demo,",
    ),
    "unknown group option": Case(
        ["model=gpt5"], "In 'config': Could not find 'model/gpt5'; valid options for model: chatglm3_6b,"
    ),
    "unknown override key": Case(
        ["search.budgett=5"], "Could not override 'search.budgett': no such setting"
    ),
    "wrong value type": Case(
        ["search.budget=lots"], "search.budget: Value 'lots' of type 'str' could not be converted to Integer"
    ),
    "invalid value": Case(
        ["lora.r=0", "search.batch_size=-1"],
        "invalid settings: lora.r: must be > 0, got 0; search.batch_size: must be > 0, got -1",
    ),
    "eval token budget of 0": Case(
        ["eval.batch_tokens=0"],
        "invalid settings: eval.batch_tokens: must be a positive integer or null, got 0",
    ),
    "malformed recipe YAML": Case(
        ["recipe=broken"],
        "malformed YAML in {tmp}/recipes/recipe/broken.yaml, line 3:",
        prepare=_broken_recipe,
    ),
    "dataset list outside eval": Case(
        ["dataset=[piqa,hellaswag]"],
        "dataset=[piqa,hellaswag]: several datasets work with `flexora eval` and `flexora compare` only",
    ),
    "missing data file": Case(
        ["dataset.data_dir={tmp}/nowhere"],
        "{tmp}/nowhere/train.jsonl not found: dataset.data_dir needs one train.jsonl, train.csv or train.parquet",
    ),
    "unreadable data file": Case(
        ["dataset.data_dir={tmp}/data"],
        "{tmp}/data/train.jsonl: cannot read",
        prepare=lambda t, d: _data(t, d, b"\xff\xfe\n"),
    ),
    "invalid JSON line": Case(
        ["dataset.data_dir={tmp}/data"],
        "{tmp}/data/train.jsonl:1: not valid JSON",
        prepare=lambda t, d: _data(t, d, b"{oops\n"),
    ),
    "row missing a column": Case(
        ["dataset.data_dir={tmp}/data"],
        "{tmp}/data/train.jsonl row 1, column 'endings': missing (the row has ",
        prepare=lambda t, d: _data(t, d, {k: v for k, v in _record(d).items() if k != "endings"}),
    ),
    "SFT row without a response": Case(
        ["dataset.data_dir={tmp}/data", "dataset.task=sft"],
        "{tmp}/data/train.jsonl row 1, column 'output': missing (the row has instruction, input); fix dataset.sft",
        prepare=lambda t, d: _data(t, d, {"instruction": "Add two and two.", "input": ""}),
    ),
    "SFT turn with an unknown role": Case(
        [*SFT_CHAT, "model.chat_template=true"],
        "{tmp}/data/train.jsonl row 1, column 'messages': turn 2 has unknown role 'bot'; use one of "
        "system, user, assistant, tool",
        prepare=lambda t, d: _data(
            t, d, {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}
        ),
    ),
    "SFT empty conversation": Case(
        [*SFT_CHAT, "model.chat_template=true"],
        "{tmp}/data/train.jsonl row 1, column 'messages': expected a non-empty list of turns, got []",
        prepare=lambda t, d: _data(t, d, {"messages": []}),
    ),
    "SFT template that renders nothing": Case(
        [
            "dataset.data_dir={tmp}/data",
            "dataset.task=sft",
            "dataset.sft.format=prompt_response",
            "dataset.sft.prompt=q",
            "dataset.sft.response='{{{{ a | trim }}}}'",
        ],
        "{tmp}/data/train.jsonl row 1, template '{{{{ a | trim }}}}': renders nothing; fix the template",
        prepare=lambda t, d: _data(t, d, {"q": "Add two and two.", "a": "  "}),
    ),
    "SFT chat data, tokenizer without a chat template": Case(
        [*SFT_CHAT, "model.chat_template=true", "search.budget=8", "search.val_samples=4"],
        "model.chat_template=true: the tokenizer of {demo}/model has no chat template; use an instruct "
        "model, or model.chat_template=false with alpaca or prompt_response data",
        prepare=lambda t, d: _data(
            t, d, *[{"messages": [HI, {"role": "assistant", "content": "Hello"}]}] * 16
        ),
    ),
    "SFT chat data without model.chat_template": Case(
        SFT_CHAT,
        "invalid settings: dataset.sft.format=messages: chat data is rendered by the tokenizer's chat "
        "template; set model.chat_template=true",
    ),
    "label out of range": Case(
        ["dataset.data_dir={tmp}/data"],
        "{tmp}/data/train.jsonl row 1, column 'label': label '7' out of range, expected 0, 1, 2, 3",
        prepare=lambda t, d: _data(t, d, {**_record(d), "label": "7"}),
    ),
    "empty split": Case(
        ["dataset.data_dir={tmp}/data"],
        "{tmp}/data/train.jsonl: split 'train' is empty",
        prepare=lambda t, d: _data(t, d, b"\n"),
    ),
    "column the data lacks": Case(
        ["dataset.columns.question=prompt"],
        "{demo}/data/train.jsonl row 1, column 'prompt': missing (the row has ",
    ),
    "label in the wrong format": Case(
        ["dataset.columns.label_format=letter"],
        "{demo}/data/train.jsonl row 1, column 'label': label ",
    ),
    "chat template the tokenizer lacks": Case(
        ["model.chat_template=true"],
        "model.chat_template=true: the tokenizer of {demo}/model has no chat template",
    ),
    "lm-eval option without lm-eval": Case(
        ["tasks=[arc_easy]"],
        "invalid settings: eval.tasks: only with eval.evaluator=lm_eval or both (add evaluator=lm_eval)",
        stage="eval",
    ),
    "unknown lm-eval task": Case(
        ["evaluator=lm_eval", "tasks=[arc_eesy]", "adapters=[]"],
        "eval.tasks: lm-eval has no task arc_eesy",
        stage="eval",
    ),
    "budget larger than the data": Case(
        ["search.budget=99999"],
        "search.budget=99999 + search.val_samples=400 exceeds the 2800 examples of demo[train]",
    ),
    "select.layers out of range": Case(
        ["select.layers=[1,8]"],
        "select.layers: [8] out of range for a model with 8 layers (0..7)",
        stage="select",
    ),
    "select.layers duplicates": Case(
        ["select.layers=[2,2]"],
        "invalid settings: select.layers: duplicate indices in [2, 2]",
        stage="select",
    ),
    "top_k not positive": Case(
        ["select.rule=top_k", "select.k=0"],
        "invalid settings: select.k: rule=top_k needs k > 0, got 0",
        stage="select",
    ),
    "top_k above layer count": Case(
        ["select.rule=top_k", "select.k=9"],
        "select.k=9 is out of range for 8 layers; use 1..8",
        stage="select",
        prepare=_searched([0.1] * 8),
    ),
    "α from a model with other layer count": Case(
        [],
        "{run}/search/alpha.json ranks 12 layers but {demo}/model has 8",
        stage="select",
        prepare=_searched([0.1] * 12),
    ),
    "α from other settings": Case(
        [],
        "select: the search outputs in {run}/search were made with other settings (lora.alpha: 16.0 then, 8.0 now; lora.r: 8 then, 4 now)",
        stage="select",
        prepare=_searched([0.1] * 8, config=True),
    ),
    "damaged search result": Case(
        [],
        "{run}/search/alpha.json lacks alpha_sum, hypergradient, lora_params_per_layer, max_grad_norm, "
        "nonfinite_steps_skipped, num_processes, padding_waste, precision, ranking, scaled_alpha, seconds, "
        "steps, unroll_steps: it is damaged or from an older flexora; rerun `flexora search` with force=true",
        stage="select",
        prepare=lambda tmp, demo: (
            (tmp / "run" / "search").mkdir(parents=True)
            or (tmp / "run" / "search" / "alpha.json").write_text('{"alpha": [0.1, 0.2]}')
        ),
    ),
    "unrolled hypergradient on fused attention": Case(
        ["search.hypergradient=unrolled"],
        "invalid settings: search.hypergradient=unrolled differentiates through the LoRA steps (a double "
        "backward), which needs model.attn_implementation=eager; set them, or use search.hypergradient=darts",
    ),
    "selection empty": Case(
        [], "select: no layer has α̂ > 0", exit_code=1, stage="select", prepare=_searched([-0.1] * 8)
    ),
    "stage before its input exists": Case(
        [], "finetune needs {run}/select/selection.json, which `flexora select` writes", stage="finetune"
    ),
    "adapter from another base model": Case(
        ["eval.adapters=[{tmp}/other]", "eval.limit=4"],
        "adapter {tmp}/other does not fit {demo}/model (it was trained on meta-llama/Meta-Llama-3-8B)",
        stage="eval",
        prepare=_foreign_adapter,
    ),
    "eval adapter folder empty": Case(
        ["eval.adapters=[{tmp}]"], "eval.adapters: {tmp} holds no adapter", stage="eval"
    ),
    "unknown eval dataset": Case(
        ["eval.adapters=[]", "eval.datasets=[demo,nope]"],
        "eval.datasets: no dataset config 'nope'; choose from custom, demo,",
        stage="eval",
    ),
    "model path that is not a model": Case(
        ["model.name_or_path={tmp}"],
        "model.name_or_path={tmp} is not a model directory (no config.json)",
        stage="search",
    ),
    "model path that does not exist": Case(
        ["model.name_or_path={tmp}/no-model"],
        "model path {tmp}/no-model does not exist; check model.name_or_path",
        stage="search",
    ),
    "device=cuda without CUDA": Case(
        ["device=cuda"], "device=cuda but this machine has no CUDA device; use device=cpu or device=auto"
    ),
    "4-bit without bitsandbytes": Case(
        ["model.quantization=4bit"],
        'model.quantization=4bit needs bitsandbytes; install it with `pip install "flexora-cli[quant]"` '
        "or use model.quantization=none",
        prepare=_without_bitsandbytes,
    ),
    "tracker not installed": Case(
        ["tracker=wandb"],
        "tracker=wandb needs the wandb package; pip install wandb, or tracker=none",
    ),
    "fp16 without a GPU": Case(
        ["precision=fp16"],
        "precision=fp16 needs a CUDA GPU; use precision=fp32 (or bf16) on CPU",
    ),
    "darts hypergradient under FSDP": Case(
        ["search.hypergradient=darts", "distributed=fsdp"],
        "search.hypergradient=darts needs each process to hold whole LoRA tensors, not FSDP shards; set "
        "distributed=ddp, or use search.hypergradient=first_order",
    ),
    "QLoRA under FSDP": Case(
        ["model.quantization=4bit", "distributed=fsdp"],
        "distributed=fsdp cannot shard model.quantization=4bit: FSDP2 has no support for bitsandbytes' "
        "packed weights; use distributed=ddp for QLoRA, or model.quantization=none",
    ),
    "compile under FSDP": Case(
        ["compile=true", "distributed=fsdp"],
        "compile=true with distributed=fsdp has not been checked (FSDP2's hooks inside the compiled "
        "layers); use one of them, or distributed=ddp with compile=true",
    ),
    "unrolled hypergradient compiled": Case(
        ["search.hypergradient=unrolled", "model.attn_implementation=eager", "compile=true"],
        "invalid settings: search.hypergradient=unrolled differentiates through the LoRA steps (a double "
        "backward), which needs compile=false; set them, or use search.hypergradient=darts",
    ),
    "unknown precision and zero accumulation": Case(
        ["precision=fp8", "search.grad_accum=0"],
        "invalid settings: search.grad_accum: must be > 0, got 0; precision: 'fp8' is not one of auto, fp32, "
        "bf16, fp16",
    ),
    "unsupported dtype on the device": Case(
        ["model.dtype=float16"],
        "model.dtype=float16 is not supported for training on CPU; use float32 or bfloat16",
    ),
    "non-finite loss": Case(
        ["search.budget=96", "search.val_samples=32", "checkpoint_every=1"],
        "search: non-finite loss at step 3 (LoRA step, forward); first non-finite output in "
        "model.layers.3 (LlamaDecoderLayer); no update was applied from step 3 on; the last good "
        "checkpoint is {run}/search/checkpoints/step-0000002: rerun the same command to resume",
        exit_code=1,
        prepare=_nan_at_step_3,
    ),
    "lock held by a live process": Case(
        [], "{run} is in use by flexora process {ppid} ({run}/.lock)", exit_code=1, prepare=_live_lock
    ),
    "out_dir is a file": Case(
        [],
        "out_dir {run}: {run} is a file, not a folder; choose another out_dir",
        prepare=lambda tmp, _demo: (tmp / "run").write_text("a file, not a run\n"),
    ),
    "disk full while writing": Case(
        ["select.layers=[2]"],
        "no space left on the device while writing {run}/select/config.yaml",
        exit_code=1,
        stage="select",
        prepare=_disk_full,
    ),
}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, demo_dir, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    demo = Path(demo_dir)
    monkeypatch.chdir(tmp_path)
    if case.prepare:
        case.prepare(tmp_path, demo)
    if case.prepare is _without_bitsandbytes:
        import importlib.util

        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else find_spec(n, *a)
        )
    if case.prepare is _broken_recipe:
        for module in (cli, config):  # the pre-check composes through config, Hydra's main through cli
            monkeypatch.setattr(module, "recipes_dir", lambda: tmp_path / "recipes")
    if case.prepare is _disk_full:
        import errno

        def no_space(*_args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", no_space)
    if case.prepare is _nan_at_step_3:
        from flexora_cli.stages import search
        from tests.conftest import poison_layer

        monkeypatch.setattr(search, "load_model", poison_layer(search.load_model, layer=3, from_call=5))
    fill = {"tmp": tmp_path, "run": tmp_path / "run", "demo": demo, "ppid": os.getppid()}
    args = [a.format(**fill) for a in case.args]
    command = (
        args
        if name == "unknown stage"
        else [case.stage, "recipe=demo", f"demo_assets={demo}", f"out_dir={tmp_path / 'run'}", *args]
    )
    before = _tree(tmp_path)

    code = cli.main(command)

    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == case.exit_code, err[-3000:]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err[-3000:]
    assert errors[0].startswith("error: " + case.message.format(**fill)), errors[0]
    assert "Traceback" not in err
    if os.environ.get("FLEXORA_CATALOGUE_OUT"):  # regenerates docs/errors.md's table (see there)
        shown = errors[0]
        for key in ("run", "tmp", "demo"):  # longest first: run lies inside tmp
            shown = shown.replace(str(fill[key]), f"<{key}>")
        with open(os.environ["FLEXORA_CATALOGUE_OUT"], "a") as out:
            out.write(
                json.dumps(
                    {"name": name, "stage": command[0], "args": case.args, "code": code, "error": shown}
                )
                + "\n"
            )
    after = _tree(tmp_path)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    log = {"run/manifest.json", f"run/{case.stage}/config.yaml"} if case.exit_code == 1 else set()
    # earlier good steps, and the tracker's log of them
    kept = {k for k in changed if k.startswith((f"run/{case.stage}/checkpoints/", f"run/logs/{case.stage}/"))}
    assert changed - kept <= log, changed
    if "run/manifest.json" in changed:  # the failed stage is recorded as such, with its error
        entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"][case.stage]
        assert entry["status"] == "failed" and entry["error"] == errors[0].removeprefix("error: ")


def test_catalogue_is_documented_and_large_enough():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text()
    assert len(CASES) >= 25
    for name in CASES:
        assert f"| {name} |" in doc, name
