"""The join stage's per-document work, run in a pool of worker processes.

For each document of a chunk: token ids; mentions (MediaWiki links first, then alias matches
where no link is, then an extractor's where neither is); each mention's token span; the KG
triples whose head and tail are mentioned in one sentence (distant supervision) and the
extractor's triples, each with the token span of its evidence.
"""

from __future__ import annotations

import bisect
import re
import zlib
from collections import Counter

import numpy as np

from data_prep.readers import RawDoc
from data_prep.tokenizer import load_tokenizer

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

_WORKER: dict = {}


def init_worker(
    tokenizer: str, kg_index: str | None, extractor: tuple[str, str | None] | None = None
) -> None:
    """A worker's state: the tokenizer, the KG index memory-mapped (every worker reads the same pages,
    so its memory does not grow with the KG), the extractor."""
    from data_prep.extractors import load_extractor
    from data_prep.kg_index import KGIndex, PairIndex

    index = KGIndex.open(kg_index) if kg_index else None
    _WORKER.update(
        tok=load_tokenizer(tokenizer),
        index=index,
        linker=index.matcher() if index else None,
        pairs=PairIndex(index) if index else {},
        extractor=load_extractor(*extractor) if extractor else None,
    )


def _sentences(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [(s, e) for s, e in spans if e > s]


def find_mentions(
    doc: RawDoc, linker, extractor, linked: list | None = None
) -> tuple[list[tuple[int, int, str]], list]:
    """Stage link: the document's mentions as sorted character spans (start, end, entity) - wiki
    links first, alias matches where no link is, then an extractor's where neither is - and the
    extractor's triples as (start, end, Triple), or (start, end, Triple, score) where it gives scores. linked: the linker's matches, if already found (a
    batch of documents is matched in one pass)."""
    mentions = [(link.start, link.end, link.target) for link in doc.links]
    if linker is None and extractor is None:
        return mentions, []
    taken = np.zeros(len(doc.text) + 1, dtype=bool)
    for s, e, _ in mentions:
        taken[s:e] = True
    if linker is not None:
        for m in linked if linked is not None else linker.find(doc.text):
            if not taken[m.start : m.end].any():
                mentions.append((m.start, m.end, m.entity))
                taken[m.start : m.end] = True
        mentions.sort()
    extracted = []
    if extractor is not None:
        from data_prep.kg import Mention

        found = extractor.extract(doc.text, [Mention(*m) for m in mentions])
        mentions = sorted(mentions + [tuple(m) for m in found.mentions if not taken[m.start : m.end].any()])
        extracted = found.triples
        if found.counts:
            _WORKER.setdefault("counts", Counter()).update(found.counts)
        if found.scores:  # the extractor's confidence of each triple: kept with its evidence
            extracted = [(s, e, t, p) for (s, e, t), p in zip(found.triples, found.scores)]
    return mentions, extracted


def distant_supervision(text: str, mentions: list[tuple[int, int, str]], pairs) -> list[tuple[int, int, int]]:
    """Stage extract: (sentence start, sentence end, KG triple index) for every KG triple whose head
    and tail are both mentioned in the sentence. pairs: (head, tail) -> triple indices (a dict, or
    kg_index.PairIndex)."""
    if not pairs or len({m[2] for m in mentions}) < 2:
        return []
    sents = _sentences(text)
    s_start = [a for a, _ in sents]
    by_sentence: dict[int, set[str]] = {}
    for start, end, entity in mentions:
        k = bisect.bisect_right(s_start, start) - 1
        if end <= sents[k][1]:  # a mention across a sentence end belongs to none
            by_sentence.setdefault(k, set()).add(entity)
    asked = [(k, a, b) for k, ents in sorted(by_sentence.items()) for a in ents for b in ents if a != b]
    if hasattr(pairs, "get_many"):  # the KG index: every pair of the document in one lookup
        answers = pairs.get_many([(a, b) for _, a, b in asked])
    else:
        answers = [pairs.get((a, b), ()) for _, a, b in asked]
    found: dict[int, set[int]] = {}
    for (k, _, _), triples in zip(asked, answers):
        if len(triples):
            found.setdefault(k, set()).update(triples)
    return [(sents[k][0], sents[k][1], t) for k in sorted(found) for t in sorted(found[k])]


def _batches(docs: list[RawDoc], max_chars: int = 1 << 22) -> list[list[RawDoc]]:
    """Consecutive documents, about max_chars characters of text at a time: a tokenizer's batch
    encode holds every id as a Python int (~36 bytes a token), so a batch bounds that memory."""
    batches: list[list[RawDoc]] = [[]]
    n = 0
    for doc in docs:
        if batches[-1] and n + len(doc.text) > max_chars:
            batches.append([])
            n = 0
        batches[-1].append(doc)
        n += len(doc.text)
    return batches


def process_chunk(docs: list[RawDoc]) -> list[dict]:
    """Stage join for a chunk: token ids, mention token spans, attached triples with token spans, and
    the KG index id of each span's entity (-1: not in the index), so that the pack stage, in one
    process, need not search the names."""
    tok, linker, pairs, extractor = _WORKER["tok"], _WORKER["linker"], _WORKER["pairs"], _WORKER["extractor"]
    index = _WORKER.get("index")
    out: list[dict] = []
    for batch in _batches(docs):
        texts = [d.text for d in batch]
        linked = link_many(linker, texts)
        for doc, text, ids, found in zip(batch, texts, tok.encode(texts), linked):
            joined = _join(doc, text, ids, tok, linker, pairs, extractor, found)
            # the matcher's finds are in entity_id's cache already: a search only for other names
            joined["entity_ids"] = [index.entity_id(name) if index else -1 for _, _, name in joined["spans"]]
            out.append(joined)
    if out and _WORKER.get("counts"):  # the extractor's counts of this chunk ride on its first document
        out[0]["extractor_counts"] = dict(_WORKER.pop("counts"))
    return out


def link_many(linker, texts: list[str], per_pass: int = 1 << 20) -> list:
    """The linker's matches of each text, a pass over about per_pass characters at a time."""
    if linker is None or not hasattr(linker, "find_many"):
        return [None] * len(texts)
    out: list = []
    start = size = 0
    for i, t in enumerate(texts):
        size += len(t)
        if size >= per_pass or i == len(texts) - 1:
            out += linker.find_many(texts[start : i + 1])
            start, size = i + 1, 0
    return out


def _join(doc: RawDoc, text: str, ids: np.ndarray, tok, linker, pairs, extractor, linked=None) -> dict:
    """One document: its mentions as token spans, the triples attached with their token spans."""
    mentions, extracted = find_mentions(doc, linker, extractor, linked)
    # (char start, char end, triple): KG triples by index, an extractor's as Triple (the main
    # process gives new ones an index)
    scores: dict = {}
    for x in extracted:
        if len(x) == 4:
            scores[x[2]] = max(scores.get(x[2], 0.0), x[3])
    evidence = distant_supervision(text, mentions, pairs) + [x[:3] for x in extracted]
    spans, attached = [], []
    if mentions or evidence:
        begin, end = tok.char_bounds(text, ids)
        # Tokens overlapping characters [start, end): first ending after start, up to the last beginning before end.
        if mentions:
            m = np.array([(s, e) for s, e, _ in mentions], dtype=np.int64)
            t_start, t_end = (
                np.searchsorted(end, m[:, 0], side="right"),
                np.searchsorted(begin, m[:, 1], side="left"),
            )
            spans = [(int(a), int(b), x[2]) for a, b, x in zip(t_start, t_end, mentions) if b > a]
        if evidence:
            ev = np.array([(cs, ce) for cs, ce, _ in evidence], dtype=np.int64)
            ts_all = np.searchsorted(end, ev[:, 0], side="right").tolist()
            te_all = np.searchsorted(begin, ev[:, 1], side="left").tolist()
            attached = [(ts, max(te, ts + 1), x[2]) for ts, te, x in zip(ts_all, te_all, evidence)]
    return {
        "ids": ids,
        "spans": spans,
        "triples": attached,
        "n_mentions": len(mentions),
        "scores": scores,  # extracted triple -> its highest confidence in the document
        "valid_key": doc.key if doc.key is not None else zlib.crc32(doc.text.encode()),
        "part": doc.part,
        "last": doc.last,
    }
