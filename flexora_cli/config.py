"""From recipes to typed settings: Hydra composition, the `${package_dir:…}` resolver, dataset
presets, and `load`, which merges a config onto settings.Settings and checks it whole (every
section's fields, the rules across sections, and the method's own rules) in one message.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flexora_cli.errors import ConfigError, first_line
from flexora_cli.settings import DatasetSettings, Settings


def recipes_dir() -> Path:
    """recipes/ beside the package in a source checkout, else the copy installed in the package."""
    source = Path(__file__).resolve().parent.parent / "recipes"
    return source if (source / "config.yaml").exists() else Path(__file__).resolve().parent / "recipes"


def package_dir(module: str, pip_install: str) -> str:
    """The folder of the installed package `module` (the `${package_dir:module,pip command}`
    resolver of recipes that use files a package ships, e.g. recipes/model/smollm2_135m.yaml)."""
    spec = importlib.util.find_spec(module)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the files this config uses come from the Python package {module}, which is not "
            f"installed; run `{pip_install}`"
        )
    return str(Path(spec.submodule_search_locations[0]))


OmegaConf.register_new_resolver("package_dir", package_dir, replace=True)


def compose(overrides: list[str]) -> DictConfig:
    """The recipes composed with `overrides`, exactly as `flexora STAGE overrides...` does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def load(cfg: DictConfig | Settings) -> Settings:
    """Typed, validated settings from a composed config; raises ConfigError listing every problem."""
    if isinstance(cfg, Settings):
        settings = cfg
    else:
        try:
            merged = OmegaConf.merge(OmegaConf.structured(Settings), cfg)
            settings = OmegaConf.to_object(merged)
        except OmegaConfBaseException as exc:
            resolving = "raised while resolving interpolation: "
            if resolving in str(exc):  # a resolver's own message (e.g. package_dir) says the fix
                raise ConfigError(first_line(exc).split(resolving, 1)[1]) from exc
            key = getattr(exc, "full_key", None)
            where = f"{key}: " if key and key not in first_line(exc) else ""
            raise ConfigError(
                f"{where}{first_line(exc)} (check the spelling and type of the override)"
            ) from exc
    settings.select.layers = _plain_list(settings.select.layers)
    settings.dataset.columns.choices = _plain_list(settings.dataset.columns.choices)
    if isinstance(settings.eval.batch_size, str) and settings.eval.batch_size.isdigit():
        settings.eval.batch_size = int(settings.eval.batch_size)
    from flexora_cli.method import hypergradient  # torch: not at import, so `flexora --help` stays quick

    problems = settings.validate() + hypergradient.setting_problems(settings)
    if problems:
        raise ConfigError("invalid settings: " + "; ".join(problems))
    return settings


def _plain_list(value: Any) -> Any:
    """`Any` fields keep OmegaConf's ListConfig through to_object; a plain list instead."""
    return list(value) if isinstance(value, tuple) or OmegaConf.is_list(value) else value


def dataset_settings(name: str, settings: Settings) -> DatasetSettings:
    """The dataset config recipes/dataset/NAME.yaml, resolved against `settings` (e.g. demo_assets).

    The run's own dataset keeps the command line's overrides.
    """
    if name == settings.dataset.name:
        return settings.dataset
    return dataset_preset(name, settings.demo_assets)


def dataset_preset(name: str, demo_assets: str | None = None, **changes: Any) -> DatasetSettings:
    """The dataset config recipes/dataset/NAME.yaml with `changes` (e.g. data_dir) applied."""
    path = recipes_dir() / "dataset" / f"{name}.yaml"
    if not path.is_file():
        valid = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"eval.datasets: no dataset config '{name}'; choose from {valid}")
    try:
        root = OmegaConf.create({"demo_assets": demo_assets, "dataset": with_defaults(path)})
        values = {**OmegaConf.to_container(root.dataset, resolve=True), **changes}
        merged = OmegaConf.merge(OmegaConf.structured(DatasetSettings), values)
        spec = OmegaConf.to_object(merged)
        spec.columns.choices = _plain_list(spec.columns.choices)
        return spec
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {first_line(exc)}") from exc


def with_defaults(path: Path) -> DictConfig:
    """A group config merged onto the configs its `defaults` list names in the same group, as
    Hydra composes it (presets hold only their differences)."""
    node = OmegaConf.load(path)
    bases = node.pop("defaults", [])
    merged = [with_defaults(path.parent / f"{base}.yaml") for base in bases if base != "_self_"]
    return OmegaConf.merge(*merged, node)
