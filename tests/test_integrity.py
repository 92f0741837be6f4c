"""Nothing is lost or silently replaced (manifest.py, checkpoint.py): damaged checkpoints fall back
to the previous one, damaged or missing outputs are rerun by `flexora run` or refused in one line
by a standalone stage, a damaged manifest is rebuilt, a result made with other settings is never
overwritten without force=true, a bad out_dir fails before any work, files get the user's umask,
and degenerate runs say so.

Each test asserts the exit code, exactly one `error:` line (or the one warning where we recover),
no traceback, and that no completed result changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flexora_cli import cli

QUICK = [
    "recipe=demo",
    "search.budget=128",
    "search.val_samples=32",
    "search.log_every=2",
    "finetune.epochs=0.5",
    "dataset.max_train_samples=128",
    "eval.limit=24",
    "checkpoint_every=2",
    "plots=false",
    "quiet=true",
]


def flexora(capsys, *args: str) -> tuple[int, str, list[str]]:
    """Exit code, stderr, and its `error:` lines of one command (asserts: no traceback)."""
    code = cli.main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return code, err, [line for line in err.splitlines() if line.startswith("error:")]


def results(run: Path) -> dict[str, bytes]:
    """Every completed result of a run (the files the manifest fingerprints), by path; for the
    files that also log timings (alpha.json, train_log.json), what they hold but the seconds."""
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    found = {name: (run / name).read_bytes() for entry in stages.values() for name in entry.get("files", {})}
    for timed in ("search/alpha.json", "finetune/train_log.json"):
        if timed in found:
            content = json.loads(found[timed])
            found[timed] = json.dumps(
                {k: v for k, v in content.items() if k not in ("seconds", "tokens_per_second")}
            ).encode()
    return found


def warnings(err: str) -> list[str]:
    """The `warning:` lines (report.warn never wraps them), without the prefix."""
    return [line.removeprefix("warning: ") for line in err.splitlines() if line.startswith("warning: ")]


@pytest.fixture(scope="module")
def reference(demo_dir, tmp_path_factory) -> Path:
    """One complete quick run of the pipeline, to copy and damage."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(["run", *QUICK, f"demo_assets={demo_dir}", f"out_dir={run}"]) == 0
    return run


@pytest.fixture()
def copied(reference, tmp_path, demo_dir):
    """A copy of the reference run, and the arguments that address it."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run, [*QUICK, f"demo_assets={demo_dir}", f"out_dir={run}"]


@pytest.mark.parametrize("damaged", ["weights.safetensors", "state.pt"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(
    reference, tmp_path, demo_dir, damaged, capsys, monkeypatch
):
    run = tmp_path / "run"
    args = ["search", *QUICK, f"demo_assets={demo_dir}", f"out_dir={run}"]
    monkeypatch.setenv("FLEXORA_FAULT", "search:5")  # fails after step 5: checkpoints 2 and 4 kept
    code, _, errors = flexora(capsys, *args)
    assert code == 1 and errors == ["error: search: injected fault at step 5 on process 0 (FLEXORA_FAULT)"]
    newest = run / "search" / "checkpoints" / "step-0000004" / damaged
    newest.write_bytes(newest.read_bytes()[:100])
    monkeypatch.delenv("FLEXORA_FAULT")

    code, err, errors = flexora(capsys, *args)
    assert code == 0 and errors == []
    (warning,) = [w for w in warnings(err) if "checkpoint" in w]
    assert f"step-0000004 is damaged ({damaged} has 100 bytes" in warning
    assert "resuming from" in err and "step-0000002" in " ".join(err.split())
    # Bit-exact resume from the older checkpoint: the same α̂ as the uninterrupted run.
    assert results(run)["search/alpha.json"] == results(reference)["search/alpha.json"]


def test_every_checkpoint_damaged_is_one_error(tmp_path, demo_dir, capsys, monkeypatch):
    run = tmp_path / "run"
    args = ["search", *QUICK, f"demo_assets={demo_dir}", f"out_dir={run}"]
    monkeypatch.setenv("FLEXORA_FAULT", "search:5")
    flexora(capsys, *args)
    for weights in (run / "search" / "checkpoints").glob("*/weights.safetensors"):
        weights.write_bytes(b"")
    monkeypatch.delenv("FLEXORA_FAULT")
    code, _, errors = flexora(capsys, *args)
    assert code == 2 and len(errors) == 1
    assert "search: every kept checkpoint is damaged (step-0000004, step-0000002" in errors[0]
    assert errors[0].endswith("add force=true to start search over")


def test_deleted_adapter_is_rebuilt_by_run(copied, capsys):
    run, args = copied
    before = results(run)
    shutil.rmtree(run / "finetune" / "adapter")
    code, err, errors = flexora(capsys, "run", *args)
    assert code == 0 and errors == []
    (warning,) = [w for w in warnings(err) if w.startswith("run:")]
    assert warning.startswith("run: finetune runs again: its outputs are damaged: finetune/adapter/")
    assert "is missing" in warning
    assert results(run) == before  # the same adapter again; eval, built from it, is still current
    assert "run: eval already complete" in " ".join(err.split())


@pytest.mark.parametrize(
    "stage, damaged, message",
    [
        ("eval", "finetune/adapter/adapter_model.safetensors", "eval: the finetune outputs are damaged"),
        ("export", "finetune/adapter/adapter_model.safetensors", "export: the finetune outputs are damaged"),
        ("finetune", "select/selection.json", "finetune: the select outputs are damaged"),
        ("select", "search/alpha.json", "select: the search outputs are damaged"),
    ],
)
def test_standalone_stage_refuses_damaged_inputs(copied, capsys, stage, damaged, message):
    run, args = copied
    path = run / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, errors = flexora(capsys, stage, *args)
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: {message} ({damaged} has ")
    assert errors[0].endswith(
        f"rerun `flexora {damaged.split('/')[0]}` (force=true replaces it) or `flexora run`"
    )
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_damaged_selection_is_rerun_by_run(copied, capsys):
    run, args = copied
    before = results(run)
    (run / "select" / "selection.json").write_text('{"layers": [')
    code, err, errors = flexora(capsys, "run", *args)
    assert code == 0 and errors == []
    assert any(w.startswith("run: select runs again: its outputs are damaged") for w in warnings(err))
    assert results(run) == before


@pytest.mark.parametrize("damage", [b'{"version": "0.1.0", "sta', b"", b"[1, 2]"])
def test_damaged_manifest_is_rebuilt(copied, capsys, damage):
    run, args = copied
    before = results(run)
    (run / "manifest.json").write_bytes(damage)
    code, err, errors = flexora(capsys, "run", *args)
    assert code == 0 and errors == []
    (warning,) = warnings(err)
    assert warning.startswith(f"{run}/manifest.json is damaged")
    assert "complete stages found: eval, finetune, search, select" in warning
    assert "run: eval already complete" in " ".join(err.split())  # nothing reran
    assert results(run) == before


def test_search_with_other_settings_refuses_to_replace(copied, capsys):
    run, args = copied
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, errors = flexora(capsys, "search", *args, "search.alpha_lr=0.02")
    assert code == 2 and errors == [
        f"error: search: {run}/search holds a complete result made with other settings "
        "(search.alpha_lr: 0.01 then, 0.02 now); add force=true to replace it, or use another out_dir"
    ]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_eval_with_other_settings_writes_beside(copied, capsys):
    run, args = copied
    before = results(run)
    code, err, errors = flexora(capsys, "eval", *args, "eval.limit=8")
    assert code == 0 and errors == []
    (beside,) = (run / "eval").glob("*/metrics.json")
    assert f"this one goes to {beside.parent}\n" in err
    assert json.loads(beside.read_text())["results"]["demo"]["adapter"]["n"] == 8
    after = results(run)
    assert {k: after[k] for k in before} == before  # the pipeline's eval included
    assert set(after) - set(before) == {
        f"eval/{beside.parent.name}/{f}" for f in ("metrics.json", "predictions.jsonl")
    }
    # The same eval again is complete in its own folder; the pipeline's eval is untouched.
    assert flexora(capsys, "run", *args)[0] == 0


@pytest.mark.parametrize("where", ["file", "proc"])
def test_bad_out_dir_is_one_error_before_any_work(tmp_path, demo_dir, capsys, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "run" if where == "file" else Path("/proc/flexora-run")
    code, _, errors = flexora(capsys, "search", *QUICK, f"demo_assets={demo_dir}", f"out_dir={out}")
    assert code == 2 and len(errors) == 1
    if where == "file":
        assert errors[0] == f"error: out_dir {out}: {blocker} is a file, not a folder; choose another out_dir"
    else:
        assert errors[0].startswith(f"error: out_dir {out} cannot be written (")
        assert errors[0].endswith("); choose a folder you can write to")
    assert blocker.read_text() == "not a folder" and not out.exists()


def test_outputs_follow_the_umask(copied, capsys):
    run, args = copied
    previous = os.umask(0o022)
    try:
        assert flexora(capsys, "eval", *args, "force=true")[0] == 0
    finally:
        os.umask(previous)
    for path in (run / "eval" / "metrics.json", run / "manifest.json", run / "eval" / "outputs.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (run / "finetune" / "adapter").stat().st_mode & 0o777 == 0o755


def test_degenerate_runs_warn(tmp_path, demo_dir, capsys):
    args = [*QUICK, f"demo_assets={demo_dir}", f"out_dir={tmp_path / 'run'}"]
    code, err, errors = flexora(capsys, "run", *args, "search.budget=8", "finetune.epochs=0.001")
    assert code == 0 and errors == []
    found = warnings(err)
    assert any(w.startswith("search: the search took 1 α step(s) and α̂ spans") for w in found), found
    assert any(w.startswith("select: the search took 1 α step(s)") for w in found), found
    assert any(
        w.startswith("finetune: finetune.epochs=0.001 trains 1 step(s) on 16 of the 128") for w in found
    )
    log = json.loads((tmp_path / "run" / "finetune" / "train_log.json").read_text())
    assert log["steps"] == 1 and log["examples"] == 16 and log["dataset_examples"] == 128


def test_eval_results_go_to_stdout(copied, tmp_path):
    """`flexora eval ... > out.txt` keeps the table and the closing panel; stderr has neither."""
    run, args = copied
    with open(tmp_path / "out.txt", "w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "flexora_cli", "eval", *args, "eval.limit=8"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "out.txt").read_text()
    assert "Accuracy (mcq format)" in text and "eval done" in text and "metrics.json" in text
    assert "Accuracy" not in done.stderr and "eval done" not in done.stderr
