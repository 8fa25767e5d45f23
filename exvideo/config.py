"""Typed stage configurations: pydantic models loaded from YAML, with `key.sub=value` overrides from the CLI.

The config object is the single source of truth for a stage; errors name the field, the bad value and the file.
Every field is one of two kinds. An output field decides what the stage writes; an operational field, declared
with `operational(...)`, only decides how the run goes (worker and actor counts, devices, speed switches, logging
cadence, where it tracks). A stage's cache key and its output folder's identity hash the output fields only, so
changing an operational field reuses finished work and lets an unfinished run resume with the new value.
"""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

T = TypeVar("T", bound="StageConfig")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says which field and why."""


OPERATIONAL = "operational"


def operational(*args: Any, **kwargs: Any) -> Any:
    """A pydantic `Field` that changes how a stage runs, never what it writes (see the module docstring)."""
    return Field(*args, json_schema_extra={OPERATIONAL: True}, **kwargs)


class StageConfig(BaseModel):
    """Base for every stage config: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def operational_fields(cls) -> frozenset[str]:
        """Names of the fields declared with `operational(...)`."""
        return frozenset(name for name, info in cls.model_fields.items()
                         if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get(OPERATIONAL))

    def output_fields(self, exclude: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
        """JSON-ready values of the fields that decide the output: operational ones (in nested configs too) and
        `exclude` left out."""
        data = {}
        for name in type(self).model_fields:
            if name in exclude or name in self.operational_fields():
                continue
            value = getattr(self, name)
            nested = isinstance(value, StageConfig)
            data[name] = value.output_fields() if nested else self.model_dump(mode="json", include={name})[name]
        return data


def default_tracking_uri(run_dir: Path) -> str:
    """The MLflow store a stage uses when its config names none: a sqlite file inside its run directory.

    Here rather than in exvideo.tracking, so that a config resolves its store without importing MLflow.
    """
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def apply_override(data: dict, override: str) -> None:
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
        apply_override(data, override)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {cls.__name__} from {source}: {describe_errors(exc)}") from None


def describe_errors(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: the dotted field path (under `prefix`), what is wrong and the value given."""
    problems = []
    for err in exc.errors():
        field = ".".join([prefix] * bool(prefix) + [str(p) for p in err["loc"]])
        if err["loc"]:
            problems.append(f"{field}: {err['msg']} (got {err.get('input')!r})")
        else:  # a check across fields: its message names them, and the input is the whole mapping
            problems.append(f"{prefix}: " * bool(prefix) + err["msg"].removeprefix("Value error, "))
    return "; ".join(problems)


def field_table(cls: type[BaseModel], width: int = 100) -> str:
    """Every field of a config for `--help`, nested ones dotted (`params.num_frames`): its type, its default (or
    "required"), whether it is operational, and its description."""
    lines = ["fields (--set NAME=VALUE, or NAME: VALUE in the --config YAML; [operational]: changes only how the stage",
             "runs, so it is left out of the cache key and a finished stage is reused):"]
    for name, annotation, default, about, is_operational in _fields(cls, "", False):
        default_text = "(required)" if default is _REQUIRED else f"= {_as_yaml(default)}"
        lines.append(f"  {name}: {_type_text(annotation)} {default_text}" + " [operational]" * is_operational)
        if about:
            lines.extend(textwrap.wrap(about, width, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


_REQUIRED = object()


def _fields(cls: type, prefix: str, inherited_operational: bool) -> typing.Iterator[tuple]:
    """(dotted name, type, default or _REQUIRED, description, operational) of a pydantic model's or a dataclass's
    fields, a nested config's fields in its place."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        entries = [(f.name, hints[f.name], _REQUIRED if f.default is dataclasses.MISSING else f.default, None, False)
                   for f in dataclasses.fields(cls)]
    else:
        entries = [(name, info.annotation,
                    _REQUIRED if info.is_required() else info.get_default(call_default_factory=True),
                    info.description,
                    isinstance(info.json_schema_extra, dict) and bool(info.json_schema_extra.get(OPERATIONAL)))
                   for name, info in cls.model_fields.items()]
    for name, annotation, default, about, is_operational in entries:
        operational_here = inherited_operational or is_operational
        nested = typing.get_origin(annotation) is None and isinstance(annotation, type) and (
            issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation))
        if nested:
            yield from _fields(annotation, f"{prefix}{name}.", operational_here)
        else:
            yield f"{prefix}{name}", annotation, default, about, operational_here


def _type_text(annotation: Any) -> str:
    """A field's type as a user reads it: `svd | animatediff | null`, `int`, `dict[int, str]`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if arg is type(None) else _type_text(arg) for arg in args)
    if isinstance(annotation, type) and not args:
        return annotation.__name__
    return re.sub(r"\b(typing|pathlib|collections\.abc)\.", "", str(annotation))


def _as_yaml(value: Any) -> str:
    """A default as it would be written in `--set` (null, true, [a, b], a plain path)."""
    if value is None:
        return "null"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_as_yaml(v) for v in value) + "]"
    return str(value)
