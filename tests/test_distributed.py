"""Two processes under `accelerate launch` or torchrun (DDP, or FSDP2 with distributed=fsdp, over
gloo, on CPU) take the same steps as one, and a checkpoint resumes under another process count.

accelerate's `--cpu` launches several processes only through mpirun, so the test uses its
torchrun launcher (`--multi_gpu`) with device=cpu: the same DDP code path, over gloo.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexora_cli import cli
from flexora_cli.fsdp import HeldBytes
from flexora_cli.method import SearchResult
from flexora_cli.records import FinetuneLog
from tests.test_checkpoint import _wait_for

LAUNCH = [
    *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
    *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
    *("-m", "flexora_cli.cli"),
]


def torchrun(*flags: str) -> list[str]:
    """A torchrun launch of the CLI (with --log-dir, each worker's stdout/stderr go to files there)."""
    return [sys.executable, "-m", "torch.distributed.run", *flags, "-m", "flexora_cli.cli"]


def quick(demo_dir: str, out: Path) -> list[str]:
    return [
        "recipe=demo",
        f"demo_assets={demo_dir}",
        f"out_dir={out}",
        "search.budget=256",
        "search.val_samples=64",
        "finetune.epochs=0.5",
        "dataset.max_train_samples=128",
        "eval.limit=40",
        "quiet=true",
    ]


def alpha(out: Path) -> list[float]:
    return json.loads((out / "search" / "alpha.json").read_text())["alpha"]


def test_two_processes_run_every_stage_like_one(demo_dir, tmp_path):
    two = subprocess.run([*LAUNCH, "run", *quick(demo_dir, tmp_path / "two")], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert cli.main(["run", *quick(demo_dir, tmp_path / "one")]) == 0

    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    assert json.loads((two_dir / "search" / "alpha.json").read_text())["num_processes"] == 2
    torch.testing.assert_close(torch.tensor(alpha(two_dir)), torch.tensor(alpha(one_dir)), rtol=0, atol=1e-6)
    selections = [
        json.loads((d / "select" / "selection.json").read_text())["layers"] for d in (one_dir, two_dir)
    ]
    assert selections[0] == selections[1]
    adapters = [
        load_file(str(d / "finetune" / "adapter" / "adapter_model.safetensors")) for d in (one_dir, two_dir)
    ]
    assert adapters[0].keys() == adapters[1].keys()
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], tensor, rtol=1e-4, atol=1e-6)
    metrics = [json.loads((d / "eval" / "metrics.json").read_text())["results"] for d in (one_dir, two_dir)]
    assert metrics[0]["demo"]["adapter"]["n"] == metrics[1]["demo"]["adapter"]["n"] == 40
    assert metrics[0]["demo"]["adapter"]["acc"] == metrics[1]["demo"]["adapter"]["acc"]
    assert not list(two_dir.rglob("*.tmp")) and not (two_dir / ".lock").exists()


def test_fsdp_on_two_processes_searches_and_finetunes_like_one(demo_dir, tmp_path):
    """distributed=fsdp (FSDP2 over gloo, one unit per layer, α̂ replicated) takes the
    one-process steps: α̂ and the adapter to 1e-5 in float32."""
    sharded, one = tmp_path / "fsdp", tmp_path / "one"
    done = subprocess.run(
        [*LAUNCH, "run", *quick(demo_dir, sharded), "distributed=fsdp"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli.main(["run", *quick(demo_dir, one)]) == 0

    search = SearchResult.from_json(json.loads((sharded / "search" / "alpha.json").read_text()))
    assert search.num_processes == 2
    torch.testing.assert_close(torch.tensor(alpha(sharded)), torch.tensor(alpha(one)), rtol=0, atol=1e-5)
    finetune = FinetuneLog.from_json(json.loads((sharded / "finetune" / "train_log.json").read_text()))
    for held in (HeldBytes(**search.held_bytes), HeldBytes(**finetune.held_bytes)):
        assert 0.45 < held.params / held.model_params < 0.55  # half of every unit, α̂ whole
    assert abs(sum(alpha(sharded))) < 1e-5  # Σα̂ = 0 kept with α̂ replicated
    adapters = [
        load_file(str(d / "finetune" / "adapter" / "adapter_model.safetensors")) for d in (one, sharded)
    ]
    assert adapters[0].keys() == adapters[1].keys()
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], tensor, rtol=0, atol=1e-5)


ONE_PROCESS = [sys.executable, "-m", "flexora_cli.cli"]


def stop_then_resume(first: list[str], then: list[str], args: list[str], out: Path) -> str:
    """Launch `first` with `args`, stop it (SIGTERM) at its first search checkpoint, resume
    with `then`; the resumed launch's stderr. Before that, FSDP shards resumed under
    distributed=auto are refused in one line, the checkpoint left as it was."""
    launch = subprocess.Popen([*first, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for("search/checkpoints/step-*", out, launch)
    launch.send_signal(signal.SIGTERM)  # a launcher passes it to every worker
    launch.communicate()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["search"]["status"] == "interrupted"
    other = "distributed=auto" if "distributed=fsdp" in args else "distributed=fsdp"
    refused = subprocess.run([*ONE_PROCESS, *args, other], capture_output=True, text=True)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode != 0 and len(errors) == 1 and "cannot resume" in errors[0], refused.stderr[
        -2000:
    ]
    assert "Traceback" not in refused.stderr
    resumed = subprocess.run([*then, *args], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return resumed.stderr


@pytest.mark.parametrize(
    ("distributed", "first", "then", "atol"),
    [
        # whole tensors, as one process writes them (slow: fsdp-2-to-1 keeps the default run's resume
        # across process counts, and test_two_processes_run_every_stage_like_one its DDP)
        pytest.param("auto", LAUNCH, ONE_PROCESS, 1e-6, marks=pytest.mark.slow),
        ("fsdp", LAUNCH, ONE_PROCESS, 1e-5),
        pytest.param(
            "fsdp",
            ONE_PROCESS,
            torchrun("--standalone", "--nproc-per-node", "2"),
            1e-5,
            marks=pytest.mark.slow,
        ),
    ],
    ids=["ddp-2-to-1", "fsdp-2-to-1", "fsdp-1-to-2"],
)
def test_search_stopped_resumes_under_another_process_count(
    demo_dir, tmp_path, distributed, first, then, atol
):
    """A checkpoint holds whole tensors, or under FSDP shards that DCP reshards, so a search
    stopped on one process count resumes on another and ends where one process ends."""
    checkpointed = ["search.batch_size=4", "checkpoint_every=4"]
    args = ["search", *quick(demo_dir, tmp_path / "stopped"), *checkpointed, f"distributed={distributed}"]
    assert "resuming from" in stop_then_resume(first, then, args, tmp_path / "stopped")
    assert cli.main(["search", *quick(demo_dir, tmp_path / "one"), *checkpointed]) == 0
    assert json.loads((tmp_path / "stopped" / "search" / "alpha.json").read_text())["steps"] == 64
    torch.testing.assert_close(
        torch.tensor(alpha(tmp_path / "stopped")), torch.tensor(alpha(tmp_path / "one")), rtol=0, atol=atol
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "launcher"), [("search", ONE_PROCESS), ("finetune", LAUNCH)], ids=["search-1", "finetune-2"]
)
def test_fsdp_killed_resumes_bit_identical_past_a_truncated_shard(demo_dir, tmp_path, stage, launcher):
    """kill -9 of an FSDP run (one process mid-search, two mid-finetune), one shard of its newest
    checkpoint truncated: the relaunch warns once, resumes from the checkpoint before, and ends
    with the α̂ and adapter an uninterrupted run of the same launch writes, bit for bit."""
    flags = ["finetune.epochs=2", "finetune.batch_size=4", "checkpoint_every=2", "distributed=fsdp"]
    flags += ["search.batch_size=4"] if stage == "search" else []
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    launch = subprocess.Popen(
        [*launcher, "run", *quick(demo_dir, killed), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # one process group: the launcher and its workers
    )
    _wait_for(f"{stage}/checkpoints/step-0000004", killed, launch)
    kill_launch(launch)
    launch.communicate()
    newest = sorted((killed / stage / "checkpoints").glob("step-*"))[-1]
    shard = sorted((newest / "shards").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])

    resumed = subprocess.run(
        [*launcher, "run", *quick(demo_dir, killed), *flags], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [
        line for line in resumed.stderr.splitlines() if line.startswith("warning:") and newest.name in line
    ]
    assert len(warnings) == 1, resumed.stderr[-3000:]
    done = subprocess.run([*launcher, "run", *quick(demo_dir, whole), *flags], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert alpha(killed) == alpha(whole)
    adapters = [
        load_file(str(d / "finetune" / "adapter" / "adapter_model.safetensors")) for d in (killed, whole)
    ]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_documented_accelerate_configs_load(name):
    """The configs docs/distributed.md points to parse as accelerate configs (FSDP itself needs GPUs)."""
    from accelerate.commands.config.config_args import ClusterConfig
    from transformers.models.llama import modeling_llama

    config = ClusterConfig.from_yaml_file(
        str(Path(__file__).parents[1] / "docs" / "accelerate" / f"{name}.yaml")
    )
    assert config.num_processes == 8 and config.mixed_precision == "bf16"
    if name == "fsdp":
        assert hasattr(modeling_llama, config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
        assert config.fsdp_config["fsdp_use_orig_params"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs the FSDP launch would run")
def test_fsdp_launch_without_gpus_is_one_clear_error(demo_dir, tmp_path):
    """accelerate's FSDP needs an accelerator; here that is one error line per worker, nothing written."""
    config = (Path(__file__).parents[1] / "docs" / "accelerate" / "fsdp.yaml").read_text()
    local = tmp_path / "fsdp.yaml"
    local.write_text(config.replace("num_processes: 8", "num_processes: 2"))
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(local),
        "-m",
        "flexora_cli",
    ]
    done = subprocess.run(
        [*launch, "search", *quick(demo_dir, tmp_path / "run")], capture_output=True, text=True
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and all(e.startswith("error: accelerate cannot start with this launch:") for e in errors)
    assert not (tmp_path / "run").exists()


def kill_launch(launch: subprocess.Popen) -> None:
    """kill -9 a launch started with start_new_session=True: its workers (torchrun gives each a
    session of its own), then the launcher's process group."""
    for worker in Path(f"/proc/{launch.pid}/task/{launch.pid}/children").read_text().split():
        os.kill(int(worker), signal.SIGKILL)
    os.killpg(launch.pid, signal.SIGKILL)


def free_port() -> int:
    """A TCP port the OS has just handed out (bound, then released), for a rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_stderr(log_dir: Path) -> list[str]:
    """Each worker's stderr (torchrun --redirects 3), by rank."""
    return [
        p.read_text() for p in sorted(log_dir.glob("*/attempt_0/*/stderr.log"), key=lambda p: p.parent.name)
    ]


@pytest.mark.parametrize(
    "distributed", ["auto", pytest.param("fsdp", marks=pytest.mark.slow)], ids=["ddp", "fsdp"]
)
@pytest.mark.parametrize("failing", [0, 1])
def test_a_failure_on_one_process_ends_every_process_with_its_error(demo_dir, tmp_path, failing, distributed):
    out, logs = tmp_path / "run", tmp_path / "logs"
    launch = torchrun("--nproc-per-node", "2", "--log-dir", str(logs), "--redirects", "3")
    done = subprocess.run(
        [*launch, "search", *quick(demo_dir, out), f"distributed={distributed}"],
        env={**os.environ, "FLEXORA_FAULT": f"search:3:{failing}"},
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard: the launch ends when the failing process does
    )
    assert done.returncode != 0
    expected = f"error: search: injected fault at step 3 on process {failing} (FLEXORA_FAULT)"
    workers = worker_stderr(logs)
    assert len(workers) == 2, f"expected both workers' logs under {logs}"
    for stderr in workers:
        assert [line for line in stderr.splitlines() if line.startswith("error:")] == [expected], stderr[
            -2000:
        ]
        assert "Traceback" not in stderr
    entry = json.loads((out / "manifest.json").read_text())["stages"]["search"]
    assert entry["status"] == "failed" and entry["error"] == expected.removeprefix("error: ")


@pytest.mark.slow
def test_two_nodes_match_one_process_and_resume_after_a_node_is_killed(demo_dir, tmp_path, capsys):
    """Two "nodes" of one process each over 127.0.0.1 (gloo): α̂ as one process computes it, and
    after node 1 is killed mid-search, a relaunch of both resumes from the last checkpoint."""
    out = tmp_path / "two-nodes"
    args = [*quick(demo_dir, out), "search.batch_size=4", "checkpoint_every=4"]
    port = str(free_port())

    def node(rank: int) -> subprocess.Popen:
        flags = ("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1")
        rendezvous = ("--master-addr", "127.0.0.1", "--master-port", port)
        return subprocess.Popen(
            [*torchrun(*flags, *rendezvous), "search", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a process group per node, to kill a node whole
        )

    nodes = [node(0), node(1)]
    _wait_for("search/checkpoints/step-*", out, nodes[0])
    assert nodes[1].poll() is None, nodes[1].communicate()
    kill_launch(nodes[1])  # node 1 gone without a word
    _, err = nodes[0].communicate(timeout=300)  # a hang guard: node 0 must exit on its own
    assert nodes[0].returncode != 0
    nodes[1].communicate()
    lost = "error: another process of this launch stopped without an error message ("  # gloo: closed or reset
    assert [line for line in err.splitlines() if line.startswith("error:")][0].startswith(lost), err[-2000:]
    entry = json.loads((out / "manifest.json").read_text())["stages"]["search"]
    assert entry["status"] == "failed" and entry["error"].startswith(lost.removeprefix("error: "))

    nodes = [node(0), node(1)]
    for launched in nodes:
        _, err = launched.communicate(timeout=300)
        assert launched.returncode == 0, err[-3000:]
    assert json.loads((out / "search" / "alpha.json").read_text())["num_processes"] == 2
    reference = [*quick(demo_dir, tmp_path / "one"), "search.batch_size=4", "checkpoint_every=4"]
    assert cli.main(["search", *reference]) == 0
    torch.testing.assert_close(
        torch.tensor(alpha(out)), torch.tensor(alpha(tmp_path / "one")), rtol=0, atol=1e-5
    )
