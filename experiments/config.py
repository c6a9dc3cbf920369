"""Load and validate YAML experiment configs with errors that name the bad key or value."""

from __future__ import annotations

import copy
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


def merge(target: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``source`` into ``target`` (sections merged, other values replaced)."""
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


#: group → how a config names its choice
GROUPS = {"data": ("data", "name"), "model": ("model",), "optimizer": ("optimizer", "name")}


def _choice(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    value = config
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def compose(base: str | Path, overrides: list[str]) -> dict[str, Any]:
    """A training config from the base file, its chosen groups and ``key=value`` overrides.

    The model (``model=``), optimizer (``optimizer.name=``) and data set (``data.name=``)
    are chosen in the base file or the overrides; each loads ``<group>/<name>.yaml`` next
    to the base file, merged in the order data, model, optimizer. A group file's ``when``
    rules (``{if: {data: digits, optimizer: sgd}, set: {...}}``) then apply where all
    their conditions hold, in the same order; the overrides come last.
    """
    base = Path(base)
    config = load_yaml(base)
    choices = {group: _choice(apply_overrides(copy.deepcopy(config), list(overrides)), path)
               for group, path in GROUPS.items()}
    rules = []
    for group in ("data", "model", "optimizer"):
        name = choices[group]
        if name is None:
            continue
        path = base.parent / group / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (base.parent / group).glob("*.yaml"))
            raise ConfigError(f"config {'.'.join(GROUPS[group])} {name!r} has no group file {path}; known: {known}.")
        part = load_yaml(path)
        rules += part.pop("when", [])
        merge(config, part)
    for rule in rules:
        if not isinstance(rule, dict) or set(rule) != {"if", "set"}:
            raise ConfigError(f"A 'when' rule must be {{if: {{...}}, set: {{...}}}}, got {rule!r}.")
        if all(choices.get(group) == value for group, value in rule["if"].items()):
            merge(config, rule["set"])
    config = apply_overrides(config, list(overrides))
    config.setdefault("output", {}).setdefault(
        "dir", f"results/train/{choices['model']}_{choices['optimizer']}_{choices['data']}")
    return config
