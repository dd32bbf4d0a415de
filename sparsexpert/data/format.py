"""The packed dataset format, in one place: what `python -m data_prep` writes and `sparsexpert.data`
reads (both import this module).

A dataset folder holds:

    tokenizer.model              SentencePiece model (or tokenizer/, a Hugging Face tokenizer folder)
    {split}_00000.bin ...        uint16/uint32 rows of seq_len token ids (split: train, valid)
    {split}_spans.npy            int64 [n, 4]: row, first token, end token (exclusive), entity index
    {split}_triples.npy          int64 [n, 2]: row, triple index (triples attached to the row's sentences)
    entities.tsv                 index<TAB>id<TAB>surface: the entity's first alias, or where it has
                                 none (met in wiki links only) its id with underscores as spaces
    relations.tsv                index<TAB>id
    triples.tsv                  the whole triple vocabulary (KG triples, then the extractor's new ones),
                                 attached or not: index, head, relation, tail, times attached (may be
                                 0), source (kg|extracted), and for an extracted triple whose
                                 extractor scores them its highest confidence and the extractor's
                                 run: the pretraining triple objective and
                                 K-BERT-style injection use the whole KG, not only attached triples
    kg_triples.npy               int64 [triples, 3]: head, relation, tail (entity and relation indices) of
                                 every triple index of triples.tsv, for readers that must not parse a
                                 KG of millions of lines (absent in datasets written before it; readers
                                 then parse triples.tsv)
    stats.json                   the stats stage's figures
    manifest.json                written last: format, config, inputs and hashes, counts, the tokenizer,
                                 seq_len and dtype, per split its shards with their sha256
    .verified.json               written by the reader: the shards already checked against the manifest

`FORMAT` names the version; a reader refuses a newer one (and a folder whose manifest is not ours)
with the fix, instead of misreading it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

import numpy as np

FORMAT_PREFIX = "sparsexpert-packed/"
VERSION = 3
FORMAT = f"{FORMAT_PREFIX}{VERSION}"
"""The format data_prep writes, in the manifest's "format"."""
MANIFEST = "manifest.json"
VERIFIED = ".verified.json"
"""Beside the shards: the ones already checked against the manifest, by size and mtime."""
SPLITS = ("train", "valid")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def table_name(split: str, kind: str) -> str:
    """The per-row table of a split: kind "spans" (mentions) or "triples" (attached triples)."""
    return f"{split}_{kind}.npy"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


class TokenizerEntry(TypedDict):
    """The manifest's "tokenizer"."""

    file: str
    type: str
    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int
    unk_id: int
    mask_id: int
    sha256: str


class Manifest(TypedDict, total=False):
    """The fields of manifest.json that readers rely on (data_prep writes more: counts and provenance)."""

    format: str
    config: dict[str, Any]
    tokenizer: TokenizerEntry
    seq_len: int
    dtype: str
    entities: int
    relations: int
    splits: dict[str, Any]


def is_dataset(folder: str | Path) -> bool:
    """Whether `folder` holds a finished dataset (its manifest is written last)."""
    return (Path(folder) / MANIFEST).is_file()


def check_format(manifest: dict[str, Any], path: str | Path) -> None:
    """Refuse a manifest that is not of this format or is newer than this reader, naming the fix; an
    older version of ours passes here (what it lacks is refused where it is needed)."""
    fmt = manifest.get("format")
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_PREFIX):
        raise ValueError(
            f"{path}: format={fmt!r} is not a dataset written by data_prep ({FORMAT_PREFIX}*); prepare it "
            "with `python -m data_prep run ...`"
        )
    version = fmt[len(FORMAT_PREFIX) :]
    if not version.isdigit() or int(version) > VERSION:
        raise ValueError(
            f"{path}: format {fmt!r} is newer than this sparsexpert reads ({FORMAT}); upgrade sparsexpert, "
            "or prepare the dataset again with this version's data_prep"
        )
