"""Errors a user can see. The CLI prints `error: <message>` and exits with `exit_code`, no traceback."""

from __future__ import annotations


class FlexoraError(Exception):
    """Base class: a problem the user can fix; the message names the problem and the fix."""

    exit_code = 1


class ConfigError(FlexoraError):
    """Bad settings or command line (exit 2)."""

    exit_code = 2


class DataError(FlexoraError):
    """A dataset file or record that breaks its schema (exit 2)."""

    exit_code = 2


class MissingArtifactError(FlexoraError):
    """A stage needs a file that an earlier stage writes (exit 2)."""

    exit_code = 2

    def __init__(self, path, stage: str, this_stage: str):
        super().__init__(
            f"{this_stage} needs {path}, which `flexora {stage}` writes; run `flexora {stage}` "
            f"with the same out_dir first (or `flexora run` for the whole pipeline)"
        )

    @classmethod
    def because(cls, message: str) -> MissingArtifactError:
        """The error with its own message (e.g. the stage ran but did not complete)."""
        error = cls.__new__(cls)
        FlexoraError.__init__(error, message)
        return error


class DamagedArtifactError(FlexoraError):
    """A stage's output file that does not hold what that stage writes (exit 2)."""

    exit_code = 2


class ModelError(FlexoraError):
    """A model that cannot be loaded or does not have the configured layout (exit 2)."""

    exit_code = 2


class TrainingError(FlexoraError):
    """A failure while training or evaluating (exit 1)."""

    exit_code = 1


class RunLockedError(FlexoraError):
    """Another live process holds the run directory (exit 1)."""

    exit_code = 1


class DiskFullError(FlexoraError):
    """No space left while writing an artifact; the previous file (if any) is untouched (exit 1)."""

    exit_code = 1


def inject_fault(stage: str, step: int, process_index: int) -> None:
    """Raise a TrainingError where `FLEXORA_FAULT=<stage>:<step>[:<process>]` says, for the
    fault-injection tests and scripts/fault_injection.py (a failure on one process of a launch)."""
    import os

    spec = os.environ.get("FLEXORA_FAULT")
    if not spec:
        return
    want_stage, want_step, *want_process = spec.split(":")
    if (want_stage, int(want_step)) == (stage, step) and (
        not want_process or int(want_process[0]) == process_index
    ):
        raise TrainingError(
            f"{stage}: injected fault at step {step} on process {process_index} (FLEXORA_FAULT)"
        )


def first_line(exc: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
