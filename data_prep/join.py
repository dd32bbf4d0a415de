"""The join stage's per-document work, run in a pool of worker processes.

For each document of a chunk: token ids; mentions (MediaWiki links first, then alias matches
where no link is, then an extractor's where neither is); each mention's token span; the KG
triples whose head and tail are mentioned in one sentence (distant supervision) and the
extractor's triples, each with the token span of its evidence.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from data_prep.readers import RawDoc
from data_prep.tokenizer import load_tokenizer

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

_WORKER: dict = {}


def init_worker(
    tokenizer: str,
    aliases: dict | None,
    case: str,
    pair_index: dict | None,
    extractor: tuple[str, str | None] | None = None,
) -> None:
    from data_prep.extractors import load_extractor
    from data_prep.kg import Linker

    _WORKER.update(
        tok=load_tokenizer(tokenizer),
        linker=Linker(aliases, case) if aliases else None,
        pairs=pair_index or {},
        extractor=load_extractor(*extractor) if extractor else None,
    )


def _sentences(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [(s, e) for s, e in spans if e > s]


def process_chunk(docs: list[RawDoc]) -> list[dict]:
    tok, linker, pairs = _WORKER["tok"], _WORKER["linker"], _WORKER["pairs"]
    texts = [d.text for d in docs]
    out = []
    for doc, text, ids in zip(docs, texts, tok.encode(texts)):
        # Mentions: wiki links first; alias matches only where no link is.
        mentions = [(link.start, link.end, link.target) for link in doc.links]
        if linker is not None:
            taken = np.zeros(len(doc.text) + 1, dtype=bool)
            for s, e, _ in mentions:
                taken[s:e] = True
            mentions += [
                (m.start, m.end, m.entity) for m in linker.find(doc.text) if not taken[m.start : m.end].any()
            ]
            mentions.sort()
        extracted = []
        if _WORKER["extractor"] is not None:
            from data_prep.kg import Mention

            found = _WORKER["extractor"].extract(doc.text, [Mention(*m) for m in mentions])
            taken = np.zeros(len(doc.text) + 1, dtype=bool)
            for s, e, _ in mentions:
                taken[s:e] = True
            mentions = sorted(
                mentions + [tuple(m) for m in found.mentions if not taken[m.start : m.end].any()]
            )
            extracted = found.triples
        spans, attached = [], []
        if mentions:
            begin, end = tok.char_bounds(text, ids)
            m_start = np.fromiter((m[0] for m in mentions), dtype=np.int64, count=len(mentions))
            m_end = np.fromiter((m[1] for m in mentions), dtype=np.int64, count=len(mentions))
            # Tokens overlapping characters [start, end): first ending after start, up to the last beginning before end.
            t_start, t_end = (
                np.searchsorted(end, m_start, side="right"),
                np.searchsorted(begin, m_end, side="left"),
            )
            spans = [(int(a), int(b), m[2]) for a, b, m in zip(t_start, t_end, mentions) if b > a]
            if pairs and len({m[2] for m in mentions}) > 1:
                sents = _sentences(doc.text)
                s_start = np.array([a for a, _ in sents], dtype=np.int64)
                s_end = np.array([b for _, b in sents], dtype=np.int64)
                sent_of = np.searchsorted(s_start, m_start, side="right") - 1
                by_sentence: dict[int, set[str]] = {}
                for k, m in enumerate(mentions):
                    if m_end[k] <= s_end[sent_of[k]]:  # mentions across a sentence end belong to none
                        by_sentence.setdefault(int(sent_of[k]), set()).add(m[2])
                for k, ents in sorted(by_sentence.items()):
                    if len(ents) < 2:
                        continue
                    found = {t for a in ents for b in ents if a != b for t in pairs.get((a, b), ())}
                    if found:
                        ts = int(np.searchsorted(end, s_start[k], side="right"))
                        te = int(np.searchsorted(begin, s_end[k], side="left"))
                        attached.extend((ts, te, t) for t in sorted(found))
        if extracted:  # (char start, char end, Triple): the main process gives new triples an index
            if not mentions:
                begin, end = tok.char_bounds(text, ids)
            for cs, ce, triple in extracted:
                ts = int(np.searchsorted(end, cs, side="right"))
                te = int(np.searchsorted(begin, ce, side="left"))
                attached.append((ts, max(te, ts + 1), triple))
        out.append(
            {
                "ids": ids,
                "spans": spans,
                "triples": attached,
                "n_mentions": len(mentions),
                "valid_key": zlib.crc32(doc.text.encode()),
            }
        )
    return out
