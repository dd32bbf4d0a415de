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
    return np.concatenate(packer.rows) if packer.rows else np.zeros((0, seq_len), dtype), len(packer.buf)


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
        self.rows: list[np.ndarray] = []  # pending rows of the open shard
        self.n_rows = 0
        self.shards: list[dict] = []
        self.counts: Counter[str] = Counter()
        self.pending_triples: dict[int, set[int]] = {}  # row -> triples, for rows a later document may reach
        self.n_triples = 0
        self.rows_with_entity = 0
        self._last_entity_row = -1
        self._spans_file = open(out / f".{split}_spans.tmp", "wb") if out is not None else None
        self._triples_file = open(out / f".{split}_triples.tmp", "wb") if out is not None else None

    def add(self, ids: np.ndarray, spans: list, triples: list, eos: bool = True) -> None:
        """Append a document (eos=False: a piece of one, which the next piece continues)."""
        base = self.n_rows * self.L + len(self.buf)  # global position of this document's first token
        L = self.L
        self._flush_triples(before_row=base // L)  # no later document reaches rows before this one
        self.buf = np.concatenate([self.buf, ids, [self.eos_id] if eos else []])
        rows = []
        for ts, te, ent in spans:
            s, e = base + ts, base + te
            row = s // L
            if (e - 1) // L != row:
                e = (row + 1) * L
                self.counts["spans_clipped"] += 1
            rows.append((row, s - row * L, e - row * L, ent))
        if rows and self._spans_file is not None:
            self._spans_file.write(np.asarray(rows, dtype=np.int64).tobytes())
            for row, *_ in rows:  # rows arrive in order: count each row with an entity once
                if row > self._last_entity_row:
                    self.rows_with_entity += 1
                    self._last_entity_row = row
        for ts, te, t in triples:
            for row in range((base + ts) // L, (base + max(te, ts + 1) - 1) // L + 1):
                self.pending_triples.setdefault(row, set()).add(t)
        while len(self.buf) >= L:
            self.rows.append(self.buf[:L].astype(self.dtype)[None])
            self.buf = self.buf[L:]
            self.n_rows += 1
            if len(self.rows) == self.rows_per_shard:
                self._flush()

    def _flush_triples(self, before_row: int) -> None:
        done = sorted(r for r in self.pending_triples if r < before_row)
        if not done or self._triples_file is None:
            return
        pairs = [(r, t) for r in done for t in sorted(self.pending_triples.pop(r))]
        self._triples_file.write(np.asarray(pairs, dtype=np.int64).tobytes())
        self.n_triples += len(pairs)

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
        self.shards.append({"file": name, "num_sequences": len(self.rows), "sha256": sha})
        self.rows = []

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
