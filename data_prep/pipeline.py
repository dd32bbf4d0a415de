"""Text to packed token shards: ingest, train a SentencePiece tokenizer, encode, pack, write.

This is the text-only core of data_prep (entity linking and the KG join build on it). Output
folder layout, read by `sparsexpert.data.shards.PackedDataset`:

    tokenizer.model            SentencePiece model
    train_00000.bin ...        uint16/uint32 rows of `seq_len` token ids, C order
    valid_00000.bin ...
    manifest.json              written last: config, inputs and their hashes, counts, shard checksums

Documents are packed back to back, each followed by EOS (the document boundary); the tail that
does not fill a last row is dropped and counted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import unicodedata
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "sparsexpert-packed/1"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 3, 0, 1, 2
SPECIAL_SYMBOLS = ["<mask>"]


@dataclass
class TextPrepConfig:
    """How text becomes shards."""

    vocab_size: int = 1024
    """SentencePiece vocabulary size."""
    tokenizer_type: str = "bpe"
    """SentencePiece model type: "bpe" or "unigram"."""
    seq_len: int = 128
    """Tokens per packed row."""
    valid_fraction: float = 0.05
    """Share of documents (chosen by content hash, so stable) held out for validation."""
    rows_per_shard: int = 16384
    """Rows per shard file."""
    threads: int = 2
    """Threads for tokenizer training and encoding."""


class DataError(ValueError):
    """Bad input: the message names the file, the line and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ingest(paths: list[Path]) -> tuple[list[str], Counter, int]:
    """Read one document a line; NFC-normalize; drop empty and exact-duplicate documents.
    Returns the accepted documents, rejected counts by reason, and the number of documents read."""
    docs, rejected, seen, n_in = [], Counter(), set(), 0
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no such corpus file; check the path")
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                n_in += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: invalid UTF-8 at byte {e.start}; re-encode the file as UTF-8"
                    ) from e
                text = unicodedata.normalize("NFC", line).strip()
                if not text:
                    rejected["empty"] += 1
                    continue
                key = hashlib.sha1(text.encode()).digest()
                if key in seen:
                    rejected["duplicate"] += 1
                    continue
                seen.add(key)
                docs.append(text)
    return docs, rejected, n_in


def train_tokenizer(docs: list[str], out_file: Path, cfg: TextPrepConfig) -> Path:
    """Train SentencePiece on the documents in memory (so the model records no temporary paths)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(docs),
            model_writer=model,
            vocab_size=cfg.vocab_size,
            model_type=cfg.tokenizer_type,
            character_coverage=1.0,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            user_defined_symbols=SPECIAL_SYMBOLS,
            num_threads=cfg.threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        if "Vocabulary size" in str(e):
            raise DataError(f"tokenizer: {e}; lower vocab_size for this corpus") from e
        raise
    out_file.write_bytes(model.getvalue())
    return out_file


def _is_valid(doc: str, fraction: float) -> bool:
    return zlib.crc32(doc.encode()) % 10_000 < fraction * 10_000


def _write_split(rows: np.ndarray, out: Path, split: str, rows_per_shard: int) -> list[dict]:
    shards = []
    for i, start in enumerate(range(0, len(rows), rows_per_shard)):
        name = f"{split}_{i:05d}.bin"
        chunk = np.ascontiguousarray(rows[start : start + rows_per_shard])
        chunk.tofile(out / name)
        shards.append({"file": name, "num_sequences": int(len(chunk)), "sha256": _sha256(out / name)})
    return shards


def pack(token_lists: list[list[int]], seq_len: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Concatenate documents (each + EOS) and cut into rows; returns rows and dropped tail tokens."""
    flat = np.fromiter((t for ids in token_lists for t in (*ids, EOS_ID)), dtype=np.int64)
    n_rows = len(flat) // seq_len
    return flat[: n_rows * seq_len].astype(dtype).reshape(n_rows, seq_len), int(len(flat) - n_rows * seq_len)


def prepare_text(
    corpus: list[str | Path], out_dir: str | Path, cfg: TextPrepConfig | None = None, log=print
) -> dict:
    """Run the pipeline; the output folder appears complete or not at all (built aside, then renamed)."""
    import sentencepiece as spm

    cfg = cfg or TextPrepConfig()
    out_dir = Path(out_dir)
    paths = [Path(p) for p in corpus]
    t0 = time.time()
    docs, rejected, n_in = ingest(paths)
    if not docs:
        raise DataError(
            f"{', '.join(map(str, paths))}: no usable documents ({n_in} read, rejected {dict(rejected)})"
        )
    log(f"data_prep: ingested {n_in} documents, kept {len(docs)}, rejected {dict(rejected)}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model_path = train_tokenizer(docs, work / "tokenizer.model", cfg)
        sp = spm.SentencePieceProcessor(model_file=str(model_path))
        vocab = sp.get_piece_size()
        dtype = np.dtype(np.uint16 if vocab < 2**16 else np.uint32)
        ids = sp.encode(docs, num_threads=cfg.threads)
        split_of = [("valid" if _is_valid(d, cfg.valid_fraction) else "train") for d in docs]
        manifest_splits, tokens, dropped = {}, 0, 0
        for split in ("train", "valid"):
            lists = [x for x, s in zip(ids, split_of) if s == split]
            rows, tail = pack(lists, cfg.seq_len, dtype)
            tokens += int(rows.size)
            dropped += tail
            manifest_splits[split] = {
                "documents": len(lists),
                "shards": _write_split(rows, work, split, cfg.rows_per_shard),
            }
        if not manifest_splits["train"]["shards"]:
            raise DataError(
                f"{paths[0]}: the corpus is too small to fill one training row of {cfg.seq_len} tokens"
            )
        manifest = {
            "format": FORMAT,
            "config": asdict(cfg),
            "inputs": [{"path": str(p), "sha256": _sha256(p)} for p in paths],
            "tokenizer": {
                "file": "tokenizer.model",
                "type": "sentencepiece",
                "vocab_size": vocab,
                "pad_id": PAD_ID,
                "eos_id": EOS_ID,
                "bos_id": BOS_ID,
                "unk_id": UNK_ID,
                "mask_id": sp.piece_to_id("<mask>"),
                "sha256": _sha256(model_path),
            },
            "seq_len": cfg.seq_len,
            "dtype": dtype.name,
            "documents_in": n_in,
            "documents_written": len(docs),
            "documents_rejected": dict(rejected),
            "tokens": tokens,
            "tokens_dropped_tail": dropped,
            "splits": manifest_splits,
        }
        tmp = work / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.rename(work / MANIFEST)
        if (out_dir / MANIFEST).is_file():
            log(f"data_prep: {out_dir} was completed meanwhile by another process; keeping it")
        else:
            if out_dir.exists():  # an earlier run died before writing its manifest
                shutil.rmtree(out_dir)
            work.rename(out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work)
    log(
        f"data_prep: {tokens} tokens in {sum(len(s['shards']) for s in manifest_splits.values())} shards "
        f"-> {out_dir} ({time.time() - t0:.1f}s)"
    )
    return manifest


def prepare_example(out_dir: str | Path, cfg: TextPrepConfig | None = None, log=print) -> dict:
    """Generate the built-in knowledge world and prepare it into shards in out_dir."""
    from data_prep.example_world import write_world

    out_dir = Path(out_dir)
    raw = out_dir.parent / f"{out_dir.name}_raw"
    paths = write_world(raw)
    return prepare_text([paths["corpus"]], out_dir, cfg, log=log)
