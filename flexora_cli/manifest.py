"""What each stage completed, and proof that its files are still what it wrote.

`out_dir/manifest.json` holds one entry per stage folder (`search`, `select`, `finetune`, `eval`,
`eval/<digest>` for an eval with other settings, `export`): its status, the settings it ran with
and, once complete, the size and sha256 of every output file and the digest of the upstream
outputs it was built from. A copy of a complete entry sits beside the outputs
(`<stage>/outputs.json`), so a damaged or deleted manifest is rebuilt from them.

Nothing downstream trusts a file before it is verified against its entry: `flexora run` reruns a
stage whose outputs are missing, damaged or built from since-changed inputs; a standalone stage
refuses to build on such outputs with one line. A complete result is never replaced by a run with
other settings without force=true (an eval with other eval settings writes beside it instead).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from flexora_cli import __version__, report
from flexora_cli.errors import ConfigError, DamagedArtifactError, MissingArtifactError
from flexora_cli.records import ManifestEntry
from flexora_cli.rundir import MODEL_CARD, RunDir, now, sha256_of
from flexora_cli.settings import Settings
from flexora_cli.stage_table import BY_NAME

RECORD = "outputs.json"


def stage_settings(stage: str, settings: Settings) -> dict:
    """The settings a stage's outputs depend on, as plain JSON-able values."""
    as_dict = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
    for training in ("search", "finetune"):  # how a failure is handled, not what a stage computes
        as_dict[training].pop("on_nonfinite", None)
    as_dict["select"].pop("print", None)  # how the result is shown
    return {key: as_dict[key] for key in BY_NAME[stage].settings}


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


def fingerprint(paths: list[Path], root: Path) -> dict[str, dict]:
    """Size and sha256 of every file in `paths` (folders walked, their hidden files and model card
    left out: eval rewrites it; files named in `paths` always in), keyed by path relative to root."""
    files = sorted(
        f
        for p in paths
        for f in ([p] if p.is_file() else p.rglob("*"))
        if f.is_file() and (f == p or not (f.name.startswith(".") or f.name == MODEL_CARD))
    )
    return {str(f.relative_to(root)): {"size": f.stat().st_size, "sha256": sha256_of(f)} for f in files}


def file_problems(files: dict[str, dict], root: Path, writer: str) -> list[str]:
    """Why the files differ from their fingerprint ([] when every one matches)."""
    problems = []
    for name, expected in files.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (size := path.stat().st_size) != expected["size"]:
            problems.append(f"{name} has {size:,} bytes, {expected['size']:,} when {writer} wrote it")
        elif sha256_of(path) != expected["sha256"]:
            problems.append(f"{name} differs from what {writer} wrote (sha256)")
    return problems


@dataclasses.dataclass(frozen=True)
class Completion:
    """Manifest.completion's answer."""

    done: bool
    """Complete with these settings, from the current upstream outputs, and every file verifies."""
    reason: str = ""
    """Why not, when not done."""
    lost: bool = False
    """It was complete, but its outputs are damaged or its inputs changed since: worth a warning."""


class ManifestFile:
    """out_dir/manifest.json as typed entries: read (a damaged file is rebuilt from the stages'
    outputs.json records), and the writes that mark a stage running, complete or failed."""

    _warned: set[str] = set()  # damaged manifests already reported by this process

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self.path = run_dir.manifest_json

    # -- reading -------------------------------------------------------------------------------
    def entries(self) -> dict[str, ManifestEntry]:
        """Stage folder → its entry."""
        problem = None
        if self.path.exists():
            try:
                manifest = json.loads(self.path.read_text())
                if isinstance(manifest, dict) and isinstance(manifest.get("stages"), dict):
                    return {k: ManifestEntry.from_json(e, self.path) for k, e in manifest["stages"].items()}
                problem = "it does not hold a manifest"
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, DamagedArtifactError) as exc:
                problem = f"unreadable: {str(exc).splitlines()[0][:80]}"
        return self._rebuild(problem)

    def _rebuild(self, problem: str | None) -> dict[str, ManifestEntry]:
        entries: dict[str, ManifestEntry] = {}
        records = sorted(self.run_dir.root.glob(f"*/{RECORD}")) + sorted(
            self.run_dir.root.glob(f"eval/*/{RECORD}")
        )
        for record in records:
            try:
                entry = ManifestEntry.from_json(json.loads(record.read_text()), record)
                entries[entry.folder] = entry
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, DamagedArtifactError, TypeError):
                continue  # a damaged record: that stage counts as not run
        if problem is not None and str(self.path) not in self._warned:
            self._warned.add(str(self.path))
            report.warn(
                f"{self.path} is damaged ({problem}); rebuilt it from the stages' "
                f"{RECORD} records (complete stages found: {', '.join(entries) or 'none'})"
            )
            self._write(entries)
        return entries

    def entry(self, key: str) -> ManifestEntry | None:
        return self.entries().get(key)

    # -- writing ------------------------------------------------------------------------------
    def _write(self, entries: dict[str, ManifestEntry]) -> None:
        if self.run_dir.writes:
            stages = {key: entry.to_json() for key, entry in entries.items()}
            self.run_dir.write_json(self.path, {"version": __version__, "stages": stages})

    def begin(self, stage: str, settings: Settings, key: str | None = None) -> None:
        """Record the stage as running (its previous result is being replaced) and write the
        resolved settings beside its outputs."""
        if not self.run_dir.writes:
            return
        from omegaconf import OmegaConf

        key = key or stage
        config = OmegaConf.to_yaml(OmegaConf.structured(settings))
        self.run_dir.write_text(self.run_dir.root / key / "config.yaml", config)
        entries = self.entries()
        entries[key] = ManifestEntry("running", stage_hash(stage, settings), started=now(), pid=os.getpid())
        self._write(entries)

    def complete(
        self,
        stage: str,
        settings: Settings,
        outputs: list[Path],
        inputs: tuple[str, ...] = (),
        key: str | None = None,
        logs: tuple[Path, ...] = (),
        **summary: Any,
    ) -> None:
        """Mark the stage complete with the fingerprint of `outputs` and the digests of the
        upstream stages in `inputs`; its record goes beside the outputs first. `logs` (e.g. a
        training log with timings) are verified too, but left out of the digest downstream
        stages are built from, so a rerun that reproduces the outputs leaves them current."""
        if not self.run_dir.writes:
            return
        key = key or stage
        entries = self.entries()
        files = fingerprint(outputs, self.run_dir.root)
        running = entries.get(key)
        entry = ManifestEntry(
            "complete",
            stage_hash(stage, settings),
            started=running.started if running else None,
            ended=now(),
            pid=running.pid if running else None,
            folder=key,
            settings=stage_settings(stage, settings),
            inputs={up: entries[up].digest if up in entries else None for up in inputs},
            files=files | fingerprint(list(logs), self.run_dir.root),
            digest=hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16],
            summary=summary,
        )
        self.run_dir.write_json(self.run_dir.root / key / RECORD, entry.to_json())
        entries[key] = entry
        self._write(entries)

    def mark_failed(self, error: BaseException) -> None:
        """Record `error` on the stages this process left running (failed, or interrupted)."""
        if not self.run_dir.writes or not self.path.exists():
            return
        entries = self.entries()
        running = [e for e in entries.values() if e.status == "running" and e.pid == os.getpid()]
        if not running:
            return
        status = "interrupted" if getattr(error, "exit_code", None) == 130 else "failed"
        for entry in running:
            entry.status, entry.ended, entry.error = status, now(), " ".join(str(error).split())
        self._write(entries)


class Manifest(ManifestFile):
    """What a stage may trust of the manifest: whether a stage is complete and current, and the
    refusals to build on damaged or other-settings outputs, or to replace a result silently."""

    def problems(self, key: str) -> list[str]:
        """Why `key`'s complete outputs cannot be trusted: missing, resized or changed files."""
        entry = self.entry(key)
        files = entry.files if entry else {}
        return file_problems(files, self.run_dir.root, f"`flexora {key.split('/')[0]}`")

    def stale_inputs(self, key: str) -> list[str]:
        """The upstream stages whose outputs changed since `key` was built from them."""
        entries = self.entries()
        inputs = entries[key].inputs if key in entries else {}
        return [
            up for up, digest in inputs.items() if (entries[up].digest if up in entries else None) != digest
        ]

    def completion(self, stage: str, settings: Settings, key: str | None = None) -> Completion:
        """Whether the stage is complete with these settings, from current inputs, and verified."""
        key = key or stage
        entry = self.entry(key)
        if entry is None or not entry.complete:
            return Completion(False, f"{entry.status} last time" if entry else "not run yet")
        if stale := self.stale_inputs(key):
            return Completion(
                False, f"built from {', '.join(stale)} outputs that have changed since", lost=True
            )
        if entry.config_hash != stage_hash(stage, settings):
            return Completion(False, "made with other settings")
        if problems := self.problems(key):
            return Completion(False, f"its outputs are damaged: {'; '.join(problems[:3])}", lost=True)
        return Completion(True)

    def require(self, stage: str, this_stage: str) -> None:
        """Refuse to build on `stage`'s outputs unless it completed and they verify.

        A folder with no manifest entry at all (files made by hand) is trusted as it is.
        """
        entry = self.entry(stage)
        rerun = f"rerun `flexora {stage}` (force=true replaces it) or `flexora run`"
        if entry is None:
            return
        if not entry.complete:
            raise MissingArtifactError.because(
                f"{this_stage} needs a complete {stage} in {self.run_dir.stage_dir(stage)}, but its last "
                f"run {entry.status}; {rerun}"
            )
        if problems := self.problems(stage):
            raise DamagedArtifactError(
                f"{this_stage}: the {stage} outputs are damaged ({'; '.join(problems[:3])}); {rerun}"
            )

    def check_upstream(self, upstream: str, this_stage: str, settings: Settings) -> None:
        """Refuse to build on `upstream`'s outputs if they are damaged or were made with other settings."""
        self.require(upstream, this_stage)
        entry = self.entry(upstream)
        saved = (entry.settings if entry else None) or self._saved_config(upstream)
        if saved is None:
            return
        differing = settings_differences(saved, stage_settings(upstream, settings))
        if differing:
            raise ConfigError(
                f"{this_stage}: the {upstream} outputs in {self.run_dir.stage_dir(upstream)} were made with "
                f"other settings ({'; '.join(differing[:6])}); rerun `flexora {upstream}` (or `flexora run`) "
                f"with these settings, or use another out_dir"
            )

    def _saved_config(self, stage: str) -> dict | None:
        """The stage's settings from its config.yaml (outputs made before records, or by hand)."""
        from omegaconf import OmegaConf

        from flexora_cli.config import load

        path = self.run_dir.stage_dir(stage) / "config.yaml"
        return stage_settings(stage, load(OmegaConf.load(path))) if path.exists() else None

    def _replaced_differences(self, stage: str, settings: Settings, key: str) -> list[str]:
        """The settings that differ between these and `key`'s complete, current result ([] when
        there is none, with force=true, or when its inputs have changed since: it is stale)."""
        entry = self.entry(key)
        if settings.force or entry is None or not entry.complete or self.stale_inputs(key):
            return []
        if entry.config_hash == stage_hash(stage, settings):
            return []
        return settings_differences(entry.settings or {}, stage_settings(stage, settings))

    def check_overwrite(self, stage: str, settings: Settings, key: str | None = None) -> None:
        """Refuse to replace a complete, current result made with other settings (force=true may)."""
        key = key or stage
        if differing := self._replaced_differences(stage, settings, key):
            raise ConfigError(
                f"{stage}: {self.run_dir.root / key} holds a complete result made with other settings "
                f"({'; '.join(differing[:6])}); add force=true to replace it, or use another out_dir"
            )

    def eval_key(self, settings: Settings) -> str:
        """`eval`, or `eval/<digest>` when `eval/` holds a current result made with other eval
        settings only (another limit, format, datasets or adapters): that result is kept."""
        differing = self._replaced_differences("eval", settings, "eval")
        if differing and all(d.startswith("eval.") for d in differing):
            return f"eval/{stage_hash('eval', settings)[:8]}"
        return "eval"

    def require_adapter(self, this_stage: str, settings: Settings) -> Path:
        """This run's fine-tuned adapter, which must exist, verify and match `settings`."""
        config = self.run_dir.adapter_dir / "adapter_config.json"
        self.check_upstream("finetune", this_stage, settings)
        if not config.exists():
            raise MissingArtifactError(config, "finetune", this_stage)
        return self.run_dir.adapter_dir
