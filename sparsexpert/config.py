"""Typed configuration: dataclasses built from JSON files and dotted command-line overrides.

Every component has a small dataclass with a docstring per field (see `model/config.py`,
`data/config.py`, `train/config.py`). This module turns dictionaries (a JSON file, or values
from the command line, parsed by `sparsexpert/cli.py`) into those dataclasses, rejecting unknown
keys and wrong types with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

T = TypeVar("T")


NO_VALUE: Any = object()
"""The `value` of a ConfigError about a name rather than a value (an unknown option): not shown."""


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the field, the value and the fix."""

    def __init__(self, field: str, value: Any, fix: str):
        self.field = field
        super().__init__(f"{field}: {fix}" if value is NO_VALUE else f"{field}={value!r}: {fix}")


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def is_section(tp: Any) -> TypeGuard[type]:
    """Whether the annotation `tp` is a dataclass: a nested section of a config."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`, converting ints to floats and dicts to dataclasses."""
    origin = typing.get_origin(tp)
    if is_section(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(name, value, f"expected a mapping of {tp.__name__} fields")
        return from_dict(tp, value, prefix=name)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name)
            except ConfigError:
                continue
        raise ConfigError(name, value, f"expected {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, value, f"expected a list ({tp})")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return origin(coerce(v, arg, f"{name}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(name, value, "expected true or false")
    if tp is int and isinstance(value, bool):
        raise ConfigError(name, value, "expected an integer")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(name, value, f"expected {tp.__name__}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys are errors (with the nearest valid name)."""
    types_ = field_types(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in types_:
            # the same name one section down first ("max_steps" -> "train.max_steps"), else the spelling
            moved = [f"{k}.{key}" for k, tp in types_.items() if is_section(tp) and key in field_types(tp)]
            near = moved or difflib.get_close_matches(key, types_.keys(), n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"valid fields: {', '.join(types_)}"
            raise ConfigError(name, value, f"unknown field of {cls.__name__}; {hint}")
        kwargs[key] = coerce(value, types_[key], name)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def load_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); fix the file") from e
