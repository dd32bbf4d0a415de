"""Reading data_prep's packed shards, and the deterministic order in which ranks consume them.

Sample order: the rows of the training split are shuffled once per epoch with a generator seeded
by (seed, epoch) and read as one endless stream. Global batch g takes the next
`micro x grad_accum x dp` rows of that stream; inside it, micro-batch j = m * dp + rank is the one
rank `rank` uses at accumulation step m. So a 1-process run with grad_accum=2 consumes exactly
the micro-batches a 2-process run consumes in one step, and the position in the data is a single
number: the count of global batches consumed (the optimizer step).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; prepare the dataset with `python -m data_prep` first")
    return json.loads(path.read_text())


class PackedDataset:
    """The rows of one split, memory-mapped: dataset[indices] -> LongTensor [len(indices), seq_len];
    dataset.rows(indices) gives the same rows as an int64 numpy array."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.dir = Path(data_dir)
        self.manifest = read_manifest(self.dir)
        if split not in self.manifest["splits"]:
            raise KeyError(f"{self.dir / MANIFEST}: no split {split!r}; have {list(self.manifest['splits'])}")
        self.seq_len = int(self.manifest["seq_len"])
        dtype = np.dtype(self.manifest["dtype"])
        self.shards = []
        for s in self.manifest["splits"][split]["shards"]:
            path = self.dir / s["file"]
            expected = s["num_sequences"] * self.seq_len * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise ValueError(
                    f"{path}: missing or of the wrong size (expected {expected} bytes); "
                    "re-run data_prep into a fresh folder"
                )
            self.shards.append(
                np.memmap(path, dtype=dtype, mode="r", shape=(s["num_sequences"], self.seq_len))
            )
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
