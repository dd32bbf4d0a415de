"""One command-line language for every entry point (pretraining, fine-tuning, data_prep, ablation).

A config field is named by its dotted path in the config dataclasses, given either way:

    --train.max_steps=100      --train.max_steps 100      --model.causal   (a bool alone: true)
    --corpus a.txt b.xml       (a list field takes the values up to the next --option)

Hyphens and underscores are the same (`--seq-len` is `--seq_len`). Values are JSON where they parse
as JSON (numbers, true/false, lists), else strings; a string field takes the text as it is. Every name
is checked: an unknown one is an error with the nearest valid name (`--max_steps` -> `--train.max_steps`).

DeepSpeed settings take the same form under `ds.`, applied to the `--ds_config` JSON (DeepSpeed's own
name `--deepspeed_config` is accepted too) and checked like it: `--ds.optimizer.params.lr=3e-4`.

`--help` lists every field with its type, default and docstring, generated from the dataclasses
(`fields_help`): the docstrings under each field are the documentation, read from the source with `ast`.
An own short generator rather than tyro or jsonargparse: those build one argparse option per field and
would replace the `ConfigError` messages (did-you-mean, file and field named) with argparse's, need a
new pinned dependency in docker/, and tyro's list syntax differs from the JSON the config files use.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import json
import os
import re
import textwrap
import types
import typing
from typing import Any, TypeVar

from sparsexpert.config import NO_VALUE, ConfigError, coerce, field_types, from_dict, is_section, load_json

T = TypeVar("T")

DS_EVERYDAY = (
    ("train_micro_batch_size_per_gpu", "micro-batch per rank"),
    ("gradient_accumulation_steps", "micro-batches per optimizer step"),
    ("optimizer.params.lr", "peak learning rate"),
    ("scheduler.params.warmup_num_steps", "warmup steps (WarmupLR, WarmupDecayLR, WarmupCosineLR)"),
    ("bf16.enabled", "bf16 mixed precision (fp16.enabled: fp16 with dynamic loss scaling)"),
    ("zero_optimization.stage", "ZeRO stage 0-3"),
    ("gradient_clipping", "global gradient-norm clip (0: none)"),
)
"""The DeepSpeed settings users change every day, shown in --help (any path of the JSON works)."""


# ---------------------------------------------------------------------------------------- the fields
@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} of a dataclass, read from the string literal under each field in its source
    (the docstring of a field is the documentation; nothing else repeats it)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (a frozen build): the names and types still show
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


@dataclasses.dataclass
class FieldInfo:
    name: str
    """Dotted path, e.g. "train.max_steps"."""
    type: Any
    """The annotation."""
    default: Any
    """The default value (of a default-constructed config)."""
    doc: str
    """The field's docstring."""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def iter_fields(cls: type, prefix: str = "", obj: Any = None) -> list[FieldInfo]:
    """Every leaf field of a dataclass tree with its dotted name (nested dataclasses are sections)."""
    obj = cls() if obj is None else obj
    docs, out = field_docs(cls), []
    for name, tp in field_types(cls).items():
        dotted = f"{prefix}{name}"
        value = getattr(obj, name)
        if is_section(tp):
            out += iter_fields(tp, f"{dotted}.", value)
        else:
            out.append(FieldInfo(dotted, tp, value, docs.get(name, "")))
    return out


def fields_help(cls: type | None, ds: bool) -> str:
    """The --help text of every config field of `cls` and, with ds, of the DeepSpeed overrides."""
    lines = []
    if cls is not None:
        lines += textwrap.wrap(
            "configuration fields (--field=VALUE or --field VALUE, a nested one as --section.field; the "
            "same nesting in a --config JSON file; --print_config shows the resolved configuration):",
            100,
        )
        lines.append("")
        for f in iter_fields(cls):
            lines.append(f"  --{f.name} {_type_name(f.type)} (default: {json.dumps(f.default, default=str)})")
            # a docstring's paragraphs, each re-flowed (its source line breaks are not meaningful)
            for para in re.split(r"\n\s*\n", f.doc or "(no description)"):
                lines += textwrap.wrap(
                    " ".join(para.split()), 96, initial_indent=" " * 6, subsequent_indent=" " * 6
                )
    if ds:
        lines += [
            "",
            "DeepSpeed settings (--ds.<path in the --ds_config JSON>=VALUE, checked like the JSON), e.g.:",
            "",
        ]
        lines += [f"  --ds.{path:<40} {what}" for path, what in DS_EVERYDAY]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- the parser
def _norm(name: str) -> str:
    return name.replace("-", "_")


def _is_list(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) in (list, tuple)


def _is_str(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return str in typing.get_args(tp)
    return tp is str


def _is_bool(tp: Any) -> bool:
    return tp is bool


def _lookup(cls: type, dotted: str) -> Any:
    """The annotation of field `dotted` of `cls`; an error with the nearest valid name if there is none."""
    tp: Any = cls
    parts = dotted.split(".")
    for part in parts:
        types_ = field_types(tp) if is_section(tp) else {}
        if part not in types_:
            raise ConfigError(f"--{dotted}", NO_VALUE, _nearest(cls, dotted))
        tp = types_[part]
    if is_section(tp):
        inner = ", ".join(f"--{dotted}.{k}" for k in list(field_types(tp))[:4])
        raise ConfigError(f"--{dotted}", NO_VALUE, f"is a section: give one of its fields ({inner}, ...)")
    return tp


def _nearest(cls: type, dotted: str) -> str:
    """'did you mean ...' among every field name: the same leaf name in another section first
    (--max_steps -> --train.max_steps), else the closest spelling."""
    names = [f.name for f in iter_fields(cls)]
    leaf = dotted.rsplit(".", 1)[-1]
    same_leaf = [n for n in names if n.rsplit(".", 1)[-1] == leaf]
    near = same_leaf or difflib.get_close_matches(dotted, names, n=1, cutoff=0.6)
    if near:
        return f"no such field; did you mean --{near[0]}?"
    return "no such field; --help lists every field"


def split_overrides(
    rest: list[str], cls: type | None, ds: bool
) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The arguments argparse left over, as (field, value) pairs for the config and for the DeepSpeed
    JSON (names without the `ds.` prefix). Values are raw strings, or lists of them for list fields."""
    fields, ds_pairs = [], []
    i = 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or len(item) == 2:
            raise ConfigError(item, NO_VALUE, "unexpected argument: options look like --section.field=VALUE")
        key, sep, raw = item[2:].partition("=")
        key = _norm(key)
        i += 1
        if key.startswith("ds.") and ds:
            if not sep:
                if i >= len(rest) or rest[i].startswith("--"):
                    raise ConfigError(f"--{key}", NO_VALUE, "needs a value: --ds.<path>=VALUE")
                raw, i = rest[i], i + 1
            ds_pairs.append((key[3:], raw))
            continue
        if cls is None:
            raise ConfigError(
                f"--{key}", raw if sep else NO_VALUE, "unknown option; --help lists the options"
            )
        tp = _lookup(cls, key)
        if sep:
            value: Any = raw
        elif _is_list(tp):
            values = []
            while i < len(rest) and not rest[i].startswith("--"):
                values.append(rest[i])
                i += 1
            if not values:
                raise ConfigError(f"--{key}", NO_VALUE, "needs one value or more")
            value = values
        elif i < len(rest) and not rest[i].startswith("--"):
            value, i = rest[i], i + 1
        elif _is_bool(tp):
            value = "true"
        else:
            raise ConfigError(f"--{key}", NO_VALUE, f"needs a value: --{key}=VALUE or --{key} VALUE")
        fields.append((key, value))
    return fields, ds_pairs


def as_option(key: str, raw: Any) -> str:
    """A (field, value) pair of `split_overrides` as one `--key=value` argument, to hand on to a launcher."""
    return f"--{key}={raw if isinstance(raw, str) else json.dumps(raw)}"


def _parse_value(raw: Any, tp: Any) -> Any:
    """A command-line value for a field of type `tp`: JSON where it parses (numbers, booleans, lists,
    null), the text itself for a string field or where it is not JSON."""
    if isinstance(raw, list):  # --corpus a b c
        if _is_list(tp):
            return [_parse_value(r, str) if _is_str_list(tp) else _json_or_text(r) for r in raw]
        return raw
    if _is_str(tp) and not (raw == "null" and type(None) in typing.get_args(tp)):
        return raw
    if _is_str_list(tp) and not raw.lstrip().startswith("["):
        return [raw]  # --corpus=a.txt: one file
    return _json_or_text(raw)


def _is_str_list(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_str_list(a) for a in typing.get_args(tp))
    return typing.get_origin(tp) in (list, tuple) and typing.get_args(tp)[:1] == (str,)


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def set_field(cfg: Any, dotted: str, raw: Any) -> None:
    """Set field `dotted` of the dataclass tree `cfg` from a command-line value, checked against its type."""
    tp = _lookup(type(cfg), dotted)
    parts = dotted.split(".")
    target = cfg
    for part in parts[:-1]:
        target = getattr(target, part)
    setattr(target, parts[-1], coerce(_parse_value(raw, tp), tp, dotted))


def apply_ds_overrides(ds_json: dict[str, Any], pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of the DeepSpeed JSON with `--ds.a.b=value` applied. A path goes through JSON objects;
    a key the JSON does not have is added only where DeepSpeed's checks cover it (a top-level section,
    zero_optimization, fp16, bf16: `parallel.check_sections` refuses a wrong one); inside optimizer and
    scheduler params, whose names only the optimizer's constructor knows, a new key is refused with the
    nearest existing one, so that a typo cannot pass silently."""
    ds = copy.deepcopy(ds_json)
    for path, raw in pairs:
        parts = [p for p in path.split(".") if p]
        if not parts:
            raise ConfigError(
                "--ds.", raw, "give a path in the DeepSpeed JSON, e.g. --ds.optimizer.params.lr=3e-4"
            )
        node = ds
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--ds.{path}", raw, f"ds_config.{where} is {child!r}, not a JSON object")
            node = child
        leaf = parts[-1]
        if (
            leaf not in node
            and len(parts) >= 3
            and parts[-2] == "params"
            and parts[0] in ("optimizer", "scheduler")
        ):
            near = difflib.get_close_matches(leaf, list(node), n=1)
            hint = (
                f"did you mean --ds.{'.'.join(parts[:-1] + [near[0]])}?" if near else f"it has {sorted(node)}"
            )
            raise ConfigError(
                f"--ds.{path}",
                raw,
                f"the JSON's {'.'.join(parts[:-1])} has no {leaf!r}; {hint} (or add it to the JSON)",
            )
        node[leaf] = _json_or_text(raw) if isinstance(raw, str) else raw
    from sparsexpert.distributed import parallel

    parallel.check_sections(ds)
    return ds


# ------------------------------------------------------------------------------------- one entry point
def parser(doc: str | None, cls: type | None, ds: bool, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser for a launcher's own options (add them to it), with --help listing every
    config field, --print_config, --config (when there is a config class) and --ds_config (when ds)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=doc,
        epilog=fields_help(cls, ds),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    if ds:
        # `accelerate launch --use_deepspeed --deepspeed_config_file F` hands F on in this variable
        from_accelerate = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        p.add_argument(
            "--ds_config",
            "--deepspeed_config",
            dest="ds_config",
            required=not from_accelerate,
            default=from_accelerate,
            help="DeepSpeed JSON (see ds_configs/); --ds.<path>=VALUE overrides its settings. Under "
            "`accelerate launch --use_deepspeed --deepspeed_config_file F`, F when not given",
        )
    if cls is not None:
        p.add_argument(
            "--config", help=f"JSON file of {cls.__name__} fields (the same nesting as the options)"
        )
        p.add_argument(
            "--print_config", action="store_true", help="print the resolved configuration as JSON and exit"
        )
    return p


def parse(
    p: argparse.ArgumentParser, argv: list[str] | None, cls: type[T], ds: bool
) -> tuple[argparse.Namespace, T, dict[str, Any] | None]:
    """(launcher options, the config: defaults < --config file < field options, the DeepSpeed JSON with
    its --ds overrides applied and checked). A wrong name or value is an argparse error (exit 2) naming
    the option and the fix."""
    args, rest = p.parse_known_args(argv)
    try:
        pairs, ds_pairs = split_overrides(rest, cls, ds)
        cfg = cls()
        if getattr(args, "config", None):
            try:
                cfg = from_dict(cls, load_json(args.config))
            except ConfigError as e:
                p.error(f"{args.config}: {e}")
        for key, raw in pairs:
            set_field(cfg, key, raw)
        ds_json = apply_ds_overrides(load_json(args.ds_config), ds_pairs) if ds else None
    except (ConfigError, FileNotFoundError, ValueError) as e:
        p.error(str(e))
    return args, cfg, ds_json


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Apply command-line options (`--a.b=value`, `--a.b value`) to a config tree, as `parse` does."""
    pairs, _ = split_overrides(overrides, type(cfg), ds=False)
    for key, raw in pairs:
        set_field(cfg, key, raw)
    return cfg


def print_config(config: dict[str, Any]) -> None:
    print(json.dumps(config, indent=2, default=str), flush=True)
