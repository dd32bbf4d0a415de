"""The pack stage: documents to fixed-length rows, entity spans and triples to row coordinates.

Files are written with plain writes, never through a writable memory map: on a full disk a write
raises ENOSPC (which the pipeline reports), where a store into a mapped page kills the process
with SIGBUS. Shards are fsynced as they are written.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import numpy as np

from data_prep.arrays import sorted_unique, unique_pairs
from sparsexpert.data.format import shard_name, table_name

EOS_ID = 2
"""The end-of-sequence id of the SentencePiece models data_prep trains (a loaded tokenizer brings its own)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack(token_lists: list[list[int]], seq_len: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Concatenate documents (each + EOS) and cut into rows; returns rows and dropped tail tokens."""
    packer = Packer(None, "x", seq_len, dtype, 1 << 30)
    for ids in token_lists:
        packer.add(np.asarray(ids, dtype=np.int64), [], [])
    rows = np.concatenate(packer.rows) if packer.rows else np.zeros((0, seq_len), dtype)
    return rows, len(packer.buf)


class Packer:
    """Appends documents to a token stream and writes full rows to shard files as they fill.

    Memory stays bounded by the largest document: rows, entity spans and row triples go to disk as
    soon as no later document can touch them (documents only ever move forward in the stream)."""

    def __init__(
        self,
        out: Path | None,
        split: str,
        seq_len: int,
        dtype: np.dtype,
        rows_per_shard: int,
        eos_id: int = EOS_ID,
    ):
        self.out, self.split, self.L, self.dtype = out, split, seq_len, dtype
        self.rows_per_shard, self.eos_id = rows_per_shard, eos_id
        self.buf = np.zeros(0, dtype=np.int64)
        self.rows: list[np.ndarray] = []  # blocks of rows of the open shard
        self.open_rows = 0  # rows in those blocks
        self.n_rows = 0
        self.shards: list[dict] = []
        self.counts: Counter[str] = Counter()
        self.pending = np.zeros(
            (0, 2), np.int64
        )  # (row, triple) pairs, sorted, of rows a later document may reach
        self.n_triples = 0
        self.rows_with_entity = 0
        self._last_entity_row = -1
        self._spans_file = open(out / f".{split}_spans.tmp", "wb") if out is not None else None
        self._triples_file = open(out / f".{split}_triples.tmp", "wb") if out is not None else None

    def add(self, ids: np.ndarray, spans: list, triples: list, eos: bool = True) -> None:
        """Append a document (eos=False: a piece of one, which the next piece continues). spans:
        (first token, end token, entity); triples: (first token, end token, triple)."""
        self.add_docs(
            np.asarray(ids, dtype=np.int64),
            np.array([len(ids)]),
            np.array([eos]),
            np.array([(0, *x) for x in spans], dtype=np.int64).reshape(-1, 4),
            np.array([(0, *x) for x in triples], dtype=np.int64).reshape(-1, 4),
        )

    def add_docs(
        self, ids: np.ndarray, lengths: np.ndarray, eos: np.ndarray, spans: np.ndarray, triples: np.ndarray
    ) -> None:
        """Append documents in order, at once: ids [tokens] their token ids concatenated, lengths
        [docs], eos [docs] (False: a piece the next continues), spans and triples [n, 4] (document,
        first token, end token, entity or triple) sorted by document, spans by first token too."""
        L = self.L
        eos = eos.astype(np.int64)
        sizes = lengths + eos  # each document's tokens in the stream
        base = self.n_rows * L + len(self.buf)  # global position of the first document's first token
        starts = base + np.cumsum(sizes) - sizes  # of each document
        # the stream: each document's ids, then its EOS
        stream = np.full(int(sizes.sum()), self.eos_id, dtype=np.int64)
        stream[np.arange(len(ids)) + np.repeat(starts - base - (np.cumsum(lengths) - lengths), lengths)] = ids
        if len(spans):
            s = starts[spans[:, 0]] + spans[:, 1]
            e = starts[spans[:, 0]] + spans[:, 2]
            row = s // L
            cross = (e - 1) // L != row
            if cross.any():
                e = np.where(cross, (row + 1) * L, e)
                self.counts["spans_clipped"] += int(cross.sum())
            if self._spans_file is not None:
                self._spans_file.write(np.stack([row, s - row * L, e - row * L, spans[:, 3]], 1).tobytes())
                new_rows = sorted_unique(row)  # rows arrive in order: count each row with an entity once
                self.rows_with_entity += int((new_rows > self._last_entity_row).sum())
                self._last_entity_row = max(self._last_entity_row, int(new_rows[-1]))
        if len(triples):
            s = starts[triples[:, 0]] + triples[:, 1]
            first, last = (
                s // L,
                (starts[triples[:, 0]] + np.maximum(triples[:, 2], triples[:, 1] + 1) - 1) // L,
            )
            n = last - first + 1  # rows each triple's evidence touches
            rows = np.repeat(first, n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
            pairs = np.stack([rows, np.repeat(triples[:, 3], n)], 1)
            self.pending = unique_pairs(np.concatenate([self.pending, pairs]))
        # no later document reaches rows before the row the next one starts in
        self._flush_triples(before_row=(starts[-1] + sizes[-1]) // L if len(sizes) else base // L)
        self.buf = np.concatenate([self.buf, stream])
        full = len(self.buf) // L
        block, self.buf = self.buf[: full * L].reshape(full, L).astype(self.dtype), self.buf[full * L :]
        i = 0
        while i < full:
            take = min(full - i, self.rows_per_shard - self.open_rows)
            self.rows.append(block[i : i + take])
            self.open_rows += take
            self.n_rows += take
            i += take
            if self.open_rows == self.rows_per_shard:
                self._flush()

    def _flush_triples(self, before_row: int) -> None:
        """Write the (row, triple) pairs of rows before before_row: sorted, each once."""
        k = int(np.searchsorted(self.pending[:, 0], before_row, side="left"))
        if not k or self._triples_file is None:
            return
        self._triples_file.write(np.ascontiguousarray(self.pending[:k]).tobytes())
        self.n_triples += k
        self.pending = self.pending[k:]

    def _flush(self) -> None:
        if not self.rows or self.out is None:
            return
        name = shard_name(self.split, len(self.shards))
        data = np.concatenate(self.rows).data.cast("B")
        with open(self.out / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        sha = hashlib.sha256(data).hexdigest()
        self.shards.append({"file": name, "num_sequences": self.open_rows, "sha256": sha})
        self.rows, self.open_rows = [], 0

    def _finish_array(self, out: Path, kind: str, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Move the spilled entries of `kind` that fall in complete rows to out/{split}_{kind}.npy, in
        blocks; returns (that array memory-mapped, the few dropped tail entries)."""
        tmp = out / f".{self.split}_{kind}.tmp"
        n = tmp.stat().st_size // (8 * width)
        data = (
            np.memmap(tmp, dtype=np.int64, mode="r", shape=(n, width))
            if n
            else np.zeros((0, width), np.int64)
        )
        keep = int(np.searchsorted(data[:, 0], self.n_rows, side="left"))  # entries are written in row order
        final = out / table_name(self.split, kind)
        with open(final, "wb") as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int64)), "fortran_order": False}
            np.lib.format.write_array_header_1_0(f, {**header, "shape": (keep, width)})
            for start in range(0, keep, 1 << 20):
                f.write(np.ascontiguousarray(data[start : min(keep, start + (1 << 20))]).tobytes())
        tail = np.array(data[keep:])
        del data
        tmp.unlink()
        return np.load(final, mmap_mode="r"), tail

    def finish(self) -> dict:
        if self.out is None or self._spans_file is None or self._triples_file is None:
            raise RuntimeError("Packer.finish writes a split's files: this Packer has no output folder")
        self._flush()
        self._flush_triples(before_row=1 << 62)
        self._spans_file.close()
        self._triples_file.close()
        spans, spans_tail = self._finish_array(self.out, "spans", 4)
        triples, _ = self._finish_array(self.out, "triples", 2)
        self.counts["spans_dropped_tail"] = len(spans_tail)
        return {
            "shards": self.shards,
            "rows": self.n_rows,
            "tokens": self.n_rows * self.L,
            "tokens_dropped_tail": len(self.buf),
            "spans": int(len(spans)),
            "row_triples": int(len(triples)),
            **self.counts,
            "rows_with_entity": self.rows_with_entity - len(np.unique(spans_tail[:, 0])),
        }
