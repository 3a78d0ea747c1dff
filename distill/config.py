"""Recipes: YAML -> typed, frozen config dataclasses, with key=value overrides.

A stage declares its config as a frozen dataclass whose defaults are the sensible ones (the
DeepSeek-R1 paper's, where it has one). Values are layered, later wins:

    defaults  <  preset (e.g. --student qwen-7b)  <  recipe YAML  <  command-line flags  <  key=value

Every layer is type-checked against the dataclass: an unknown key, a wrong type or a missing
required value raises ConfigError naming the file (or "command line") and the key, with a
suggestion. `load_config` also returns where each value came from, so a run can print it (`non_default`
says which values differ from the defaults), and `save_config` writes the resolved config into
the run directory.

Supported field types: str, int, float, bool, Path, Optional[X], Literal[...], list[X] /
tuple[X, ...], dict[str, X], and nested config dataclasses (YAML mapping or dotted keys such as
`sampling.temperature=0.7`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from distill.errors import ConfigError

T = TypeVar("T")

@dataclasses.dataclass(frozen=True)
class Loaded(typing.Generic[T]):
    config: T
    sources: dict[str, str]  # dotted key -> "default" | "preset <name>" | "recipe <file>" | "command line"


def load_config(
    cls: type[T],
    *,
    recipe: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    preset: Mapping[str, Any] | None = None,
    preset_name: str = "preset",
) -> Loaded[T]:
    """Build a `cls` from its defaults, a preset, a recipe file, CLI flags and key=value overrides.

    `flags` holds the values of explicit CLI options; None values mean "not given" and are skipped.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if preset:
        _merge(cls, values, sources, dict(preset), f"preset {preset_name}")
    if recipe is not None:
        _merge(cls, values, sources, read_recipe(recipe), f"recipe {recipe}")
    if flags:
        given = {k: v for k, v in flags.items() if v is not None}
        _merge(cls, values, sources, _nest(given), "command line")
    if overrides:
        _merge(cls, values, sources, _nest(parse_overrides(overrides, cls)), "command line")
    config = _build(cls, values, prefix="", origin=_origin_of(recipe))
    for key in _all_keys(cls):
        sources.setdefault(key, "default")
    return Loaded(config=config, sources=sources)


def read_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe not found; pass an existing YAML file to --recipe")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of key: value, got {type(data).__name__}")
    return data


def recipe_command(path: str | Path) -> list[str]:
    """The command a recipe's opening comment gives, e.g. ['distill', 'train', '--recipe', ...]."""
    path = Path(path)
    first = path.read_text(encoding="utf-8").lstrip().splitlines()[:1]
    if not first or not first[0].startswith("# distill "):
        raise ConfigError(f"{path}:1: a recipe opens with a comment giving its command, e.g. '# distill train --recipe {path}'")
    return first[0][2:].split()


def parse_overrides(items: Sequence[str], cls: type | None = None) -> dict[str, Any]:
    """['a.b=1', 'c=x'] -> {'a.b': '1', 'c': 'x'}; values stay strings and are typed by _build."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"command line: '{item}' is not key=value (e.g. temperature=0.7)")
        result[key] = _RawString(value)
    return result


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML-able data (Paths become strings, tuples lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return plain(config)


def save_config(config: Any, path: str | Path, sources: Mapping[str, str] | None = None) -> None:
    """Write the resolved config; non-default values carry a comment saying where they came from."""
    path = Path(path)
    text = yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
    if sources:
        origins = [f"#   {k}: {v}" for k, v in sources.items() if v != "default"]
        if origins:
            text = "# resolved config; values not at their default came from:\n" + "\n".join(origins) + "\n" + text
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def non_default(config: Any) -> dict[str, Any]:
    """The dotted keys whose value differs from the config class's default (required fields,
    which have none, included), in field order: what a run prints about its settings."""
    defaults = _field_defaults(type(config))
    return {key: value for key, value in _flatten(config).items() if key not in defaults or defaults[key] != value}


def replace(config: T, **changes: Any) -> T:
    return dataclasses.replace(config, **changes)


# --------------------------------------------------------------------------------------------
# internals


class _RawString(str):
    """A value typed on the command line: parsed according to the field's type, not as YAML."""


def _origin_of(recipe: str | Path | None) -> str:
    return str(recipe) if recipe is not None else "command line"


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: '{key}' sets a field inside a value that is not a section")
        node[parts[-1]] = value
    return nested


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            flat.update(_flatten(value, f"{prefix}{f.name}."))
        else:
            flat[prefix + f.name] = str(value) if isinstance(value, Path) else value
    return flat


def _field_defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> default value, as _flatten shows it (Paths as strings); no entry for a
    required field."""
    defaults: dict[str, Any] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            if dataclasses.is_dataclass(hints[f.name]):
                defaults.update(_field_defaults(hints[f.name], f"{prefix}{f.name}."))
            continue
        if dataclasses.is_dataclass(value):
            defaults.update({f"{prefix}{f.name}.{k}": v for k, v in _flatten(value).items()})
        else:
            defaults[prefix + f.name] = str(value) if isinstance(value, Path) else value
    return defaults


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys += _all_keys(kind, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _merge(cls: type, values: dict, sources: dict, layer: Mapping[str, Any], origin: str, prefix: str = "") -> None:
    """Check the keys of one layer against `cls` and merge them into `values` (nested dicts)."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    where = origin.split(" ", 1)[1] if origin.startswith("recipe ") else "command line" if origin == "command line" else origin
    for key, value in layer.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: key '{prefix}{key}' is a section; give it as a mapping or set '{prefix}{key}.<field>'")
            _merge(kind, values.setdefault(key, {}), sources, value, origin, f"{prefix}{key}.")
        else:
            # Type-check now so the error names the layer the bad value came from.
            values[key] = _coerce(value, kind, f"{prefix}{key}", where)
            sources[prefix + key] = origin


def _build(cls: type[T], values: Mapping[str, Any], prefix: str, origin: str) -> T:
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            kwargs[f.name] = _build(kind, values.get(f.name, {}), f"{prefix}{f.name}.", origin)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            flag = "--" + (prefix + f.name).replace("_", "-")
            raise ConfigError(f"missing required value '{prefix}{f.name}': pass {flag} or set '{prefix}{f.name}:' in the recipe")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:  # __post_init__ validation of a stage config
        raise ConfigError(f"{origin}: {error}") from None


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(kind))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(kind))
    if kind is type(None):
        return "null"
    return getattr(kind, "__name__", str(kind))


def _coerce(value: Any, kind: Any, key: str, where: str) -> Any:
    try:
        return _convert(value, kind)
    except (TypeError, ValueError):
        shown = str(value)
        raise ConfigError(f"{where}: key '{key}' expects {_type_name(kind)}, got '{shown}'") from None


def _convert(value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    raw = isinstance(value, _RawString)
    if kind is Any:
        return yaml.safe_load(value) if raw else value
    if origin in (Union, types.UnionType):
        if value is None or (raw and value.strip().lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
            raise TypeError
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if origin is Literal:
        for arg in args:
            if value == arg or (raw and str(arg) == value):
                return arg
        raise ValueError
    if origin in (list, tuple, Sequence) or kind in (list, tuple):
        if raw:
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v.strip()]
            value = [_RawString(v.strip()) if isinstance(v, str) else v for v in value]
        if not isinstance(value, (list, tuple)):
            raise TypeError
        item = args[0] if args else Any
        converted = [_convert(v, item) for v in value]
        return tuple(converted) if origin is tuple or kind is tuple else converted
    if origin is dict or kind is dict:
        if raw:
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise TypeError
        item = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, item) for k, v in value.items()}
    if kind is bool:
        if isinstance(value, bool):
            return value
        if raw and value.strip().lower() in ("true", "yes", "1", "on"):
            return True
        if raw and value.strip().lower() in ("false", "no", "0", "off"):
            return False
        raise TypeError
    if kind is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if raw:
            return int(value.strip().replace("_", ""))
        raise TypeError
    if kind is float:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, (int, float)):
            return float(value)
        if raw:
            return float(value.strip())
        raise TypeError
    if kind is str:
        if isinstance(value, str):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `model: 7` is unusual but unambiguous
        raise TypeError
    if kind is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise TypeError
    raise TypeError(f"unsupported config type {kind}")


# --------------------------------------------------------------------------------------------
# the stages' config classes, for recipe checking (each stage module owns its dataclass)

STAGE_CONFIGS: dict[str, str] = {
    "generate": "distill.teacher.generate:GenerateConfig",
    "filter": "distill.teacher.filter:FilterConfig",
    "train": "distill.students.sft:TrainConfig",
    "grpo": "distill.students.grpo:GRPOConfig",
    "onpolicy": "distill.students.onpolicy:OnPolicyConfig",
    "eval": "distill.evaluate:EvalConfig",
    "compare": "distill.compare:CompareConfig",
    "demo": "distill.toy.demo:DemoConfig",
}


def stage_config_class(stage: str) -> type:
    import importlib

    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"no stage named '{stage}'; known: {', '.join(sorted(STAGE_CONFIGS)) or 'none yet'}")
    module, _, name = STAGE_CONFIGS[stage].partition(":")
    return getattr(importlib.import_module(module), name)


def check_recipe(path: str | Path) -> type:
    """Check a recipe file against the config class of the stage its opening comment names:
    every key known and well typed (required values may come from the command line, so their
    absence is not an error here). Returns the config class."""
    command = recipe_command(path)
    if len(command) < 2:
        raise ConfigError(f"{path}:1: the opening comment names no stage")
    cls = stage_config_class(command[1])
    _merge(cls, {}, {}, read_recipe(path), f"recipe {path}")
    return cls
