"""Shared fixtures: the real recipes composed through Hydra, and the demo's tiny model and data."""

from __future__ import annotations

import pytest
import torch
from omegaconf import DictConfig

from flexora_cli import demo
from flexora_cli.config import compose

torch.set_num_threads(2)


def flat(rows) -> list[float]:
    """Per-prompt score lists as one list (to compare two scorings with pytest.approx)."""
    return [value for row in rows for value in row]


def compose_config(*overrides: str) -> DictConfig:
    """The config `flexora <stage> *overrides` would run with."""
    return compose(list(overrides))


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; a command sets it once, tests set it many times."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> str:
    """The bundled demo's assets (tiny Llama model + planted-teacher data), built once per session."""
    return str(demo.ensure_assets(tmp_path_factory.mktemp("demo") / "assets"))


@pytest.fixture()
def tiny_cfg(demo_dir, tmp_path):
    """A quick demo-recipe config in a fresh run directory; extra overrides as arguments."""

    def make(*overrides: str) -> DictConfig:
        quick = [
            "search.budget=64",
            "search.val_samples=32",
            "search.log_every=2",
            "finetune.epochs=0.5",
            "dataset.max_train_samples=128",
            "eval.limit=40",
        ]
        return compose_config(
            "recipe=demo", f"demo_assets={demo_dir}", f"out_dir={tmp_path / 'run'}", *quick, *overrides
        )

    return make


def poison_layer(load_model, layer: int, from_call: int, until_call=None, backward=False, loaded=None):
    """`load_model` whose decoder layer `layer` turns non-finite in its forwards from_call..until_call
    (its output, or with backward=True its output's gradient); the models go into `loaded`. A
    search step runs 2 forwards per micro-batch: the LoRA step's, then the α step's."""

    def load(*args, **kwargs):
        model = load_model(*args, **kwargs)
        calls = []

        def poison(_module, _inputs, output):
            calls.append(1)
            if len(calls) < from_call or (until_call is not None and len(calls) > until_call):
                return output
            if backward:
                output.register_hook(lambda grad: grad * float("nan"))
                return output
            return output * float("nan")

        model.model.layers[layer].register_forward_hook(poison)
        if loaded is not None:
            loaded.append(model)
        return model

    return load
