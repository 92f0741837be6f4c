"""One module per stage, each with a plain `run(cfg)`; `setup` is what they all start with."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from omegaconf import DictConfig

from flexora_cli import demo, report
from flexora_cli.errors import FlexoraError
from flexora_cli.rundir import RunDir, is_main_process
from flexora_cli.settings import Settings, load


def setup(cfg: DictConfig | Settings) -> tuple[Settings, RunDir]:
    """Typed, validated settings and the run directory; builds the demo assets when asked."""
    settings = load(cfg)
    report.configure(settings.quiet, main_process=is_main_process())
    if settings.demo_assets and settings.demo_task == "smollm2":
        from flexora_cli import smollm2_demo

        smollm2_demo.ensure_assets(settings.demo_assets, settings.model)
    elif settings.demo_assets:
        demo.ensure_assets(settings.demo_assets)
    return settings, RunDir(settings.out_dir, plots=settings.plots)


def collator(settings: Settings, engine, model, pad_id: int, grad_accum: int):
    """The training step's collator for this stage: packed rows where the model allows
    (step.AnswerLM.packed), this process's share of each global batch."""
    from flexora_cli.step import Collator

    return Collator(
        pad_id=pad_id,
        packed=model.packed,
        pack_tokens=settings.pack_tokens,
        multiple=settings.pad_to_multiple_of,
        num_processes=engine.num_processes,
        process_index=engine.process_index,
        grad_accum=grad_accum,
    )


def planted_layers(settings: Settings) -> list[int] | None:
    """The demo's known right answer (None for real models)."""
    return demo.planted_layers(settings.demo_assets) if settings.demo_assets else None


def locked(stage_run: Callable[[DictConfig | Settings], dict]) -> Callable[[DictConfig | Settings], dict]:
    """Run a stage holding its run directory's lock (RunDir.lock); a failure is noted in the manifest."""

    @functools.wraps(stage_run)
    def run(cfg: DictConfig | Settings) -> dict:
        settings = load(cfg)  # composed and validated once; the stage's setup() gets it as is
        run_dir = RunDir(settings.out_dir)
        with run_dir.lock():
            try:
                result = stage_run(settings)
            except (FlexoraError, KeyboardInterrupt) as exc:
                run_dir.mark_failed(exc)
                raise
        _wait_for_other_processes()  # the next stage reads what the main process just wrote
        return result

    return run


def _wait_for_other_processes() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
