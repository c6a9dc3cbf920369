"""Load and validate YAML experiment configs with errors that name the bad key or value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file is missing, malformed or has a bad key/value."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
    return data


def check_keys(section: dict[str, Any], allowed: dict[str, type | tuple], where: str) -> None:
    """Reject unknown keys and values of the wrong type, naming them."""
    for key, value in section.items():
        if key not in allowed:
            raise ConfigError(f"Unknown key {key!r} in {where}; allowed: {sorted(allowed)}.")
        types = allowed[key]
        if value is not None and not isinstance(value, types):
            raise ConfigError(f"{where}.{key} = {value!r} has the wrong type; expected {types}.")


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` / ``a.b=value`` overrides (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like key=value.")
        key, raw = item.split("=", 1)
        target = config
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"Override {item!r}: {part!r} is not a section.")
        target[parts[-1]] = yaml.safe_load(raw)
    return config
