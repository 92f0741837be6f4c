"""Kill `flexora run recipe=demo` at random points and damage its artifacts; count the outcomes.

Kill trials: SIGKILL the run (its whole process group) at a random moment of one of the four
stages (the same number of trials in each: once the stage before it is complete, after a time
drawn within the span that stage took in a reference run, model loading included), rerun the same command to the end, and compare the final results with the reference's:
α̂, the selected layers, the adapter's tensors, the accuracies and every prediction. Damage
trials: truncate, corrupt or delete one random artifact (a stage output, a record, the manifest,
or the newest checkpoint of an interrupted search), rerun, and check that the run either
recovers with results identical to the reference or stops with one clean `error:` line (no
traceback). Prints one line per trial and a markdown table (docs/errors.md holds the last one).

    python scripts/fault_injection.py --kills 20 --damages 10 --work /tmp/faults
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from flexora_cli.manifest import ManifestFile
from flexora_cli.method import SearchResult, Selection
from flexora_cli.records import EvalMetrics
from flexora_cli.rundir import RunDir
from flexora_cli.stage_table import PIPELINE as STAGES


def command(demo: Path, out: Path) -> list[str]:
    args = ["recipe=demo", f"demo_assets={demo}", f"out_dir={out}", "checkpoint_every=25", "quiet=true"]
    return [sys.executable, "-m", "flexora_cli", "run", *args, "plots=false", "tracker=none"]


def launch(demo: Path, out: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command(demo, out),
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115 - closed with the process
        start_new_session=True,  # its own process group, killed whole
        env={**os.environ, **(env or {})},
    )


def statuses(out: Path) -> dict[str, str]:
    """Each stage's status in the run's manifest (written atomically, so always whole), read
    without ever writing to the run: this script only watches it."""
    watcher = RunDir(out)
    watcher.writes = False
    entries = ManifestFile(watcher).entries()
    return {s: entries[s].status for s in STAGES if s in entries}


def stage_running(out: Path) -> str | None:
    running = [s for s, status in statuses(out).items() if status == "running"]
    return running[-1] if running else None


def reference_run(demo: Path, work: Path) -> tuple[dict, dict[str, float]]:
    """The uninterrupted run's results, and the seconds each stage took from the moment the
    stage before it completed (from the launch for the search) to its own completion."""
    out = work / "reference"
    shutil.rmtree(out, ignore_errors=True)
    started, completed = time.monotonic(), {}
    process = launch(demo, out, work / "reference.log")
    while process.poll() is None:
        for stage, status in statuses(out).items():
            if status == "complete":
                completed.setdefault(stage, time.monotonic() - started)
        time.sleep(0.02)
    assert process.returncode == 0, (work / "reference.log").read_text()[-3000:]
    for stage in statuses(out):  # a last stage that completed between two polls
        completed.setdefault(stage, time.monotonic() - started)
    ends = [completed[s] for s in STAGES]
    return results(out), {s: end - begin for s, begin, end in zip(STAGES, [0.0, *ends], ends)}


def results(out: Path) -> dict:
    """What a run found and produced, without timings."""
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    run_dir = RunDir(out)
    alpha = SearchResult.read(run_dir.alpha_json, "search", "fault_injection")
    metrics = EvalMetrics.read(run_dir.metrics_json, "eval", "fault_injection")
    return {
        "alpha": alpha.alpha,
        "alpha_history": [h.get("alpha") for h in alpha.history],
        "layers": Selection.read(run_dir.selection_json, "select", "fault_injection").layers,
        "adapter": digest(out / "finetune" / "adapter" / "adapter_model.safetensors"),
        "accuracy": {d: {v: s.acc for v, s in scores.items()} for d, scores in metrics.results.items()},
        "predictions": digest(out / "eval" / "predictions.jsonl"),
    }


def outcome(code: int, log: Path, out: Path, reference: dict) -> str:
    """identical | differs | clean error | unclean (a traceback, or several error lines)."""
    err = log.read_text()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if "Traceback" in err:
        return "unclean"
    if code != 0:
        return "clean error" if len(errors) == 1 and err.rstrip().endswith(errors[0]) else "unclean"
    return "identical" if results(out) == reference else "differs"


def kill_trial(demo: Path, work: Path, index: int, stage: str, after: float, reference: dict) -> dict:
    """Kill the run `after` seconds after the stage before `stage` completed, then rerun it."""
    out, log = work / f"kill-{index:02d}", work / f"kill-{index:02d}.log"
    shutil.rmtree(out, ignore_errors=True)
    process = launch(demo, out, log)
    previous = STAGES[STAGES.index(stage) - 1] if stage != STAGES[0] else None
    while previous and statuses(out).get(previous) != "complete" and process.poll() is None:
        time.sleep(0.01)
    time.sleep(after)
    killed_in = stage_running(out) or ("finished" if process.poll() is not None else "between stages")
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    rerun = launch(demo, out, log)
    code = rerun.wait()
    return {"trial": f"kill {index}", "aimed at": stage, "after_s": round(after, 2), "killed in": killed_in,
            "exit": code, "outcome": outcome(code, log, out, reference)}  # fmt: skip


def interrupted_search(demo: Path, work: Path) -> Path:
    """A search stopped after step 120 (checkpoints 100 and 75 kept), to damage its checkpoints."""
    out = work / "interrupted"
    if not out.exists():
        launch(demo, out, work / "interrupted.log", {"FLEXORA_FAULT": "search:120"}).wait()
    return out


def damage_trial(demo: Path, work: Path, index: int, rng: random.Random, reference: dict) -> dict:
    out, log = work / f"damage-{index:02d}", work / f"damage-{index:02d}.log"
    shutil.rmtree(out, ignore_errors=True)
    if index % 3 == 2:  # one trial in three: the newest checkpoint of a stopped search
        shutil.copytree(interrupted_search(demo, work), out)
        newest = sorted((out / "search" / "checkpoints").glob("step-*"))[-1]
        candidates = sorted(newest.iterdir())
    else:
        shutil.copytree(work / "reference", out)
        entries = ManifestFile(RunDir(out)).entries()
        files = [out / name for entry in entries.values() for name in entry.files]
        candidates = sorted({*files, out / "manifest.json", *out.glob("*/outputs.json")})
    target = rng.choice(candidates)
    how = rng.choice(["truncate", "corrupt", "delete"])
    data = target.read_bytes()
    if how == "truncate":
        target.write_bytes(data[: rng.randrange(len(data))])
    elif how == "corrupt":
        position = rng.randrange(len(data))
        target.write_bytes(data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1 :])
    else:
        target.unlink()
    code = launch(demo, out, log).wait()
    result = outcome(code, log, out, reference)
    return {"trial": f"damage {index}", "file": str(target.relative_to(out)), "how": how, "exit": code,
            "outcome": result, "clean": result in ("identical", "clean error")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--damages", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/flexora-faults"))
    args = parser.parse_args()
    from flexora_cli import demo as demo_assets

    args.work.mkdir(parents=True, exist_ok=True)
    demo = demo_assets.ensure_assets(args.work / "assets")
    rng = random.Random(args.seed)
    reference, spans = reference_run(demo, args.work)
    print(json.dumps({"reference stage spans (s)": spans}), flush=True)
    trials = []
    for index in range(args.kills):
        stage = STAGES[index % len(STAGES)]
        trials.append(kill_trial(demo, args.work, index, stage, rng.uniform(0, spans[stage]), reference))
        print(json.dumps(trials[-1]), flush=True)
    for index in range(args.damages):
        trials.append(damage_trial(demo, args.work, index, rng, reference))
        print(json.dumps(trials[-1]), flush=True)
    kills = [t for t in trials if t["trial"].startswith("kill")]
    damages = [t for t in trials if t["trial"].startswith("damage")]
    print("\n| trials | identical final result | clean (recovered identical, or one error line) |")
    print("|---|---|---|")
    print(
        f"| {len(kills)} kills (SIGKILL) | {sum(t['outcome'] == 'identical' for t in kills)}/{len(kills)} | – |"
    )
    recovered = sum(t["outcome"] == "identical" for t in damages)
    print(
        f"| {len(damages)} damaged artifacts | {recovered}/{len(damages)} | {sum(t['clean'] for t in damages)}/{len(damages)} |"
    )


if __name__ == "__main__":
    main()
