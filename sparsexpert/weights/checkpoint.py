"""Self-describing checkpoints around DeepSpeed's save_checkpoint, checked before anything reads them.

Layout of `<output_dir>/checkpoints/`:

    step_00000100/                 one tag (always named step_<8 digits>)
        (DeepSpeed's model and optimizer files, per rank)
        rng_rank00000.json ...     each rank's RNG states (plain JSON)
        tokenizer.model            the tokenizer the run used (or tokenizer/, a Hugging Face folder)
        sparsexpert.json           run config, DeepSpeed config, step, data position, world/ep size
        COMPLETE.json              written last: every file of the tag with its size and xxh3-128
                                   checksum, and whether the step was healthy
    latest                         the newest healthy complete tag, replaced atomically

Integrity. `save` fsyncs every file and the tag folder before it writes COMPLETE.json, and the
checkpoints folder after `latest`: after a crash, a tag with COMPLETE.json holds what it lists. Before a
tag is read (`resolve_tag`; deepspeed_formats.py's `load`, `load_elastic`, `load_weights`), `verify` compares every file with
COMPLETE.json (size and checksum), and an error names the file that differs. `scan` says, for every tag
it passed over, why: `find_latest` takes its pick, `for_resume` turns it into the resume decision
(an error listing every checkpoint and its fault when none is usable; the skipped newer ones logged
when it falls back). Tags written before checksums (COMPLETE.json with sizes only) are accepted on
their sizes, with a warning: refusing them would strand every existing run, and a size check still
catches the common damage (a truncated file). xxh3-128 runs at ~11 GB/s on one core here, against
~1.2 for sha256 and ~1.0 for blake2b (bench/checkpoint_integrity.py): it detects damage, not malice,
which is the next paragraph's business.

Trust: no code from a checkpoint. Every file of ours is read as data: `load_file` is
`torch.load(weights_only=True)`, RNG states are JSON (older tags' rng_rank*.pt with exactly NumPy's array
types allowed), configs JSON. Paths read from files here stay inside: `latest` must name a tag
(step_<8 digits>) of its own folder, and every file COMPLETE.json lists must lie inside its tag.

DeepSpeed's own formats inside a tag (its model, expert and optimizer files; its universal form; the
engine's loading, plain or resharded) are read in `deepspeed_formats.py`, the one module of this package
that imports DeepSpeed.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import pickle
import random
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from data_prep.output import file_digest
from sparsexpert.distributed import comm

COMPLETE = "COMPLETE.json"
META = "sparsexpert.json"
LATEST = "latest"
UNIVERSAL = "universal"
CONVERTED = "CONVERTED.json"
CHECKSUM = "xxh3_128"
TAG = re.compile(r"step_\d{8}")
"""What a tag is called; `latest` must hold exactly such a name."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, incomplete, unsafe, or none at all. The message
    names the files and what is wrong with each."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holding pickled objects other than tensors and plain data (code may run)."""


class NoSpaceError(OSError):
    """A save that did not fit on its filesystem (errno ENOSPC); its partial tag is removed."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _log_warning(message: str) -> None:
    """The default `log` of the readers below: rank 0 prints to stderr."""
    if comm.rank() == 0:
        print(f"sparsexpert: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- durable writes, checksums


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file, fsynced, renamed over it; then the folder fsynced."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _files_of(folder: Path, exclude: tuple[str, ...]) -> list[str]:
    """Every file under `folder`, relative, sorted (those named in `exclude` at its top left out)."""
    return sorted(
        str(p.relative_to(folder).as_posix())
        for p in folder.rglob("*")
        if p.is_file() and str(p.relative_to(folder)) not in exclude
    )


def _manifest(folder: Path, names: list[str], collective: bool) -> tuple[dict[str, dict[str, Any]], str]:
    """({name: {"size", CHECKSUM}} for the files `names` of `folder`, each fsynced on the way; the first
    error, "" if none). Collective when asked: every rank hashes its share (`_share`) and all get the
    whole table; no rank raises between the collectives."""
    rank, world = (comm.rank(), comm.world_size()) if collective else (0, 1)
    mine, error = {}, ""
    sizes = []
    for name in names:
        try:
            sizes.append((folder / name).stat().st_size)
        except OSError:
            sizes.append(0)  # reported when its turn comes
    for name in (names[i] for i in _share(sizes, rank, world)):
        path = folder / name
        try:
            mine[name] = {"size": path.stat().st_size, CHECKSUM: file_digest(path, sync=True)}
        except OSError as exc:
            error = error or f"{path}: {exc}"
    if world > 1:
        parts = comm.all_gather_object((mine, error))
        mine = {k: v for part, _ in parts for k, v in part.items()}
        error = next((e for _, e in parts if e), "")
    return {name: mine[name] for name in names if name in mine}, error


def _total_size(tag_dir: Path) -> int:
    """Bytes of a tag as its COMPLETE.json lists them (else as found on disk)."""
    try:
        files = json.loads((tag_dir / COMPLETE).read_text())["files"]
        return sum(v if isinstance(v, int) else int(v["size"]) for v in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())


def _human(n: int) -> str:
    size: float = n
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n:,} bytes" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    return str(size)


# ---------------------------------------------------------------- checking a tag


def _inside(folder: Path, name: str) -> bool:
    """Whether a name read from a file is a plain relative path that stays inside `folder`, also
    through symbolic links."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or "\0" in name:
        return False
    real, base = os.path.realpath(folder / name), os.path.realpath(folder)
    return real.startswith(base + os.sep)


@dataclass
class Check:
    """What `verify` found in a tag."""

    problems: list[str] = field(default_factory=list)
    """Each fault, naming the file: the tag is unusable if there is any."""
    sizes_only: bool = False
    """Written before checksums: its files were compared by size only."""
    healthy: bool = True
    """False: saved with healthy=False (a step whose loss was not finite); never picked as latest."""

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_manifest(tag_dir: Path, marker: str) -> tuple[dict[str, Any] | None, str]:
    path = tag_dir / marker
    if not path.is_file():
        return None, f"incomplete: no {marker} (a save that did not finish)"
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
    except (OSError, ValueError) as exc:
        return None, f"{marker} is unreadable ({exc})"
    return manifest, ""


def _size_of(entry: Any) -> int:
    if isinstance(entry, dict):
        entry = entry.get("size")
    return entry if isinstance(entry, int) else 0


def _share(sizes: list[int], rank: int, world: int) -> list[int]:
    """The indices of the files this rank hashes: largest first, dealt round-robin (balanced bytes)."""
    return sorted(range(len(sizes)), key=lambda i: -sizes[i])[rank::world]


def _compare(
    folder: Path, files: dict[str, Any], checksums: bool, share: tuple[int, int]
) -> tuple[dict[int, str], bool]:
    """Problems by file index (every file's name and size; the checksums of this rank's share of the
    files), and whether any entry had no checksum (written before checksums)."""
    rank, world = share
    problems: dict[int, str] = {}
    sizes_only = False
    mine = set(_share([_size_of(e) for e in files.values()], rank, world))
    for i, (name, entry) in enumerate(files.items()):
        if not isinstance(name, str) or not _inside(folder, name):
            problems[i] = f"its file list names {name!r}, a path outside the tag; refused"
            continue
        if isinstance(entry, int):
            size, digest = entry, None
        elif isinstance(entry, dict) and isinstance(entry.get("size"), int):
            size, digest = entry["size"], entry.get(CHECKSUM)
        else:
            problems[i] = f"its file list has no size for {name}"
            continue
        sizes_only |= digest is None
        path = folder / name
        try:
            have = path.stat().st_size
        except FileNotFoundError:
            problems[i] = f"{name} is missing"
            continue
        except OSError as exc:
            problems[i] = f"{name} cannot be read ({exc})"
            continue
        if have != size:
            problems[i] = f"{name} is {have:,} bytes where {size:,} were written"
        elif checksums and digest is not None and i in mine:
            try:
                if file_digest(path) != digest:
                    problems[i] = f"{name} differs from what was written (its {CHECKSUM} checksum; same size)"
            except OSError as exc:
                problems[i] = f"{name} cannot be read ({exc})"
    return problems, sizes_only


_VERIFIED: dict[str, tuple] = {}
"""Tags this process has just verified with checksums, and their files' stats then: the reader that
follows (deepspeed_formats.`load` after `for_resume`, `load_weights` after `resolve_tag`) takes the entry instead of
reading every file a second time, if nothing changed (`_take_verified`)."""


def _stats(tag_dir: Path, names: list[str]) -> tuple:
    out = []
    for name in [COMPLETE, *names]:
        try:
            st = (tag_dir / name).stat()
        except OSError:
            return ()
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def _take_verified(tag_dir: Path) -> bool:
    """Whether this process verified `tag_dir` just before, its files unchanged since (consumes it)."""
    stats = _VERIFIED.pop(os.path.realpath(tag_dir), None)
    if not stats:
        return False
    return stats == _stats(tag_dir, [name for name, *_ in stats[1:]])


def verify(tag_dir: str | Path, checksums: bool = True, collective: bool = False) -> Check:
    """Compare a tag with its COMPLETE.json: every file listed is there, inside the tag, with its size
    and (checksums=True) its checksum. Files added later (universal/) are not part of it.
    collective: every rank of the run calls this at once; each hashes a share of the files and all get
    the same verdict (under torch.distributed only; otherwise this process checks everything)."""
    tag_dir = Path(tag_dir)
    world = comm.world_size() if collective else 1
    manifest, fault = _read_manifest(tag_dir, COMPLETE)
    problems: dict[int, str] = {-1: fault} if manifest is None else {}
    sizes_only, healthy = False, True
    if manifest is not None:
        share = (comm.rank(), world) if world > 1 else (0, 1)
        problems, sizes_only = _compare(tag_dir, manifest["files"], checksums, share)
        healthy = manifest.get("healthy", True) is not False
    if world > 1:  # the same verdict on every rank, whatever each one saw
        merged: dict[int, str] = {}
        for part, part_sizes_only, part_healthy in comm.all_gather_object((problems, sizes_only, healthy)):
            merged.update(part)
            sizes_only |= part_sizes_only
            healthy &= part_healthy
        problems = merged
    check = Check([problems[i] for i in sorted(problems)], sizes_only, healthy)
    if manifest is not None and check.ok and checksums and not sizes_only:
        _VERIFIED[os.path.realpath(tag_dir)] = _stats(tag_dir, list(manifest["files"]))
    return check


def is_complete(tag_dir: Path) -> bool:
    """COMPLETE.json is there and every file it lists has its size (no checksums read: see `verify`)."""
    return verify(tag_dir, checksums=False).ok


# ---------------------------------------------------------------- which checkpoint


@dataclass
class Found:
    """What a checkpoints folder holds, as `scan` judged it."""

    root: Path
    tag: Path | None = None
    """The checkpoint to use: the one `latest` names if usable, else the newest usable one."""
    passed_over: list[tuple[str, str]] = field(default_factory=list)
    """(tag or "latest", why) for `latest` when it names nothing usable, every tag tried before `tag`,
    and every tag newer than `tag` that was not tried, newest first."""
    sizes_only: bool = False
    """`tag` was written before checksums: verified by its sizes only."""
    anything: bool = False
    """Whether the folder held any tag or a `latest` file at all."""

    def report(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in self.passed_over)


def _read_latest(root: Path) -> tuple[str | None, str]:
    """(the tag `latest` names, "") or (None, why it names none)."""
    path = root / LATEST
    try:
        text = path.read_text(errors="replace").strip()
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"cannot be read ({exc})"
    if not TAG.fullmatch(text):
        return None, f"holds {text[:80]!r}, not a tag name (step_<8 digits>) of {root}; ignored"
    if not (root / text).is_dir():
        return None, f"names {text}, which is not in {root}"
    return text, ""


def _unhealthy_or_incomplete(tag_dir: Path) -> str:
    """Why a tag not tried would not be used anyway, read cheaply from its COMPLETE.json ("" if none)."""
    manifest, fault = _read_manifest(tag_dir, COMPLETE)
    if manifest is None:
        return fault
    if not manifest.get("healthy", True):
        return "marked unhealthy (saved after a step whose loss was not finite)"
    return ""


def scan(ckpt_root: str | Path, checksums: bool = True, collective: bool = False) -> Found:
    """The checkpoint to continue from in `ckpt_root`, and why each other candidate was passed over.

    Tried in order: the tag `latest` names, then every tag newest first; the first that `verify`
    passes and is healthy is taken, the older ones are not read. `latest` must hold a tag name of this
    folder (step_<8 digits>); anything else (a path, ../.., garbage) is reported and ignored.
    collective: see `verify` (every rank calls this at once)."""
    root = Path(ckpt_root)
    found = Found(root)
    if not root.is_dir():
        return found
    tags = sorted((p.name for p in root.iterdir() if TAG.fullmatch(p.name) and p.is_dir()), reverse=True)
    latest, why = _read_latest(root)
    found.anything = bool(tags) or (root / LATEST).exists()
    if why:
        found.passed_over.append((LATEST, why))
    order = ([latest] if latest else []) + [t for t in tags if t != latest]
    for name in order:
        check = verify(root / name, checksums, collective)
        if check.ok and check.healthy:
            found.tag, found.sizes_only = root / name, check.sizes_only
            break
        reason = "; ".join(check.problems) if check.problems else _unhealthy_or_incomplete(root / name)
        found.passed_over.append((name, reason))
    if found.tag is not None:  # newer tags that `latest` passed by (an interrupted or unhealthy save)
        tried = {name for name, _ in found.passed_over}
        for name in tags:
            if name > found.tag.name and name not in tried:
                why = _unhealthy_or_incomplete(root / name) or f"newer, but {LATEST} names {found.tag.name}"
                found.passed_over.append((name, why))
    pointer = [item for item in found.passed_over if item[0] == LATEST]
    found.passed_over = pointer + sorted((i for i in found.passed_over if i[0] != LATEST), reverse=True)
    return found


def find_latest(ckpt_root: str | Path) -> Path | None:
    """The tag named by `latest` if complete and healthy, else the newest such tag, else None. Checks
    the files' sizes, not their checksums (`scan` with checksums=False): a quick look, e.g. whether a
    run has a checkpoint; loading one checks the checksums too (`resolve_tag`, `load`)."""
    return scan(ckpt_root, checksums=False).tag


def for_resume(ckpt_root: str | Path, log: Callable[[str], None] = _log_warning) -> Path | None:
    """The checkpoint a resume continues from, every file checked against its checksum (collective:
    every rank calls it; each hashes a share of the files). None when the folder holds no checkpoint
    at all. Raises CheckpointError, listing every checkpoint and its fault, when checkpoints exist but
    none is usable; logs the newer ones passed over, and why, when it falls back to an older one."""
    found = scan(ckpt_root, checksums=True, collective=True)
    if found.tag is None:
        if found.anything:
            raise CheckpointError(
                f"no usable checkpoint in {found.root} to resume from: {found.report()}. Nothing was "
                "changed; repair or move these away (or start the run over)"
            )
        return None
    if found.passed_over:
        log(f"resume: passed over {found.report()}; continuing from {found.tag.name}")
    if found.sizes_only:
        log(f"{found.tag}: written before checksums, verified by its files' sizes only")
    return found.tag


def resolve_tag(path: str | Path, log: Callable[[str], None] = _log_warning) -> Path:
    """A checkpoint tag folder from a tag, a checkpoints/ folder or a run's output folder
    (pretraining: its latest usable checkpoint; fine-tuning: its best/), every file checked against
    COMPLETE.json (sizes and checksums). Raises CheckpointError naming each checkpoint passed over
    and why when none is usable; logs the ones passed over when it takes an older one."""
    p = Path(path)
    if (p / META).is_file() or (p / COMPLETE).is_file():
        check = verify(p)
        if not check.ok:
            raise CheckpointError(f"{p}: not a usable checkpoint: {'; '.join(check.problems)}")
        if not check.healthy:
            log(f"{p}: marked unhealthy (saved after a step whose loss was not finite); reading it as asked")
        if check.sizes_only:
            log(f"{p}: written before checksums, verified by its files' sizes only")
        return p
    for root in (p, p / "best", p / "checkpoints"):  # best/: a fine-tuning run's best dev checkpoint
        found = scan(root)
        if found.tag is not None:
            if found.passed_over:
                log(f"{root}: passed over {found.report()}; reading {found.tag.name}")
            if found.sizes_only:
                log(f"{found.tag}: written before checksums, verified by its files' sizes only")
            return found.tag
        if found.anything:
            raise CheckpointError(f"{root}: no usable checkpoint: {found.report()}")
    raise CheckpointError(f"{p}: no sparsexpert checkpoint (give a tag, checkpoints/ or a run folder)")


# ---------------------------------------------------------------- reading files as data

# numpy's array pickling (older tags' rng_rank*.pt): the reconstructor under both of its module
# names, the array, the dtype and the one dtype class those states use (uint32).
_reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct  # NumPy 2 / 1
_NUMPY_RNG_GLOBALS: list[Any] = [
    (_reconstruct, "numpy._core.multiarray._reconstruct"),
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def _refusal(path: Path | str, exc: Exception) -> UnsafeCheckpointError:
    text = str(exc)
    named = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if named:
        what = f"it names {named.group(1)}"
    else:  # torch's own words, without its advice to allow what the file names
        what = text.split("WeightsUnpickler error:")[-1].strip().split(". ")[0][:200]
    return UnsafeCheckpointError(
        f"{path}: refused: it holds pickled objects other than tensors and plain data ({what}); "
        "sparsexpert reads checkpoints as data only and never runs code from one"
    )


def load_file(path: str | Path, allow: list[Any] | None = None) -> Any:
    """A torch.save file of a checkpoint, read as data (weights_only, plus the classes in `allow`)."""
    try:
        with torch.serialization.safe_globals(allow or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None


# ---------------------------------------------------------------- RNG states


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


def _bytes_of(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def rng_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """`rng_state()` as plain JSON: integers, floats and base64 bytes (read back exactly)."""
    version, internal, gauss = state["python"]
    kind, key, pos, has_gauss, cached = state["numpy"]
    out = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "kind": kind,
            "key": [int(k) for k in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": _bytes_of(state["torch"]),
    }
    if "cuda" in state:
        out["cuda"] = _bytes_of(state["cuda"])
    return out


def rng_from_json(data: dict[str, Any]) -> dict[str, Any]:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)

    py, npy = data["python"], data["numpy"]
    state = {
        "python": (int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]),
        "numpy": (
            str(npy["kind"]),
            np.array(npy["key"], dtype=np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        ),
        "torch": tensor(data["torch"]),
    }
    if "cuda" in data:
        state["cuda"] = tensor(data["cuda"])
    return state


def _rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank{rank:05d}.json"


def read_rng(tag_dir: Path, rank: int) -> dict[str, Any] | None:
    """The RNG states rank `rank` saved in `tag_dir`, or None if it saved none (a smaller world)."""
    path = _rng_file(tag_dir, rank)
    if path.is_file():
        try:
            return rng_from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not RNG states ({type(exc).__name__}: {exc})") from None
    legacy = path.with_suffix(".pt")  # tags written before the JSON form
    if legacy.is_file():
        return load_file(legacy, allow=_NUMPY_RNG_GLOBALS)
    return None


# ---------------------------------------------------------------- saving


def _exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


_WRITE_FAILED = ("iostream error", "inline_container", "PytorchStreamWriter", "write")
"""Words of torch's writer errors (it does not pass errno on)."""


def _space_problem(exc: BaseException, root: Path, tag: str, previous: str | None) -> str:
    """The message of a save that failed for want of space, or "" when `exc` is something else.

    Python's writes say so (OSError ENOSPC or EDQUOT); torch's zip writer, which DeepSpeed saves
    with, does not: on a full filesystem it raises RuntimeError("basic_ios::clear: iostream error",
    then "[enforce fail at inline_container.cc:672] . unexpected pos ..."). A write error counts as
    one when the filesystem has less room left than the previous checkpoint took (measured before
    the partial tag is removed)."""
    said = any(
        (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
        or "No space left on device" in str(e)
        or "Disk quota exceeded" in str(e)
        for e in _exception_chain(exc)
    )
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = 0
    need = _total_size(root / previous) if previous else 0
    write_failed = any(
        isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(w in str(e) for w in _WRITE_FAILED))
        for e in _exception_chain(exc)
    )
    if not said and not (write_failed and free < max(need, 16 << 20)):
        return ""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if previous:
        room = f"the previous checkpoint {previous} took {_human(need)}: make at least that much room"
    else:
        room = "this is the run's first checkpoint: make room for one"
    kept = f"{root / LATEST} still names {previous}" if previous else "no checkpoint of the run is lost"
    return (
        f"no space left on device: saving checkpoint {tag} into {root} failed ({type(exc).__name__}: "
        f"{first}); {_human(free)} free there, and {room}, then continue with --resume. The partial {tag} "
        f"was removed; {kept}"
    )


def _rotate(root: Path, current: str, previous: str | None, keep: int) -> None:
    """Delete the checkpoints `keep` no longer asks for. Never deleted: the tag just written, the tag
    `latest` named before it, tags newer than the one just written, and tags that do not verify
    (incomplete or damaged: left for a look, never counted as kept). Kept: the `keep` newest healthy
    tags (the one just written included). Deleted: the other healthy ones, and every tag marked
    unhealthy, older than the one just written."""
    older = sorted(
        p.name for p in root.iterdir() if TAG.fullmatch(p.name) and p.is_dir() and p.name < current
    )
    verdicts = {name: verify(root / name, checksums=False) for name in older}
    healthy = [n for n in older if verdicts[n].ok and verdicts[n].healthy]
    kept = set(healthy[len(healthy) - (keep - 1) :]) if keep > 1 else set()
    for name in older:
        check = verdicts[name]
        if name == previous or name in kept or not check.ok:
            continue
        shutil.rmtree(root / name, ignore_errors=True)


def save(
    engine,
    ckpt_root: str | Path,
    step: int,
    meta: dict[str, Any],
    tokenizer_file: str | Path | None,
    keep: int = 0,
    healthy: bool = True,
) -> Path:
    """Save on every rank (collective). Returns the tag folder.

    Every file is fsynced and checksummed (each rank a share of the files), the tag folder fsynced,
    then COMPLETE.json written; then, if `healthy`, `latest` is moved to the tag (the checkpoints
    folder fsynced) and older tags rotated (`keep` > 0: see `_rotate`). healthy=False (a step whose loss
    was not finite) writes the tag marked so, for a look, and leaves `latest` and every other tag as
    they were. A save that runs out of space removes its partial tag and raises NoSpaceError saying so,
    with the room needed; `latest` stays on the previous tag."""
    root = Path(ckpt_root)
    tag = tag_for(step)
    tag_dir = root / tag
    rank = comm.rank()
    previous, _ = _read_latest(root)
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a leftover of an interrupted save of the same step
    comm.barrier()
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state={"sparsexpert_step": step}, save_latest=False)
    except Exception as exc:  # DeepSpeed's save is collective: the others cannot be told; clean up here
        message = _space_problem(exc, root, tag, previous)
        shutil.rmtree(tag_dir, ignore_errors=True)
        if message:
            raise NoSpaceError(errno.ENOSPC, message) from exc
        raise
    error = ""
    try:
        _rng_file(tag_dir, rank).write_text(json.dumps(rng_to_json(rng_state())))
        if rank == 0:
            if tokenizer_file is not None:  # a SentencePiece file or a Hugging Face tokenizer folder
                src = Path(tokenizer_file)
                (shutil.copytree if src.is_dir() else shutil.copyfile)(src, tag_dir / src.name)
            (tag_dir / META).write_text(json.dumps(meta, indent=2, default=str))
    except Exception as exc:
        error = _space_problem(exc, root, tag, previous) or f"{type(exc).__name__}: {exc}"
    comm.barrier()
    if not any(comm.all_gather_object(bool(error))):
        files, error = _manifest(tag_dir, _files_of(tag_dir, exclude=(COMPLETE,)), collective=True)
        if rank == 0 and not error:
            try:
                for d in sorted({(tag_dir / f).parent for f in files} | {tag_dir}, reverse=True):
                    _fsync_dir(d)  # the tag folder, and any folder in it (a tokenizer folder)
                manifest = {
                    "format": 2,
                    "step": step,
                    "healthy": healthy,
                    "checksum": CHECKSUM,
                    "files": files,
                }
                _atomic_write(tag_dir / COMPLETE, json.dumps(manifest, indent=1))
                _fsync_dir(root)
                if healthy:
                    _atomic_write(root / LATEST, tag)
            except Exception as exc:
                error = _space_problem(exc, root, tag, previous) or f"{type(exc).__name__}: {exc}"
    errors = [e for e in comm.all_gather_object(error) if e]
    if errors:
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                if (root / LATEST).read_text().strip() == tag:  # moved before the error: moved back
                    _atomic_write(root / LATEST, previous) if previous else (root / LATEST).unlink()
        comm.barrier()
        if errors[0].startswith("no space left on device"):
            raise NoSpaceError(errno.ENOSPC, errors[0])
        raise CheckpointError(f"saving checkpoint {tag} into {root} failed: {errors[0]}; {tag} was removed")
    if rank == 0 and healthy and keep:
        _rotate(root, tag, previous, keep)
    comm.barrier()
    return tag_dir


# ---------------------------------------------------------------- loading


def _check_for_load(tag_dir: Path) -> dict[str, Any]:
    """Collective: every file of the tag against its checksum (unless every rank just did: `for_resume`),
    then its metadata. Raises CheckpointError naming the faults."""
    if all(comm.all_gather_object(_take_verified(tag_dir))):  # every rank checked it just before
        return json.loads((tag_dir / META).read_text())
    check = verify(tag_dir, collective=True)
    _VERIFIED.pop(os.path.realpath(tag_dir), None)
    if not check.ok:
        raise CheckpointError(f"{tag_dir}: not a usable checkpoint: {'; '.join(check.problems)}")
    if check.sizes_only:
        _log_warning(f"{tag_dir}: written before checksums, verified by its files' sizes only")
    return json.loads((tag_dir / META).read_text())
