"""Knowledge extraction with our own models: a fine-tuned relation run as a data_prep extractor.

    python -m data_prep run --corpus news.txt --kg kg.tsv --aliases aliases.tsv --output data/news \\
        --extractor data_prep.model_extractor:RelationModelExtractor --extractor_args rel.json
    # rel.json: {"run": "runs/relation", "threshold": 0.9, "batch_size": 64}

The run is one `launcher/finetune.py --task relation` trained, for instance, on `python -m data_prep
relations` (distant supervision from the corpus and the seed KG). For every sentence of a document (the
join stage's split, at most `max_sentence_chars` long), the mentions found before the extractor runs
(wiki or gold links, alias matches) give the first mention of each entity; every ordered pair of two
different entities, spans not overlapping, is marked `[E1] ... [/E1]`, `[E2] ... [/E2]` as fine-tuning
marked it (`data_prep relations` builds its examples the same way) and classified. A relation other than
the negative label with probability >= `threshold` becomes the triple (e1's entity, relation, e2's
entity), attached with the sentence as its evidence; triples the KG lacks are written to triples.tsv
with source "extracted". A document's pairs are scored in batches of `batch_size`, shortest first;
on CUDA when there is one (`device`).
"""

from __future__ import annotations

import bisect
from collections import Counter

from data_prep.extractors import Extraction
from data_prep.kg import Mention, Triple


class _Everything:
    def __contains__(self, name: object) -> bool:
        return True


class RelationModelExtractor:
    def __init__(
        self,
        run: str,
        threshold: float = 0.5,
        batch_size: int = 64,
        max_sentence_chars: int = 400,
        device: str = "auto",
        task: str | None = None,
    ):
        from sparsexpert.finetune.predict import FinetunedModel

        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold}: a probability in [0, 1]")
        self.model = FinetunedModel.load(run, device=device)
        self.t = self.model.task("relation", task)
        self.labels = self.model.tasks[self.t].labels
        self.negative = self.model.negative.get(self.model.tasks[self.t].name, "no_relation")
        self.threshold, self.batch_size, self.max_chars = threshold, batch_size, max_sentence_chars
        self.counts: Counter[str] = Counter()

    def extract(self, text: str, mentions: list[Mention]) -> Extraction:
        from data_prep.join import _sentences
        from data_prep.relations import sentence_pairs
        from sparsexpert.finetune.readers import RelationExample

        ordered = sorted((m.start, m.end, m.entity) for m in mentions)
        starts = [m[0] for m in ordered]
        examples, where = [], []
        for s, e in _sentences(text):
            if e - s > self.max_chars:
                self.counts["sentences_too_long"] += 1
                continue
            lo, hi = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
            inside = [(ms - s, me - s, ent) for ms, me, ent in ordered[lo:hi] if me <= e]
            for a, b in sentence_pairs(inside, _Everything(), self.counts):
                examples.append(RelationExample(text[s:e], (a[0], a[1]), (b[0], b[1]), self.negative))
                where.append((s, e, a[2], b[2]))
        out = Extraction()
        if not examples:
            return out
        probs, kept = self.model.relation_probs(examples, self.model.tasks[self.t].name, self.batch_size)
        best = probs.argmax(1)
        for (s, e, head, tail), k, p, ok in zip(where, best.tolist(), probs.max(1).tolist(), kept.tolist()):
            self.counts["pairs_scored" if ok else "pairs_cut"] += 1
            if ok and self.labels[k] != self.negative and p >= self.threshold:
                out.triples.append((s, e, Triple(head, self.labels[k], tail)))
                out.scores.append(p)
        return out
