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


def load_yaml(stream) -> Any:
    return yaml.load(stream, Loader=_Loader)


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
        raise ValueError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    value: Any = load_yaml(raw) if raw else None
    for part in reversed(key.strip().split(".")):
        if not part:
            raise ValueError(f"override {item!r} has an empty key")
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


def load_config(defaults: dict, path: str | None = None, overrides: list[str] = ()) -> dict:
    """defaults <- YAML file at path (or packaged config of that name, see `resolve_config`)
    <- overrides; keys unknown to defaults are errors."""
    config = copy.deepcopy(defaults)
    layers = []
    if path is not None:
        path = resolve_config(path)
        with open(path) as f:
            layers.append((path, load_yaml(f) or {}))
    layers += [(f"override {o!r}", parse_override(o)) for o in overrides]
    for source, layer in layers:
        _check_known(defaults, layer, source)
        config = merge(config, layer)
    return config


def _check_known(defaults: dict, layer: dict, source: str, prefix: str = "") -> None:
    for key, value in layer.items():
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise KeyError(
                f"{source}: unknown config key {prefix}{key!r}; known keys here: {known}"
            )
        if isinstance(value, dict) and isinstance(defaults[key], dict) and defaults[key]:
            _check_known(defaults[key], value, source, f"{prefix}{key}.")
