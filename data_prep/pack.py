"""The pack stage: documents to fixed-length rows, entity spans and triples to row coordinates."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np

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
    """Appends documents to a token stream and writes full rows to shard files as they fill."""

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
        self.spans: list[tuple[int, int, int, int]] = []
        self.triples: list[tuple[int, int]] = []
        self.counts = Counter()

    def add(self, ids: np.ndarray, spans: list, triples: list) -> None:
        base = self.n_rows * self.L + len(self.buf)  # global position of this document's first token
        self.buf = np.concatenate([self.buf, ids, [self.eos_id]])
        L = self.L
        for ts, te, ent in spans:
            s, e = base + ts, base + te
            row = s // L
            if (e - 1) // L != row:
                e = (row + 1) * L
                self.counts["spans_clipped"] += 1
            self.spans.append((row, s - row * L, e - row * L, ent))
        for ts, te, t in triples:
            for row in range((base + ts) // L, (base + max(te, ts + 1) - 1) // L + 1):
                self.triples.append((row, t))
        while len(self.buf) >= L:
            self.rows.append(self.buf[:L].astype(self.dtype)[None])
            self.buf = self.buf[L:]
            self.n_rows += 1
            if len(self.rows) == self.rows_per_shard:
                self._flush()

    def _flush(self) -> None:
        if not self.rows or self.out is None:
            return
        name = f"{self.split}_{len(self.shards):05d}.bin"
        chunk = np.concatenate(self.rows)
        chunk.tofile(self.out / name)
        self.shards.append(
            {"file": name, "num_sequences": int(len(chunk)), "sha256": sha256_file(self.out / name)}
        )
        self.rows = []

    def finish(self) -> dict:
        self._flush()
        dropped_tail = len(self.buf)
        spans = np.array([s for s in self.spans if s[0] < self.n_rows], dtype=np.int64).reshape(-1, 4)
        triples = np.array(
            sorted(set(t for t in self.triples if t[0] < self.n_rows)), dtype=np.int64
        ).reshape(-1, 2)
        self.counts["spans_dropped_tail"] = len(self.spans) - len(spans)
        np.save(self.out / f"{self.split}_spans.npy", spans)
        np.save(self.out / f"{self.split}_triples.npy", triples)
        return {
            "shards": self.shards,
            "rows": self.n_rows,
            "tokens": self.n_rows * self.L,
            "tokens_dropped_tail": dropped_tail,
            "spans": int(len(spans)),
            "row_triples": int(len(triples)),
            **self.counts,
            "rows_with_entity": int(len(np.unique(spans[:, 0]))) if len(spans) else 0,
        }
