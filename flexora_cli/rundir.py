"""The run directory: where every artifact lives, and the only code that writes there.

Every file appears atomically (temp name in the same folder, fsync, rename), so a killed run
leaves the old file or the new one, never half of one; it gets the user's umask (0644 typically),
so colleagues on the same machine can read results. What each stage completed, and the check
that its files are intact, is manifest.py's.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MODEL_CARD = "README.md"
"""The adapter's model card (model_card.py): documentation, rewritten by eval, so not verified."""
LAUNCH_FAILURE = ".failed"
"""out_dir/.failed: the first error of a multi-process launch, for the other processes (engine.launch_error)."""


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
        run directory did not exist and the stage leaves nothing in it (but a launch's failure note),
        it is removed again.
        """
        from flexora_cli import report
        from flexora_cli.errors import RunLockedError

        if not self.writes:
            yield
            return
        path = self.root / ".lock"
        created = not self.root.exists()
        check_writable(self.root)
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
                report.warn(f"taking over the stale lock {path} (process {holder} is gone)")
                path.unlink(missing_ok=True)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            left = list(self.root.iterdir()) if created else []
            if created and all(p.name == LAUNCH_FAILURE for p in left):  # nothing but a failure note
                for p in left:
                    p.unlink(missing_ok=True)
                self.root.rmdir()

    # -- a multi-process launch's first failure (written by whichever process fails first) ------
    def claim_launch_failure(self, message: str, exit_code: int) -> bool:
        """Leave this launch's first error in out_dir/.failed; False when another process was
        first. Any process writes it (not only the main one): the first to fail may be any."""
        try:  # O_EXCL: the first failure wins
            fd = os.open(self.root / LAUNCH_FAILURE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump({"message": message, "exit_code": exit_code, "time": time.time()}, handle)
        return True

    def launch_failure(self, since: float) -> dict | None:
        """The error another process of this launch left in out_dir/.failed after `since`."""
        try:
            failure = json.loads((self.root / LAUNCH_FAILURE).read_text())
            return failure if failure["time"] >= since else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

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
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
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


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success its files are fsynced and it replaces `path`
    whole, so a reader sees the old folder or the new one, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _disk_full_is_clear(path):
            yield tmp
            for item in tmp.rglob("*"):  # a checkpoint's shards/ included
                if item.is_file():
                    with open(item, "rb+") as handle:
                        os.fsync(handle.fileno())
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_of(path: Path | str) -> str:
    """A file's sha256, read in 16 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, stage: str, this_stage: str) -> dict:
    """Read an artifact of an earlier stage, or say which stage writes it."""
    from flexora_cli.errors import DamagedArtifactError, MissingArtifactError

    if not path.exists():
        raise MissingArtifactError(path, stage, this_stage)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedArtifactError(
            f"{this_stage}: {path} is damaged ({str(exc).splitlines()[0][:80]}); rerun `flexora {stage}` "
            f"with force=true (or `flexora run`)"
        ) from None


def check_writable(root: Path) -> None:
    """Create `root` and prove a file can be written there, or say in one line why not."""
    from flexora_cli.errors import ConfigError

    blocker = next((p for p in (root, *root.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"out_dir {root}: {blocker} is a file, not a folder; choose another out_dir")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test."):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"out_dir {root} cannot be written ({reason}); choose a folder you can write to"
        ) from None


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


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


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
