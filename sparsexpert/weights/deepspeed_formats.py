"""DeepSpeed's checkpoint formats, read as data: the files DeepSpeed writes into a tag of ours (model
states, one file per expert, optimizer partitions), its universal form, and the engine's loading of
either. The one module of `sparsexpert/weights/` that imports DeepSpeed; the tag around these files
(atomic writes, COMPLETE.json checksums, `latest`, RNG states) is `checkpoint.py`'s, and everything
here verifies a tag through it before DeepSpeed or we read a byte.

It lives beside `checkpoint.py` rather than in `sparsexpert/distributed/` because it is built on our
tag format (verification, RNG states, the conversion's own checksummed manifest), which uses the
collectives of `distributed/comm.py`: in `distributed/` it would make the two packages import each other.

Trust: DeepSpeed's model-state and expert files and universal fp32.pt hold tensors and plain
containers only, and we read them with `load_file` (weights_only). DeepSpeed reads a tag itself at a
resume (`engine.load_checkpoint`) and when it converts one to its universal form (`to_universal`, also
reached by `load_weights` on ZeRO-3 tags from elsewhere); its torch.load calls say weights_only=False,
so those run under `deepspeed_reads_data_only`, which forces torch's weights-only unpickler for them and
allows exactly the four DeepSpeed classes its optimizer states hold (two loss scalers, the ZeRO stage
enum, a fragment address: each constructed with its state set, no code of the file's choosing). A file
holding anything else is refused, naming it.

Elastic resume (`load_elastic`, a tag written at another world size or ep_size): rank 0 converts
the tag once with DeepSpeed's own converter (deepspeed/checkpoint/ds_to_universal.py) into

    step_00000100/universal/       DeepSpeed's universal checkpoint: every parameter whole, with its
        zero/<param>/...           fp32 weights, Adam moments and step; AutoEP experts stacked by
        CONVERTED.json             global id; written last, with every file's size and checksum, so
                                   the conversion is reused afterwards (converted again if damaged)

which an engine built with `"checkpoint": {"load_universal": true}` (`universal_loading`) reshards
on load. ZeRO stages 1-3; ZeRO-0 has no universal loading in DeepSpeed 0.19.8.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pickle
import random
import shutil
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsexpert.distributed import comm
from sparsexpert.metrics import Progress
from sparsexpert.weights.checkpoint import (
    _VERIFIED,
    CHECKSUM,
    CONVERTED,
    META,
    UNIVERSAL,
    UnsafeCheckpointError,
    _atomic_write,
    _check_for_load,
    _compare,
    _files_of,
    _fsync_dir,
    _log_warning,
    _manifest,
    _read_manifest,
    _refusal,
    _take_verified,
    load_file,
    read_rng,
    resolve_tag,
    set_rng_state,
)


def deepspeed_classes() -> list[Any]:
    """The classes DeepSpeed 0.19.8 pickles into its optimizer states (found by scanning tags of ZeRO
    0-3, fp32/bf16/fp16, AutoEP and native MoE, and their universal forms): plain records."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _unsafe_files(folder: Path, allow: list[Any]) -> list[str]:
    """The .pt files under `folder` that name globals outside torch's weights-only set and `allow`."""
    found = []
    with torch.serialization.safe_globals(allow):
        for f in sorted(folder.rglob("*.pt")):
            try:
                bad = torch.serialization.get_unsafe_globals_in_checkpoint(f)
            except Exception as exc:  # not a zip torch.save file at all
                bad = [f"unreadable: {type(exc).__name__}"]
            if bad:
                found.append(f"{f.relative_to(folder)} ({', '.join(sorted(bad)[:3])})")
    return found


@contextlib.contextmanager
def deepspeed_reads_data_only(folder: Path) -> Iterator[None]:
    """Around DeepSpeed code that reads `folder` with torch.load(weights_only=False): torch's
    weights-only unpickler is forced for it (TORCH_FORCE_WEIGHTS_ONLY_LOAD), allowing DeepSpeed's few
    optimizer-state classes. A file holding anything else raises UnsafeCheckpointError naming it."""
    saved = {
        k: os.environ.pop(k, None)
        for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    }
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    allow = deepspeed_classes()
    try:
        with torch.serialization.safe_globals(allow):
            yield
    except pickle.UnpicklingError as exc:
        where = _unsafe_files(folder, allow)
        raise _refusal(f"{folder}: {', '.join(where) or 'a file'}", exc) from None
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def load(engine, tag_dir: Path) -> dict[str, Any]:
    """Load a tag saved by `save` into the engine (same world size and ep_size), after `verify`
    (collective); returns its metadata. DeepSpeed reads its files under `deepspeed_reads_data_only`."""
    meta = _check_for_load(tag_dir)
    with deepspeed_reads_data_only(tag_dir):
        path, _ = engine.load_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if path is None:
        raise RuntimeError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    state = read_rng(tag_dir, comm.rank())
    if state is not None:
        set_rng_state(state)
    return meta


def load_weights(
    path: str | Path, log: Callable[[str], None] = _log_warning
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full model weights of a checkpoint written at any world size and ep_size, in the
    plain model's layout (experts stacked by global id), as fp32; and the checkpoint's metadata.
    The tag is checked first (`resolve_tag`) and every file is read as data.

    DeepSpeed keeps the dense weights in mp_rank_00_model_states.pt (the same on every rank below
    ZeRO-3) and each expert (AutoEP's or the native layer's) in its own file named by its global id. ZeRO-3 keeps them only
    in the ranks' optimizer partitions: they are read from the tag's universal form (`to_universal`,
    converted once and kept in <tag>/universal/)."""
    tag = Path(path) if _take_verified(Path(path)) else resolve_tag(path, log)
    _VERIFIED.pop(os.path.realpath(tag), None)
    meta = json.loads((tag / META).read_text())
    stage = meta.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        return _universal_weights(tag, meta), meta
    module = load_file(tag / "mp_rank_00_model_states.pt")["module"]
    native = any(".deepspeed_moe." in k for k in module)  # DeepSpeed's native MoE layers (native_moe.py)
    if native:
        from sparsexpert.distributed import native_moe
    state = {k.replace(".mlp.router.gate.", ".mlp.gate."): v.float() for k, v in module.items()}
    if native:
        state = {native_moe.plain_name(k): v for k, v in state.items()}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    expert_files = sorted(tag.glob("layer_*_expert_*_mp_rank_*_model_states.pt"))
    long = len(expert_files) > 64  # a progress line for long reads only
    progress = Progress(f"reading the experts of {tag}", len(expert_files), "files", log=log, enabled=long)
    for f in expert_files:
        progress.update()
        for key, value in load_file(f).items():
            if native:  # layers.L.mlp.deepspeed_moe.experts.deepspeed_experts.<global id>.w1.weight
                stem, e = native_moe.expert_key(key)
            else:  # layers.L.mlp.experts.w1.<global expert id>
                stem, e = key.rsplit(".", 1)
            experts.setdefault(stem, {})[int(e)] = value.float()
    progress.close()
    for stem, by_id in experts.items():
        ids = sorted(by_id)
        if ids != list(range(len(ids))):
            raise ValueError(f"{tag}: experts of {stem} are {ids}; some expert files are missing")
        state[stem] = torch.stack([by_id[i] for i in ids])
    return state, meta


def _universal_weights(tag: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a ZeRO-3 tag from its universal form, shaped as the model's parameters
    (DeepSpeed flattens the dense ones there; AutoEP experts come stacked by global id)."""
    from sparsexpert.config import from_dict
    from sparsexpert.model.config import ModelConfig
    from sparsexpert.model.transformer import Transformer

    to_universal(tag)  # under torch.distributed, collective: rank 0 converts once, the others wait
    with torch.device("meta"):
        shapes = {
            n: p.shape
            for n, p in Transformer(from_dict(ModelConfig, meta["run"]["model"])).named_parameters()
        }
    state = {}
    folders = sorted(d for d in (tag / UNIVERSAL / "zero").iterdir() if d.is_dir())  # not optimizer_state.pt
    progress = Progress(
        f"reading the weights of {tag / UNIVERSAL}", len(folders), "parameters", log=_log_warning
    )
    for d in folders:
        progress.update()
        saved = load_file(d / "fp32.pt")
        name = d.name.replace(".mlp.router.gate.", ".mlp.gate.")
        state[name] = (saved["param"] if isinstance(saved, dict) else saved).float().reshape(shapes[name])
    progress.close()
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise ValueError(
            f"{tag}/{UNIVERSAL}: no weights for {missing[:5]}; delete that folder to convert again"
        )
    return state


CONVERT_TIMEOUT = datetime.timedelta(hours=2)
"""How long the other ranks wait for rank 0 to convert a tag to DeepSpeed's universal format."""


# Keys of an optimizer parameter group that say what the group is rather than where training is.
# DeepSpeed's universal loading copies the saved groups' keys over the live ones: at ZeRO-1/2 by
# position (so an expert group of the old ep_size keeps its old name "ep_size_2"), at ZeRO-3 from the
# first saved group into every group (so weight decay would reach the norms and embeddings too).
_GROUP_IDENTITY = ("name", "moe", "weight_decay")


def universal_loading(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config with universal-checkpoint loading on, which deepspeed.initialize must see."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def _converted_problems(out: Path) -> list[str]:
    """Whether <tag>/universal/ holds a finished conversion whose files match CONVERTED.json ([] if so)."""
    manifest, fault = _read_manifest(out, CONVERTED)
    if manifest is None:
        return [fault]
    problems, _ = _compare(out, manifest["files"], True, (0, 1))
    return [problems[i] for i in sorted(problems)]


def to_universal(tag_dir: Path) -> Path:
    """<tag>/universal/: the tag in DeepSpeed's universal format, converted by rank 0 the first time
    (DeepSpeed's ds_to_universal, in-process, reading the tag as data only, its output in
    universal/convert.log) and reused after that while its files match CONVERTED.json (converted again
    otherwise). Collective under torch.distributed: the other ranks wait for rank 0 through the
    rendezvous store, without the collective timeout, since a large model takes a while to convert.
    Without torch.distributed (consolidation, export) this process converts."""
    out = tag_dir / UNIVERSAL
    rank, world = comm.rank(), comm.world_size()
    error = ""
    if rank == 0 and (problems := _converted_problems(out)):
        if (out / CONVERTED).is_file():
            _log_warning(f"{out}: {'; '.join(problems)}; converting the tag again")
        shutil.rmtree(out, ignore_errors=True)  # a leftover of an interrupted or damaged conversion
        out.mkdir()
        try:
            _ds_to_universal(tag_dir, out)
        except UnsafeCheckpointError as exc:
            error = f"unsafe:{exc}"
        except Exception as exc:  # reported on every rank below
            error = f"{type(exc).__name__}: {exc}"
    if world > 1:
        store, key = comm.store(), f"sparsexpert/universal/{tag_dir.name}"
        if rank == 0:
            store.set(key, error)
        else:
            store.wait([key], CONVERT_TIMEOUT)
            error = store.get(key).decode()
    if error.startswith("unsafe:"):
        raise UnsafeCheckpointError(error.removeprefix("unsafe:"))
    if error:
        raise RuntimeError(
            f"{tag_dir}: DeepSpeed's ds_to_universal could not convert this checkpoint ({error}); "
            f"see {out / 'convert.log'}, or resume at the world size and ep_size it was written with"
        )
    return out


def _parameter_count(model: dict[str, Any]) -> int | None:
    """Parameters (tensors) of the model a checkpoint's metadata describes; None if it does not."""
    if not model:
        return None
    from sparsexpert.config import from_dict
    from sparsexpert.model.config import ModelConfig
    from sparsexpert.model.transformer import Transformer

    with torch.device("meta"):
        return sum(1 for _ in Transformer(from_dict(ModelConfig, model)).parameters())


def _ds_to_universal(tag_dir: Path, out: Path) -> None:
    import deepspeed
    from deepspeed.checkpoint.ds_to_universal import main

    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(out),
        num_extract_workers=1,  # >1 forks a process pool, which a process holding gloo threads should not
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    # DeepSpeed's own output goes to convert.log; the progress line counts the parameters merged so far
    # (one folder each under universal/zero/) against the model's (native experts: one folder each).
    meta = json.loads((tag_dir / META).read_text())
    model = meta.get("run", {}).get("model", {})
    total = None if (model.get("moe") or {}).get("backend") == "native" else _parameter_count(model)
    progress = Progress(f"universal conversion of {tag_dir}", total, "parameters")
    merged = out / "zero"
    with (
        open(out / "convert.log", "w") as log,
        progress.polling(lambda: sum(1 for d in merged.iterdir() if d.is_dir()) if merged.is_dir() else 0),
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
        deepspeed_reads_data_only(tag_dir),
    ):
        main(args)
    progress.close()
    (tag_dir / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; we name the tag
    files, error = _manifest(out, _files_of(out, exclude=(CONVERTED, "convert.log")), collective=False)
    if error:
        raise OSError(error)
    for d in sorted({(out / f).parent for f in files} | {out}, reverse=True):
        _fsync_dir(d)
    manifest = {"deepspeed": deepspeed.__version__, "checksum": CHECKSUM, "files": files}
    _atomic_write(out / CONVERTED, json.dumps(manifest, indent=1))


def load_elastic(engine, tag_dir: Path, seed: int) -> tuple[dict[str, Any], list[dict[str, list[int]]]]:
    """Load a tag written at another world size or ep_size (ZeRO 1-3) into an engine built with
    `universal_loading`, resharding weights, Adam moments and step through its universal form
    (`to_universal`), then check the result (`check_elastic_load`), raising on every rank if it is
    wrong. Returns the tag's metadata and, per rank, the global expert ids of each AutoEP layer.

    RNG: a rank restores the RNG state of the same rank of the checkpoint when there is one, and
    otherwise seeds from (seed, step, rank). Nothing in training draws from these generators
    (data order, masking and knowledge sampling are keyed by step and micro-batch), so this only
    keeps user code that does reproducible."""
    meta = _check_for_load(tag_dir)
    to_universal(tag_dir)
    groups = engine.optimizer.optimizer.param_groups  # the torch optimizer inside ZeRO's
    identity = [{k: g[k] for k in _GROUP_IDENTITY if k in g} for g in groups]
    with deepspeed_reads_data_only(tag_dir):
        path, _ = engine.load_checkpoint(
            str(tag_dir), tag=UNIVERSAL, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if path is None:
        raise RuntimeError(f"{tag_dir / UNIVERSAL}: DeepSpeed could not load this universal checkpoint")
    for group, keep in zip(groups, identity):
        group.update(keep)
    stage = meta["ds_config"].get("zero_optimization", {}).get("stage", 0)
    reference = _reference(tag_dir, stage)  # the tag's own files, read once for the load and the check
    if stage < 3:
        _load_frozen(engine, tag_dir, reference)
    # DeepSpeed quirk: ZeRO-3's universal loading gives every sub-group's Adam state the same `step`
    # tensor, which torch's Adam increments in place, once per sub-group and optimizer step.
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    rank = comm.rank()
    state = read_rng(tag_dir, rank)
    if state is not None:
        set_rng_state(state)
    else:
        s = zlib.crc32(f"{seed}/{meta['step']}/{rank}".encode())
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)  # CUDA generators too
    return meta, check_elastic_load(engine, tag_dir, meta, reference)


def _load_frozen(engine, tag_dir: Path, reference) -> None:
    """What DeepSpeed's universal loading leaves at its initialization, loaded from the tag's dense model
    states (ZeRO 0-2, the same on every rank; `reference` is `_reference` of the tag): the universal form
    holds what DeepSpeed's optimizer steps, not the weights outside it and the buffers (the row-wise
    entity table and its accumulators, model.knowledge.entity_optimizer=rowwise_adagrad)."""
    module = engine.module
    own = module.state_dict()
    names = [n for n, p in module.named_parameters() if not p.requires_grad]
    names += [n for n, _ in module.named_buffers() if n in own]  # persistent ones
    for name in names:
        try:
            saved = reference(name, None)
        except KeyError:
            raise RuntimeError(
                f"{tag_dir}: the checkpoint has no {name}, which this model keeps outside the optimizer"
            ) from None
        own[name].copy_(saved)


def _reference(tag_dir: Path, stage: int):
    """name, expert ids -> the tensor the checkpoint holds for that parameter (the experts' rows
    only when ids is given). ZeRO 0-2: the tag's own files (dense weights in
    mp_rank_00_model_states.pt, each expert of each layer in its own file), independent of the
    conversion. ZeRO-3 keeps weights only in the optimizer partitions: the universal form's."""
    if stage == 3:

        def universal(name: str, ids: list[int] | None) -> torch.Tensor:
            saved = load_file(tag_dir / UNIVERSAL / "zero" / name / "fp32.pt")
            full = saved["param"] if isinstance(saved, dict) else saved  # experts: stacked by global id
            return full if ids is None else full[ids]

        return universal
    model_states = tag_dir / "mp_rank_00_model_states.pt"
    dense = load_file(model_states)["module"]
    by_expert: dict[int, dict[str, torch.Tensor]] = {}

    def own_files(name: str, ids: list[int] | None) -> torch.Tensor:
        if ids is None:
            return dense[name]
        for e in ids:
            if e not in by_expert:
                by_expert[e] = {}
                for f in tag_dir.glob(f"layer_*_expert_{e}_mp_rank_*_model_states.pt"):
                    by_expert[e].update(load_file(f))
        return torch.stack([by_expert[e][f"{name}.{e}"] for e in ids])

    return own_files


def check_elastic_load(engine, tag_dir: Path, meta: dict[str, Any], reference) -> list[dict[str, list[int]]]:
    """After an elastic load, on every rank: each parameter, and for each AutoEP layer exactly the
    experts of the global ids this rank owns, equal the checkpoint's (`reference`: `_reference` of the
    tag); the engine,
    the learning-rate schedule and every Adam state are at the checkpoint's step. Collective:
    raises RuntimeError on every rank naming what differs where; returns, per rank, the expert ids
    of each AutoEP layer."""
    from deepspeed.checkpoint.autoep_affine import autoep_experts_for_rank
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    step = meta["step"]
    owned, experts = {}, {}
    for name, module in engine.module.named_modules():
        if isinstance(module, AutoEPMoELayer):
            owned[name] = list(autoep_experts_for_rank(module.expert_placement_descriptor, module.ep_rank))
            experts.update({f"{name}.experts.{w}": owned[name] for w in ("w1", "w2", "w3")})
    problems = []
    for name, p in engine.module.named_parameters():
        with GatheredParameters([p]):  # ZeRO-3: the whole parameter (the same on every rank)
            have = p.detach().cpu().clone()  # the reference is read on the host
        want = reference(name, experts.get(name)).to(have.dtype)
        if have.numel() != want.numel() or not torch.equal(have.flatten(), want.flatten()):
            ids = f" (experts {experts[name]})" if name in experts else ""
            problems.append(f"{name}{ids} differs from the checkpoint")
    if engine.global_steps != step:
        problems.append(f"the engine is at step {engine.global_steps}")
    sched = getattr(engine.lr_scheduler, "last_batch_iteration", step - 1)
    if sched != step - 1:
        problems.append(f"the learning-rate schedule is at step {sched + 1}")
    zero, opt = engine.optimizer, engine.optimizer.optimizer
    # The fp32 partitions the torch optimizer steps: ZeRO-3 (which hands them to it one sub-group at
    # a time), ZeRO-1/2, ZeRO-1 in bf16 (DeepSpeed's BF16_Optimizer).
    flat: list[torch.Tensor] = next(
        (
            getattr(zero, a)
            for a in (
                "fp32_partitioned_groups_flat",
                "single_partition_of_fp32_groups",
                "fp32_groups_flat_partition",
            )
            if getattr(zero, a, None)
        ),
        [],
    )
    adam_steps = {int(opt.state.get(p, {}).get("step", -1)) for p in flat if p.numel()}
    if adam_steps != {step}:
        problems.append(f"the optimizer states are at steps {sorted(adam_steps)} (-1: missing)")
    everyone = comm.all_gather_object((owned, problems))
    wrong = [f"rank {r}: {'; '.join(probs)}" for r, (_, probs) in enumerate(everyone) if probs]
    if wrong:
        raise RuntimeError(
            f"elastic resume from {tag_dir} at step {step} is wrong: {' | '.join(wrong)}; resume at "
            f"world size {meta['world_size']} and ep_size {meta['ep_size']}, as the checkpoint was written"
        )
    return [own for own, _ in everyone]


def describe_experts(owned: list[dict[str, list[int]]]) -> str:
    """'rank 0 [0, 1], rank 1 [2, 3]' (the same ids in every AutoEP layer), else per layer."""
    parts = []
    for rank, layers in enumerate(owned):
        ids = {tuple(v) for v in layers.values()}
        parts.append(f"rank {rank} {list(ids.pop()) if len(ids) == 1 else layers}")
    return ", ".join(parts)
