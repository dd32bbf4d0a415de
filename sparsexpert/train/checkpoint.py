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
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE.json"
META = "sparsexpert.json"
LATEST = "latest"


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
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


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
    rank = dist.get_rank()
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a leftover of an interrupted save of the same step
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"sparsexpert_step": step}, save_latest=False)
    torch.save(rng_state(), tag_dir / f"rng_rank{rank:05d}.pt")
    dist.barrier()
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
    dist.barrier()
    return tag_dir


def load(engine, tag_dir: Path) -> dict[str, Any]:
    """Load a tag saved by `save` into the engine (same world size and ep_size); returns its metadata."""
    meta = json.loads((tag_dir / META).read_text())
    path, _ = engine.load_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    rng_file = tag_dir / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
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
    ZeRO-3) and each AutoEP expert in its own file named by its global id."""
    tag = resolve_tag(path)
    meta = json.loads((tag / META).read_text())
    stage = meta.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise ValueError(
            f"{tag}: a ZeRO-3 checkpoint keeps weights partitioned; reading it needs consolidation, "
            "which sparsexpert does not do yet: initialize from a ZeRO 0-2 checkpoint"
        )
    module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    state = {k.replace(".mlp.router.gate.", ".mlp.gate."): v.float() for k, v in module.items()}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for f in sorted(tag.glob("layer_*_expert_*_mp_rank_*_model_states.pt")):
        for key, value in torch.load(f, map_location="cpu", weights_only=False).items():
            stem, e = key.rsplit(".", 1)  # layers.L.mlp.experts.w1.<global expert id>
            experts.setdefault(stem, {})[int(e)] = value.float()
    for stem, by_id in experts.items():
        ids = sorted(by_id)
        if ids != list(range(len(ids))):
            raise ValueError(f"{tag}: experts of {stem} are {ids}; some expert files are missing")
        state[stem] = torch.stack([by_id[i] for i in ids])
    return state, meta
