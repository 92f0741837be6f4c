"""Terminal output: plain progress lines for logs (quiet=true or no terminal), signed α̂ bars,
results on stdout printed whole in a pipe."""

from __future__ import annotations

import subprocess
import sys

from flexora_cli import report


def test_quiet_progress_prints_a_line_per_tenth(capsys):
    report.configure(quiet=True)
    with report.progress("search", 40) as bar:
        bar.update(0, completed=0)
        for step in range(40):
            bar.update(0, advance=1, info=f"loss {1 / (step + 1):.2f}")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("search: 4/40 (10%) elapsed") and lines[0].endswith("loss 0.25")
    assert lines[-1].startswith("search: 40/40 (100%)")


def test_signed_bars_read_without_colour():
    assert report.signed_bar(0.5, 0.5, half=4) == "    │[green]████[/green]"
    assert report.signed_bar(-0.25, 0.5, half=4) == "  [red]██[/red]│    "
    assert report.signed_bar(0.0, 0.5, half=4) == "    │[green][/green]    "


def test_a_wide_table_in_a_pipe_is_intact():
    """Results go to stdout, whole: a 200-column cell is not cut or wrapped in a pipe."""
    code = (
        "from rich.table import Table; from flexora_cli import report; "
        "t = Table(); t.add_column('wide'); t.add_row('x' * 200); report.result(t)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""
    assert any("x" * 200 in line for line in done.stdout.splitlines())
