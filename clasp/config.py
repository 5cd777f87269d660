"""YAML configs merged in three layers: built-in defaults, a file, `key.sub=value` overrides.

The file is a path or the name of a config packaged in `clasp/configs/` (`demo`, `vit-s`,
`vit-b`), so `--config demo` works in any install, editable or not.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import yaml

PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (1e-3), as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:\d[\d_]*\.?[\d_]*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\.inf|\.nan)$", re.X
    ),
    list("-+0123456789."),
)


class ConfigError(KeyError, ValueError):
    """A config key that is unknown, a value of the wrong type or out of range, or a config
    file that is not valid YAML. Its message names the key (or file) and what to do."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


def load_yaml(stream) -> Any:
    return yaml.load(stream, Loader=_Loader)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """'expected ..., but found ... (line 3, column 5)' from a PyYAML error."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"


def merge(base: dict, override: dict) -> dict:
    """Recursively merge override into a copy of base; override wins on leaves."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> dict:
    """'optim.lr=1e-3' -> {'optim': {'lr': 0.001}}; the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value: Any = load_yaml(raw) if raw else None
    except yaml.YAMLError as error:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({_yaml_problem(error)}); quote "
            "it or fix its brackets"
        ) from None
    for part in reversed(key.strip().split(".")):
        if not part:
            raise ConfigError(f"override {item!r} has an empty key")
        value = {part: value}
    return value


def packaged_configs() -> list[str]:
    """Names of the configs that ship with the package, e.g. ['demo', 'vit-b', 'vit-s']."""
    return sorted(n[: -len(".yaml")] for n in os.listdir(PACKAGED_CONFIGS) if n.endswith(".yaml"))


def resolve_config(name_or_path: str) -> str:
    """The YAML file a `--config` value names: an existing file as given, else the packaged
    config of that name ('demo' or 'demo.yaml' -> clasp/configs/demo.yaml)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if os.sep not in name_or_path:  # a bare name: look among the packaged configs
        name = name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml"
        packaged = os.path.join(PACKAGED_CONFIGS, name)
        if os.path.isfile(packaged):
            return packaged
    raise FileNotFoundError(
        f"config file not found: {name_or_path}; pass a YAML file or the name of a packaged "
        f"config ({', '.join(packaged_configs())})"
    )


def read_config_file(path: str) -> dict:
    """The mapping in a YAML config file ({} for an empty file); ConfigError naming the file
    and the line when it is not valid YAML or not a mapping."""
    with open(path) as f:
        try:
            layer = load_yaml(f)
        except yaml.YAMLError as error:
            raise ConfigError(
                f"config file {path} is not valid YAML: {_yaml_problem(error)}; fix it there"
            ) from None
    if layer is not None and not isinstance(layer, dict):
        raise ConfigError(
            f"config file {path} holds a {type(layer).__name__}, not a mapping of keys "
            "(e.g. `optim: {lr: 1e-3}`)"
        )
    return layer or {}


def load_config(defaults: dict, path: str | None = None, overrides: list[str] = ()) -> dict:
    """defaults <- YAML file at path (or packaged config of that name, see `resolve_config`)
    <- overrides. Every key must be known to defaults, and every value must have its
    default's type where the default is not None (see `_checked`); a ConfigError names the
    key otherwise. Ranges are checked where each key is used (e.g. `clasp.model.vit`)."""
    config = copy.deepcopy(defaults)
    layers = []
    if path is not None:
        path = resolve_config(path)
        layers.append((path, read_config_file(path)))
    layers += [(f"override {o!r}", parse_override(o)) for o in overrides]
    for source, layer in layers:
        config = merge(config, _checked(defaults, layer, source))
    return config


def _checked(defaults: dict, layer: dict, source: str, prefix: str = "") -> dict:
    """`layer` with every key known to `defaults` and every leaf of its default's type:
    numbers for numbers (a whole float such as 1e4 becomes an int where the default is an
    int; whether a number must be whole, positive... is checked where it is used), true or
    false for booleans, strings for strings, lists (of the default's element type) for
    lists, mappings for sections. None defaults and empty sections take anything."""
    out = {}
    for key, value in layer.items():
        name = f"{prefix}{key}"
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise ConfigError(
                f"{source}: unknown config key {prefix}{key!r}; known keys here: {known}"
            )
        default = defaults[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                keys = f" of {', '.join(sorted(default))}" if default else ""
                raise ConfigError(
                    f"{source}: {name} is a section{keys}, got {value!r}; set its keys "
                    f"instead ({name}.KEY=VALUE)"
                )
            out[key] = _checked(default, value, source, f"{name}.") if default else value
        elif isinstance(default, list):
            if not isinstance(value, list):
                raise ConfigError(f"{source}: {name} must be a list like {default}, got {value!r}")
            kinds = {_kind(v) for v in default}
            if len(kinds) == 1 and None not in kinds:
                (kind,) = kinds
                value = [_leaf(kind, v, f"{name}[{i}]", source, default[0]) for i, v in
                         enumerate(value)]  # fmt: skip
            out[key] = value
        elif default is None:
            out[key] = value
        else:
            out[key] = _leaf(_kind(default), value, name, source, default)
    return out


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return None


def _leaf(kind: str | None, value: Any, name: str, source: str, default: Any) -> Any:
    if kind is None:
        return value
    found = _kind(value)
    if kind == "int" and found == "float":
        return int(value) if value.is_integer() else value
    if found == kind or (kind == "float" and found == "int"):
        return value
    raise ConfigError(
        f"{source}: {name} must be {_EXPECTED[kind]} (default {_show(default)}), got {_show(value)}"
    )


def _show(value: Any) -> str:
    """A value as YAML writes it: true, null, 'text', [1, 2]."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value)
