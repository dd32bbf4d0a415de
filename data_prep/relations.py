"""A relation-classification dataset by distant supervision, for fine-tuning.

    python -m data_prep relations --corpus news.txt --kg kg.tsv --aliases aliases.tsv --case exact \\
        --output data/rel [--valid_fraction 0.2] [--negative_ratio 1.0] [--seed 0] [--max_sentence_chars 400]

Documents are read, normalized and deduplicated as the pipeline's ingest stage does; mentions are
found as its link stage does (MediaWiki links first, then KG alias matches). For every sentence
(the join stage's sentence split) no longer than `max_sentence_chars`, the first mention of each
KG entity in it is taken, and every ordered pair of two different entities whose spans do not
overlap is an example: positive, labelled with the relation of a KG triple (head = e1, tail = e2)
- the first in the KG's sorted order where the pair has several (counted in
`multi_relation_pairs`) - or negative, labelled `no_relation`. All positives are kept; of the
negatives, a seeded random sample of at most `negative_ratio * positives`. A relation whose examples
all fall in dev cannot be learned: its dev examples are left out, unless no example is in train at all (stats.json counts them per relation
in `dev_left_out_relation_not_in_train`).

Sentences are split between train and dev by a hash of their text (as the pipeline splits
documents), so a sentence and all its examples, and any repeat of it, fall in one split, and the
split does not depend on the seed. Output folder:

    train.jsonl, dev.jsonl   one example a line, in corpus order: {"text": sentence, "e1": [s, e],
                             "e2": [s, e], "label": relation or "no_relation", "e1_id", "e2_id"}
                             (spans are [start, end) character offsets of "text")
    stats.json               counts (documents, sentences, positives per relation, negatives kept and
                             dropped, ...), the label set and the parameters; written last

The same inputs and parameters give byte-identical output.
"""

from __future__ import annotations

import bisect
import json
import random
import uuid
import zlib
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.join import _sentences, find_mentions
from data_prep.pipeline import DataError, PrepConfig, Progress, documents_in, iter_docs, load_inputs

NO_RELATION = "no_relation"


@dataclass
class RelationsConfig:
    """One `python -m data_prep relations` run."""

    corpus: list[str] = field(default_factory=list)
    """Corpus files, in any format the pipeline reads."""
    kg: str | None = None
    """Knowledge-graph triples (.tsv, .nt, .jsonl): required."""
    output: str = ""
    """Folder to write train.jsonl, dev.jsonl and stats.json into."""
    aliases: str | None = None
    """entity_id<TAB>surface form file. None: entity names (underscores as spaces) are the aliases."""
    case: str = "ignore"
    """Alias matching: "ignore" case or "exact"."""
    text_field: str = "text"
    """Field (JSONL) or column (Parquet) holding the text."""
    on_error: str = "fail"
    """Bad input records: "fail" with file:line, or "skip" and count them."""
    valid_fraction: float = 0.2
    """Share of sentences (chosen by a hash of their text) in dev.jsonl."""
    negative_ratio: float = 1.0
    """Negatives kept: at most this many per positive, a seeded random sample."""
    seed: int = 0
    """Seed of the negative sample."""
    max_sentence_chars: int = 400
    """Longer sentences are skipped (and counted)."""

    def prep_config(self) -> PrepConfig:
        """The pipeline config for the shared input checks, reading and deduplication."""
        return PrepConfig(
            corpus=list(self.corpus),
            output=self.output,
            kg=self.kg,
            aliases=self.aliases,
            case=self.case,
            text_field=self.text_field,
            on_error=self.on_error,
        )

    def validate(self) -> None:
        if not self.kg:
            raise DataError("no knowledge graph: pass --kg FILE (the relations come from its triples)")
        if self.case not in ("exact", "ignore"):
            raise DataError(f"case={self.case!r}: use 'exact' or 'ignore'")
        if not 0.0 <= self.valid_fraction <= 1.0:
            raise DataError(f"valid_fraction={self.valid_fraction}: must be in [0, 1]")
        if self.negative_ratio < 0:
            raise DataError(f"negative_ratio={self.negative_ratio}: must be >= 0")
        if self.max_sentence_chars < 1:
            raise DataError(f"max_sentence_chars={self.max_sentence_chars}: must be >= 1")


def _is_dev(sentence: str, valid_fraction: float) -> bool:
    return zlib.crc32(sentence.encode()) % 10_000 < valid_fraction * 10_000


def _atomic_write(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(data, encoding="utf-8")
    tmp.replace(path)


def sentence_pairs(
    mentions: list[tuple[int, int, str]], entities: Container[str], counts: Counter
) -> list[tuple[tuple[int, int, str], tuple[int, int, str]]]:
    """Ordered pairs (e1 mention, e2 mention) of a sentence: the first mention of each KG entity
    (spans relative to the sentence, sorted), two different entities, spans not overlapping."""
    first: dict[str, tuple[int, int, str]] = {}
    for m in mentions:
        if m[2] not in entities:
            counts["mentions_not_in_kg"] += 1
        elif m[2] not in first:
            first[m[2]] = m
    ordered = sorted(first.values())
    pairs = []
    for a in ordered:
        for b in ordered:
            if a[2] == b[2]:
                continue
            if a[0] < b[1] and b[0] < a[1]:
                counts["overlapping_pairs_skipped"] += 1
                continue
            pairs.append((a, b))
    return pairs


def prepare_relations(rc: RelationsConfig, log=print) -> dict:
    """Build the dataset into rc.output; returns the stats (also written to stats.json)."""
    from data_prep.kg_index import KGEntities, PairIndex

    rc.validate()
    cfg = rc.prep_config()
    know = load_inputs(cfg, log)  # checks the corpus paths, opens the KG index (DataError names the file)
    index = know.index
    assert index is not None  # rc.validate() requires a KG
    entities, pair_index = KGEntities(index), PairIndex(index)
    linker = index.matcher()
    counts: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    positives_per_relation: Counter[str] = Counter()
    # Sentences with examples, and every example in corpus order as (sentence index, e1, e2, label).
    sentences: list[str] = []
    examples: list[tuple[int, tuple, tuple, str]] = []
    negatives: list[int] = []  # positions in `examples`
    progress = Progress("data_prep relations", unit="docs")
    n_docs = 0
    for doc in iter_docs(cfg, counts, rejected):
        n_docs += doc.last  # a document over max_doc_chars comes in pieces
        progress.update(doc.last)
        mentions, _ = find_mentions(doc, linker, None)
        starts = [m[0] for m in mentions]
        for s, e in _sentences(doc.text):
            counts["sentences"] += 1
            if e - s > rc.max_sentence_chars:
                counts["skipped_long"] += 1
                continue
            lo, hi = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
            # A mention across a sentence end belongs to no sentence.
            inside = [(ms - s, me - s, ent) for ms, me, ent in mentions[lo:hi] if me <= e]
            pairs = sentence_pairs(inside, entities, counts)
            if not pairs:
                continue
            counts["sentences_with_pair"] += 1
            k = len(sentences)
            sentences.append(doc.text[s:e])
            for a, b in pairs:
                found = pair_index.get((a[2], b[2]))
                if found:
                    if len(found) > 1:
                        counts["multi_relation_pairs"] += 1
                    label = index.triple(found[0]).relation
                    positives_per_relation[label] += 1
                else:
                    label = NO_RELATION
                    negatives.append(len(examples))
                examples.append((k, a, b, label))
    progress.close()

    n_positives = len(examples) - len(negatives)
    n_keep = min(len(negatives), int(rc.negative_ratio * n_positives + 1e-9))  # 0.29 * 100 is 28.99...
    dropped = set(negatives) - set(random.Random(rc.seed).sample(negatives, n_keep))
    lines: dict[str, list[str]] = {"train": [], "dev": []}
    labels_in: dict[str, set[str]] = {"train": set(), "dev": set()}
    for i, (k, a, b, label) in enumerate(examples):
        if i in dropped:
            continue
        text = sentences[k]
        record = {
            "text": text,
            "e1": [a[0], a[1]],
            "e2": [b[0], b[1]],
            "label": label,
            "e1_id": a[2],
            "e2_id": b[2],
        }
        split = "dev" if _is_dev(text, rc.valid_fraction) else "train"
        lines[split].append(json.dumps(record, ensure_ascii=False) + "\n")
        labels_in[split].add(label)
    # a relation whose every example fell in dev cannot be learned (fine-tuning refuses a dev label the
    # training file never uses): its dev examples are left out, counted per relation
    unseen = (
        labels_in["dev"] - labels_in["train"] if lines["train"] else set()
    )  # all in dev: an evaluation set
    dev_unseen: Counter[str] = Counter()
    if unseen:
        kept_dev = []
        for line in lines["dev"]:
            label = json.loads(line)["label"]
            if label in unseen:
                dev_unseen[label] += 1
            else:
                kept_dev.append(line)
        lines["dev"] = kept_dev

    if not n_positives:
        raise DataError(
            f"{', '.join(rc.corpus)}: no sentence mentions two entities related in {rc.kg} "
            f"({n_docs} documents, {counts['sentences']} sentences, {len(negatives)} unrelated pairs); "
            "check --aliases and --case"
        )
    out = Path(rc.output)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in lines.items():
        _atomic_write(out / f"{split}.jsonl", "".join(rows))
    per_relation = dict(sorted(positives_per_relation.items(), key=lambda kv: (-kv[1], kv[0])))
    stats = {
        "documents_in": documents_in(counts, rejected),
        "documents": n_docs,
        "documents_rejected": dict(sorted(rejected.items())),
        "sentences": counts["sentences"],
        "skipped_long": counts["skipped_long"],
        "sentences_with_pair": counts["sentences_with_pair"],
        "mentions_not_in_kg": counts["mentions_not_in_kg"],
        "overlapping_pairs_skipped": counts["overlapping_pairs_skipped"],
        "positives": n_positives,
        "positives_per_relation": per_relation,
        "multi_relation_pairs": counts["multi_relation_pairs"],
        "negatives": len(negatives),
        "negatives_kept": n_keep,
        "negatives_dropped": len(negatives) - n_keep,
        "train": len(lines["train"]),
        "dev": len(lines["dev"]),
        **({"dev_left_out_relation_not_in_train": dict(sorted(dev_unseen.items()))} if dev_unseen else {}),
        "labels": [NO_RELATION, *sorted(per_relation)],
        "kg_relations": len(know.relations),
        "params": {
            "case": rc.case,
            "valid_fraction": rc.valid_fraction,
            "negative_ratio": rc.negative_ratio,
            "seed": rc.seed,
            "max_sentence_chars": rc.max_sentence_chars,
        },
    }
    _atomic_write(out / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    log(
        f"data_prep relations: documents {n_docs}, sentences {stats['sentences']} (with a pair "
        f"{stats['sentences_with_pair']}, skipped long {stats['skipped_long']}); positives "
        f"{stats['positives']} over {len(per_relation)} relations, negatives kept {n_keep} "
        f"(dropped {stats['negatives_dropped']}); train {stats['train']}, dev {stats['dev']} -> {out}"
    )
    return stats
