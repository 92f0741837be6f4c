"""The run directory: where every artifact lives, and the only code that writes there.

Every file appears atomically (temp name in the same folder, fsync, rename), so a killed run
leaves the old file or the new one, never half of one. The manifest records each stage's status
and the hash of the settings it ran with, which is how `flexora run` knows a stage is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from flexora_cli import __version__
from flexora_cli.settings import Settings

STAGES = ("search", "select", "finetune", "eval", "export")

# The settings each stage's output depends on; later stages include earlier ones, so a change
# upstream invalidates everything downstream.
_SEARCH_KEYS = (
    "model",
    "dataset",
    "lora",
    "search",
    "seed",
    "format",
    "max_length",
    "precision",
    "group_by_length",
)
_STAGE_KEYS = {
    "search": _SEARCH_KEYS,
    "select": (*_SEARCH_KEYS, "select"),
    "finetune": (*_SEARCH_KEYS, "select", "finetune"),
    "eval": (*_SEARCH_KEYS, "select", "finetune", "eval"),
    "export": (*_SEARCH_KEYS, "select", "finetune"),
}


def is_main_process() -> bool:
    """False in the processes after the first of a multi-process launch (`accelerate launch`,
    torchrun set RANK): they compute, but only the main process writes and prints."""
    return int(os.environ.get("RANK", "0")) == 0


class RunDir:
    """Paths of every artifact under `out_dir`, plus atomic writers and the manifest.

    Only the main process writes (`writes`); elsewhere the writers do nothing, and the atomic
    context managers hand out a throwaway temp location.
    """

    def __init__(self, out_dir: str | os.PathLike, plots: bool = True):
        self.root = Path(out_dir)
        self.writes = is_main_process()
        self.plots = plots

    # -- layout -------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    @property
    def alpha_json(self) -> Path:
        return self.root / "search" / "alpha.json"

    @property
    def alpha_png(self) -> Path:
        return self.root / "search" / "alpha.png"

    @property
    def search_loss_png(self) -> Path:
        return self.root / "search" / "loss.png"

    @property
    def selection_json(self) -> Path:
        return self.root / "select" / "selection.json"

    @property
    def selection_png(self) -> Path:
        return self.root / "select" / "alpha.png"

    @property
    def adapter_dir(self) -> Path:
        return self.root / "finetune" / "adapter"

    @property
    def finetune_log_json(self) -> Path:
        return self.root / "finetune" / "train_log.json"

    @property
    def finetune_loss_png(self) -> Path:
        return self.root / "finetune" / "loss.png"

    @property
    def metrics_json(self) -> Path:
        return self.root / "eval" / "metrics.json"

    @property
    def predictions_jsonl(self) -> Path:
        return self.root / "eval" / "predictions.jsonl"

    @property
    def export_dir(self) -> Path:
        return self.root / "export" / "model"

    def checkpoints_dir(self, stage: str) -> Path:
        return self.root / stage / "checkpoints"

    @property
    def manifest_json(self) -> Path:
        return self.root / "manifest.json"

    # -- lock ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold `out_dir/.lock` (our pid) while a stage runs.

        A live holder is an error naming its pid; a dead holder's lock is taken over with a
        warning; this process already holding it (`flexora run` calling a stage) is fine. If the
        run directory did not exist and the stage leaves nothing in it, it is removed again.
        """
        from flexora_cli import report
        from flexora_cli.errors import RunLockedError

        if not self.writes:
            yield
            return
        path = self.root / ".lock"
        created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                holder = _lock_holder(path)
                if holder == os.getpid():
                    yield
                    return
                if holder is not None and _alive(holder):
                    raise RunLockedError(
                        f"{self.root} is in use by flexora process {holder} ({path}); wait for it to "
                        f"finish or stop it, or give this run another out_dir"
                    ) from None
                report.console.print(f"warning: taking over the stale lock {path} (process {holder} is gone)")
                path.unlink(missing_ok=True)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            if created and not any(self.root.iterdir()):
                self.root.rmdir()

    # -- atomic writes ------------------------------------------------------------------------
    def write_json(self, path: Path, obj: Any) -> Path:
        return self.write_text(path, json.dumps(obj, indent=2) + "\n")

    def write_jsonl(self, path: Path, rows: list[dict]) -> Path:
        return self.write_text(path, "".join(json.dumps(row) + "\n" for row in rows))

    def write_text(self, path: Path, text: str) -> Path:
        with self.atomic_file(path) as tmp:
            tmp.write_text(text)
        return path

    @contextlib.contextmanager
    def atomic_file(self, path: Path) -> Iterator[Path]:
        """Yield a temp path beside `path`; on success it is fsynced and renamed onto `path`."""
        if not self.writes:
            with tempfile.TemporaryDirectory() as scratch:
                yield Path(scratch) / path.name
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with _disk_full_is_clear(path):
                yield tmp
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def atomic_dir(self, path: Path) -> Iterator[Path]:
        """Yield a temp folder beside `path`; on success it replaces `path` whole (main process)."""
        if not self.writes:
            with tempfile.TemporaryDirectory() as scratch:
                yield Path(scratch)
            return
        with atomic_directory(path) as tmp:
            yield tmp

    def save_figure(self, path: Path, make_figure: Callable[[], Any]) -> Path:
        """Draw a matplotlib figure (main process, plots=true), save it as PNG atomically, release it."""
        import matplotlib.pyplot as plt

        if not (self.writes and self.plots):
            return path
        figure = make_figure()
        with self.atomic_file(path) as tmp:
            figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        return path

    # -- manifest and per-stage config --------------------------------------------------------
    def read_manifest(self) -> dict:
        if self.manifest_json.exists():
            return json.loads(self.manifest_json.read_text())
        return {"version": __version__, "stages": {}}

    def begin_stage(self, stage: str, settings: Settings) -> None:
        """Record the stage as running and write the resolved settings beside its outputs."""
        if not self.writes:
            return
        config = OmegaConf.to_yaml(OmegaConf.structured(settings))
        self.write_text(self.stage_dir(stage) / "config.yaml", config)
        manifest = self.read_manifest()
        manifest["version"] = __version__
        manifest["stages"][stage] = {
            "status": "running",
            "config_hash": stage_hash(stage, settings),
            "started": _now(),
            "ended": None,
            "pid": os.getpid(),
        }
        self.write_json(self.manifest_json, manifest)

    def end_stage(self, stage: str, **summary: Any) -> None:
        if not self.writes:
            return
        manifest = self.read_manifest()
        entry = manifest["stages"].setdefault(stage, {})
        entry.update(status="complete", ended=_now(), **summary)
        self.write_json(self.manifest_json, manifest)

    def check_upstream(self, upstream: str, this_stage: str, settings: Settings) -> None:
        """Refuse to build on `upstream`'s outputs if they were made with other settings."""
        from flexora_cli.errors import ConfigError
        from flexora_cli.settings import load

        saved_config = self.stage_dir(upstream) / "config.yaml"
        if not saved_config.exists():
            return
        saved = load(OmegaConf.load(saved_config))
        differing = settings_differences(stage_settings(upstream, saved), stage_settings(upstream, settings))
        if differing:
            raise ConfigError(
                f"{this_stage}: the {upstream} outputs in {self.stage_dir(upstream)} were made with other "
                f"settings ({'; '.join(differing[:6])}); rerun `flexora {upstream}` (or `flexora run`) with "
                f"these settings, or use another out_dir"
            )

    def require_adapter(self, this_stage: str, settings: Settings) -> Path:
        """This run's fine-tuned adapter, which must exist and match `settings` (check_upstream)."""
        from flexora_cli.errors import MissingArtifactError

        config = self.adapter_dir / "adapter_config.json"
        if not config.exists():
            raise MissingArtifactError(config, "finetune", this_stage)
        self.check_upstream("finetune", this_stage, settings)
        return self.adapter_dir

    def mark_failed(self, error: Exception) -> None:
        """Record `error` on the stages this process left running (failed, or interrupted)."""
        if not self.writes or not self.manifest_json.exists():
            return
        manifest = self.read_manifest()
        running = [
            e
            for e in manifest["stages"].values()
            if e.get("status") == "running" and e.get("pid") == os.getpid()
        ]
        if not running:
            return
        status = "interrupted" if getattr(error, "exit_code", None) == 130 else "failed"
        for entry in running:
            entry.update(status=status, ended=_now(), error=" ".join(str(error).split()))
        self.write_json(self.manifest_json, manifest)

    def is_complete(self, stage: str, settings: Settings) -> bool:
        """True when the stage finished with exactly these settings."""
        entry = self.read_manifest()["stages"].get(stage, {})
        return entry.get("status") == "complete" and entry.get("config_hash") == stage_hash(stage, settings)


def stage_settings(stage: str, settings: Settings) -> dict:
    """The settings a stage's outputs depend on, as plain JSON-able values."""
    as_dict = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
    for training in ("search", "finetune"):  # how a failure is handled, not what a stage computes
        as_dict[training].pop("on_nonfinite", None)
    return {key: as_dict[key] for key in _STAGE_KEYS[stage]}


def stage_hash(stage: str, settings: Settings) -> str:
    """Short hash of the settings a stage's outputs depend on."""
    relevant = stage_settings(stage, settings)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def settings_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """`key: old then, new now` for every leaf that differs between two settings dicts."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [d for k in keys for d in settings_differences(saved.get(k), current.get(k), f"{prefix}{k}.")]
    return [] if saved == current else [f"{prefix.rstrip('.')}: {saved!r} then, {current!r} now"]


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success its files are fsynced and it replaces `path`
    whole, so a reader sees the old folder or the new one, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _disk_full_is_clear(path):
            yield tmp
            for item in tmp.iterdir():
                if item.is_file():
                    with open(item, "rb+") as handle:
                        os.fsync(handle.fileno())
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path, stage: str, this_stage: str) -> dict:
    """Read an artifact of an earlier stage, or say which stage writes it."""
    from flexora_cli.errors import MissingArtifactError

    if not path.exists():
        raise MissingArtifactError(path, stage, this_stage)
    return json.loads(path.read_text())


@contextlib.contextmanager
def _disk_full_is_clear(path: Path) -> Iterator[None]:
    """Turn "no space left on device" into one clear error (the temp copy is removed by the caller)."""
    from flexora_cli.errors import DiskFullError

    try:
        yield
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        if not (full or "No space left" in str(exc) or "file write failed" in str(exc)):
            raise
        raise DiskFullError(
            f"no space left on the device while writing {path} (the previous version, if any, is "
            f"intact); free some space or point out_dir to a larger disk, then rerun to resume"
        ) from exc


def _lock_holder(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None  # unreadable or half-written: treated as stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
