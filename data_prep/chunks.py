"""Joined chunks in <output>.parts/chunks: the join stage's output, the pack stage's input.

A chunk is one NumPy .npz file read with allow_pickle=False, so a parts folder shared between
machines holds data only, never code (a pickle runs code when loaded):

    ids          uint16/uint32, every document's token ids, concatenated
    doc_info     int64 [docs, 5]: tokens, mentions, split key, piece index, last piece (0/1)
    spans        int64 [n, 4]: document, first token, end token, entity (index into meta.entities)
    triples      int64 [n, 4]: document, first token, end token, triple: >= 0 a KG triple index,
                 < 0 -(k + 1) for meta.new_triples[k] (an extractor's triple, indexed at pack time)
    meta         uint8, UTF-8 JSON: format, records read, rejections by reason, entities, new_triples
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np

from data_prep.kg import Triple
from data_prep.readers import DataError

FORMAT = "sparsexpert-chunk/1"
SUFFIX = ".npz"


def chunk_file(chunk_dir: Path, c: int) -> Path:
    return chunk_dir / f"chunk_{c:07d}{SUFFIX}"


def refuse_pickles(chunk_dir: Path) -> None:
    """Chunks of older versions were pickles: never load them."""
    old = sorted(chunk_dir.glob("*.pkl"))
    if old:
        raise DataError(
            f"{chunk_dir.parent}: holds joined chunks in the old pickle format ({old[0].name}, {len(old)} in all), "
            "which data_prep no longer loads (a pickle can run code); delete the folder "
            f"{chunk_dir.parent} and run again (the join is redone)"
        )


def encode_chunk(docs: list[dict], records: int, rejected: Counter) -> bytes:
    """The .npz bytes of a chunk: `docs` as process_chunk returns them."""
    entities: dict[str, int] = {}
    new_triples: dict[Triple, int] = {}
    spans: list[tuple[int, int, int, int]] = []
    triples: list[tuple[int, int, int, int]] = []
    for d, r in enumerate(docs):
        spans.extend((d, ts, te, entities.setdefault(ent, len(entities))) for ts, te, ent in r["spans"])
        for ts, te, t in r["triples"]:
            if not isinstance(t, int):
                t = -1 - new_triples.setdefault(t, len(new_triples))
            triples.append((d, ts, te, t))
    top = max((int(r["ids"].max()) for r in docs if len(r["ids"])), default=0)
    dtype = np.uint16 if top < 2**16 else np.uint32
    ids = np.concatenate([r["ids"].astype(dtype) for r in docs]) if docs else np.zeros(0, dtype)
    info = [(len(r["ids"]), r["n_mentions"], r["valid_key"], r["part"], int(r["last"])) for r in docs]
    meta = {
        "format": FORMAT,
        "records": records,
        "rejected": dict(rejected),
        "entities": list(entities),
        "new_triples": [[t.head, t.relation, t.tail] for t in new_triples],
    }
    buf = io.BytesIO()
    np.savez(
        buf,
        ids=ids,
        doc_info=np.asarray(info, dtype=np.int64).reshape(-1, 5),
        spans=np.asarray(spans, dtype=np.int64).reshape(-1, 4),
        triples=np.asarray(triples, dtype=np.int64).reshape(-1, 4),
        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
    )
    return buf.getvalue()


def read_chunk(path: Path) -> dict:
    """{"docs": [...], "records", "rejected"}: the documents as process_chunk returned them."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, info, spans, triples = (z[k] for k in ("ids", "doc_info", "spans", "triples"))
            meta = json.loads(z["meta"].tobytes())
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: not a readable joined chunk ({e}); delete it and run the join again") from e
    if meta.get("format") != FORMAT:
        raise DataError(
            f"{path}: chunk format {meta.get('format')!r}, expected {FORMAT}; delete the parts folder"
        )
    entities = meta["entities"]
    new = [Triple(*t) for t in meta["new_triples"]]
    starts = np.concatenate([[0], np.cumsum(info[:, 0])])
    span_bounds = np.searchsorted(spans[:, 0], np.arange(len(info) + 1))
    triple_bounds = np.searchsorted(triples[:, 0], np.arange(len(info) + 1))
    docs = []
    for d, (_, n_mentions, key, part, last) in enumerate(info.tolist()):
        s = spans[span_bounds[d] : span_bounds[d + 1]].tolist()
        t = triples[triple_bounds[d] : triple_bounds[d + 1]].tolist()
        docs.append(
            {
                "ids": ids[starts[d] : starts[d + 1]].astype(np.int64),
                "spans": [(ts, te, entities[e]) for _, ts, te, e in s],
                "triples": [(ts, te, k if k >= 0 else new[-1 - k]) for _, ts, te, k in t],
                "n_mentions": n_mentions,
                "valid_key": key,
                "part": part,
                "last": bool(last),
            }
        )
    return {"docs": docs, "records": meta["records"], "rejected": meta["rejected"]}
