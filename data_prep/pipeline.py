"""Corpus (+ knowledge graph) to packed, knowledge-joined token shards.

Stages: ingest (read, NFC-normalize, drop empty and exact-duplicate documents, each rejection
counted by reason) -> tokenizer (train SentencePiece, or load one) -> link (Aho-Corasick over the
KG aliases; MediaWiki links take precedence) -> extract (distant supervision: a KG triple is
attached to a sentence that mentions both its head and its tail) -> join (token ids, mention
spans in token positions, attached triple ids) -> pack (rows of seq_len tokens, documents
separated by EOS; a span crossing a row boundary is clipped to its first row and counted) ->
write shards and, last, manifest.json.

Output folder, read by `sparsexpert.data.shards.PackedDataset`:

    tokenizer.model              SentencePiece model
    {split}_00000.bin ...        uint16/uint32 rows of seq_len token ids (split: train, valid)
    {split}_spans.npy            int64 [n, 4]: row, first token, end token (exclusive), entity index
    {split}_triples.npy          int64 [n, 2]: row, triple index (triples attached to the row's sentences)
    entities.tsv relations.tsv   index<TAB>id vocabularies
    triples.tsv                  the attached triples: index, head, relation, tail, times attached
    stats.json                   the stats stage's figures
    manifest.json                written last: config, inputs and hashes, counts, shard checksums

The same inputs and config give byte-identical output for any number of workers: documents are
processed in chunks by a pool but consumed in input order.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import pickle
import re
import shutil
import sys
import tempfile
import time
import unicodedata
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep.readers import DataError, read_corpus
from data_prep.tokenizer import find_tokenizer, load_tokenizer

__all__ = ["DataError", "PrepConfig", "TextPrepConfig", "prepare", "prepare_example", "prepare_text", "pack"]

MANIFEST = "manifest.json"
FORMAT = "sparsexpert-packed/2"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 3, 0, 1, 2
SPECIAL_SYMBOLS = ["<mask>"]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class PrepConfig:
    """One data_prep run."""

    corpus: list[str] = field(default_factory=list)
    """Corpus files: .txt (one document a line), .jsonl, .parquet, MediaWiki .xml / .xml.bz2."""
    output: str = ""
    """Dataset folder to write."""
    kg: str | None = None
    """Knowledge-graph triples (.tsv, .nt, .jsonl). None: no linking beyond wiki links, no triples."""
    aliases: str | None = None
    """entity_id<TAB>surface form file. None: entity names (underscores as spaces) are the aliases."""
    tokenizer: str | None = None
    """An existing SentencePiece .model to use instead of training one."""
    vocab_size: int = 1024
    """SentencePiece vocabulary size when training."""
    tokenizer_type: str = "bpe"
    """SentencePiece model type: "bpe" or "unigram"."""
    seq_len: int = 128
    """Tokens per packed row."""
    valid_fraction: float = 0.05
    """Share of documents (chosen by content hash, so stable) held out for validation."""
    rows_per_shard: int = 16384
    """Rows per shard file."""
    workers: int = 1
    """Processes for linking, extraction and encoding; output does not depend on it."""
    text_field: str = "text"
    """Field (JSONL) or column (Parquet) holding the text."""
    case: str = "ignore"
    """Alias matching: "ignore" case or "exact"."""
    on_error: str = "fail"
    """Bad input records: "fail" with file:line, or "skip" and count them."""
    chunk_docs: int = 256
    """Documents per unit of work: the grain of parallelism, of resuming and of scale-out."""
    extractor: str | None = None
    """A pluggable extractor `module:Class` adding mentions and triples (see data_prep/extractors.py)."""
    extractor_args: str | None = None
    """JSON file of keyword arguments for the extractor."""
    num_shards: int = 1
    """Machines sharing the join stage (a Slurm array, or one process per node)."""
    shard_index: int = 0
    """This machine's share: the chunks c with c % num_shards == shard_index."""

    def validate(self) -> None:
        if not self.corpus:
            raise DataError("no corpus: pass --corpus FILE...")
        if not self.output:
            raise DataError("no output folder: pass --output DIR")
        if self.on_error not in ("fail", "skip"):
            raise DataError(f"on_error={self.on_error!r}: use 'fail' or 'skip'")
        if not 0 <= self.shard_index < self.num_shards:
            raise DataError(f"shard_index={self.shard_index}: must be in [0, num_shards={self.num_shards})")
        if self.seq_len < 2 or self.workers < 1 or self.vocab_size < 16:
            raise DataError("seq_len must be >= 2, workers >= 1, vocab_size >= 16")


TextPrepConfig = PrepConfig  # the text-only use of the same config


def _tree_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, in sorted order)."""
    if path.is_file():
        return _sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + _sha256(f).encode())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Doc:
    text: str
    links: list  # WikiLink


INGEST_REASONS = ("empty", "duplicate")


def documents_in(counts: Counter, rejected: Counter) -> int:
    """Records read: those the readers passed on, plus those they filtered or skipped (by reason)."""
    return counts["in"] + sum(n for reason, n in rejected.items() if reason not in INGEST_REASONS)


def iter_docs(cfg: PrepConfig, counts: Counter, rejected: Counter) -> Iterator[Doc]:
    """Stage ingest: records the readers pass on are counted in counts["in"]; rejections by reason
    (readers count what they filter or skip, ingest counts empty and duplicate documents)."""
    seen: set[bytes] = set()
    for path in cfg.corpus:
        for raw in read_corpus(Path(path), cfg.text_field, rejected, cfg.on_error):
            counts["in"] += 1
            text = raw.text if raw.links else unicodedata.normalize("NFC", raw.text).strip()
            if not text.strip():
                rejected["empty"] += 1
                continue
            key = hashlib.sha1(text.encode()).digest()
            if key in seen:
                rejected["duplicate"] += 1
                continue
            seen.add(key)
            yield Doc(text, raw.links)


def train_tokenizer(docs: Iterator[str], out_file: Path, cfg: PrepConfig) -> Path:
    """Train SentencePiece from an iterator (so the model records no temporary paths)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    errors: list[DataError] = []

    def guarded() -> Iterator[str]:  # a DataError raised inside SentencePiece would come out as RuntimeError
        try:
            yield from docs
        except DataError as e:
            errors.append(e)

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=guarded(),
            model_writer=model,
            vocab_size=cfg.vocab_size,
            model_type=cfg.tokenizer_type,
            character_coverage=1.0,
            normalization_rule_name="identity",  # ingest already NFC-normalizes; keeps offsets exact
            remove_extra_whitespaces=False,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            user_defined_symbols=SPECIAL_SYMBOLS,
            num_threads=cfg.workers,
            minloglevel=2,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 24,
        )
    except RuntimeError as e:
        if errors:
            raise errors[0] from None
        if "Vocabulary size" in str(e):
            raise DataError(f"tokenizer: {e}; lower vocab_size for this corpus") from e
        raise
    if errors:
        raise errors[0]
    # The model records the thread count it was trained with; record 1 so that --workers does not
    # change the file (the vocabulary does not depend on it).
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    proto.trainer_spec.num_threads = 1
    out_file.write_bytes(proto.SerializeToString())
    return out_file


# --- per-document work, run in the pool -------------------------------------------------------

_WORKER: dict = {}


def _init_worker(
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


def _process_chunk(docs: list[Doc]) -> list[dict]:
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


# --- packing ------------------------------------------------------------------------------------


def pack(token_lists: list[list[int]], seq_len: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Concatenate documents (each + EOS) and cut into rows; returns rows and dropped tail tokens."""
    packer = _Packer(None, "x", seq_len, dtype, 1 << 30)
    for ids in token_lists:
        packer.add(np.asarray(ids, dtype=np.int64), [], [])
    return np.concatenate(packer.rows) if packer.rows else np.zeros((0, seq_len), dtype), len(packer.buf)


class _Packer:
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
            {"file": name, "num_sequences": int(len(chunk)), "sha256": _sha256(self.out / name)}
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


class Progress:
    """Counts and rate of a long stage on stderr, at most once a second (a line each in logs)."""

    def __init__(self, stage: str, unit: str = "docs", every: float = 1.0):
        self.stage, self.unit, self.every = stage, unit, every
        self.done, self.t0 = 0, time.time()
        self.last = self.t0
        self.tty = sys.stderr.isatty()

    def update(self, n: int = 1) -> None:
        self.done += n
        if time.time() - self.last >= self.every:
            self._print()

    def _print(self, end: str = "") -> None:
        self.last = time.time()
        rate = self.done / max(self.last - self.t0, 1e-9)
        line = (
            f"data_prep {self.stage}: {self.done:,} {self.unit} ({rate:,.0f}/s, {self.last - self.t0:.0f}s)"
        )
        print(("\r" + line) if self.tty else line, end=end if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._print(end="\n")


@dataclass
class Knowledge:
    """The KG side of a run, shared by every stage."""

    triples: list  # sorted distinct Triples; a triple's index is its position
    aliases: dict[str, list[str]] | None
    relations: list[str]
    missing_alias: int
    pair_index: dict[tuple[str, str], list[int]]


def load_inputs(cfg: PrepConfig) -> Knowledge:
    """Check every input file and read the KG (the --dry-run stops after this)."""
    from data_prep.kg import check_aliases, read_aliases, read_triples

    cfg.validate()
    for p in cfg.corpus:
        if not Path(p).is_file():
            raise DataError(f"{p}: no such corpus file; check the path")
    triples, aliases, missing = [], None, 0
    if cfg.kg:
        triples = read_triples(cfg.kg)
        aliases = read_aliases(cfg.aliases, {t.head for t in triples} | {t.tail for t in triples})
        triples, missing = check_aliases(triples, aliases, Path(cfg.kg), cfg.on_error)
    if cfg.extractor:  # fail here, not inside a pool initializer
        from data_prep.extractors import load_extractor

        load_extractor(cfg.extractor, cfg.extractor_args)
    triple_list = sorted(set(triples), key=lambda t: (t.head, t.relation, t.tail))
    pair_index: dict[tuple[str, str], list[int]] = {}
    for i, t in enumerate(triple_list):
        pair_index.setdefault((t.head, t.tail), []).append(i)
    return Knowledge(triple_list, aliases, sorted({t.relation for t in triple_list}), missing, pair_index)


# Fields that do not change the output: they may differ between the machines or runs sharing a parts folder.
_RUN_ONLY_FIELDS = ("workers", "num_shards", "shard_index", "output")


def parts_dir(cfg: PrepConfig) -> Path:
    out = Path(cfg.output)
    return out.parent / f"{out.name}.parts"


def _open_parts(cfg: PrepConfig) -> Path:
    """The folder of finished work units, reused by a resumed run and shared by scale-out machines."""
    parts = parts_dir(cfg)
    (parts / "chunks").mkdir(parents=True, exist_ok=True)
    fingerprint = {k: v for k, v in asdict(cfg).items() if k not in _RUN_ONLY_FIELDS}
    fp_file = parts / "config.json"
    started = find_tokenizer(parts) is not None or any((parts / "chunks").iterdir())
    if fp_file.is_file() and started:
        if json.loads(fp_file.read_text()) != fingerprint:
            raise DataError(
                f"{parts}: holds work of a run with a different config; use the same config to resume, "
                "or delete the folder to start over"
            )
    else:
        _atomic_write(fp_file, json.dumps(fingerprint, indent=1).encode())
    return parts


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def stage_tokenizer(cfg: PrepConfig, log=print) -> Path:
    """Train (or copy) the tokenizer into the parts folder, once."""
    parts = _open_parts(cfg)
    existing = find_tokenizer(parts)
    if existing is not None:
        return existing
    probe_counts, probe_rejected = Counter(), Counter()
    if next(iter_docs(cfg, probe_counts, probe_rejected), None) is None:
        raise DataError(
            f"{', '.join(cfg.corpus)}: no usable documents ({documents_in(probe_counts, probe_rejected)} "
            f"read, rejected {dict(probe_rejected)})"
        )
    if cfg.tokenizer:  # a SentencePiece .model file, or a Hugging Face folder
        given = load_tokenizer(cfg.tokenizer)
        model = parts / given.name
        tmp = parts / f".{given.name}.{uuid.uuid4().hex}"
        (shutil.copytree if Path(cfg.tokenizer).is_dir() else shutil.copyfile)(cfg.tokenizer, tmp)
    else:
        model = parts / "tokenizer.model"
        tmp = parts / f".tokenizer.{uuid.uuid4().hex}.model"
        log(f"data_prep tokenizer: training SentencePiece {cfg.tokenizer_type}, vocabulary {cfg.vocab_size}")
        progress = Progress("tokenizer (reading)")

        def texts() -> Iterator[str]:
            for d in iter_docs(cfg, Counter(), Counter()):
                progress.update()
                yield d.text

        train_tokenizer(texts(), tmp, cfg)
        progress.close()
    tmp.replace(model)
    return model


def _chunks(cfg: PrepConfig) -> Iterator[tuple[int, list[Doc], int, Counter]]:
    """(chunk index, documents, records read, rejections) in input order; what is read after the
    last document is counted in the last chunk."""
    counts, rejected = Counter(), Counter()
    seen_in, seen_rej = 0, Counter()
    chunk: list[Doc] = []
    index = 0
    for doc in iter_docs(cfg, counts, rejected):
        chunk.append(doc)
        if len(chunk) == cfg.chunk_docs:
            n_in = documents_in(counts, rejected)
            yield index, chunk, n_in - seen_in, rejected - seen_rej
            seen_in, seen_rej, chunk, index = n_in, rejected.copy(), [], index + 1
    n_in = documents_in(counts, rejected)
    if chunk or n_in > seen_in:
        yield index, chunk, n_in - seen_in, rejected - seen_rej


def stage_join(cfg: PrepConfig, know: Knowledge, log=print) -> int:
    """Link, extract and join this machine's chunks (c % num_shards == shard_index) in a pool of
    cfg.workers processes, skipping chunks already done. Returns the number of chunks of the input."""
    parts = _open_parts(cfg)
    model = find_tokenizer(parts)
    if model is None:
        raise DataError(
            f"{model}: no tokenizer yet; run `python -m data_prep tokenizer` with the same config first"
        )
    chunk_dir = parts / "chunks"
    todo_meta: dict[int, tuple[int, Counter]] = {}
    skipped = 0

    def mine() -> Iterator[list[Doc]]:
        nonlocal skipped
        for c, docs, n_in, rej in _chunks(cfg):
            total[0] = c + 1
            if c % cfg.num_shards != cfg.shard_index:
                continue
            if (chunk_dir / f"chunk_{c:07d}.pkl").is_file():
                skipped += 1
                continue
            todo_meta[c] = (n_in, rej)
            order.append(c)
            yield docs

    total, order = [0], []
    extractor = (cfg.extractor, cfg.extractor_args) if cfg.extractor else None
    init = (str(model), know.aliases, cfg.case, know.pair_index, extractor)
    pool = mp.get_context("spawn").Pool(cfg.workers, _init_worker, init) if cfg.workers > 1 else None
    if pool is None:
        _init_worker(*init)
    progress = Progress("join")
    try:
        results = pool.imap(_process_chunk, mine()) if pool else map(_process_chunk, mine())
        for k, result in enumerate(results):
            c = order[k]
            n_in, rej = todo_meta.pop(c)
            payload = {"docs": result, "records": n_in, "rejected": dict(rej)}
            _atomic_write(chunk_dir / f"chunk_{c:07d}.pkl", pickle.dumps(payload, protocol=4))
            progress.update(len(result))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    progress.close()
    _atomic_write(parts / "num_chunks", str(total[0]).encode())
    if skipped:
        log(f"data_prep join: resumed, {skipped} chunks were already done")
    return total[0]


def stage_pack(cfg: PrepConfig, know: Knowledge, log=print) -> dict:
    """Pack every chunk, in input order, into the output folder (complete or not at all), then
    remove the parts folder. On several machines this is the merge step, run once."""

    parts = _open_parts(cfg)
    n_file = parts / "num_chunks"
    if not n_file.is_file():
        raise DataError(f"{parts}: the join stage has not run yet")
    n_chunks = int(n_file.read_text())
    missing = [c for c in range(n_chunks) if not (parts / "chunks" / f"chunk_{c:07d}.pkl").is_file()]
    if missing:
        raise DataError(
            f"{parts}: {len(missing)} of {n_chunks} chunks are not joined yet (first: chunk {missing[0]}, "
            "which --num-shards K gives to --shard-index chunk % K); run the join stage for them first"
        )
    t0 = time.time()
    out_dir = Path(cfg.output)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        src = find_tokenizer(parts)
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, work / src.name)
        tok = load_tokenizer(work / src.name)
        vocab = tok.vocab_size
        dtype = np.dtype(np.uint16 if vocab < 2**16 else np.uint32)
        # Vocabularies: KG entities sorted; entities first met in wiki links appended in input order.
        entity_index = {
            e: i
            for i, e in enumerate(sorted({t.head for t in know.triples} | {t.tail for t in know.triples}))
        }
        packers = {
            s: _Packer(work, s, cfg.seq_len, dtype, cfg.rows_per_shard, tok.eos_id)
            for s in ("train", "valid")
        }
        counts, rejected, triple_hits, mentions, records = Counter(), Counter(), Counter(), 0, 0
        progress = Progress("pack", "chunks")
        # Triple vocabulary: the KG's sorted triples, then extracted ones the KG lacks, in input order.
        triple_index = {t: i for i, t in enumerate(know.triples)}
        triples = list(know.triples)
        for c in range(n_chunks):
            payload = pickle.loads((parts / "chunks" / f"chunk_{c:07d}.pkl").read_bytes())
            records += payload["records"]
            rejected.update(payload["rejected"])
            for r in payload["docs"]:
                split = "valid" if r["valid_key"] % 10_000 < cfg.valid_fraction * 10_000 else "train"
                spans = [
                    (ts, te, entity_index.setdefault(ent, len(entity_index))) for ts, te, ent in r["spans"]
                ]
                row_triples = []
                for ts, te, t in r["triples"]:
                    if not isinstance(t, int):
                        counts["triples_extracted"] += 1
                        if t not in triple_index:
                            triple_index[t] = len(triples)
                            triples.append(t)
                        t = triple_index[t]
                    row_triples.append((ts, te, t))
                packers[split].add(r["ids"], spans, row_triples)
                counts[split] += 1
                mentions += r["n_mentions"]
                triple_hits.update(t for _, _, t in row_triples)
            progress.update()
        progress.close()
        splits = {s: {"documents": counts[s], **p.finish()} for s, p in packers.items()}
        written = counts["train"] + counts["valid"]
        if not splits["train"]["shards"]:
            raise DataError(
                f"{cfg.corpus[0]}: the corpus is too small to fill one training row of {cfg.seq_len} tokens"
            )
        manifest = _write_metadata(
            work,
            cfg,
            know,
            entity_index,
            triple_hits,
            splits,
            records,
            written,
            rejected,
            mentions,
            vocab,
            dtype,
            tok,
            triples,
            counts["triples_extracted"],
        )
        if out_dir.exists():  # an earlier dataset (or one that died before its manifest) is replaced
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work)
    shutil.rmtree(parts, ignore_errors=True)
    log(
        f"data_prep: {manifest['documents_in']} documents in, {written} written, rejected {dict(rejected)}; "
        f"{manifest['tokens']} tokens, {mentions} mentions, {manifest['triples_attached']} triples attached -> "
        f"{out_dir} ({time.time() - t0:.1f}s packing)"
    )
    return manifest


def _write_metadata(
    work: Path,
    cfg: PrepConfig,
    know: Knowledge,
    entity_index: dict,
    triple_hits: Counter,
    splits: dict,
    records: int,
    written: int,
    rejected: Counter,
    mentions: int,
    vocab: int,
    dtype: np.dtype,
    tok,
    triples: list,
    n_extracted: int,
) -> dict:
    names = [""] * len(entity_index)
    for e, i in entity_index.items():
        names[i] = e
    (work / "entities.tsv").write_text("".join(f"{i}\t{e}\n" for i, e in enumerate(names)), encoding="utf-8")
    relations = list(dict.fromkeys([*know.relations, *(t.relation for t in triples[len(know.triples) :])]))
    (work / "relations.tsv").write_text(
        "".join(f"{i}\t{r}\n" for i, r in enumerate(relations)), encoding="utf-8"
    )
    n_kg = len(know.triples)
    (work / "triples.tsv").write_text(
        "".join(
            f"{i}\t{t.head}\t{t.relation}\t{t.tail}\t{triple_hits[i]}\t{'kg' if i < n_kg else 'extracted'}\n"
            for i, t in enumerate(triples)
            if triple_hits[i]
        ),
        encoding="utf-8",
    )
    per_relation = Counter()
    for i, n in triple_hits.items():
        per_relation[triples[i].relation] += n
    tokens = sum(s["tokens"] for s in splits.values())
    rows = sum(s["rows"] for s in splits.values())
    stats = {
        "documents": written,
        "tokens": tokens,
        "mentions": mentions,
        "mentions_per_1000_tokens": 1000 * sum(s["spans"] for s in splits.values()) / max(tokens, 1),
        "share_of_rows_with_entity": sum(s["rows_with_entity"] for s in splits.values()) / max(rows, 1),
        "triples_per_row": sum(s["row_triples"] for s in splits.values()) / max(rows, 1),
        "top_relations": per_relation.most_common(10),
        "documents_rejected": dict(rejected),
    }
    (work / "stats.json").write_text(json.dumps(stats, indent=2))
    inputs = [*cfg.corpus, *(x for x in (cfg.kg, cfg.aliases) if x)]
    manifest = {
        "format": FORMAT,
        "config": {k: v for k, v in asdict(cfg).items() if k not in _RUN_ONLY_FIELDS},
        "inputs": [{"path": str(p), "sha256": _sha256(Path(p))} for p in inputs],
        "tokenizer": {
            "file": tok.name,
            "type": tok.kind,
            "vocab_size": vocab,
            "pad_id": tok.pad_id,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "unk_id": tok.unk_id,
            "mask_id": tok.mask_id,
            "sha256": _tree_sha256(work / tok.name),
        },
        "seq_len": cfg.seq_len,
        "dtype": dtype.name,
        "documents_in": records,
        "documents_written": written,
        "documents_rejected": dict(rejected),
        "tokens": tokens,
        "tokens_dropped_tail": sum(s["tokens_dropped_tail"] for s in splits.values()),
        "mentions": mentions,
        "spans": sum(s["spans"] for s in splits.values()),
        "spans_clipped": sum(s.get("spans_clipped", 0) for s in splits.values()),
        "spans_dropped_tail": sum(s.get("spans_dropped_tail", 0) for s in splits.values()),
        "entities": len(entity_index),
        "relations": len(relations),
        "kg_triples": len(know.triples),
        "kg_triples_without_alias": know.missing_alias,
        "triples_attached": sum(triple_hits.values()),
        "triples_attached_by_extractor": n_extracted,
        "triples_new_from_extractor": len(triples) - n_kg,
        "distinct_triples_attached": len(triple_hits),
        "triples_per_relation": dict(sorted(per_relation.items())),
        "splits": splits,
    }
    tmp = work / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.rename(work / MANIFEST)
    return manifest


def prepare(cfg: PrepConfig, log=print, dry_run: bool = False) -> dict:
    """Every stage: inputs, tokenizer, join (link, extract, join), pack. Resumes finished work found
    in <output>.parts; with --num-shards > 1 it stops after this machine's share of the join
    (run `merge` once all shards are done). Returns the manifest ({} when not packing)."""
    know = load_inputs(cfg)
    if dry_run:
        log(f"data_prep: inputs are valid ({len(cfg.corpus)} corpus files, {len(know.triples)} triples)")
        return {}
    if cfg.num_shards > 1 and not cfg.tokenizer and find_tokenizer(parts_dir(cfg)) is None:
        raise DataError(
            "with --num-shards > 1 every machine must use the same tokenizer: run "
            "`python -m data_prep tokenizer` with the same config once first, or pass --tokenizer"
        )
    stage_tokenizer(cfg, log)
    stage_join(cfg, know, log)
    if cfg.num_shards > 1:
        log(
            f"data_prep: shard {cfg.shard_index} of {cfg.num_shards} done in {parts_dir(cfg)}; "
            "run `python -m data_prep merge` with the same config when all are"
        )
        return {}
    return stage_pack(cfg, know, log)


def prepare_text(
    corpus: list[str | Path], out_dir: str | Path, cfg: PrepConfig | None = None, log=print
) -> dict:
    """Text only: corpus files to shards in out_dir (the fields of cfg other than corpus/output apply)."""
    cfg = PrepConfig(
        **{**asdict(cfg or PrepConfig()), "corpus": [str(p) for p in corpus], "output": str(out_dir)}
    )
    return prepare(cfg, log=log)


def prepare_example(out_dir: str | Path, cfg: PrepConfig | None = None, log=print) -> dict:
    """Generate the built-in knowledge world and prepare it, KG-joined, into out_dir."""
    from data_prep.example_world import write_world

    out_dir = Path(out_dir)
    raw = out_dir.parent / f"{out_dir.name}_raw"
    paths = write_world(raw)
    cfg = PrepConfig(
        **{
            **asdict(cfg or PrepConfig()),
            "corpus": [str(paths["corpus"])],
            "output": str(out_dir),
            "kg": str(paths["kg"]),
            "aliases": str(paths["aliases"]),
            "case": "exact",
        }
    )
    return prepare(cfg, log=log)
