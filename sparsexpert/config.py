"""Typed configuration: dataclasses built from JSON files and dotted command-line overrides.

Every component has a small dataclass with a docstring per field (see `model/config.py`,
`data/config.py`, `train/config.py`). This module turns dictionaries (a JSON file, or values
from the command line, parsed by `sparsexpert/cli.py`) into those dataclasses, rejecting unknown
keys and wrong types with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from dataclasses import dataclass
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


REPORT_TO = ("tensorboard", "wandb")
"""Where train.report_to may send the figures, besides metrics.jsonl and the console."""


def report_destinations(report_to: str, field: str = "train.report_to") -> tuple[str, ...]:
    """The destinations named by `report_to` ("tensorboard", "wandb", both comma-separated, or "none"),
    checked: an unknown name, or wandb when the package is not installed, is a ConfigError naming `field`."""
    names = tuple(dict.fromkeys(n.strip() for n in report_to.split(",") if n.strip()))
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown or not names:
        raise ConfigError(
            field, report_to, f"must name {' and/or '.join(REPORT_TO)} (comma-separated), or be none"
        )
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            field,
            report_to,
            "asks for Weights & Biases, which is not installed: pip install wandb (and wandb login), "
            "or leave wandb out",
        )
    return names


@dataclass
class LoopConfig:
    """What every training loop (pretraining's and fine-tuning's `train` section) shares: where its
    figures go, and when it stops by itself."""

    tensorboard: bool = True
    """Write TensorBoard event files under <output_dir>/tensorboard (false: none, whatever report_to says)."""
    report_to: str = "tensorboard"
    """Where rank 0 sends the logged figures besides metrics.jsonl and the console: "tensorboard",
    "wandb" (Weights & Biases: `pip install wandb` first, then `wandb login`; project "sparsexpert",
    the run named after the output folder), both ("tensorboard,wandb"), or "none"."""
    heatmap_every: int = 10
    """Write the layer x expert load heatmap image (TensorBoard `expert_load_heatmap`) every this many
    log intervals, and at the first and the last; 0 never."""
    collective_timeout_minutes: float = 10.0
    """A rank waiting longer than this in a collective fails instead of hanging."""
    max_nonfinite_steps: int = 3
    """Steps in a row whose loss or gradients are not finite before the run stops with exit status 1.
    Such a step's update is skipped (DeepSpeed's optimizers skip it; ZeRO-0 in fp32 we do) and no
    checkpoint is written after it, so the newest checkpoint is healthy. fp16 overflow steps (skipped while
    the loss scale adapts) do not count."""

    def validate(self) -> None:
        report_destinations(self.report_to, "train.report_to")
        if self.max_nonfinite_steps < 1:
            raise ConfigError("train.max_nonfinite_steps", self.max_nonfinite_steps, "must be >= 1")
        if self.heatmap_every < 0:
            raise ConfigError("train.heatmap_every", self.heatmap_every, "must be >= 0")
        if self.collective_timeout_minutes <= 0:
            raise ConfigError(
                "train.collective_timeout_minutes", self.collective_timeout_minutes, "must be > 0"
            )
