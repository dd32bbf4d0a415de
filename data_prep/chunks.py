"""Joined chunks in <output>.parts/chunks: the join stage's output, the pack stage's input.

A chunk is one NumPy .npz file read with allow_pickle=False, so a parts folder shared between
machines holds data only, never code (a pickle runs code when loaded):

    ids          uint16/uint32, every document's token ids, concatenated
    doc_info     int64 [docs, 5]: tokens, mentions, split key, piece index, last piece (0/1)
    spans        int64 [n, 4]: document, first token, end token, entity (index into meta.entities)
    entity_ids   int64 [len(meta.entities)]: each entity's id in the KG index, -1 where it has none
    triples      int64 [n, 4]: document, first token, end token, triple: >= 0 a KG triple index,
                 < 0 -(k + 1) for meta.new_triples[k] (an extractor's triple, indexed at pack time)
    meta         uint8, UTF-8 JSON: format, records read, rejections by reason, entities, new_triples,
                 new_triple_scores (each new triple's highest confidence in the chunk, null where the
                 extractor gives none), extractor_counts (what the extractor counted)
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.kg import Triple
from data_prep.readers import DataError

FORMAT = "sparsexpert-chunk/2"  # /2 added entity_ids
SUFFIX = ".npz"


def chunk_file(chunk_dir: Path, c: int) -> Path:
    return chunk_dir / f"chunk_{c:07d}{SUFFIX}"


def refuse_old_chunks(chunk_dir: Path) -> None:
    """Chunks of older versions, before the join skips them as done: pickles (never loaded: a pickle
    can run code) and .npz chunks of another FORMAT."""
    old = sorted(chunk_dir.glob("*.pkl"))
    if old:
        raise DataError(
            f"{chunk_dir.parent}: holds joined chunks in the old pickle format ({old[0].name}, {len(old)} in all), "
            "which data_prep no longer loads (a pickle can run code); delete the folder "
            f"{chunk_dir.parent} and run again (the join is redone)"
        )
    first = next(iter(sorted(chunk_dir.glob(f"chunk_*{SUFFIX}"))), None)
    if first is not None:
        read_chunk(first)  # raises, naming the parts folder to delete


def encode_chunk(docs: list[dict], records: int, rejected: Counter) -> bytes:
    """The .npz bytes of a chunk: `docs` as process_chunk returns them."""
    entities: dict[str, int] = {}
    entity_ids: list[int] = []
    new_triples: dict[Triple, int] = {}
    spans: list[tuple[int, int, int, int]] = []
    triples: list[tuple[int, int, int, int]] = []
    scores: dict[Triple, float] = {}
    extractor_counts: Counter[str] = Counter()
    for d, r in enumerate(docs):
        extractor_counts.update(r.get("extractor_counts", {}))
        for t, p in r.get("scores", {}).items():
            scores[t] = max(scores.get(t, 0.0), p)
        for (ts, te, ent), eid in zip(r["spans"], r["entity_ids"]):
            k = entities.setdefault(ent, len(entities))
            if k == len(entity_ids):
                entity_ids.append(eid)
            spans.append((d, ts, te, k))
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
        **({"new_triple_scores": [scores.get(t) for t in new_triples]} if scores else {}),
        **({"extractor_counts": dict(extractor_counts)} if extractor_counts else {}),
    }
    buf = io.BytesIO()
    np.savez(
        buf,
        ids=ids,
        doc_info=np.asarray(info, dtype=np.int64).reshape(-1, 5),
        spans=np.asarray(spans, dtype=np.int64).reshape(-1, 4),
        entity_ids=np.asarray(entity_ids, dtype=np.int64),
        triples=np.asarray(triples, dtype=np.int64).reshape(-1, 4),
        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
    )
    return buf.getvalue()


@dataclass
class Chunk:
    """A joined chunk as arrays (see the module doc); the documents in input order."""

    ids: np.ndarray  # every document's token ids, concatenated
    doc_info: np.ndarray  # [docs, 5]
    spans: np.ndarray  # [n, 4] document, first token, end token, index into entities
    entities: list[str]
    entity_ids: np.ndarray  # [len(entities)]
    triples: np.ndarray  # [n, 4] document, first token, end token, triple (< 0: -(k + 1) for new_triples[k])
    new_triples: list[Triple]
    new_triple_scores: list[float | None]
    extractor_counts: dict[str, int]
    records: int
    rejected: dict


def read_chunk(path: Path) -> Chunk:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            arrays = {k: z[k] for k in ("ids", "doc_info", "spans", "entity_ids", "triples") if k in z}
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: not a readable joined chunk ({e}); delete it and run the join again") from e
    if meta.get("format") != FORMAT:
        raise DataError(
            f"{path}: chunk format {meta.get('format')!r}, expected {FORMAT}; delete the parts folder "
            f"{path.parent.parent} and run again (the join is redone)"
        )
    if len(arrays) != 5:
        raise DataError(f"{path}: arrays missing from a joined chunk; delete it and run the join again")
    if len(arrays["entity_ids"]) != len(meta["entities"]):
        raise DataError(
            f"{path}: entity_ids and meta.entities differ in length; delete it and run the join again"
        )
    return Chunk(
        **arrays,
        entities=meta["entities"],
        new_triples=[Triple(*t) for t in meta["new_triples"]],
        new_triple_scores=meta.get("new_triple_scores", [None] * len(meta["new_triples"])),
        extractor_counts=meta.get("extractor_counts", {}),
        records=meta["records"],
        rejected=meta["rejected"],
    )
