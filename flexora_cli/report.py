"""What the user sees. Results (tables, each stage's closing panel) on stdout, so
`flexora eval ... > results.txt` keeps them; progress, logs and warnings on stderr; matplotlib
figures on disk. Results are not cut at 80 columns when they do not go to a terminal: tables
print whole in a pipe or a file."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from flexora_cli.records import EvalMetrics, Score

_PIPE_WIDTH = 1000  # a pipe or file has no width: wide enough that no table is cut


def _results_stream(stderr: bool) -> Console:
    stream = Console(stderr=stderr)
    if not stream.is_terminal:
        stream.width = _PIPE_WIDTH
    return stream


console = Console(stderr=True)
"""Progress, logs and warnings (stderr; rules and bars keep the terminal's width, or 80)."""
results = _results_stream(stderr=False)
"""Tables and closing panels (stdout; stderr instead with print_json=true, whose JSON owns stdout)."""


def line(message: str) -> None:
    """One line on stderr, never wrapped (paths stay whole for logs, greps and copy-paste)."""
    console.print(message, soft_wrap=True, markup=False, highlight=False)


def result(renderable: object) -> None:
    """A result (table, panel, the line naming written files) on the results stream; text is
    printed as it is (`[2, 5]` is not markup), never wrapped."""
    if isinstance(renderable, str):
        results.print(renderable, markup=False, highlight=False, soft_wrap=True)
    else:
        results.print(renderable)


def warn(message: str) -> None:
    """One `warning: ...` line (see `line`)."""
    line(f"warning: {message}")


_plain = False


def configure(quiet: bool, main_process: bool = True, json_on_stdout: bool = False) -> None:
    """quiet=True, or stderr not being a terminal, turns progress bars into plain log lines.
    Processes after the first of a multi-process launch print nothing but errors."""
    global _plain, results
    results = _results_stream(stderr=json_on_stdout)
    _plain = quiet or not console.is_terminal
    console.quiet = results.quiet = not main_process
    if _plain or not main_process:  # transformers' own "Loading weights" bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class PlainProgress:
    """Progress as one line per ~10% (or per minute), for logs; the same `update` as rich's."""

    def __init__(self, description: str, total: int):
        self.description, self.total, self.completed = description, max(total, 1), 0
        self.started = self.last_print = time.monotonic()
        self.next_fraction = 0.1

    def update(self, _task: int, advance: int = 0, completed: int | None = None, info: str = "") -> None:
        self.completed = completed if completed is not None else self.completed + advance
        fraction, now = self.completed / self.total, time.monotonic()
        if fraction >= self.next_fraction or now - self.last_print >= 60 or self.completed == self.total:
            rate = (now - self.started) / max(self.completed, 1)
            eta = rate * (self.total - self.completed)
            console.print(
                f"{self.description}: {self.completed}/{self.total} ({fraction:.0%}) "
                f"elapsed {now - self.started:.0f}s eta {eta:.0f}s {info}".rstrip(),
                markup=False,
                highlight=False,
            )
            self.last_print, self.next_fraction = now, (int(fraction * 10) + 1) / 10


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Progress | PlainProgress]:
    """A progress bar with ETA; `update(task, advance=..., completed=..., info=...)` on it."""
    if _plain:
        yield PlainProgress(description, total)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        bar.add_task(description, total=total, info="")
        yield bar


def alpha_table(
    alpha: list[float],
    ranking: list[int],
    selected: list[int] | None = None,
    planted: list[int] | None = None,
) -> Table:
    table = Table(title="Layer ranking by α̂ (Flexora gates)")
    table.add_column("rank", justify="right")
    table.add_column("layer", justify="right")
    table.add_column("α̂", justify="right")
    table.add_column("", justify="left")
    table.add_column("selected" if selected is not None else "")
    if planted is not None:
        table.add_column("planted")
    peak = max(abs(a) for a in alpha) or 1.0
    for rank, layer in enumerate(ranking, start=1):
        value = alpha[layer]
        bar = signed_bar(value, peak)
        row = [str(rank), str(layer), f"{value:+.4f}", bar, "✓" if selected and layer in selected else ""]
        if planted is not None:
            row.append("✓" if layer in planted else "")
        table.add_row(*row)
    return table


def signed_bar(value: float, peak: float, half: int = 10) -> str:
    """A bar left (negative, red) or right (positive, green) of a `│` axis, its length ∝ |value|,
    so the sign reads without colour (in a pipe or a log)."""
    length = round(half * abs(value) / peak) if peak else 0
    if value >= 0:
        return " " * half + "│" + f"[green]{'█' * length}[/green]" + " " * (half - length)
    return " " * (half - length) + f"[red]{'█' * length}[/red]" + "│" + " " * half


def stage_panel(stage: str, facts: list[str], files: list[Path]) -> Panel:
    """The closing summary of a stage: what it did, and where its files are."""
    lines = [escape(fact) for fact in facts] + [""] + [f"[cyan]{escape(str(f))}" for f in files if f.exists()]
    return Panel("\n".join(lines).rstrip(), title=f"[bold]{stage} done", title_align="left", expand=False)


METRIC_COLUMNS = {
    "acc": "acc",
    "acc_norm": "acc_norm",
    "loss": "loss",
    "perplexity": "ppl",
    "exact_match,strict-match": "exact_match",
    "exact_match,flexible-extract": "em_flexible",
}
"""Score metrics the eval table shows where any row has them (lm-eval's gsm8k filters included)."""


def metrics_table(summary: EvalMetrics) -> Table:
    """eval/metrics.json as a table: one row per dataset and model variant, a column for each
    metric any of them has (accuracies with their stderr)."""
    rows = [(d, v, s) for d, scores in summary.results.items() for v, s in scores.items()]
    present = [m for m in METRIC_COLUMNS if any(_metric(s, m) is not None for _, _, s in rows)]
    kind = "Accuracy" if set(present) <= {"acc", "acc_norm"} else "Scores"
    table = Table(title=escape(f"{kind} ({evaluated_with(summary)})"))
    for column in ["dataset", "split", "n", "model"]:
        table.add_column(column, justify="left" if column != "n" else "right")
    for metric in present:
        table.add_column(METRIC_COLUMNS[metric], justify="right")
        if metric in ("acc", "acc_norm"):
            table.add_column("± stderr", justify="right")
    for dataset, variant, score in rows:
        cells = [escape(dataset), escape(summary.splits.get(dataset, "")), str(score.n), escape(variant)]
        for metric in present:
            value = _metric(score, metric)
            if metric in ("acc", "acc_norm"):
                cells += _with_stderr(value, getattr(score, f"{metric}_stderr"))
            else:
                cells.append("–" if value is None else f"{value:.4f}")
        table.add_row(*cells)
    return table


def _metric(score: Score, metric: str) -> float | None:
    return getattr(score, metric) if hasattr(score, metric) else score.others.get(metric)


def headline(score: Score) -> str:
    """One score in one cell: the accuracy ± stderr, else the held-out loss, else lm-eval's
    exact match (strict), else –."""
    if score.acc is not None:
        return f"{score.acc:.4f} ± {score.acc_stderr or 0:.4f}"
    if score.loss is not None:
        return f"loss {score.loss:.4f}"
    exact = score.others.get("exact_match,strict-match")
    return "–" if exact is None else f"exact_match {exact:.4f}"


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table (compare's table.md, summary.md, the model card)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _with_stderr(value: float | None, stderr: float | None) -> list[str]:
    return ["–", ""] if value is None else [f"{value:.4f}", f"{stderr:.4f}"]


def evaluated_with(summary: EvalMetrics) -> str:
    """What scored eval/metrics.json: `mcq format`, `completion format`, `lm-eval 0.4.13`, or the
    built-in scorer and lm-eval both (`flexora + lm-eval 0.4.13`, the format named where used)."""
    if summary.format and summary.evaluator.startswith("flexora"):
        return summary.evaluator.replace("flexora", f"{summary.format} format", 1)
    return summary.evaluator


def plot_alpha(alpha: list[float], history: list[dict], selected: list[int] | None = None):
    """α̂ per layer (bars) and α̂ trajectories over search steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, lines) = plt.subplots(1, 2, figsize=(11, 4))
    colors = ["tab:green" if selected and i in selected else "tab:gray" for i in range(len(alpha))]
    bars.bar(range(len(alpha)), alpha, color=colors)
    bars.axhline(0, color="black", linewidth=0.8)
    bars.set(xlabel="layer", ylabel="α̂", title="final α̂ per layer")
    steps = [h["step"] for h in history]
    for layer in range(len(alpha)):
        lines.plot(steps, [h["alpha"][layer] for h in history], label=str(layer))
    lines.set(xlabel="search step", ylabel="α̂", title="α̂ trajectories")
    if len(alpha) <= 16:
        lines.legend(fontsize="x-small", ncol=2)
    return fig


def plot_losses(history: list[dict], keys: tuple[str, ...]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    for key in keys:
        axis.plot([h["step"] for h in history], [h[key] for h in history], label=key.replace("_", " "))
    axis.set(xlabel="step", ylabel="loss")
    axis.legend()
    return fig
