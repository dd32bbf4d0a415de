"""Joined chunks in <output>.parts/chunks: the join stage's output, the pack stage's input.

A chunk is one NumPy .npz file read with allow_pickle=False, so a parts folder shared between
machines holds data only, never code (a pickle runs code when loaded):

    ids          uint16/uint32, every document's token ids, concatenated
    doc_info     int64 [docs, 5]: tokens, mentions, split key, piece index, last piece (0/1)
    spans        int32/int64 [n, 4]: document, first token, end token, entity (0.. in order of first mention)
    entity_ids   int64 [entities]: each entity's id in the KG index, -1 where it has none
    triples      int32/int64 [n, 4]: document, first token, end token, triple: >= 0 a KG triple index,
                 < 0 -(k + 1) for meta.new_triples[k] (an extractor's triple, indexed at pack time)
    meta         uint8, UTF-8 JSON: format, records read, rejections by reason, names (of the entities
                 whose entity_ids is -1, in order: the index names the others), new_triples,
                 new_triple_scores (each new triple's highest confidence in the chunk, null where the
                 extractor gives none), extractor_counts (what the extractor counted)

Format /2 held every entity's name (meta.entities), and spans and triples as int64; /3 names only the
entities the KG index lacks (a name the index holds is one the join need not send nor the pack stage read)
and stores spans and triples as int32 where every value fits (half the bytes). /2 chunks still load.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.kg import Triple
from data_prep.readers import DataError

FORMAT = "sparsexpert-chunk/3"  # /2 added entity_ids; /3 names only the entities the index lacks
READ = (FORMAT, "sparsexpert-chunk/2")  # the formats read_chunk loads
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


@dataclass
class Joined:
    """Joined documents as the join stage hands them to encode_chunk: arrays, documents in input order
    (the layout of the module doc, token ids still one array per document)."""

    ids: list[np.ndarray]
    doc_info: np.ndarray  # int64 [docs, 5]
    spans: np.ndarray  # int64 [n, 4]: document, first token, end token, index into entities
    entities: list[str | None]  # in order of first mention: the name where entity_ids is -1, else None
    entity_ids: np.ndarray  # int64 [len(entities)]: KG index id, -1 where none
    triples: np.ndarray  # int64 [n, 4]: document, first token, end token, triple (< 0: new_triples)
    new_triples: list[Triple] = field(default_factory=list)
    scores: dict[Triple, float] = field(default_factory=dict)  # a new triple's highest confidence
    extractor_counts: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.ids)


def joined_of(docs: list[dict]) -> Joined:
    """Joined from documents as join._join returns them, one dict each (the path with wiki links or an
    extractor)."""
    entities: dict[str | int, int] = {}  # an entity's index id, or its name where it has none -> 0..
    names: list[str | None] = []
    entity_ids: list[int] = []
    new_triples: dict[Triple, int] = {}
    spans: list[tuple[int, int, int, int]] = []
    triples: list[tuple[int, int, int, int]] = []
    scores: dict[Triple, float] = {}
    for d, r in enumerate(docs):
        for t, p in r.get("scores", {}).items():
            scores[t] = max(scores.get(t, 0.0), p)
        for (ts, te, ent), eid in zip(r["spans"], r["entity_ids"]):
            k = entities.setdefault(ent if eid < 0 else eid, len(entities))
            if k == len(entity_ids):
                entity_ids.append(eid)
                names.append(ent if eid < 0 else None)
            spans.append((d, ts, te, k))
        for ts, te, t in r["triples"]:
            if not isinstance(t, int):
                t = -1 - new_triples.setdefault(t, len(new_triples))
            triples.append((d, ts, te, t))
    info = [(len(r["ids"]), r["n_mentions"], r["valid_key"], r["part"], int(r["last"])) for r in docs]
    return Joined(
        [r["ids"] for r in docs],
        np.asarray(info, dtype=np.int64).reshape(-1, 5),
        np.asarray(spans, dtype=np.int64).reshape(-1, 4),
        names,
        np.asarray(entity_ids, dtype=np.int64),
        np.asarray(triples, dtype=np.int64).reshape(-1, 4),
        list(new_triples),
        scores,
    )


def concat_joined(parts: list[Joined]) -> Joined:
    """Consecutive Joined as one: documents renumbered, entities and new triples merged in order of
    first mention (what one Joined of all the documents would hold)."""
    if len(parts) == 1:
        return parts[0]
    entities: dict[str | int, int] = {}  # as in joined_of
    names: list[str | None] = []
    entity_ids: list[int] = []
    new_triples: dict[Triple, int] = {}
    out = Joined(
        [],
        np.zeros((0, 5), np.int64),
        np.zeros((0, 4), np.int64),
        [],
        np.zeros(0, np.int64),
        np.zeros((0, 4), np.int64),
    )
    spans, triples, docs = [], [], 0
    for part in parts:
        where = np.zeros(len(part.entities), np.int64)
        for k, (name, eid) in enumerate(zip(part.entities, part.entity_ids.tolist())):
            where[k] = entities.setdefault(eid if eid >= 0 else str(name), len(entities))
            if where[k] == len(entity_ids):
                entity_ids.append(eid)
                names.append(name)
        new = np.array([-1 - new_triples.setdefault(t, len(new_triples)) for t in part.new_triples], np.int64)
        s, t = part.spans.copy(), part.triples.copy()
        s[:, 0] += docs
        s[:, 3] = where[s[:, 3]]
        t[:, 0] += docs
        mine = t[:, 3] < 0
        t[mine, 3] = new[-1 - t[mine, 3]]
        spans.append(s)
        triples.append(t)
        docs += len(part)
        out.ids += part.ids
        for tr, p in part.scores.items():
            out.scores[tr] = max(out.scores.get(tr, 0.0), p)
        out.extractor_counts.update(part.extractor_counts)
    out.doc_info = np.concatenate([p.doc_info for p in parts])
    out.spans, out.triples = np.concatenate(spans), np.concatenate(triples)
    out.entities, out.entity_ids = names, np.asarray(entity_ids, dtype=np.int64)
    out.new_triples = list(new_triples)
    return out


def _narrow(a: np.ndarray) -> np.ndarray:
    """int32 where every value fits, else int64: half the bytes to checksum, write and read for a chunk's spans
    and triples, which the KG's mentions make most of a chunk."""
    fits = not len(a) or (int(a.min()) >= -(2**31) and int(a.max()) < 2**31)
    return a.astype(np.int32) if fits else a


def encode_chunk(joined: Joined, records: int, rejected: Counter) -> bytes:
    """The .npz bytes of a chunk of joined documents."""
    ids_of = joined.ids
    top = max((int(x.max()) for x in ids_of if len(x)), default=0)
    dtype = np.uint16 if top < 2**16 else np.uint32
    ids = np.concatenate([x.astype(dtype) for x in ids_of]) if ids_of else np.zeros(0, dtype)
    news = joined.new_triples
    meta = {
        "format": FORMAT,
        "records": records,
        "rejected": dict(rejected),
        "names": [n for n, i in zip(joined.entities, joined.entity_ids.tolist()) if i < 0],
        "new_triples": [[t.head, t.relation, t.tail] for t in news],
        **({"new_triple_scores": [joined.scores.get(t) for t in news]} if joined.scores else {}),
        **({"extractor_counts": dict(joined.extractor_counts)} if joined.extractor_counts else {}),
    }
    buf = io.BytesIO()
    np.savez(
        buf,
        ids=ids,
        doc_info=joined.doc_info,
        spans=_narrow(joined.spans),
        entity_ids=joined.entity_ids,
        triples=_narrow(joined.triples),
        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
    )
    return buf.getvalue()


@dataclass
class Chunk:
    """A joined chunk as arrays (see the module doc); the documents in input order."""

    ids: np.ndarray  # every document's token ids, concatenated
    doc_info: np.ndarray  # [docs, 5]
    spans: np.ndarray  # [n, 4] document, first token, end token, index into entities
    entities: list[str | None]  # the name where entity_ids is -1; None where the KG index names it
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
        for k in ("spans", "triples"):  # int32 where the values fit (format /3)
            if k in arrays:
                arrays[k] = arrays[k].astype(np.int64, copy=False)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: not a readable joined chunk ({e}); delete it and run the join again") from e
    if meta.get("format") not in READ:
        raise DataError(
            f"{path}: chunk format {meta.get('format')!r}, expected {FORMAT}; delete the parts folder "
            f"{path.parent.parent} and run again (the join is redone)"
        )
    if len(arrays) != 5:
        raise DataError(f"{path}: arrays missing from a joined chunk; delete it and run the join again")
    eid = arrays["entity_ids"]
    if meta["format"] == FORMAT:  # names of the entities the index lacks
        entities: list[str | None] = [None] * len(eid)
        unindexed, names = np.flatnonzero(eid < 0).tolist(), meta["names"]
    else:  # /2: every entity's name
        entities, unindexed, names = list(meta["entities"]), list(range(len(eid))), meta["entities"]
    if len(unindexed) != len(names):
        raise DataError(
            f"{path}: entity_ids and the entity names in meta differ in number; delete it and run the join again"
        )
    for k, name in zip(unindexed, names):
        entities[k] = name
    return Chunk(
        **arrays,
        entities=entities,
        new_triples=[Triple(*t) for t in meta["new_triples"]],
        new_triple_scores=meta.get("new_triple_scores", [None] * len(meta["new_triples"])),
        extractor_counts=meta.get("extractor_counts", {}),
        records=meta["records"],
        rejected=meta["rejected"],
    )
