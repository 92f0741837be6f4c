"""Terminal output: plain progress lines for logs (quiet=true or no terminal)."""

from __future__ import annotations

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
