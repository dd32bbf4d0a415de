"""Knowledge extraction with our own models: fine-tuned NER and relation runs as a data_prep extractor.

    python -m data_prep run --corpus news.txt --kg kg.tsv --aliases aliases.tsv --output data/news \\
        --extractor runs/relation                        # a fine-tuned relation run
    python -m data_prep run ... --extractor runs/ner,runs/relation --extractor_args x.json
    # x.json (optional): {"threshold": 0.9, "batch_size": 64, "device": "auto", "max_sentence_chars": 400}

`--extractor` takes fine-tuning runs (folders; `launcher/finetune.py` wrote them), comma-separated: one
with a relation task, one with an NER task, or one multi-task run with both. The same is
`--extractor data_prep.model_extractor:ModelExtractor` with {"runs": [...]} in the arguments file.

Per sentence of a document (the join stage's split, at most `max_sentence_chars` long):
- NER (with an NER run): the words (`WORD`: punctuation apart) are tagged as fine-tuning tags them; an entity
  that overlaps no mention found before (wiki or gold links, alias matches: an entity the KG names by an
  alias is found by the alias linker first) becomes a new mention of a new entity, whose id is
  `extracted:<TYPE>:<surface, NFKC, case-folded, spaces as _>` (stable: the same surface and type
  give the same id in every document); entities.tsv lists it with source "extracted" and its type.
- Relations (with a relation run): the first mention of each entity gives the pairs; every ordered
  pair of two different entities, spans not overlapping, is marked `[E1] ... [/E1]`, `[E2] ... [/E2]` as
  fine-tuning marked it (`data_prep relations` builds its examples the same way) and classified. A
  relation other than the negative label with probability >= `threshold` becomes the triple (e1's
  entity, relation, e2's entity), attached with the sentence as its evidence; triples.tsv writes one
  the KG lacks with source "extracted", its highest probability and the run.

A document's sentences and pairs are scored in batches of `batch_size`, shortest first, on CUDA when
there is one (`device`); each worker process loads the models once. On the CPU the workers share one copy
of the weights (`share_weights`): memory-mapped from SPARSEXPERT_CACHE (default ~/.cache/sparsexpert),
written there once per checkpoint (sparsexpert/finetune/predict.py: shared_weights).
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections import Counter

from data_prep.extractors import EXTRACTED, Extraction
from data_prep.kg import Mention, Triple

WORD = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]")
"""The words NER tags: runs of letters and digits (joined by - or an apostrophe), and each other
non-space character alone, as CoNLL data separates punctuation."""


def new_entity_id(surface: str, type_: str) -> str:
    norm = "_".join(unicodedata.normalize("NFKC", surface).casefold().split())
    return f"{EXTRACTED}{type_}:{norm}"


class _Everything:
    def __contains__(self, name: object) -> bool:
        return True


class ModelExtractor:
    def __init__(
        self,
        runs: list[str] | str,
        threshold: float = 0.5,
        batch_size: int = 64,
        max_sentence_chars: int = 400,
        device: str = "auto",
        share_weights: bool = True,
    ):
        from sparsexpert.finetune.predict import FinetunedModel

        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold}: a probability in [0, 1]")
        runs = [r for r in ([runs] if isinstance(runs, str) else runs) if r]
        self.ner = self.relation = None
        for run in runs:
            model = FinetunedModel.load(run, device=device, shared=share_weights)
            kinds = {t.kind for t in model.tasks}
            if "ner" in kinds and self.ner is None:
                self.ner, self.ner_task = model, model.task("ner")
            if "relation" in kinds and self.relation is None:
                self.relation, self.rel_task = model, model.task("relation")
            if not kinds & {"ner", "relation"}:
                raise ValueError(
                    f"{run}: its tasks are {sorted(kinds)}; an extractor needs an ner or a relation task"
                )
        if self.ner is None and self.relation is None:
            raise ValueError("no run given: runs=[an NER run and/or a relation run]")
        if self.relation is not None:
            spec = self.relation.tasks[self.rel_task]
            self.labels, self.negative = spec.labels, self.relation.negative.get(spec.name, "no_relation")
        self.runs = runs
        self.threshold, self.batch_size, self.max_chars = threshold, batch_size, max_sentence_chars

    @property
    def name(self) -> str:
        return ",".join(self.runs)

    def _ner(
        self, text: str, sentences: list[tuple[int, int]], taken: list[tuple[int, int]], counts: Counter[str]
    ) -> list[Mention]:
        """New mentions: NER entities of each sentence overlapping no mention in `taken` (the others counted)."""
        assert self.ner is not None
        words = [[(m.start() + s, m.end() + s) for m in WORD.finditer(text[s:e])] for s, e in sentences]
        found = self.ner.ner_entities(
            [[text[a:b] for a, b in w] for w in words], self.ner.tasks[self.ner_task].name, self.batch_size
        )
        used = bytearray(len(text) + 1)  # characters some mention covers
        for a, b in taken:
            used[a:b] = b"\x01" * (b - a)
        out: list[Mention] = []
        for w, entities in zip(words, found):
            # offsets in the words joined by single spaces -> offsets in the text
            joined = [0]
            for a, b in w:
                joined.append(joined[-1] + (b - a) + 1)
            for ent in entities:
                i, j = (
                    bisect.bisect_right(joined, ent["start"]) - 1,
                    bisect.bisect_right(joined, ent["end"] - 1) - 1,
                )
                start = w[i][0] + ent["start"] - joined[i]
                end = w[j][0] + ent["end"] - joined[j]
                if any(used[start:end]):
                    counts["ner_entities_overlapping"] += 1
                    continue
                used[start:end] = b"\x01" * (end - start)
                counts["ner_entities_new"] += 1
                out.append(Mention(start, end, new_entity_id(text[start:end], ent["type"])))
        return out

    def extract(self, text: str, mentions: list[Mention]) -> Extraction:
        """The document's new mentions and triples; what was passed over is counted in out.counts."""
        counts: Counter[str] = Counter()
        out = self._extract(text, mentions, counts)
        out.counts = dict(counts)
        return out

    def _extract(self, text: str, mentions: list[Mention], counts: Counter[str]) -> Extraction:
        from data_prep.join import _sentences
        from data_prep.relations import sentence_pairs
        from sparsexpert.finetune.readers import RelationExample

        out = Extraction()
        sentences = []
        for s, e in _sentences(text):
            if e - s > self.max_chars:
                counts["sentences_too_long"] += 1
            else:
                sentences.append((s, e))
        if self.ner is not None and sentences:
            out.mentions = self._ner(text, sentences, [(m.start, m.end) for m in mentions], counts)
        if self.relation is None:
            return out
        ordered = sorted((m.start, m.end, m.entity) for m in [*mentions, *out.mentions])
        starts = [m[0] for m in ordered]
        examples, where = [], []
        for s, e in sentences:
            lo, hi = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
            inside = [(ms - s, me - s, ent) for ms, me, ent in ordered[lo:hi] if me <= e]
            for a, b in sentence_pairs(inside, _Everything(), counts):
                examples.append(RelationExample(text[s:e], (a[0], a[1]), (b[0], b[1]), self.negative))
                where.append((s, e, a[2], b[2]))
        if not examples:
            return out
        probs, kept = self.relation.relation_probs(
            examples, self.relation.tasks[self.rel_task].name, self.batch_size
        )
        best = probs.argmax(1)
        for (s, e, head, tail), k, p, ok in zip(where, best.tolist(), probs.max(1).tolist(), kept.tolist()):
            counts["pairs_scored" if ok else "pairs_cut"] += 1
            if ok and self.labels[k] != self.negative and p >= self.threshold:
                out.triples.append((s, e, Triple(head, self.labels[k], tail)))
                out.scores.append(p)
        return out
