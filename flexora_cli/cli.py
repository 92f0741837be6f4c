"""`flexora <stage> [overrides]`: command line → Hydra config → `stages.<stage>.run(cfg)`.

Hydra owns the command line after the stage name (overrides, --cfg, --help, -m). Before handing
over, plain override lists are composed once here so that a config error is one `error:` line
with exit code 2 instead of Hydra's multi-line report.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from flexora_cli import __version__
from flexora_cli.config import recipes_dir
from flexora_cli.errors import ConfigError, FlexoraError
from flexora_cli.stage_table import BY_NAME

# Hydra flags that point at other config sources (they take a value).
_CONFIG_SOURCE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}
# Hydra flags that take a value, so the value is not mistaken for an override.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p"} | _CONFIG_SOURCE_FLAGS
# Flags after which the pre-check is left to Hydra (help, sweeps, other config sources).
_HYDRA_OWNED = {
    "--help",
    "-h",
    "--hydra-help",
    "--multirun",
    "-m",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
    "--version",
} | _CONFIG_SOURCE_FLAGS


def usage() -> str:
    lines = [
        f"flexora {__version__} — Flexora layer selection for LoRA fine-tuning",
        "",
        "usage: flexora <stage> [key=value ...] [hydra flags]",
        "",
        "stages:",
    ]
    lines += [f"  {stage.name:<9} {stage.summary}" for stage in BY_NAME.values()]
    lines += [
        "",
        "examples:",
        "  flexora run recipe=demo",
        "  flexora search recipe=llama3_piqa",
        "  flexora run recipe=llama3_piqa select.layers=all out_dir=runs/lora_all",
        "  flexora eval recipe=llama3_piqa format=completion dataset=[piqa,hellaswag]",
        "  flexora eval recipe=llama3_piqa adapters=[runs/a,runs/b] --cfg job",
        "  flexora compare recipe=llama3_piqa dataset=[piqa,hellaswag]",
        "  flexora run -m recipe=llama3_piqa lora=r4,r8,r16 && flexora summary runs/llama3_piqa",
        "",
        "`flexora <stage> --help` shows the config groups and options.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    stage, args = argv[0], argv[1:]
    debug = any(a.lower() in ("debug=true", "debug=1") for a in args)
    try:
        if stage not in BY_NAME:
            raise ConfigError(
                f"unknown stage '{stage}'; use one of: {', '.join(BY_NAME)} (see `flexora --help`)"
            )
        if stage == "summary":
            return _summary(args, debug)
        args = expand_shorthands(stage, args)
        owned = _HYDRA_OWNED.intersection(args)
        if not owned:
            precheck(_overrides(args))
        elif owned <= {"-m", "--multirun"}:  # a sweep: every value checked before the first job
            for job in sweep_samples(_overrides(args)):
                precheck(job)
    except FlexoraError as exc:
        if debug:
            raise
        return _fail(exc)
    return _run_hydra(stage, args, debug)


def expand_shorthands(stage: str, args: list[str]) -> list[str]:
    """`adapters=[..]`, `evaluator=`, `tasks=[..]` → eval.*; `print=peft` → select.print; `dataset=[a,b]` → dataset=a
    and eval.datasets=[a,b] (eval) or compare.datasets=[a,b] (compare).

    Hydra would merge a list of dataset configs into one node, silently mixing their fields.
    """
    expanded = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key in ("adapters", "evaluator", "tasks"):
            expanded.append(f"eval.{key}={value}")
        elif key == "print":
            expanded.append(f"select.print={value}")
        elif key == "dataset" and value.startswith("["):
            if stage not in ("eval", "compare"):
                raise ConfigError(
                    f"{arg}: several datasets work with `flexora eval` and `flexora compare` only; "
                    f"train one run per dataset (`flexora {stage} -m dataset=a,b`)"
                )
            names = [n.strip() for n in value.strip("[]").split(",") if n.strip()]
            if not names:
                raise ConfigError(f"{arg}: empty list; name at least one dataset")
            expanded += [f"dataset={names[0]}", f"{stage}.datasets=[{','.join(names)}]"]
        else:
            expanded.append(arg)
    return expanded


def sweep_samples(overrides: list[str]) -> list[list[str]]:
    """Overrides that together try every value of every swept key once (the other swept keys at
    their first value): len(values) compositions, not the product."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(_hydra_message(exc, overrides)) from exc
    try:  # a glob() sweep has no values until Hydra knows the options: left to Hydra
        sweeps = {
            o.get_key_element(): list(o.sweep_string_iterator()) for o in parsed if o.is_sweep_override()
        }
    except HydraException:
        return []
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    firsts = {key: f"{key}={values[0]}" for key, values in sweeps.items() if values}
    samples = []
    for key, values in sweeps.items():
        others = [first for other, first in firsts.items() if other != key]
        samples += [[*fixed, *others, f"{key}={value}"] for value in values]
    return samples or [fixed]


def precheck(overrides: list[str]) -> None:
    """Compose and validate the config once; any problem becomes a ConfigError."""
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from flexora_cli.config import compose, load

    try:
        cfg = compose(overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_hydra_message(exc, overrides)) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}" if mark else "a recipe file"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"malformed YAML in {where}: {problem}; fix the file") from exc
    load(cfg)


def _run_hydra(stage: str, args: list[str], debug: bool) -> int:
    import hydra
    from omegaconf import DictConfig

    module = importlib.import_module(BY_NAME[stage].module)

    swept = _swept_keys(args)

    @hydra.main(version_base="1.3", config_path=str(recipes_dir()), config_name="config")
    def task(cfg: DictConfig) -> None:
        try:
            if swept:  # `-m`: each job gets its own run directory, named by its swept values
                cfg.out_dir = _job_dir(cfg.out_dir, swept)
            result = module.run(cfg)
            if cfg.get("print_json"):  # the stage's result on stdout, for pipelines (`| jq .layers`)
                print(json.dumps(result, default=_as_json))
        except FlexoraError as exc:
            if debug:
                raise
            sys.exit(_fail(exc))
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)

    saved = sys.argv
    sys.argv = [f"flexora {stage}", *args]
    try:
        task()
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    finally:
        sys.argv = saved
    return 0


def _summary(args: list[str], debug: bool) -> int:
    """`flexora summary DIR [print_json=true]`: no config to compose, just a folder to read."""
    from flexora_cli import report
    from flexora_cli.stages import summary

    folders = [a for a in args if "=" not in a and not a.startswith("-")]
    as_json = any(a.lower() in ("print_json=true", "print_json=1") for a in args)
    report.configure(quiet=False, json_on_stdout=as_json)  # the JSON alone on stdout, if asked
    try:
        if len(folders) != 1:
            raise ConfigError("usage: flexora summary DIR (the folder holding a sweep's run directories)")
        result = summary.run(folders[0])
    except FlexoraError as exc:
        if debug:
            raise
        return _fail(exc)
    if as_json:
        print(json.dumps(result, default=str))
    return 0


def _as_json(value: object) -> object:
    """Typed stage results (method.SearchResult, Selection) as their JSON; anything else as text."""
    return value.to_json() if hasattr(value, "to_json") else str(value)


def _swept_keys(args: list[str]) -> list[str]:
    """Keys a multirun sweeps (`key=a,b`, `key=range(..)`, `key=choice(..)`); [] without -m."""
    if not {"-m", "--multirun"}.intersection(args):
        return []
    keys = []
    for arg in _overrides(args):
        key, _, value = arg.partition("=")
        bare = value.split("[")[0]  # a list value `[a,b]` is one value, not a sweep
        if "," in bare or value.startswith(("range(", "choice(", "glob(")):
            keys.append(key.lstrip("+~"))
    return keys


def _job_dir(out_dir: str, swept: list[str]) -> str:
    """out_dir/key-value+key-value for this multirun job (its overrides of the swept keys): a name
    that passes back as `out_dir=...` unquoted (no `=` or `,`, which Hydra's grammar reserves)."""
    from hydra.core.hydra_config import HydraConfig

    values = dict(o.split("=", 1) for o in HydraConfig.get().overrides.task if "=" in o)
    name = "+".join(f"{key}-{values[key]}" for key in swept if key in values)
    return str(Path(out_dir) / (name.replace("/", "_") or f"job{HydraConfig.get().job.num}"))


def _overrides(args: list[str]) -> list[str]:
    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in _FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def _hydra_message(exc: Exception, overrides: list[str] = ()) -> str:
    """One line from Hydra's multi-line errors, with the valid options where it lists them and the
    override that does not parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, OverrideParseException) or "no viable alternative" in first:
        for override in overrides:
            try:
                OverridesParser.create().parse_override(override)
            except HydraException:
                return f"cannot parse the override '{override}' ({first.rstrip('.')}); check its quotes and brackets"
    if isinstance(exc, MissingConfigException) and exc.options:
        group = exc.missing_cfg_file.rsplit("/", 1)[0] if exc.missing_cfg_file else "the group"
        return f"{first.rstrip('.')}; valid options for {group}: {', '.join(sorted(exc.options))}"
    if first.startswith("Could not override") or ("Key '" in text and "not in struct" in text):
        return f"{first.rstrip('.')}: no such setting (check the spelling; `flexora <stage> --cfg job` lists them)"
    return first


def _fail(exc: FlexoraError) -> int:
    message = " ".join(str(exc).split())
    print(f"error: {message}", file=sys.stderr)
    return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
