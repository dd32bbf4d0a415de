"""The exact-duplicate filter of the ingest stage: bounded memory, spilling to disk.

A document's key is the first 8 bytes of its SHA-1. The keys seen last are kept in a NumPy
open-addressing table (linear probing, between a quarter and half full: 16 to 32 bytes a document).
When that table would outgrow `memory_bytes`, its keys are written, sorted, to a run file on disk
(8 bytes a document) and memory-mapped; the table starts again empty. A key is looked up in the table,
then by binary search in each run. Runs are merged as a binary counter merges its digits (a run is
merged into the one before it while that one is at most twice its size), block by block with bounded
memory, so there are at most about log2(documents / run size) + 1 of them. The filter's own memory is
thus at most `memory_bytes` whatever the corpus; the runs' pages are the page cache's, which the
kernel reclaims, and they are deleted when the filter is closed.

Exact up to the 64-bit key: two different documents share a key with probability about n^2 / 2^65 over
n documents (3e-8 for a million, 3e-4 for a hundred million); the later one would then be dropped and
counted as a duplicate (`documents_rejected["duplicate"]`), never silently. There are no other false
positives: spilling changes where a key is kept, not what is found.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np

_INITIAL = 1 << 16  # slots of a fresh table (512 KiB)


class SeenDigests:
    """add(text) is True the first time a text is seen. close() deletes the spilled runs."""

    def __init__(
        self, memory_bytes: int = 256 << 20, spill_dir: str | Path | None = None, block: int = 1 << 20
    ):
        if memory_bytes < 2 * 8 * 4:
            raise ValueError(f"memory_bytes={memory_bytes}: at least 64 bytes")
        self.memory_bytes = memory_bytes
        self.spill_dir = spill_dir  # None: the system's temporary folder
        self.block = block  # keys a merge holds in memory per input run
        self.table = np.zeros(self._pow2(min(_INITIAL * 8, memory_bytes) // 8), dtype=np.uint64)  # 0: empty
        self.n = 0  # keys in the table
        self.runs: list[np.ndarray] = []  # sorted keys on disk, oldest (largest) first
        self._folder: Path | None = None
        self._files = 0
        self.spilled = 0  # keys written to runs, merges not counted

    @staticmethod
    def _pow2(n: int) -> int:
        return 1 << max(1, n.bit_length() - 1)

    @staticmethod
    def key(text: str) -> int:
        return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "little") or 1

    def add(self, text: str) -> bool:
        key = self.key(text)
        if self.runs:
            k = np.uint64(key)
            for run in self.runs:
                i = int(np.searchsorted(run, k))
                if i < len(run) and run[i] == k:
                    return False
        return self._insert(key)

    def _insert(self, key: int) -> bool:
        table, mask = self.table, len(self.table) - 1
        i = key & mask  # SHA-1's bits are uniform: the low ones are a good slot
        while True:
            v = int(table[i])
            if v == 0:
                table[i] = key
                self.n += 1
                if 2 * self.n > len(table):
                    if 2 * self.table.nbytes <= self.memory_bytes:
                        self._grow()
                    else:
                        self._spill()
                return True
            if v == key:
                return False
            i = (i + 1) & mask

    def _grow(self) -> None:
        keys = self.table[self.table != 0].tolist()
        self.table = np.zeros(2 * len(self.table), dtype=np.uint64)
        self.n = 0
        for k in keys:
            self._insert(k)

    # ----------------------------------------------------------------------------- spilling to disk
    def _new_file(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix=".data_prep-dedup.", dir=self.spill_dir))
        self._files += 1
        return self._folder / f"run{self._files:06d}.npy"

    def _spill(self) -> None:
        keys = np.sort(self.table[self.table != 0])
        path = self._new_file()
        np.save(path, keys)
        self.spilled += len(keys)
        self.runs.append(np.load(path, mmap_mode="r"))
        self.table = np.zeros(
            _INITIAL if self.memory_bytes >= _INITIAL * 8 * 2 else len(self.table), np.uint64
        )
        self.n = 0
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            b, a = self.runs.pop(), self.runs.pop()
            self.runs.append(self._merge(a, b))

    def _merge(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """One sorted run of a's and b's keys (disjoint: a key is spilled once), written block by
        block so that at most 2 x block keys are in memory."""
        path = self._new_file()
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint64, shape=(len(a) + len(b),))
        i = j = w = 0
        step = self.block
        while i < len(a) or j < len(b):
            xa, xb = np.asarray(a[i : i + step]), np.asarray(b[j : j + step])
            if len(xa) and len(xb):
                cut = min(xa[-1], xb[-1])
                na, nb = int(np.searchsorted(xa, cut, "right")), int(np.searchsorted(xb, cut, "right"))
            else:
                na, nb = len(xa), len(xb)
            merged = np.sort(np.concatenate([xa[:na], xb[:nb]]))
            out[w : w + len(merged)] = merged
            i, j, w = i + na, j + nb, w + len(merged)
        out.flush()
        del out
        for old in (a, b):
            Path(old.filename).unlink()  # type: ignore[attr-defined]
        return np.load(path, mmap_mode="r")

    @property
    def nbytes(self) -> int:
        """The filter's memory: the table (the runs are on disk)."""
        return self.table.nbytes

    @property
    def disk_bytes(self) -> int:
        return sum(run.nbytes for run in self.runs)

    def __len__(self) -> int:
        return self.n + sum(len(run) for run in self.runs)

    def close(self) -> None:
        self.runs.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> SeenDigests:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
