"""The join stage's per-document work, run in a pool of worker processes.

For each document of a chunk: token ids; mentions (MediaWiki links first, then alias matches
where no link is, then an extractor's where neither is); each mention's token span; the KG
triples whose head and tail are mentioned in one sentence (distant supervision) and the
extractor's triples, each with the token span of its evidence.

Where the KG's alias matches are the only mentions (no wiki links, no extractor), a batch of documents
is joined at once in NumPy arrays over their texts joined by NUL characters (_join_arrays): the matches,
sentences, entity pairs, pair lookups and token spans of every document with no Python per mention or per
document. It gives the same chunk, byte for byte, as joining one document at a time (_join), which the
other documents take; tests/test_kg_index.py holds the one as the reference of the other.
"""

from __future__ import annotations

import bisect
import re
import zlib
from collections import Counter

import numpy as np

from data_prep.arrays import native, sorted_unique
from data_prep.chunks import Joined, concat_joined, joined_of
from data_prep.kg_index import SEP, _code_points, char_class, text_classes
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


BATCH_CHARS = 1 << 22
"""Characters of text tokenized (and, on the array path, matched) at a time."""
ARRAYS = True
"""Join documents with alias matches alone in arrays (_join_arrays); False: one at a time (_join), the
reference the array path is tested against."""


def _batches(docs: list[RawDoc], max_chars: int | None = None) -> list[list[RawDoc]]:
    """Consecutive documents, about max_chars characters of text at a time: a tokenizer's batch
    encode holds every id as a Python int (~36 bytes a token), so a batch bounds that memory."""
    max_chars = max_chars or BATCH_CHARS
    batches: list[list[RawDoc]] = [[]]
    n = 0
    for doc in docs:
        if batches[-1] and n + len(doc.text) > max_chars:
            batches.append([])
            n = 0
        batches[-1].append(doc)
        n += len(doc.text)
    return batches


def process_chunk(docs: list[RawDoc]) -> Joined:
    """Stage join for a chunk: token ids, mention token spans, attached triples with token spans, and
    the KG index id of each span's entity (-1: not in the index; the name is sent only then), so that
    the pack stage, in one process, need not search the names. Documents with the KG's alias matches
    and distant supervision only (no wiki links, no extractor) are joined a batch at a time in arrays
    (_join_arrays); the others one at a time (_join)."""
    tok, linker, pairs, extractor = _WORKER["tok"], _WORKER["linker"], _WORKER["pairs"], _WORKER["extractor"]
    index = _WORKER.get("index")
    parts: list[Joined] = []
    for batch in _batches(docs):
        texts = [d.text for d in batch]
        if ARRAYS and index is not None and extractor is None and batch and not any(d.links for d in batch):
            parts.append(_join_arrays(batch, texts, tok.encode(texts), tok, index, linker))
            continue
        out = []
        linked = link_many(linker, texts)
        for doc, text, ids, found in zip(batch, texts, tok.encode(texts), linked):
            joined = _join(doc, text, ids, tok, linker, pairs, extractor, found)
            # the matcher's finds are in entity_id's cache already: a search only for other names
            joined["entity_ids"] = [index.entity_id(name) if index else -1 for _, _, name in joined["spans"]]
            out.append(joined)
        parts.append(joined_of(out))
    result = concat_joined(parts)
    if _WORKER.get("counts"):  # what the extractor counted in this chunk
        result.extractor_counts.update(_WORKER.pop("counts"))
    return result


def _spread(lengths: np.ndarray) -> np.ndarray:
    """For groups of these sizes laid end to end, each element's position within its group."""
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def sentence_spans(
    cp: np.ndarray, offsets: np.ndarray, classes: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """_sentences of every text at once: start and end of each non-empty sentence, in the texts joined
    (code points cp, each text's offset in offsets, len(texts) + 1 of them). A sentence ends before a
    run of whitespace (str.isspace, as the pattern's \\s) that follows ".", "!" or "?". classes: the
    text's kg_index.text_classes, if at hand."""
    compiled = native()
    if compiled is not None:
        cls = char_class(cp, "isspace").astype(np.uint8) << 1 if classes is None else classes
        starts_, ends_ = compiled.sentences(
            np.ascontiguousarray(cp, np.uint32), cls, np.ascontiguousarray(offsets, np.int64)
        )
        return np.frombuffer(starts_, np.int64), np.frombuffer(ends_, np.int64)
    space = char_class(cp, "isspace") if classes is None else (classes & 2).astype(bool)
    n = len(cp)
    punct = (cp == ord(".")) | (cp == ord("!")) | (cp == ord("?"))
    run_start = np.flatnonzero(space[1:] & punct[:-1]) + 1  # whitespace right after the punctuation
    run_end = np.flatnonzero(space & ~np.append(space[1:], False)) + 1  # one past each run of whitespace
    cut_end = run_end[np.searchsorted(run_end, run_start, side="right")]
    starts = np.sort(np.concatenate([offsets[:-1], cut_end]))
    ends = np.sort(np.concatenate([run_start, np.minimum(offsets[1:] - 1, n)]))
    keep = ends > starts
    return starts[keep], ends[keep]


def _join_arrays(
    batch: list[RawDoc], texts: list[str], ids_list: list[np.ndarray], tok, index, matcher
) -> Joined:
    """_join of documents whose mentions are the KG's alias matches alone, all at once in arrays, in
    the coordinates of the texts joined by NUL characters: the same mentions, token spans and attached
    triples, with no Python per mention."""
    offsets = np.cumsum([0, *(len(t) + 1 for t in texts)])
    joined = SEP.join(texts)
    cp = _code_points(joined)
    classes = text_classes(joined)  # str.isalnum and str.isspace of each character, for both
    start, end, entity = matcher.match_joined(texts, joined, cp, classes)
    sent_s, sent_e = sentence_spans(cp, offsets, classes)
    # token spans: each token's characters, in the joined text
    n_tok = np.array([len(x) for x in ids_list], dtype=np.int64)
    tok_off = np.append(0, np.cumsum(n_tok))
    begin, fin = _token_bounds(texts, ids_list, n_tok, tok_off, tok)
    base = np.repeat(offsets[:-1], n_tok)
    doc_len = np.repeat(np.array([len(t) for t in texts], dtype=np.int64), n_tok)
    begin_g, end_g = np.minimum(begin, doc_len) + base, np.minimum(fin, doc_len) + base
    attach = _attach_numpy if native() is None else _attach_compiled
    n_mentions, spans, entity_ids, triples = attach(
        start, end, entity, offsets, sent_s, sent_e, index, begin_g, end_g, tok_off
    )
    info = np.stack(
        [
            n_tok,
            n_mentions,
            np.array([d.key if d.key is not None else zlib.crc32(d.text.encode()) for d in batch], np.int64),
            np.array([d.part for d in batch], np.int64),
            np.array([int(d.last) for d in batch], np.int64),
        ],
        1,
    )
    return Joined(
        list(ids_list),
        info.astype(np.int64),
        spans.astype(np.int64).reshape(-1, 4),
        [None] * len(entity_ids),  # the index names them all
        entity_ids.astype(np.int64),
        triples.astype(np.int64).reshape(-1, 4),
    )


def _attach_compiled(start, end, entity, offsets, sent_s, sent_e, index, begin_g, end_g, tok_off) -> tuple:
    """_attach_numpy in one pass, compiled (data_prep/_native.c attach): the same arrays."""
    compiled = native()
    assert compiled is not None
    keys = index.pair_keys
    out = compiled.attach(
        *(np.ascontiguousarray(x, np.int64) for x in (start, end, entity, offsets, sent_s, sent_e)),
        np.ascontiguousarray(keys.keys, np.int64),
        keys.sample,
        keys.STRIDE,
        np.ascontiguousarray(index.pair_triple, np.int64),
        index.n_entities,
        max(len(index.triples), 1),
        *(np.ascontiguousarray(x, np.int64) for x in (begin_g, end_g, tok_off)),
    )
    n_mentions, spans, entity_ids, triples = (np.frombuffer(x, np.int64) for x in out)
    return n_mentions, spans.reshape(-1, 4), entity_ids, triples.reshape(-1, 4)


def _attach_numpy(start, end, entity, offsets, sent_s, sent_e, index, begin_g, end_g, tok_off) -> tuple:
    """Of a batch's alias matches (start, end, entity; by start, in the texts joined at offsets), with its
    sentences (sent_s, sent_e) and tokens (each token's characters begin_g, end_g; each text's first token
    tok_off): each text's number of mentions; the mentions that cover a token as (text, first token, end
    token, entity rank), the entities (KG index ids) ranked by first mention; the KG triples of each
    ordered pair of distinct entities in a sentence (distant supervision), by sentence then triple, as (text,
    first token, end token, triple) of the sentence. In NumPy; the compiled attach (data_prep/_native.c)
    gives the same."""
    doc = np.searchsorted(offsets, start, side="right") - 1
    n_mentions = np.bincount(doc, minlength=len(offsets) - 1)

    # distant supervision: the KG triples of each ordered pair of distinct entities in a sentence
    k = np.searchsorted(sent_s, start, side="right") - 1
    inside = end <= np.append(sent_e, -1)[k]  # one across a sentence end, or before any (k = -1), is in none
    ne, nt = index.n_entities, max(len(index.triples), 1)
    cell = sorted_unique(k[inside] * ne + entity[inside])  # (sentence, entity), sorted
    sk, ent = cell // ne, cell % ne
    first = np.flatnonzero(np.append(True, sk[1:] != sk[:-1]))
    size = np.diff(np.append(first, len(sk)))
    per = np.repeat(size, size)  # each cell's sentence's number of entities: as many pairs as heads
    a = np.repeat(np.arange(len(sk)), per)
    b = np.repeat(np.repeat(first, size), per) + _spread(per)
    a, b = a[a != b], b[a != b]
    key = ent[a] * ne + ent[b]
    lo, count = index.pair_keys.equal_range(key)
    hit = count > 0
    lo, count = lo[hit], count[hit]
    found = np.repeat(sk[a[hit]], count) * nt + index.pair_triple[np.repeat(lo, count) + _spread(count)]
    found = sorted_unique(found)  # by sentence, then triple
    ev_k, ev_t = found // nt, found % nt

    # token spans: tokens overlapping characters [start, end), the first ending after start up to the last
    # beginning before end
    ts = np.searchsorted(end_g, start, side="right")
    te = np.searchsorted(begin_g, end, side="left")
    keep = te > ts
    m_doc = doc[keep]
    uniq, first_at, inverse = np.unique(entity[keep], return_index=True, return_inverse=True)
    order = np.argsort(first_at, kind="stable")  # entities in order of first mention
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    spans = np.stack([m_doc, ts[keep] - tok_off[m_doc], te[keep] - tok_off[m_doc], rank[inverse]], 1)
    e_doc = np.searchsorted(offsets, sent_s[ev_k], side="right") - 1
    ets = np.searchsorted(end_g, sent_s[ev_k], side="right")
    ete = np.maximum(np.searchsorted(begin_g, sent_e[ev_k], side="left"), ets + 1)
    triples = np.stack([e_doc, ets - tok_off[e_doc], ete - tok_off[e_doc], ev_t], 1)
    return n_mentions, spans, uniq[order], triples


def _token_bounds(texts, ids_list, n_tok, tok_off, tok) -> tuple[np.ndarray, np.ndarray]:
    """tok.char_bounds of every document, laid end to end: from the pieces' lengths at once where the
    tokenizer gives them (SentencePiece, identity normalization), per document where a piece's length is
    unknown or the tokenizer gives none."""
    all_ids = np.concatenate(ids_list) if ids_list else np.zeros(0, np.int64)
    lengths = getattr(tok, "lengths", None)
    if lengths is None:
        pairs = [tok.char_bounds(t, x) for t, x in zip(texts, ids_list)]
        return (
            np.concatenate([p[0] for p in pairs]).astype(np.int64),
            np.concatenate([p[1] for p in pairs]).astype(np.int64),
        )
    piece = lengths[all_ids]
    total = np.cumsum(np.maximum(piece, 0))
    before = np.append(0, total)[tok_off[:-1]]
    fin = total - np.repeat(before, n_tok) - tok.dummy_prefix
    begin = np.maximum(fin - piece, 0)
    for d in np.unique(np.repeat(np.arange(len(ids_list)), n_tok)[piece < 0]).tolist():
        begin[tok_off[d] : tok_off[d + 1]], fin[tok_off[d] : tok_off[d + 1]] = tok.char_bounds(
            texts[d], ids_list[d]
        )
    return begin, fin


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
