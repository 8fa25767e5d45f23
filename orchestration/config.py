"""Typed stage configurations: pydantic models loaded from YAML, with `key.sub=value` overrides from the CLI.

The config object is the single source of truth for a stage; errors name the field, the bad value and the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound="StageConfig")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says which field and why."""


class StageConfig(BaseModel):
    """Base for every stage config: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value (nested keys with dots: train.lr=1e-4)")
    key, raw = override.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def read_yaml_mapping(path: Path, what: str) -> dict:
    """The mapping a YAML file holds; `what` names the file in errors ("config file", "workflow spec")."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of fields, not {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> T:
    """Build `cls` from an optional YAML file plus overrides, validating every field."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        data = read_yaml_mapping(Path(path), "config file")
        source = str(path)
    for override in overrides:
        _apply_override(data, override)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {cls.__name__} from {source}: {describe_errors(exc)}") from None


def describe_errors(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: the dotted field path (under `prefix`), what is wrong and the value given."""
    problems = []
    for err in exc.errors():
        field = ".".join([prefix] * bool(prefix) + [str(p) for p in err["loc"]])
        if field:
            problems.append(f"{field}: {err['msg']} (got {err.get('input')!r})")
        else:  # a check across fields: its message names them, and the input is the whole mapping
            problems.append(err["msg"].removeprefix("Value error, "))
    return "; ".join(problems)
