"""Self-describing checkpoints around DeepSpeed's save_checkpoint.

Layout of `<output_dir>/checkpoints/`:

    step_00000100/                 one tag
        (DeepSpeed's model and optimizer files, per rank)
        rng_rank00000.pt ...       each rank's RNG states
        tokenizer.model            the tokenizer the run used (or tokenizer/, a Hugging Face folder)
        sparsexpert.json           run config, DeepSpeed config, step, data position, world/ep size
        COMPLETE.json              written last: every file of the tag with its size
    latest                         the newest complete tag, replaced atomically

A tag without COMPLETE.json (a save interrupted mid-write) or whose files do not match it is
never taken as the latest: `find_latest` falls back to the newest complete one.

Elastic resume (`load_elastic`, a tag written at another world size or ep_size): rank 0 converts
the tag once with DeepSpeed's own converter (deepspeed/checkpoint/ds_to_universal.py) into

    step_00000100/universal/       DeepSpeed's universal checkpoint: every parameter whole, with its
        zero/<param>/...           fp32 weights, Adam moments and step; AutoEP experts stacked by
        CONVERTED.json             global id; written last, so the conversion is reused afterwards

which an engine built with `"checkpoint": {"load_universal": true}` (`universal_loading`) reshards
on load. ZeRO stages 1-3; ZeRO-0 has no universal loading in DeepSpeed 0.19.8.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsexpert import comm

COMPLETE = "COMPLETE.json"
META = "sparsexpert.json"
LATEST = "latest"
UNIVERSAL = "universal"
CONVERTED = "CONVERTED.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """This rank's generators: Python's, NumPy's, torch's CPU one and, on a GPU, its CUDA one (the native
    MoE backend's noisy gating and random token selection draw from the CUDA generator)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # of the current device: this rank's
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_complete(tag_dir: Path) -> bool:
    marker = tag_dir / COMPLETE
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    return all(
        (tag_dir / name).is_file() and (tag_dir / name).stat().st_size == size for name, size in files.items()
    )


def find_latest(ckpt_root: str | Path) -> Path | None:
    """The tag named by `latest` if complete, else the newest complete tag, else None."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    latest = root / LATEST
    if latest.is_file():
        tag_dir = root / latest.read_text().strip()
        if is_complete(tag_dir):
            return tag_dir
    for tag_dir in sorted(root.glob("step_*"), reverse=True):
        if tag_dir.is_dir() and is_complete(tag_dir):
            return tag_dir
    return None


def save(
    engine,
    ckpt_root: str | Path,
    step: int,
    meta: dict[str, Any],
    tokenizer_file: str | Path | None,
    keep: int = 0,
) -> Path:
    """Save on every rank (collective). Returns the tag folder."""
    root = Path(ckpt_root)
    tag = tag_for(step)
    tag_dir = root / tag
    rank = comm.rank()
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a leftover of an interrupted save of the same step
    comm.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"sparsexpert_step": step}, save_latest=False)
    torch.save(rng_state(), tag_dir / f"rng_rank{rank:05d}.pt")
    comm.barrier()
    if rank == 0:
        if tokenizer_file is not None:  # a SentencePiece file or a Hugging Face tokenizer folder
            src = Path(tokenizer_file)
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, tag_dir / src.name)
        (tag_dir / META).write_text(json.dumps(meta, indent=2, default=str))
        files = {
            str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()
        }
        _atomic_write(tag_dir / COMPLETE, json.dumps({"step": step, "files": files}, indent=1))
        _atomic_write(root / LATEST, tag)
        if keep:
            complete = [d for d in sorted(root.glob("step_*")) if d.is_dir() and is_complete(d)]
            for old in complete[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return tag_dir


def load(engine, tag_dir: Path) -> dict[str, Any]:
    """Load a tag saved by `save` into the engine (same world size and ep_size); returns its metadata."""
    meta = json.loads((tag_dir / META).read_text())
    path, _ = engine.load_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    rng_file = tag_dir / f"rng_rank{comm.rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return meta


def resolve_tag(path: str | Path) -> Path:
    """A checkpoint tag folder from a tag, a checkpoints/ folder or a run's output folder
    (pretraining: its latest complete checkpoint; fine-tuning: its best)."""
    p = Path(path)
    if (p / META).is_file():
        if not is_complete(p):
            raise FileNotFoundError(
                f"{p}: an incomplete checkpoint (no valid {COMPLETE}); use a complete one"
            )
        return p
    for root in (p, p / "checkpoints", p / "best"):  # best/: a fine-tuning run's best dev checkpoint
        if root.is_dir() and (tag := find_latest(root)) is not None:
            return tag
    raise FileNotFoundError(
        f"{p}: no complete sparsexpert checkpoint (give a tag, checkpoints/ or a run folder)"
    )


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full model weights of a checkpoint written at any world size and ep_size, in the
    plain model's layout (experts stacked by global id), as fp32; and the checkpoint's metadata.

    DeepSpeed keeps the dense weights in mp_rank_00_model_states.pt (the same on every rank below
    ZeRO-3) and each expert (AutoEP's or the native layer's) in its own file named by its global id. ZeRO-3 keeps them only
    in the ranks' optimizer partitions: they are read from the tag's universal form (`to_universal`,
    converted once and kept in <tag>/universal/)."""
    tag = resolve_tag(path)
    meta = json.loads((tag / META).read_text())
    stage = meta.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        return _universal_weights(tag, meta), meta
    module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    native = any(".deepspeed_moe." in k for k in module)  # DeepSpeed's native MoE layers (native_moe.py)
    if native:
        from sparsexpert import native_moe
    state = {k.replace(".mlp.router.gate.", ".mlp.gate."): v.float() for k, v in module.items()}
    if native:
        state = {native_moe.plain_name(k): v for k, v in state.items()}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for f in sorted(tag.glob("layer_*_expert_*_mp_rank_*_model_states.pt")):
        for key, value in torch.load(f, map_location="cpu", weights_only=False).items():
            if native:  # layers.L.mlp.deepspeed_moe.experts.deepspeed_experts.<global id>.w1.weight
                stem, e = native_moe.expert_key(key)
            else:  # layers.L.mlp.experts.w1.<global expert id>
                stem, e = key.rsplit(".", 1)
            experts.setdefault(stem, {})[int(e)] = value.float()
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
    for d in sorted((tag / UNIVERSAL / "zero").iterdir()):
        if not d.is_dir():
            continue  # optimizer_state.pt
        saved = torch.load(d / "fp32.pt", map_location="cpu", weights_only=False)
        name = d.name.replace(".mlp.router.gate.", ".mlp.gate.")
        state[name] = (saved["param"] if isinstance(saved, dict) else saved).float().reshape(shapes[name])
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise ValueError(
            f"{tag}/{UNIVERSAL}: no weights for {missing[:5]}; delete that folder to convert again"
        )
    return state


# ---------------------------------------------------------------- elastic resume

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


def to_universal(tag_dir: Path) -> Path:
    """<tag>/universal/: the tag in DeepSpeed's universal format, converted by rank 0 the first time
    (DeepSpeed's ds_to_universal, in-process, its output in universal/convert.log) and reused after
    that. Collective under torch.distributed: the other ranks wait for rank 0 through the rendezvous
    store, without the collective timeout, since a large model takes a while to convert. Without
    torch.distributed (consolidation, export) this process converts."""
    out = tag_dir / UNIVERSAL
    rank, world = comm.rank(), comm.world_size()
    error = ""
    if rank == 0 and not (out / CONVERTED).is_file():
        shutil.rmtree(out, ignore_errors=True)  # a leftover of an interrupted conversion
        out.mkdir()
        try:
            _ds_to_universal(tag_dir, out)
        except Exception as exc:  # reported on every rank below
            error = f"{type(exc).__name__}: {exc}"
    if world > 1:
        store, key = comm.store(), f"sparsexpert/universal/{tag_dir.name}"
        if rank == 0:
            store.set(key, error)
        else:
            store.wait([key], CONVERT_TIMEOUT)
            error = store.get(key).decode()
    if error:
        raise RuntimeError(
            f"{tag_dir}: DeepSpeed's ds_to_universal could not convert this checkpoint ({error}); "
            f"see {out / 'convert.log'}, or resume at the world size and ep_size it was written with"
        )
    return out


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
    with (
        open(out / "convert.log", "w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        main(args)
    (tag_dir / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; we name the tag
    _atomic_write(out / CONVERTED, json.dumps({"deepspeed": deepspeed.__version__}))


def load_elastic(engine, tag_dir: Path, seed: int) -> tuple[dict[str, Any], list[dict[str, list[int]]]]:
    """Load a tag written at another world size or ep_size (ZeRO 1-3) into an engine built with
    `universal_loading`, resharding weights, Adam moments and step through its universal form
    (`to_universal`), then check the result (`check_elastic_load`), raising on every rank if it is
    wrong. Returns the tag's metadata and, per rank, the global expert ids of each AutoEP layer.

    RNG: a rank restores the RNG state of the same rank of the checkpoint when there is one, and
    otherwise seeds from (seed, step, rank). Nothing in training draws from these generators
    (data order, masking and knowledge sampling are keyed by step and micro-batch), so this only
    keeps user code that does reproducible."""
    meta = json.loads((tag_dir / META).read_text())
    to_universal(tag_dir)
    groups = engine.optimizer.optimizer.param_groups  # the torch optimizer inside ZeRO's
    identity = [{k: g[k] for k in _GROUP_IDENTITY if k in g} for g in groups]
    path, _ = engine.load_checkpoint(
        str(tag_dir), tag=UNIVERSAL, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"{tag_dir / UNIVERSAL}: DeepSpeed could not load this universal checkpoint")
    for group, keep in zip(groups, identity):
        group.update(keep)
    # DeepSpeed quirk: ZeRO-3's universal loading gives every sub-group's Adam state the same `step`
    # tensor, which torch's Adam increments in place, once per sub-group and optimizer step.
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    rank = comm.rank()
    rng_file = tag_dir / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    else:
        s = zlib.crc32(f"{seed}/{meta['step']}/{rank}".encode())
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)  # CUDA generators too
    return meta, check_elastic_load(engine, tag_dir, meta)


def _reference(tag_dir: Path, stage: int):
    """name, expert ids -> the tensor the checkpoint holds for that parameter (the experts' rows
    only when ids is given). ZeRO 0-2: the tag's own files (dense weights in
    mp_rank_00_model_states.pt, each expert of each layer in its own file), independent of the
    conversion. ZeRO-3 keeps weights only in the optimizer partitions: the universal form's."""
    if stage == 3:

        def universal(name: str, ids: list[int] | None) -> torch.Tensor:
            saved = torch.load(
                tag_dir / UNIVERSAL / "zero" / name / "fp32.pt", map_location="cpu", weights_only=False
            )
            full = saved["param"] if isinstance(saved, dict) else saved  # experts: stacked by global id
            return full if ids is None else full[ids]

        return universal
    model_states = tag_dir / "mp_rank_00_model_states.pt"
    dense = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
    by_expert: dict[int, dict[str, torch.Tensor]] = {}

    def own_files(name: str, ids: list[int] | None) -> torch.Tensor:
        if ids is None:
            return dense[name]
        for e in ids:
            if e not in by_expert:
                by_expert[e] = {}
                for f in tag_dir.glob(f"layer_*_expert_{e}_mp_rank_*_model_states.pt"):
                    by_expert[e].update(torch.load(f, map_location="cpu", weights_only=False))
        return torch.stack([by_expert[e][f"{name}.{e}"] for e in ids])

    return own_files


def check_elastic_load(engine, tag_dir: Path, meta: dict[str, Any]) -> list[dict[str, list[int]]]:
    """After an elastic load, on every rank: each parameter, and for each AutoEP layer exactly the
    experts of the global ids this rank owns, equal the checkpoint's (`_reference`); the engine,
    the learning-rate schedule and every Adam state are at the checkpoint's step. Collective:
    raises RuntimeError on every rank naming what differs where; returns, per rank, the expert ids
    of each AutoEP layer."""
    from deepspeed.checkpoint.autoep_affine import autoep_experts_for_rank
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    step = meta["step"]
    reference = _reference(tag_dir, meta["ds_config"].get("zero_optimization", {}).get("stage", 0))
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
    flat = next(
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
