"""What makes Flexora's selection pay on real rows: the search run several ways, each over seeds.

For each setting (a list of overrides on top of a recipe) and each seed, `flexora run` (search →
select → finetune → eval) runs in <out>/<setting>/seed_<s>/, and the table reports, per setting:
the layers kept, the Jaccard index of the selected sets across seeds, Flexora's accuracy (mean ±
std over seeds, and the binomial stderr) and the search's time. Complete runs are reused, so the
command can be stopped and rerun. The base, LoRA-all and random-layer rows to set these against
come from `flexora compare` with the same recipe and seeds (README), so the study does not score
the base again (eval.include_base=false); with --recipe-runs that compare's Flexora runs are the
`recipe` setting's runs (nothing is trained twice).

    python scripts/search_study.py --recipe smollm2_piqa --seeds 1,2,3 --out runs/search_study
    python scripts/search_study.py --recipe smollm2_piqa --recipe-runs runs/real_table/piqa_olmo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flexora_cli import report
from flexora_cli.comparison import SUMMARY_COLUMNS, RunRow, summarise
from flexora_cli.config import compose, load
from flexora_cli.manifest import Manifest
from flexora_cli.method import SearchResult, Selection
from flexora_cli.records import EvalMetrics, FinetuneLog
from flexora_cli.rundir import RunDir
from flexora_cli.stages import run as pipeline

SETTINGS = {
    # The authors' code: Adam at lr 0.01 on α̂, one α step per LoRA step on 8 validation rows
    # (eval mode), LoRA lr 1e-4, r = 8 on q/v, dropout 0.
    "authors": [
        "search.alpha_optimizer=adam",
        "search.alpha_lr=0.01",
        "search.val_batch_size=8",
        "search.lr=1e-4",
        "search.alpha_warmup_steps=0",
        "lora.r=8",
        "lora.dropout=0.0",
    ],
    "recipe": [],  # the recipe as it stands
    "warmup": ["search.alpha_warmup_steps=20"],  # LoRA moves off 0 before the gates learn
    "sgd": ["search.alpha_optimizer=sgd", "search.alpha_lr=20"],  # Proposition 1, α̂'s magnitudes kept
    "val32": ["search.val_batch_size=32"],  # less noise per α step
    "budget2x": ["search.epochs=2"],  # twice the α steps on the same rows
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="smollm2_piqa")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"from {', '.join(SETTINGS)}")
    parser.add_argument("--out", default="runs/search_study")
    parser.add_argument("--override", action="append", default=[], help="applied to every setting")
    parser.add_argument(
        "--recipe-runs",
        help="a `flexora compare` of the same recipe and seeds: its seed_<s>/ runs are `recipe`'s",
    )
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[RunRow] = []
    for name in args.settings.split(","):
        for seed in seeds:
            out_dir = Path(args.out) / name / f"seed_{seed}"
            if name == "recipe" and args.recipe_runs:
                out_dir = Path(args.recipe_runs) / f"seed_{seed}"
            overrides = [
                f"recipe={args.recipe}",
                f"seed={seed}",
                f"out_dir={out_dir}",
                "eval.include_base=false",
            ]
            overrides += SETTINGS[name]
            settings = load(compose(overrides + args.override))
            report.console.rule(f"[bold]study {name} seed {seed}")
            pipeline.run(settings)
            rows.append(_row(name, seed, settings))
    summary = summarise(rows)
    table = report.markdown_table(SUMMARY_COLUMNS, [row.cells() for row in summary])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "study.md").write_text(table)
    (Path(args.out) / "study.json").write_text(
        json.dumps({"rows": [r.to_json() for r in rows], "summary": [r.to_json() for r in summary]}, indent=1)
    )
    print(table)


def _row(name: str, seed: int, settings) -> RunRow:
    run_dir = RunDir(settings.out_dir)
    metrics = (
        run_dir.root / Manifest(run_dir).eval_key(settings) / "metrics.json"
    )  # where the run's eval wrote
    scored = EvalMetrics.read(metrics, "eval", "study").score(settings.dataset.name, "adapter")
    selection = Selection.read(run_dir.selection_json, "select", "study")
    finetune = FinetuneLog.read(run_dir.finetune_log_json, "finetune", "study")
    return RunRow(
        dataset=settings.dataset.name,
        variant=name,
        layers=selection.layers,
        trainable_params=selection.trainable_params,
        acc=scored.acc,
        acc_stderr=scored.acc_stderr,
        n=scored.n,
        search_s=SearchResult.read(run_dir.alpha_json, "search", "study").seconds,
        finetune_s=finetune.seconds,
        seed=seed,
        acc_norm=scored.acc_norm,
    )


if __name__ == "__main__":
    main()
