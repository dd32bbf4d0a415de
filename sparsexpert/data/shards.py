"""Reading data_prep's packed shards, and the deterministic order in which ranks consume them.

Sample order: the rows of the training split are shuffled once per epoch with a generator seeded
by (seed, epoch) and read as one endless stream. Global batch g takes the next
`micro x grad_accum x dp` rows of that stream; inside it, micro-batch j = m * dp + rank is the one
rank `rank` uses at accumulation step m. So a 1-process run with grad_accum=2 consumes exactly
the micro-batches a 2-process run consumes in one step, and the position in the data is a single
number: the count of global batches consumed (the optimizer step).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparsexpert.data.format import MANIFEST, VERIFIED, Manifest, check_format

_BLOCK = 1 << 24  # bytes hashed (and scanned for the largest id) at a time


def read_manifest(data_dir: str | Path) -> Manifest:
    """The dataset's manifest.json, its file names checked: each must name a file inside the dataset
    folder (no absolute path, no "..", no symbolic link leading out)."""
    root = Path(data_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; prepare the dataset with `python -m data_prep` first")
    try:
        manifest = json.loads(path.read_text())
        entries = [
            (f"splits.{split}.shards[{i}].file", shard["file"])
            for split, info in manifest["splits"].items()
            for i, shard in enumerate(info["shards"])
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{path}: not a data_prep manifest ({e!r}); re-run data_prep into a fresh folder"
        ) from e
    check_format(manifest, path)
    if "tokenizer" in manifest:
        entries.append(("tokenizer.file", manifest["tokenizer"].get("file")))
    real_root = root.resolve()
    for key, name in entries:
        if key == "tokenizer.file" and name is None:
            continue
        ok = isinstance(name, str) and name and not Path(name).is_absolute() and ".." not in Path(name).parts
        if not ok or not (root / name).resolve().is_relative_to(real_root):
            raise ValueError(
                f"{path}: {key}={name!r} leads out of the dataset folder {root}; a manifest names files inside "
                "its own folder only: re-run data_prep, or copy the files in"
            )
    return manifest


def _scan(path: Path, dtype: np.dtype) -> tuple[str, int, int]:
    """(sha256, largest id, index of its first occurrence) of a shard, in one pass."""
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    top, where, pos = -1, 0, 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
            ids = np.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize)
            if len(ids):
                i = int(ids.argmax())
                if int(ids[i]) > top:
                    top, where = int(ids[i]), pos + i
            pos += n // dtype.itemsize
    return h.hexdigest(), top, where


@contextlib.contextmanager
def _lock(root: Path):
    """One process at a time verifies a dataset (the others then find its cache): an exclusive
    flock on its manifest, which needs no write access; none where the filesystem has no flock."""
    import fcntl

    fd = os.open(root / MANIFEST, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def verify_shards(root: Path, manifest: Manifest, split: str, vocab_size: int | None) -> None:
    """Check every shard of `split` against the manifest's sha256, and its largest token id against
    vocab_size, hashing the shards in parallel threads. A shard checked before (same size and mtime,
    same expected hash: see VERIFIED) is not read again; the cache is skipped where the folder is
    read-only. Raises ValueError naming the shard (and the row, for a bad id)."""
    dtype = np.dtype(manifest["dtype"])
    seq_len = int(manifest["seq_len"])
    shards = manifest["splits"][split]["shards"]
    with _lock(root):
        try:
            cache = json.loads((root / VERIFIED).read_text())["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            cache = {}
        todo, found = [], {}
        for s in shards:
            if "sha256" not in s:
                raise ValueError(
                    f"{root / MANIFEST}: shard {s['file']} has no sha256 to verify; re-run data_prep, or open the "
                    "dataset with verify=False (data.verify=false)"
                )
            st = (root / s["file"]).stat()
            stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": s["sha256"]}
            hit = cache.get(s["file"])
            if isinstance(hit, dict) and {k: hit.get(k) for k in stamp} == stamp and "max_id" in hit:
                found[s["file"]] = hit
            else:
                todo.append((s["file"], stamp))
        if todo:
            with ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1, 8)) as pool:
                scans = pool.map(lambda t: _scan(root / t[0], dtype), todo)
                for (name, stamp), (sha, top, where) in zip(todo, scans):
                    if sha != stamp["sha256"]:
                        raise ValueError(
                            f"{root / name}: its sha256 ({sha[:16]}...) is not the one in {MANIFEST} "
                            f"({stamp['sha256'][:16]}...): the file changed after data_prep wrote it; re-run "
                            "data_prep into a fresh folder"
                        )
                    found[name] = {**stamp, "max_id": top, "first_max_at": where}
            cache.update({name: found[name] for name, _ in todo})
            tmp = root / f"{VERIFIED}.{uuid.uuid4().hex}.tmp"
            try:  # best effort: a read-only dataset is verified at every open
                tmp.write_text(json.dumps({"shards": cache}, indent=1))
                tmp.replace(root / VERIFIED)
            except OSError:
                tmp.unlink(missing_ok=True)
    first = 0
    for s in shards:
        hit = found[s["file"]]
        if vocab_size is not None and hit["max_id"] >= vocab_size:
            row = hit.get("first_max_at", 0) // seq_len
            raise ValueError(
                f"{root / s['file']}: row {row} (row {first + row} of split {split!r}) holds token id "
                f"{hit['max_id']}, but the vocabulary has {vocab_size} ids ({MANIFEST} tokenizer.vocab_size): "
                "the shard is corrupt or from another tokenizer; re-run data_prep into a fresh folder"
            )
        first += s["num_sequences"]


class PackedDataset:
    """The rows of one split, memory-mapped: dataset[indices] -> LongTensor [len(indices), seq_len];
    dataset.rows(indices) gives the same rows as an int64 numpy array.

    Opening checks the manifest's file names and each shard's size; with verify=True (the default,
    `data.verify`) also each shard's sha256 and largest token id (see `verify_shards`). Every batch
    read is checked against the vocabulary size either way, so a bad id is an error naming the
    shard and the row, not an index error inside the model."""

    def __init__(self, data_dir: str | Path, split: str = "train", verify: bool = True):
        self.dir = Path(data_dir)
        self.manifest = read_manifest(self.dir)
        if split not in self.manifest["splits"]:
            raise KeyError(f"{self.dir / MANIFEST}: no split {split!r}; have {list(self.manifest['splits'])}")
        self.split = split
        self.seq_len = int(self.manifest["seq_len"])
        self.vocab_size = self.manifest.get("tokenizer", {}).get("vocab_size")
        dtype = np.dtype(self.manifest["dtype"])
        self.files = [self.dir / s["file"] for s in self.manifest["splits"][split]["shards"]]
        for s, path in zip(self.manifest["splits"][split]["shards"], self.files):
            expected = s["num_sequences"] * self.seq_len * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise ValueError(
                    f"{path}: missing or of the wrong size (expected {expected} bytes); "
                    "re-run data_prep into a fresh folder"
                )
        if verify:
            verify_shards(self.dir, self.manifest, split, self.vocab_size)
        self.shards = [
            np.memmap(path, dtype=dtype, mode="r", shape=(s["num_sequences"], self.seq_len))
            for s, path in zip(self.manifest["splits"][split]["shards"], self.files)
        ]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """int64 [len(indices), seq_len]: the rows asked for, in the order asked (repeats allowed)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"{self.dir}: row indices must be a 1-D array, got shape {idx.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(
                f"{self.dir}: row indices must be in [0, {len(self)}), got {idx.min()}..{idx.max()}"
            )
        out = np.empty((len(idx), self.seq_len), dtype=np.int64)
        # Sorting the indices groups them by shard (and reads each shard front to back): one fancy
        # index per shard, scattered back to the requested order. Shard s holds
        # sorted_idx[bounds[s]:bounds[s + 1]].
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        bounds = np.searchsorted(sorted_idx, self.offsets)
        for s in np.flatnonzero(np.diff(bounds)).tolist():
            lo, hi = bounds[s], bounds[s + 1]
            # np.asarray: a plain view of the memmap, which indexes faster than the memmap itself
            out[order[lo:hi]] = np.asarray(self.shards[s])[sorted_idx[lo:hi] - self.offsets[s]]
        if self.vocab_size is not None and out.size and out.max() >= self.vocab_size:
            k = int(np.flatnonzero(out.max(axis=1) >= self.vocab_size)[0])
            bad = int(idx[k])
            shard = int(np.searchsorted(self.offsets, bad, side="right")) - 1
            raise ValueError(
                f"{self.files[shard]}: row {bad - self.offsets[shard]} (row {bad} of split {self.split!r}) holds "
                f"token id {int(out[k].max())}, but the vocabulary has {self.vocab_size} ids: the shard is "
                "corrupt; re-run data_prep into a fresh folder (opening it with verify=True finds every such shard)"
            )
        return out

    def __getitem__(self, indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.rows(indices))


@dataclass
class BatchPlan:
    """Which rows rank `rank` reads at accumulation step m of global batch g."""

    num_rows: int
    micro: int
    grad_accum: int
    dp: int
    rank: int
    seed: int

    def __post_init__(self) -> None:
        self._perms: dict[int, np.ndarray] = {}

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return self._perms[epoch]

    def rows(self, global_batch: int, micro_step: int) -> np.ndarray:
        global_size = self.micro * self.grad_accum * self.dp
        j = micro_step * self.dp + self.rank
        start = global_batch * global_size + j * self.micro
        positions = np.arange(start, start + self.micro)
        epochs, offsets = np.divmod(positions, self.num_rows)
        out = np.empty(self.micro, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._epoch_perm(int(epoch))[offsets[sel]]
        return out


class ShardLoader:
    """Micro-batches of one rank: loader.batch(global_batch, micro_step) -> LongTensor [micro, seq_len]."""

    def __init__(self, dataset: PackedDataset, plan: BatchPlan):
        self.dataset, self.plan = dataset, plan

    def batch(self, global_batch: int, micro_step: int) -> torch.Tensor:
        return self.dataset[self.plan.rows(global_batch, micro_step)]
