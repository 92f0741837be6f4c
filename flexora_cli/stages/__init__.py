"""One module per stage, each with a plain `run(cfg)`; `setup` is what they all start with, and
`locked` what they all run under (the run directory's lock, and a failure recorded in the manifest
and shared with the other processes of a launch, engine.launch_error)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from omegaconf import DictConfig

from flexora_cli import demo, report
from flexora_cli.config import load
from flexora_cli.engine import launch_error, wait_for_other_processes
from flexora_cli.errors import FlexoraError
from flexora_cli.manifest import Manifest
from flexora_cli.rundir import RunDir, is_main_process
from flexora_cli.settings import Settings


def setup(cfg: DictConfig | Settings) -> tuple[Settings, RunDir]:
    """Typed, validated settings and the run directory; builds the demo assets when asked."""
    settings = load(cfg)
    report.configure(settings.quiet, main_process=is_main_process(), json_on_stdout=settings.print_json)
    if settings.demo_assets and settings.demo_task == "smollm2":
        from flexora_cli import smollm2_demo

        smollm2_demo.ensure_assets(settings.demo_assets, settings.model)
    elif settings.demo_assets:
        demo.ensure_assets(settings.demo_assets)
    return settings, RunDir(settings.out_dir, plots=settings.plots)


def planted_layers(settings: Settings) -> list[int] | None:
    """The demo's known right answer (None for real models)."""
    return demo.planted_layers(settings.demo_assets) if settings.demo_assets else None


def locked(stage_run: Callable[[DictConfig | Settings], dict]) -> Callable[[DictConfig | Settings], dict]:
    """Run a stage holding its run directory's lock (RunDir.lock); a failure is noted in the
    manifest, and in a multi-process launch every process ends with the failing one's error."""

    @functools.wraps(stage_run)
    def run(cfg: DictConfig | Settings) -> dict:
        settings = load(cfg)  # composed and validated once; the stage's setup() gets it as is
        run_dir = RunDir(settings.out_dir)
        with run_dir.lock():
            try:
                result = stage_run(settings)
            except (FlexoraError, KeyboardInterrupt, RuntimeError) as exc:
                error = launch_error(run_dir, exc)
                Manifest(run_dir).mark_failed(error)
                if error is exc:
                    raise
                raise error from None
        wait_for_other_processes()  # the next stage reads what the main process just wrote
        return result

    return run
