"""What the user sees: rich progress and tables on stderr, matplotlib figures on disk."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Progress]:
    """A progress bar with ETA; `update(task, advance=..., info=...)` on the yielded object."""
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
        bar = ("[green]" if value > 0 else "[red]") + "█" * max(1, round(12 * abs(value) / peak))
        row = [str(rank), str(layer), f"{value:+.4f}", bar, "✓" if selected and layer in selected else ""]
        if planted is not None:
            row.append("✓" if layer in planted else "")
        table.add_row(*row)
    return table


def metrics_table(metrics: dict) -> Table:
    table = Table(title=escape(f"Accuracy on {metrics['dataset']} [{metrics['split']}], n={metrics['n']}"))
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_column("± stderr", justify="right")
    for variant in ("base", "adapter"):
        if variant in metrics:
            table.add_row(variant, f"{metrics[variant]['accuracy']:.4f}", f"{metrics[variant]['stderr']:.4f}")
    return table


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
