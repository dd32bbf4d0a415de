"""Pluggable knowledge extractors: code that adds entity mentions and triples the KG does not have.

An extractor is any class with `extract(text, mentions) -> Extraction`, constructed from keyword
arguments (`--extractor module:Class --extractor_args args.json`). It runs in the join stage's
worker processes, after alias linking, on every document. Its mentions are added where no mention
is yet; its triples are attached to the rows covering their evidence span and written to
`triples.tsv` with source "extracted" (new ones are appended to the triple vocabulary in input order).

`InfixExtractor` is the reference implementation: a relation holds between two mentions of one
sentence when the text between them is one of the relation's connecting phrases.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from data_prep.kg import Mention, Triple
from data_prep.readers import DataError

EXTRACTED = "extracted:"
"""Prefix of the ids of new entities a model extractor found (extracted:<TYPE>:<surface>); entities.tsv
lists them with source "extracted" and the type."""


@dataclass
class Extraction:
    mentions: list[Mention] = field(default_factory=list)
    """New entity mentions (character spans of the text)."""
    triples: list[tuple[int, int, Triple]] = field(default_factory=list)
    """(start, end, triple): a triple and the character span of its evidence."""
    scores: list[float] = field(default_factory=list)
    """Each triple's confidence in [0, 1], where the extractor gives one (else empty)."""
    counts: dict[str, int] = field(default_factory=dict)
    """What the extractor counted in this document (pairs scored, sentences too long, ...): summed into
    the manifest's `extractor_counts`, so that nothing it passes over goes unreported."""


class Extractor(Protocol):
    def extract(self, text: str, mentions: list[Mention]) -> Extraction: ...


def load_extractor(spec: str, args_file: str | None = None) -> Extractor:
    """`module:Class` (importable), built with the JSON object in args_file as keyword arguments; or
    fine-tuning run folders, comma-separated: data_prep/model_extractor.py's ModelExtractor of them."""
    kwargs = json.loads(Path(args_file).read_text()) if args_file else {}
    runs = spec.split(",")
    if all(Path(r).is_dir() for r in runs):
        from data_prep.model_extractor import ModelExtractor

        try:
            return ModelExtractor(runs, **kwargs)
        except (ValueError, OSError, RuntimeError) as e:
            raise DataError(f"extractor={spec!r}: {e}") from e
    module_name, _, class_name = spec.partition(":")
    if not class_name:
        raise DataError(
            f"extractor={spec!r}: expected module:Class (e.g. data_prep.extractors:InfixExtractor) or "
            "fine-tuning run folders, comma-separated (that exist)"
        )
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise DataError(f"extractor={spec!r}: cannot import it ({e})") from e
    return cls(**kwargs)


class InfixExtractor:
    """relation -> connecting phrases: "A <phrase> B" in one sentence gives (A, relation, B)."""

    def __init__(self, patterns: dict[str, list[str]], max_gap: int = 40):
        if not patterns:
            raise DataError("InfixExtractor needs patterns: {relation: [connecting phrase, ...]}")
        self.phrases = {p.strip().lower(): rel for rel, phrases in patterns.items() for p in phrases}
        self.max_gap = max_gap

    def extract(self, text: str, mentions: list[Mention]) -> Extraction:
        out = Extraction()
        ordered = sorted(mentions)
        for a, b in zip(ordered, ordered[1:]):
            gap = text[a.end : b.start]
            if len(gap) > self.max_gap or "." in gap:
                continue
            rel = self.phrases.get(gap.strip().lower())
            if rel is not None and a.entity != b.entity:
                out.triples.append((a.start, b.end, Triple(a.entity, rel, b.entity)))
        return out
