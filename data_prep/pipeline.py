"""Corpus (+ knowledge graph) to packed, knowledge-joined token shards.

Stages: ingest (read, NFC-normalize, drop empty and exact-duplicate documents, each rejection
counted by reason) -> tokenizer (train SentencePiece, or load one) -> link (the KG index's alias
matcher, data_prep/kg_index.py; MediaWiki links take precedence) -> extract (distant supervision: a KG triple is
attached to a sentence that mentions both its head and its tail) -> join (token ids, mention
spans in token positions, attached triple ids) -> pack (rows of seq_len tokens, documents
separated by EOS; a span crossing a row boundary is clipped to its first row and counted) ->
write shards and, last, manifest.json.

Output folder: the packed dataset format (`sparsexpert/data/format.py`, files and manifest), read by
`sparsexpert.data.shards.PackedDataset`.

The same inputs and config give byte-identical output for any number of workers: documents are
processed in chunks by a pool but consumed in input order. Finished chunks wait in <output>.parts
(data_prep/chunks.py: .npz, no pickle). The dataset is built in a temporary folder beside the
output, every file fsynced, the manifest last, then swapped in for the old one; an existing output
that data_prep did not write is refused unless overwrite is set (data_prep/output.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import unicodedata
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data_prep import output
from data_prep.arrays import native, value_counts
from data_prep.chunks import chunk_file, encode_chunk, read_chunk, refuse_old_chunks
from data_prep.dedup import SeenDigests
from data_prep.extractors import EXTRACTED
from data_prep.join import init_worker, process_chunk
from data_prep.kg import default_aliases
from data_prep.kg_index import KGIndex, PairIndex, index_dir, load_or_build
from data_prep.pack import EOS_ID, Packer, pack, sha256_file
from data_prep.readers import INVALID_REASONS, LINK_NOTES, DataError, RawDoc, expand_corpus, read_corpus
from data_prep.tokenizer import copy_tokenizer, find_tokenizer, load_tokenizer
from data_prep.wikitext import WikiLink
from sparsexpert.data.format import FORMAT, MANIFEST, SPLITS, token_dtype
from sparsexpert.metrics import Progress

if TYPE_CHECKING:
    from data_prep.kg import Triple

__all__ = ["EOS_ID", "DataError", "PrepConfig", "pack", "prepare", "prepare_example", "prepare_text"]

MIN_DOC_CHARS, MAX_DOC_CHARS = 1000, 4_000_000
PAD_ID, UNK_ID, BOS_ID = 3, 0, 1  # and EOS_ID = 2 (data_prep.pack): the ids of the tokenizers we train
SPECIAL_SYMBOLS = ["<mask>"]


@dataclass
class PrepConfig:
    """One data_prep run."""

    corpus: list[str] = field(default_factory=list)
    """Corpus inputs: .txt (one document a line), .jsonl, .parquet, MediaWiki .xml / .xml.bz2; text,
    JSONL and dumps also compressed (.gz, .bz2, .zst); a folder (every corpus file under it, sorted); a folder
    Hugging Face `datasets` wrote with save_to_disk (streamed from its Arrow files)."""
    output: str = ""
    """Dataset folder to write."""
    kg: str | None = None
    """Knowledge-graph triples (.tsv, .nt, .jsonl). None: no linking beyond wiki links, no triples."""
    aliases: str | None = None
    """entity_id<TAB>surface form file (or a linked-text .jsonl: its entities' surface forms). None: a
    linked-text --kg gives its own; any other KG's entity names (underscores as spaces) are the aliases."""
    tokenizer: str | None = None
    """An existing tokenizer instead of training one: a SentencePiece .model or a Hugging Face folder."""
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
    keep_parts: bool = False
    """Keep <output>.parts after packing, so `merge` can pack the joined chunks again (other seq_len)."""
    num_shards: int = 1
    """Machines sharing the join stage (a Slurm array, or one process per node)."""
    shard_index: int = 0
    """This machine's share: the chunks c with c % num_shards == shard_index."""
    overwrite: bool = False
    """Replace an existing output folder that is not a dataset data_prep wrote (everything in it is
    deleted). Without it such a folder is refused; an earlier dataset of ours is always replaced.
    An input file inside the output folder is refused either way."""
    max_doc_chars: int = 1_000_000
    """Longer documents are cut into pieces of at most this many characters, at whitespace, packed
    one after the other with no EOS between (one split, counted in the manifest as documents_split).
    1 M characters (~250 k tokens) is far beyond any row length and any real article, and keeps each
    text SentencePiece and the join see small: whole, a 50 MB line is silently dropped by SentencePiece
    (over 16 MB) and costs 2.3 GB of memory in the join. At most 4 M (SentencePiece's 16 MB limit)."""
    dedup_mb: int = 256
    """Memory of the exact-duplicate filter (8-byte keys, 16 to 32 bytes a document): past it, the keys
    go to sorted run files in a temporary folder beside --output, deleted when ingest ends (8 bytes a
    document on disk). 256 MiB keeps 8 to 16 million documents in memory (data_prep/dedup.py)."""
    max_rejected_fraction: float = 0.1
    """With on_error="skip": the run fails when more than this share of the records read is invalid
    (bad UTF-8, malformed JSON, no text field), naming the counts by reason. Empty, duplicate and
    filtered pages (redirects, non-articles) do not count."""

    def validate(self) -> None:
        """All fields, before any work: the first wrong one is an error naming it and the fix."""

        def bad(name: str, fix: str) -> DataError:
            return DataError(f"{name}={getattr(self, name)!r}: {fix}")

        if not self.corpus:
            raise DataError("no corpus: pass --corpus FILE...")
        if not self.output:
            raise DataError("no output folder: pass --output DIR")
        self.aliases = default_aliases(self.kg, self.aliases)  # a linked-text KG brings its surface forms
        choices = {
            "on_error": ("fail", "skip"),
            "case": ("ignore", "exact"),
            "tokenizer_type": ("bpe", "unigram"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"use one of {', '.join(map(repr, allowed))}")
        at_least = {
            "seq_len": 2,
            "vocab_size": 16,
            "workers": 1,
            "chunk_docs": 1,
            "rows_per_shard": 1,
            "num_shards": 1,
            "dedup_mb": 1,
        }
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise bad(name, f"must be >= {low}")
        if not 0 <= self.shard_index < self.num_shards:
            raise bad("shard_index", f"must be in [0, num_shards={self.num_shards})")
        if not 0 <= self.valid_fraction < 1:
            raise bad("valid_fraction", "must be in [0, 1): the share of documents held out for validation")
        if not 0 <= self.max_rejected_fraction <= 1:
            raise bad("max_rejected_fraction", "must be in [0, 1] (0: no invalid record allowed)")
        if not MIN_DOC_CHARS <= self.max_doc_chars <= MAX_DOC_CHARS:
            raise bad(
                "max_doc_chars",
                f"must be in [{MIN_DOC_CHARS:,}, {MAX_DOC_CHARS:,}] (shorter pieces cut sentences apart; "
                "SentencePiece drops longer texts, over 16 MB)",
            )


def _treesha256_file(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, in sorted order)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


INGEST_REASONS = ("empty", "duplicate")


def documents_in(counts: Counter, rejected: Counter) -> int:
    """Records read: those the readers passed on, plus those they filtered or skipped (by reason)."""
    skipped = INGEST_REASONS + LINK_NOTES
    return counts["in"] + sum(n for reason, n in rejected.items() if reason not in skipped)


def split_notes(rejected: Counter) -> tuple[dict[str, int], dict[str, int]]:
    """The readers' counter as (documents rejected by reason, gold-link notes: readers.LINK_NOTES)."""
    docs = {k: n for k, n in rejected.items() if k not in LINK_NOTES}
    return docs, {k: n for k, n in rejected.items() if k in LINK_NOTES}


def check_rejected(cfg: PrepConfig, records: int, rejected: Counter) -> None:
    """Fail when more than max_rejected_fraction of the records read were invalid (and skipped)."""
    invalid = {reason: n for reason, n in sorted(rejected.items()) if reason in INVALID_REASONS and n}
    n_bad = sum(invalid.values())
    if records and n_bad / records > cfg.max_rejected_fraction:
        by_reason = ", ".join(f"{reason} {n}" for reason, n in invalid.items())
        raise DataError(
            f"{', '.join(cfg.corpus)}: {n_bad} of {records} records ({n_bad / records:.1%}) are invalid "
            f"({by_reason}), more than max_rejected_fraction={cfg.max_rejected_fraction}; check --text_field "
            "and the input's format (--on_error fail stops at the first bad record with its file and line), "
            "or raise --max_rejected_fraction if this share is expected"
        )


_SPACES = (" ", "\n", "\t", "\r", "\u3000")


def split_document(doc: RawDoc, limit: int) -> list[RawDoc]:
    """A document of more than `limit` characters as consecutive pieces of at most `limit`, each cut
    at the last whitespace of the second half of its window (the whitespace is dropped: our
    tokenizers never join pieces across it), else hard at the limit. A wiki link the cut would
    split moves the cut before it, or, where it starts in the first half, is dropped."""
    text = doc.text
    if len(text) <= limit:
        return [doc]
    pieces: list[RawDoc] = []
    start, links = 0, list(doc.links)
    while start < len(text):
        end = rest = min(start + limit, len(text))
        if end < len(text):
            lo = start + limit // 2
            ws = max(text.rfind(c, lo, end) for c in _SPACES)
            crossing = [link for link in links if link.start < (ws if ws >= 0 else end) < link.end]
            if crossing and crossing[0].start > lo:
                ws = max(text.rfind(c, lo, crossing[0].start) for c in _SPACES)
                ws = ws if ws >= 0 else crossing[0].start
                end, rest = ws, ws + (text[ws] in _SPACES)
            elif ws >= 0:
                end, rest = ws, ws + 1
        mine = [
            WikiLink(link.start - start, link.end - start, link.target)
            for link in links
            if start <= link.start and link.end <= end
        ]
        pieces.append(RawDoc(text[start:end], f"{doc.source} (piece {len(pieces) + 1})", mine, len(pieces)))
        start = rest
    key = zlib.crc32(text.encode())
    for piece in pieces:
        piece.key, piece.last = key, False
    pieces[-1].last = True
    return pieces


def iter_docs(cfg: PrepConfig, counts: Counter, rejected: Counter) -> Iterator[RawDoc]:
    """Stage ingest: records the readers pass on are counted in counts["in"]; rejections by reason
    (readers count what they filter or skip, ingest counts empty and duplicate documents). A
    document over max_doc_chars comes out as its pieces (counts["split"], counts["pieces"])."""
    parent = Path(cfg.output).resolve().parent
    with SeenDigests(cfg.dedup_mb << 20, spill_dir=parent if parent.is_dir() else None) as seen:
        yield from _ingest(cfg, seen, counts, rejected)


def ingested_text(text: str, linked: bool) -> str:
    """A record's text as ingest keeps it: as read where it has entity links (their offsets point
    into it), else NFC-normalized and stripped."""
    return text if linked else unicodedata.normalize("NFC", text).strip()


def in_valid(key, fraction: float):
    """Whether a document of this content key (crc32 of its ingested text; an int or an array of them)
    goes to the valid split."""
    return key % 10_000 < fraction * 10_000


def in_valid_split(text: str, linked: bool, fraction: float) -> bool | None:
    """The split a record's document goes to: True valid, False train, None neither (ingest drops an
    empty text)."""
    text = ingested_text(text, linked)
    return None if not text.strip() else bool(in_valid(zlib.crc32(text.encode()), fraction))


def _ingest(cfg: PrepConfig, seen: SeenDigests, counts: Counter, rejected: Counter) -> Iterator[RawDoc]:
    for path in expand_corpus(cfg.corpus):
        for raw in read_corpus(path, cfg.text_field, rejected, cfg.on_error):
            counts["in"] += 1
            text = ingested_text(raw.text, bool(raw.links))
            if not text.strip():
                rejected["empty"] += 1
                continue
            if not seen.add(text):
                rejected["duplicate"] += 1
                continue
            pieces = split_document(RawDoc(text, raw.source, raw.links), cfg.max_doc_chars)
            if len(pieces) > 1:
                counts["split"] += 1
                counts["pieces"] += len(pieces)
            yield from pieces


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
    output.write_durable(out_file, proto.SerializeToString())
    return out_file


@dataclass
class Knowledge:
    """The KG side of a run, shared by every stage: the memory-mapped index (data_prep/kg_index.py)."""

    index: KGIndex | None = None

    @property
    def n_triples(self) -> int:
        return len(self.index.triples) if self.index else 0

    @property
    def relations(self) -> list[str]:
        return self.index.relations if self.index else []

    @property
    def missing_alias(self) -> int:
        return self.index.meta["kg_triples_without_alias"] if self.index else 0


def load_inputs(cfg: PrepConfig, log=print) -> Knowledge:
    """Check every input file and open the KG index, built once beside the output (<output>.kgindex)
    and reused while the KG, the aliases, case and on_error stay the same (--dry_run stops after this)."""
    cfg.validate()
    expand_corpus(cfg.corpus)  # every input exists; no folder holds files of other types
    if cfg.extractor:  # fail here, not inside a pool initializer
        from data_prep.extractors import load_extractor

        load_extractor(cfg.extractor, cfg.extractor_args)
    if not cfg.kg:
        return Knowledge()
    return Knowledge(load_or_build(index_dir(cfg.output), cfg.kg, cfg.aliases, cfg.case, cfg.on_error, log))


# Fields that do not change the output: they may differ between the machines or runs sharing a parts folder.
_RUN_ONLY_FIELDS = ("workers", "num_shards", "shard_index", "output", "keep_parts", "overwrite", "dedup_mb")
# Fields only the pack stage reads: joined chunks can be packed again with other values.
_PACK_FIELDS = ("seq_len", "rows_per_shard", "valid_fraction", "max_rejected_fraction")


_PARTS_NAMES = {"config.json", "chunks", "num_chunks", "tokenizer.model", "tokenizer", "documents"}


def parts_dir(cfg: PrepConfig) -> Path:
    out = Path(cfg.output)
    return out.parent / f"{out.name}.parts"


def _open_parts(cfg: PrepConfig) -> Path:
    """The folder of finished work units, reused by a resumed run and shared by scale-out machines."""
    parts = parts_dir(cfg)
    fp_file = parts / "config.json"
    foreign = [p.name for p in parts.iterdir() if p.name not in _PARTS_NAMES] if parts.is_dir() else []
    foreign = [name for name in foreign if not name.startswith(".")]  # ours: temporary files
    if foreign:
        raise DataError(
            f"{parts}: holds {', '.join(sorted(foreign)[:3])}, which data_prep did not write, and a run deletes "
            "its parts folder when done; move that out, or choose another --output"
        )
    (parts / "chunks").mkdir(parents=True, exist_ok=True)
    refuse_old_chunks(parts / "chunks")
    fingerprint = {k: v for k, v in asdict(cfg).items() if k not in _RUN_ONLY_FIELDS + _PACK_FIELDS}
    started = find_tokenizer(parts) is not None or any((parts / "chunks").iterdir())
    if fp_file.is_file() and started:
        if json.loads(fp_file.read_text()) != fingerprint:
            raise DataError(
                f"{parts}: holds work of a run with a different config; use the same config to resume, "
                "or delete the folder to start over"
            )
    else:
        output.atomic_write(fp_file, json.dumps(fingerprint, indent=1).encode())
    return parts


def stage_ingest(cfg: PrepConfig, log=print) -> dict:
    """Read, normalize and deduplicate every document; report the counts and write nothing."""
    counts: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    progress = Progress("data_prep ingest", unit="docs")
    chars = 0
    for doc in iter_docs(cfg, counts, rejected):
        chars += len(doc.text)
        progress.update(doc.last)
    progress.close()
    report: dict[str, Any] = {
        "documents_in": documents_in(counts, rejected),
        "documents_written": progress.done,
        "documents_rejected": split_notes(rejected)[0],
        "documents_split": counts["split"],
        "characters": chars,
        **({"gold_links": split_notes(rejected)[1]} if split_notes(rejected)[1] else {}),
    }
    log(f"data_prep ingest: {report}")
    check_rejected(cfg, report["documents_in"], rejected)
    return report


def stage_link_extract(cfg: PrepConfig, know: Knowledge, extract: bool, log=print) -> dict:
    """Stages link and extract on their own, for inspection, in one process: `link` writes
    <output>/mentions.jsonl (one line a document: its source and [start, end, entity, surface]
    mentions); `extract` also runs distant supervision and the extractor and writes
    <output>/extracted_kg.tsv (head, relation, tail, times found, source kg|extracted)."""
    from data_prep.extractors import load_extractor
    from data_prep.join import distant_supervision, find_mentions

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    index = know.index
    linker = index.matcher() if index else None
    pairs: PairIndex | dict = PairIndex(index) if index else {}
    extractor = load_extractor(cfg.extractor, cfg.extractor_args) if cfg.extractor and extract else None
    found: Counter[Triple] = Counter()
    mentions = 0
    progress = Progress(f"data_prep {'extract' if extract else 'link'}", unit="docs")
    tmp = out / f".mentions.{uuid.uuid4().hex}.jsonl"
    with open(tmp, "w", encoding="utf-8") if not extract else contextlib.nullcontext() as f:
        for doc in iter_docs(cfg, Counter(), Counter()):
            ms, extracted = find_mentions(doc, linker, extractor)
            mentions += len(ms)
            if f is None:  # extract: no mentions file
                found.update(index.triple(t) for _, _, t in distant_supervision(doc.text, ms, pairs) if index)
                found.update(x[2] for x in extracted)
            else:
                f.write(
                    json.dumps(
                        {"source": doc.source, "mentions": [[s, e, ent, doc.text[s:e]] for s, e, ent in ms]},
                        ensure_ascii=False,
                    )
                    + "\n"
                )
            progress.update()
    progress.close()
    report: dict[str, Any] = {"documents": progress.done, "mentions": mentions}
    if extract:
        rows = sorted(found.items(), key=lambda kv: (-kv[1], kv[0].head, kv[0].relation, kv[0].tail))
        (out / "extracted_kg.tsv").write_text(
            "".join(
                f"{t.head}\t{t.relation}\t{t.tail}\t{n}\t"
                f"{'kg' if index and index.triple_index(t) >= 0 else 'extracted'}\n"
                for t, n in rows
            ),
            encoding="utf-8",
        )
        per_relation: Counter[str] = Counter()
        for t, n in found.items():
            per_relation[t.relation] += n
        report.update(
            triples=sum(found.values()),
            distinct_triples=len(found),
            per_relation=dict(per_relation.most_common()),
        )
    else:
        tmp.replace(out / "mentions.jsonl")
    log(f"data_prep {'extract' if extract else 'link'}: {report}")
    return report


def stage_tokenizer(cfg: PrepConfig, log=print) -> Path:
    """Train (or copy) the tokenizer into the parts folder, once."""
    parts = _open_parts(cfg)
    existing = find_tokenizer(parts)
    if existing is not None:
        return existing
    probe_counts: Counter[str] = Counter()
    probe_rejected: Counter[str] = Counter()
    if next(iter_docs(cfg, probe_counts, probe_rejected), None) is None:
        raise DataError(
            f"{', '.join(cfg.corpus)}: no usable documents ({documents_in(probe_counts, probe_rejected)} "
            f"read, rejected {dict(probe_rejected)})"
        )
    if cfg.tokenizer:  # a SentencePiece .model file, or a Hugging Face folder
        given = load_tokenizer(cfg.tokenizer)
        model = parts / given.name
        tmp = parts / f".{given.name}.{uuid.uuid4().hex}"
    else:
        model = parts / "tokenizer.model"
        tmp = parts / f".tokenizer.{uuid.uuid4().hex}.model"
    counts: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    try:
        with output.disk_full(parts, parts):
            if cfg.tokenizer:
                copy_tokenizer(cfg.tokenizer, tmp)
            else:
                log(
                    f"data_prep tokenizer: training SentencePiece {cfg.tokenizer_type}, vocabulary {cfg.vocab_size}"
                )
                progress = Progress("data_prep tokenizer (reading)", unit="docs")

                def texts() -> Iterator[str]:
                    for d in iter_docs(cfg, counts, rejected):
                        progress.update()
                        yield d.text

                train_tokenizer(texts(), tmp, cfg)
                progress.close()
                # the documents the join will read: its progress line gives a share and an ETA
                output.atomic_write(parts / "documents", str(progress.done).encode())
                check_rejected(cfg, documents_in(counts, rejected), rejected)  # all was read: fail early
            output.fsync_tree(tmp)
            tmp.replace(model)
            output.fsync_dir(parts)
    finally:
        if tmp.exists():
            output.remove(tmp)
    return model


def _chunks(cfg: PrepConfig) -> Iterator[tuple[int, list[RawDoc], int, Counter]]:
    """(chunk index, documents, records read, rejections) in input order; what is read after the
    last document is counted in the last chunk."""
    counts: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    seen_in = 0
    seen_rej: Counter[str] = Counter()
    chunk: list[RawDoc] = []
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
            f"{parts}: no tokenizer yet; run `python -m data_prep tokenizer` with the same config first"
        )
    chunk_dir = parts / "chunks"
    todo_meta: dict[int, tuple[int, Counter]] = {}
    skipped = 0

    def mine() -> Iterator[list[RawDoc]]:
        nonlocal skipped
        for c, docs, n_in, rej in _chunks(cfg):
            total[0] = c + 1
            if c % cfg.num_shards != cfg.shard_index:
                progress.total = progress.total and progress.total - len(docs)  # another machine's
                continue
            if chunk_file(chunk_dir, c).is_file():
                skipped += 1
                progress.total = progress.total and progress.total - len(docs)
                continue
            todo_meta[c] = (n_in, rej)
            order.append(c)
            yield docs

    total: list[int] = [0]
    order: list[int] = []
    if know.index is not None and native() is None:
        log(
            "data_prep join: the compiled alias matcher (data_prep/_native.c) is not built, so the KG join runs "
            "on NumPy alone, slower; install a C compiler and the Python headers (Debian: gcc python3-dev) and "
            "run `pip install -e .` again"
        )
    extractor = (cfg.extractor, cfg.extractor_args) if cfg.extractor else None
    init = (str(model), str(know.index.folder) if know.index else None, extractor)
    pool = mp.get_context("spawn").Pool(cfg.workers, init_worker, init) if cfg.workers > 1 else None
    if pool is None:
        init_worker(*init)
    known = parts / "documents"  # counted while the tokenizer was trained, when it was
    n_docs = int(known.read_text()) if known.is_file() and known.read_text().strip().isdigit() else None
    progress = Progress("data_prep join", n_docs, unit="docs")
    kept = f"the chunks already joined stay in {parts}: a re-run resumes from them"
    done = False
    try:
        with output.disk_full(parts, parts, then=kept):
            results = pool.imap(process_chunk, mine()) if pool else map(process_chunk, mine())
            for k, result in enumerate(results):
                c = order[k]
                n_in, rej = todo_meta.pop(c)
                output.atomic_write(chunk_file(chunk_dir, c), encode_chunk(result, n_in, rej))
                progress.update(len(result))
            output.atomic_write(parts / "num_chunks", str(total[0]).encode())
        done = True
    finally:
        if pool is not None:
            (pool.close if done else pool.terminate)()  # on an error, do not join the rest first
            pool.join()
    progress.close()
    if skipped:
        log(f"data_prep join: resumed, {skipped} chunks were already done")
    return total[0]


class TripleHits:
    """How many times each triple was attached: the KG's in an array (8 bytes a KG triple), the extractor's new
    ones in a Counter; and the relations in the order their first triple was attached (stats.json's
    top_relations breaks ties in that order). Counted a chunk at a time in arrays, not a Python object per
    attachment."""

    def __init__(self, n_kg: int, index: KGIndex | None, new_triples: list):
        self.kg = np.zeros(n_kg, np.int64)
        self.new: Counter[int] = Counter()
        self.index, self.new_triples = index, new_triples  # new_triples: Packed.new_triples, growing
        self.relation_order: dict[str, None] = {}
        # the KG's relations not in relation_order yet: once none is left, a KG triple's relation is not looked up
        self._kg_unseen = set(index.relations) if index is not None else set()

    def add(self, ids: np.ndarray) -> None:
        """Triple indices attached, in input order (KG triples first, then the new ones)."""
        n_kg = len(self.kg)
        is_kg = ids < n_kg
        if is_kg.any():
            value, count = value_counts(ids[is_kg])
            self.kg[value] += count
        new = ids[~is_kg].tolist()
        self.new.update(new)
        # the relations of these rows in order of first appearance: a KG triple's relation id (while some KG
        # relation is still unseen), or a new one's relation after them
        rows = ids if self._kg_unseen else ids[~is_kg]
        kg_rows = rows < n_kg
        kg_relations = len(self.index.relations) if self.index else 0
        code = np.empty(len(rows), np.int64)
        if self.index is not None and kg_rows.any():
            code[kg_rows] = np.asarray(self.index.triples[rows[kg_rows], 1])
        names: dict[str, int] = {}
        code[~kg_rows] = [
            kg_relations + names.setdefault(self.new_triples[i - n_kg].relation, len(names)) for i in new
        ]
        distinct, first = np.unique(code, return_index=True)
        by_name = list(names)
        for c in distinct[np.argsort(first)].tolist():
            name = self.index.relations[c] if c < kg_relations and self.index else by_name[c - kg_relations]
            self.relation_order.setdefault(name)
            self._kg_unseen.discard(name)

    def total(self) -> int:
        return int(self.kg.sum()) + sum(self.new.values())

    def distinct(self) -> int:
        return int(np.count_nonzero(self.kg)) + len(self.new)

    def per_relation(self) -> Counter[str]:
        """Attachments a relation, in the order of relation_order."""
        counts: Counter[str] = Counter()
        if self.index is not None and len(self.kg):
            hit = np.flatnonzero(self.kg)
            per = np.zeros(len(self.index.relations), np.int64)
            np.add.at(per, np.asarray(self.index.triples[hit, 1]), self.kg[hit])
            for r in np.flatnonzero(per).tolist():
                counts[self.index.relations[r]] += int(per[r])
        n_kg = len(self.kg)
        for i, n in self.new.items():
            counts[self.new_triples[i - n_kg].relation] += n
        return Counter({name: counts[name] for name in self.relation_order})


@dataclass
class Packed:
    """What the pack stage counted, for the manifest and stats."""

    # The dataset's entity vocabulary: the KG's entities first, by name; then those first met in the
    # text (wiki links, entities with aliases but no triple), in input order.
    n_kg_entities: int
    extra_entities: dict[str, int]
    new_triples: list  # the extractor's triples the KG lacks, indexed after the KG's
    triple_hits: TripleHits
    splits: dict
    records: int
    rejected: Counter
    mentions: int = 0
    written: int = 0
    attached_by_extractor: int = 0
    documents_split: int = 0  # documents longer than max_doc_chars, cut into pieces
    pieces: int = 0  # the pieces they were cut into
    kg_rank: np.ndarray | None = None  # KG index entity id -> dataset entity index (for its KG entities)
    new_triple_entities: list = field(default_factory=list)  # (head, tail) dataset indices of new_triples
    # new triple index -> the extractor's highest confidence; what the extractor counted, summed
    new_triple_scores: dict = field(default_factory=dict)
    extractor_counts: Counter = field(default_factory=Counter)


def _extractor_name(cfg: PrepConfig) -> str:
    """What triples.tsv names as the model of a scored extracted triple: the extractor's run folders
    (--extractor itself, or its `runs` argument) where it has them, else the extractor (module:Class)."""
    if cfg.extractor_args:
        runs = json.loads(Path(cfg.extractor_args).read_text()).get("runs")
        if runs:
            return runs if isinstance(runs, str) else ",".join(runs)
    return str(cfg.extractor)


def _inputs(cfg: PrepConfig) -> list[str]:
    return [*cfg.corpus, *(x for x in (cfg.kg, cfg.aliases, cfg.tokenizer, cfg.extractor_args) if x)]


def check_output(cfg: PrepConfig) -> None:
    """Refuse an output folder (or parts folder) whose replacement would delete what we did not write."""
    output.check_output(Path(cfg.output), parts_dir(cfg), _inputs(cfg), cfg.overwrite)


def stage_pack(cfg: PrepConfig, know: Knowledge, log=print) -> dict:
    """Pack every chunk, in input order, into a new folder beside the output, fsynced, its manifest
    written last; swap it in for the old output (complete or not at all), then remove the parts
    folder. On several machines this is the merge step, run once."""
    check_output(cfg)
    parts = _open_parts(cfg)
    n_file = parts / "num_chunks"
    if not n_file.is_file():
        raise DataError(f"{parts}: the join stage has not run yet")
    n_chunks = int(n_file.read_text())
    chunk_files = [chunk_file(parts / "chunks", c) for c in range(n_chunks)]
    missing = [c for c, f in enumerate(chunk_files) if not f.is_file()]
    if missing:
        raise DataError(
            f"{parts}: {len(missing)} of {n_chunks} chunks are not joined yet (first: chunk {missing[0]}, "
            "which --num_shards K gives to --shard_index chunk % K); run the join stage for them first"
        )
    t0 = time.time()
    out_dir = Path(cfg.output)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(work, 0o777 & ~output.umask())  # mkdtemp makes it 0700; a dataset folder follows the umask

    def needed() -> str:
        total = sum(f.stat().st_size for f in chunk_files)
        return f"the dataset needs about {output.size(total)} (the size of its joined chunks)"

    try:
        kept = f"the joined chunks stay in {parts}: run `merge` with the same config once there is space"
        with output.disk_full(out_dir, work, needed, then=kept):
            manifest, res = _pack(work, cfg, know, parts, chunk_files)
            output.replace_dir(work, out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work)
    if not cfg.keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    split = f", {res.documents_split} split into {res.pieces} pieces" if res.documents_split else ""
    log(
        f"data_prep: {manifest['documents_in']} documents in, {res.written} written{split}, rejected "
        f"{manifest['documents_rejected']}; {manifest['tokens']} tokens, {res.mentions} mentions, "
        f"{manifest['triples_attached']} triples attached -> {out_dir} ({time.time() - t0:.1f}s packing)"
    )
    return manifest


def _pack(
    work: Path, cfg: PrepConfig, know: Knowledge, parts: Path, chunk_files: list[Path]
) -> tuple[dict, Packed]:
    """The dataset, written into `work`: shards, arrays, vocabularies, stats and, last, the manifest."""
    src = find_tokenizer(parts)
    if src is None:
        raise DataError(
            f"{parts}: no tokenizer; run `python -m data_prep tokenizer` with the same config first"
        )
    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, work / src.name)
    tok = load_tokenizer(work / src.name)
    vocab = tok.vocab_size
    dtype = token_dtype(vocab)
    # Vocabularies: KG entities sorted; entities first met in the text appended in input order.
    index = know.index
    in_kg = np.asarray(index.in_kg) if index else np.zeros(0, bool)
    kg_rank = np.cumsum(in_kg) - 1
    n_kg = int(in_kg.sum())
    packers = {s: Packer(work, s, cfg.seq_len, dtype, cfg.rows_per_shard, tok.eos_id) for s in SPLITS}
    new_triples: list = []
    res = Packed(n_kg, {}, new_triples, TripleHits(know.n_triples, index, new_triples), {}, 0, Counter())
    counts: Counter[str] = Counter()
    progress = Progress("data_prep pack", len(chunk_files), "chunks")

    def entity(name: str) -> int:
        i = index.entity_id(name) if index else -1
        if i >= 0 and in_kg[i]:
            return int(kg_rank[i])
        return res.extra_entities.setdefault(name, n_kg + len(res.extra_entities))

    # Triple vocabulary: the KG's sorted triples, then extracted ones the KG lacks, in input order.
    n_kg_triples = know.n_triples
    new_index: dict[Triple, int] = {}

    def triple(t: Triple) -> int:
        i = index.triple_index(t) if index else -1
        if i < 0:
            if t not in new_index:
                new_index[t] = n_kg_triples + len(res.new_triples)
                res.new_triples.append(t)
            i = new_index[t]
        return i

    for path in chunk_files:
        chunk = read_chunk(path)
        res.records += chunk.records
        res.extractor_counts.update(chunk.extractor_counts)
        res.rejected.update(chunk.rejected)
        # the chunk's entities and new triples to dataset ids, in order of first mention (as the input
        # order gives the entities met in the text and the extracted triples their ids)
        eid = chunk.entity_ids
        known = (eid >= 0) & (in_kg[np.maximum(eid, 0)] if len(in_kg) else False)
        ents = np.where(known, kg_rank[np.maximum(eid, 0)] if len(kg_rank) else -1, -1)
        for k in np.flatnonzero(~known).tolist():
            name = chunk.entities[k]  # None: an index entity outside the KG's triples, named by the index
            ents[k] = entity(name if name is not None or index is None else index.names[int(eid[k])])
        news = np.array([triple(t) for t in chunk.new_triples], dtype=np.int64)
        for i, p in zip(news.tolist(), chunk.new_triple_scores):
            if p is not None and i >= n_kg_triples:
                res.new_triple_scores[i] = max(p, res.new_triple_scores.get(i, 0.0))
        spans, triples = chunk.spans.copy(), chunk.triples.copy()
        spans[:, 3] = ents[spans[:, 3]]
        extracted = triples[:, 3] < 0
        res.attached_by_extractor += int(extracted.sum())
        triples[extracted, 3] = news[-1 - triples[extracted, 3]]
        res.triple_hits.add(triples[:, 3])
        lengths, n_mentions, key, part, last = chunk.doc_info.T
        valid = in_valid(key, cfg.valid_fraction)
        for split, mine in (("train", ~valid), ("valid", valid)):
            if not mine.any():
                continue
            renumber = np.cumsum(mine) - 1  # this split's documents, 0.. in input order
            s_mine, t_mine = spans[mine[spans[:, 0]]], triples[mine[triples[:, 0]]]
            s_mine[:, 0], t_mine[:, 0] = renumber[s_mine[:, 0]], renumber[t_mine[:, 0]]
            ids = chunk.ids[np.repeat(mine, lengths)].astype(np.int64)
            packers[split].add_docs(ids, lengths[mine], last[mine].astype(bool), s_mine, t_mine)
            counts[split] += int(last[mine].sum())  # a document, once its last piece is in
        res.documents_split += int(((part == 0) & (last == 0)).sum())
        res.pieces += int(((part > 0) | (last == 0)).sum())
        res.mentions += int(n_mentions.sum())
        progress.update()
    progress.close()
    check_rejected(cfg, res.records, res.rejected)
    # the entities of the extracted triples, for kg_triples.npy (one whose mention was cut to no token
    # has no index yet: it gets one here)
    res.new_triple_entities = [(entity(t.head), entity(t.tail)) for t in res.new_triples]
    res.kg_rank = kg_rank
    res.splits = splits = {s: {"documents": counts[s], **p.finish()} for s, p in packers.items()}
    res.written = counts["train"] + counts["valid"]
    if not splits["train"]["shards"]:
        raise DataError(
            f"{cfg.corpus[0]}: the corpus is too small to fill one training row of {cfg.seq_len} tokens"
        )
    return _write_metadata(work, cfg, know, tok, dtype, res), res


def _write_kg_triples(path: Path, index: KGIndex | None, res: Packed, relations: list[str]) -> None:
    """kg_triples.npy: (head, relation, tail) dataset indices of every triple index, a block at a time."""
    n_kg = len(index.triples) if index else 0
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(n_kg + len(res.new_triples), 3))
    if index and res.kg_rank is not None:
        block = 1 << 20
        for b in range(0, n_kg, block):
            rows = np.asarray(index.triples[b : b + block])
            out[b : b + len(rows), 0] = res.kg_rank[rows[:, 0]]
            out[b : b + len(rows), 1] = rows[:, 1]  # the KG's relations come first in relations.tsv, sorted
            out[b : b + len(rows), 2] = res.kg_rank[rows[:, 2]]
    rel = {r: i for i, r in enumerate(relations)}
    for k, (t, (head, tail)) in enumerate(zip(res.new_triples, res.new_triple_entities), n_kg):
        out[k] = (head, rel[t.relation], tail)
    out.flush()
    del out


def _write_metadata(work: Path, cfg: PrepConfig, know: Knowledge, tok, dtype: np.dtype, res: Packed) -> dict:
    triple_hits, splits = res.triple_hits, res.splits
    written, mentions = res.written, res.mentions
    rejected, gold_links = split_notes(res.rejected)
    index = know.index

    def surface(name: str) -> str:
        """entities.tsv's name of an entity: its first alias, else its id with underscores as spaces."""
        i = index.entity_id(name) if index else -1
        return (index.surfaces[i] if i >= 0 and index else "") or name.replace("_", " ")

    def line(k: int, name: str) -> str:
        """An entity met in the text; one an NER model found (extracted:<TYPE>:<surface>) with its
        surface, source "extracted" and type."""
        if name.startswith(EXTRACTED):
            type_, _, norm = name[len(EXTRACTED) :].partition(":")
            return f"{k}\t{name}\t{norm.replace('_', ' ')}\textracted\t{type_}\n"
        return f"{k}\t{name}\t{surface(name)}\n"

    with open(work / "entities.tsv", "wb") as f:
        if index:
            index.write_entities(f)
        f.write("".join(line(k, name) for name, k in res.extra_entities.items()).encode())
    relations = list(dict.fromkeys([*know.relations, *(t.relation for t in res.new_triples)]))
    (work / "relations.tsv").write_text(
        "".join(f"{i}\t{r}\n" for i, r in enumerate(relations)), encoding="utf-8"
    )
    n_kg = know.n_triples
    with open(work / "triples.tsv", "wb") as f:
        if index:
            index.write_triples(f, triple_hits.kg)
        model = _extractor_name(cfg)
        scored = {i: f"\t{p:.4f}\t{model}" for i, p in res.new_triple_scores.items()}
        f.write(
            "".join(
                f"{i}\t{t.head}\t{t.relation}\t{t.tail}\t{triple_hits.new[i]}\textracted{scored.get(i, '')}\n"
                for i, t in enumerate(res.new_triples, n_kg)
            ).encode()
        )

    _write_kg_triples(work / "kg_triples.npy", index, res, relations)

    per_relation = triple_hits.per_relation()
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
        "documents_rejected": rejected,
    }
    (work / "stats.json").write_text(json.dumps(stats, indent=2))
    inputs = [*cfg.corpus, *(x for x in (cfg.kg, cfg.aliases) if x)]
    manifest = {
        "format": FORMAT,
        "config": {k: v for k, v in asdict(cfg).items() if k not in _RUN_ONLY_FIELDS},
        "inputs": [{"path": str(p), "sha256": _treesha256_file(Path(p))} for p in inputs],
        "tokenizer": {
            "file": tok.name,
            "type": tok.kind,
            "vocab_size": tok.vocab_size,
            "pad_id": tok.pad_id,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "unk_id": tok.unk_id,
            "mask_id": tok.mask_id,
            "sha256": _treesha256_file(work / tok.name),
        },
        "seq_len": cfg.seq_len,
        "dtype": dtype.name,
        "documents_in": res.records,
        "documents_written": written,
        "documents_rejected": rejected,
        **({"gold_links": gold_links} if gold_links else {}),
        "documents_split": res.documents_split,
        "document_pieces": res.pieces,
        "tokens": tokens,
        "tokens_dropped_tail": sum(s["tokens_dropped_tail"] for s in splits.values()),
        "mentions": mentions,
        "spans": sum(s["spans"] for s in splits.values()),
        "spans_clipped": sum(s.get("spans_clipped", 0) for s in splits.values()),
        "spans_dropped_tail": sum(s.get("spans_dropped_tail", 0) for s in splits.values()),
        "entities": res.n_kg_entities + len(res.extra_entities),
        "relations": len(relations),
        "kg_triples": n_kg,
        "kg_triples_without_alias": know.missing_alias,
        "triples_attached": triple_hits.total(),
        "triples_attached_by_extractor": res.attached_by_extractor,
        "triples_new_from_extractor": len(res.new_triples),
        **({"extractor_counts": dict(sorted(res.extractor_counts.items()))} if res.extractor_counts else {}),
        "distinct_triples_attached": triple_hits.distinct(),
        "triples_per_relation": dict(sorted(per_relation.items())),
        "splits": splits,
    }
    output.fsync_tree(work)  # every file and entry on disk before the manifest that vouches for them
    tmp = work / (MANIFEST + ".tmp")
    output.write_durable(tmp, json.dumps(manifest, indent=2).encode())
    tmp.rename(work / MANIFEST)
    output.fsync_dir(work)
    return manifest


def prepare(cfg: PrepConfig, log=print, dry_run: bool = False) -> dict:
    """Every stage: inputs, tokenizer, join (link, extract, join), pack. Resumes finished work found
    in <output>.parts; with --num_shards > 1 it stops after this machine's share of the join
    (run `merge` once all shards are done). Returns the manifest ({} when not packing)."""
    cfg.validate()
    check_output(cfg)  # before anything is written beside the output (the KG index)
    know = load_inputs(cfg, log)
    if dry_run:
        log(f"data_prep: inputs are valid ({len(cfg.corpus)} corpus files, {know.n_triples} triples)")
        return {}
    if cfg.num_shards > 1 and not cfg.tokenizer and find_tokenizer(parts_dir(cfg)) is None:
        raise DataError(
            "with --num_shards > 1 every machine must use the same tokenizer: run "
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
