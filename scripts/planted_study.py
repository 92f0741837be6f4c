"""A hard planted benchmark for the search: which hypergradient finds the layers where a teacher's
changes were planted, when the signal is weak?

    python scripts/planted_study.py --out runs/planted_study [--seeds 10] [--settings NAME,...]
                                    [--hypergradients first_order,darts,unrolled]

For every setting and seed it builds a planted task (demo.PlantedTask: a tiny Llama whose teacher
has low-rank changes in known q/v projections; the seed draws the model, the changes and the data),
runs the search with each hypergradient on the same data, selects with the paper's rule (α̂ > 0),
then fine-tunes and evaluates LoRA on the selected layers, on all layers, and on random layers of
the same count (drawn with the seed). Results go to OUT/results.jsonl, one line per (setting, seed, hypergradient),
so an interrupted study continues where it stopped; OUT/table.md is rewritten after every line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flexora_cli.demo import PlantedTask

HYPERGRADIENTS = {
    "first_order": [],
    "darts": [],
    "unrolled": ["search.unroll_steps=2", "model.attn_implementation=eager"],
}
SPLITS = {"train": 1100, "validation": 300, "test": 12}  # a multiple of 4: letters are balanced


@dataclass
class Setting:
    """A planted task and the search budget it is searched with."""

    task: PlantedTask
    budget: int
    val_samples: int = 200


SETTINGS = {
    # 16 layers, the other layers' attention inputs at 0.3 (the demo: 0.03), a weak change in two
    # middle layers, 400 search samples (25 steps)
    "16L-weak": Setting(PlantedTask(16, (5, 10), shift=1.0, other_input_scale=0.3, split_sizes=SPLITS), 400),
    # 24 layers, three planted (two of them adjacent), 600 samples
    "24L-weak3": Setting(
        PlantedTask(24, (7, 15, 16), shift=1.0, other_input_scale=0.3, split_sizes=SPLITS), 600
    ),
    # 16 layers, inputs at 0.1, a budget of 10 LoRA steps
    "16L-small-budget": Setting(
        PlantedTask(16, (6, 9), shift=1.0, other_input_scale=0.1, split_sizes=SPLITS), 160, 160
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/planted_study"))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--hypergradients", default=",".join(HYPERGRADIENTS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = {(r["setting"], r["seed"], r["hypergradient"]) for r in read_lines(results)}
    for name in args.settings.split(","):
        for seed in range(args.seeds):
            for kind in args.hypergradients.split(","):
                if (name, seed, kind) in done:
                    continue
                started = time.time()
                line = study_one(args.out, name, SETTINGS[name], seed, kind)
                with results.open("a") as handle:
                    handle.write(json.dumps(line) + "\n")
                print(
                    f"{name} seed {seed} {kind}: top-|P| {line['top_hit']:.2f}, selected {line['selected']}, "
                    f"acc {line['acc_flexora']:.3f} (all {line['acc_all']:.3f}, random {line['acc_random']:.3f}) "
                    f"in {time.time() - started:.0f}s",
                    flush=True,
                )
                (args.out / "table.md").write_text(table(read_lines(results)))
    print((args.out / "table.md").read_text())


def study_one(out: Path, name: str, setting: Setting, seed: int, kind: str) -> dict:
    """Search with `kind` on seed `seed` of setting `name`, then the three fine-tunes."""
    from flexora_cli import demo

    task = PlantedTask(**(asdict(setting.task) | {"seed": seed}))
    assets = demo.ensure_assets(out / "assets" / f"{name}-{seed}", task)
    base = [
        "recipe=demo",
        "demo_assets=null",
        f"model.name_or_path={assets / 'model'}",
        f"dataset.data_dir={assets / 'data'}",
        f"seed={seed}",
        "plots=false",
        "tracker=none",
        "quiet=true",
    ]
    search_args = [
        f"search.budget={setting.budget}",
        f"search.val_samples={setting.val_samples}",
        f"search.hypergradient={kind}",
        *HYPERGRADIENTS[kind],
    ]
    run_dir = out / "runs" / f"{name}-{seed}"
    searched = run_stage("search", [*base, *search_args, f"out_dir={run_dir / kind}"])
    selected = sorted(i for i, a in enumerate(searched.alpha) if a > 0)
    planted = set(task.planted)
    top = set(searched.ranking[: len(planted)])
    count = max(len(selected), 1)
    drawn = sorted(random.Random(seed).sample(range(task.num_layers), count))
    accuracy = {
        label: finetuned_accuracy(run_dir, base, layers)
        for label, layers in (
            ("flexora", selected or searched.ranking[:1]),
            ("all", "all"),
            ("random", drawn),
        )
    }
    line = {
        "setting": name,
        "seed": seed,
        "hypergradient": kind,
        "planted": sorted(planted),
        "ranking": searched.ranking,
        "alpha": [round(a, 4) for a in searched.alpha],
        "selected": selected,
        "top_hit": len(top & planted) / len(planted),
        "precision": len(set(selected) & planted) / len(selected) if selected else 0.0,
        "recall": len(set(selected) & planted) / len(planted),
        "s_per_step": searched.seconds / searched.steps,
        **{f"acc_{label}": adapter for label, (adapter, _) in accuracy.items()},
        "acc_base": accuracy["all"][1],
    }
    return line


def finetuned_accuracy(run_dir: Path, base: list[str], layers) -> tuple[float, float]:
    """(adapter, base model) accuracy on the validation split after fine-tuning LoRA on `layers`;
    one run per distinct layer set."""
    key = "all" if layers == "all" else "-".join(map(str, layers))
    spec = "all" if layers == "all" else "[" + ",".join(map(str, layers)) + "]"
    finetune = ["finetune.epochs=1", "dataset.max_train_samples=800", "eval.include_base=true"]
    run_stage("run", [*base, *finetune, f"select.layers={spec}", f"out_dir={run_dir / 'layers' / key}"])
    from flexora_cli.records import EvalMetrics

    metrics = EvalMetrics.read(run_dir / "layers" / key / "eval" / "metrics.json", "eval", "planted_study")
    return metrics.score("demo", "adapter").acc, metrics.score("demo", "base").acc


def run_stage(stage: str, overrides: list[str]):
    """A stage in this process, composed exactly as `flexora STAGE overrides...`."""
    import importlib

    from accelerate.state import AcceleratorState

    from flexora_cli.config import compose

    cfg = compose(overrides)
    try:
        return importlib.import_module(f"flexora_cli.stages.{stage}").run(cfg)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def table(lines: list[dict]) -> str:
    """Per setting and hypergradient: means ± standard deviations over seeds, how far α̂ moved from
    first_order's on the same seed, and what a random ranking would score."""

    def stat(values: list[float], digits: int = 2) -> str:
        if not values:
            return "–"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"

    first = {(r["setting"], r["seed"]): r for r in lines if r["hypergradient"] == "first_order"}

    def versus_first_order(row: dict) -> tuple[float, bool] | None:
        other = first.get((row["setting"], row["seed"]))
        if other is None:
            return None
        return max(abs(a - b) for a, b in zip(row["alpha"], other["alpha"])), row["ranking"] == other[
            "ranking"
        ]

    out = [
        "| setting | hypergradient | seeds | planted in top-\\|P\\| | precision | recall | layers kept | "
        "max \\|Δα̂\\| vs first_order | same ranking | acc Flexora | acc all layers | acc random | acc base | "
        "s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in dict.fromkeys(line["setting"] for line in lines):
        for kind in HYPERGRADIENTS:
            rows = [r for r in lines if r["setting"] == setting and r["hypergradient"] == kind]
            if not rows:
                continue
            compared = [c for c in map(versus_first_order, rows) if c is not None]
            cells = [
                setting,
                kind,
                str(len(rows)),
                stat([r["top_hit"] for r in rows]),
                stat([r["precision"] for r in rows]),
                stat([r["recall"] for r in rows]),
                stat([len(r["selected"]) for r in rows], 1),
                stat([c[0] for c in compared], 4),
                f"{sum(c[1] for c in compared)}/{len(compared)}",
                stat([r["acc_flexora"] for r in rows], 3),
                stat([r["acc_all"] for r in rows], 3),
                stat([r["acc_random"] for r in rows], 3),
                stat([r["acc_base"] for r in rows], 3),
                f"{statistics.median(r['s_per_step'] for r in rows):.3f}",
            ]
            out.append("| " + " | ".join(cells) + " |")
        first_line = next(line for line in lines if line["setting"] == setting)
        planted, layers = first_line["planted"], len(first_line["alpha"])
        chance = f"{len(planted) / layers:.2f}"
        out.append(
            f"| {setting} | (a random ranking) | – | {chance} | {chance} | – | – | – | – | – | – | – | – | – | – |"
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
