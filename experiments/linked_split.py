"""Hold facts out of linked text (REBEL / T-REx layout) for the real-data knowledge ablation.

Every distinct fact (subject uri, predicate surface form, object uri) of the file is drawn, by a hash
of the fact and the seed, into one of three assignments:

- `heldout` (share `heldout_share`): the fact's triples are removed from every record, so the KG that
  data_prep reads from the file lacks it; the text that states it is kept.
- `kg_only` (share `kg_only_share`): the KG keeps the fact; every sentence that states it is removed
  from the text: the sentence holding the object of one of its triples (REBEL aligns the object; the
  subject is often implied), and any sentence that mentions both of its ends.
- the rest: kept in the KG and in the text.

What a fact's status is after that is then read off the output, over the training documents only
(the documents data_prep puts in its valid split, by the same content hash, are held out for
perplexity and state nothing to training): in the KG or not, stated in a kept sentence of a training
document or not. The probe groups are:

- `stated.tsv`: in the KG and stated;
- `kg_only.tsv`: in the KG, never stated (what only the KG can teach);
- `heldout.tsv`: stated, not in the KG (what only the text can teach; link prediction's test set);
- facts in neither are counted in `split.json`, not probed.

A fact's group can differ from its assignment: a sentence removed for a `kg_only` fact takes the other
facts it states with it, and a fact stated only in held-out documents is stated to no arm. Each file
holds head, relation, tail and the two ends' surface forms (the form the text uses most often);
`known.tsv` holds every fact of the input (the filter and the candidate pools of the probe).
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

from data_prep.join import _sentences
from data_prep.kg import _linked_aliases, _uri, linked_triple
from data_prep.output import atomic_write
from data_prep.pipeline import in_valid_split
from data_prep.readers import _gold_links

Fact = tuple[str, str, str]
GROUPS = ("stated", "kg_only", "heldout")


def assignment(fact: Fact, seed: int, heldout_share: float, kg_only_share: float) -> str:
    u = zlib.crc32("\t".join((str(seed), *fact)).encode()) % 10_000 / 10_000
    return "heldout" if u < heldout_share else "kg_only" if u < heldout_share + kg_only_share else "kept"


def _sentence_of(pos: int, sents: list[tuple[int, int]]) -> int | None:
    for k, (s, e) in enumerate(sents):
        if s <= pos < e:
            return k
    return None


def _aligned(term: dict, text: str) -> tuple[int, int, str] | None:
    """A triple end's (start, end, uri) in text, realigned as the reader realigns mentions."""
    if not isinstance(term.get("boundaries"), list) or _uri(term) is None:
        return None
    links = _gold_links([term], text, "", None, None)
    return (links[0].start, links[0].end, links[0].target) if links else None


def split_linked_text(
    src: str | Path,
    out: str | Path,
    heldout_share: float = 0.2,
    kg_only_share: float = 0.2,
    valid_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """Write <out>/corpus.jsonl (the linked text less what is held out: corpus and KG for data_prep
    with the same valid_fraction), the probe groups, known.tsv and split.json (counts); returns the
    counts."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for lineno, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{src}:{lineno}: malformed JSON ({err.msg}); fix or remove the line"
                ) from err
            rec = records[-1][1]
            if not (
                isinstance(rec, dict)
                and isinstance(rec.get("text"), str)
                and isinstance(rec.get("triples"), list)
            ):
                raise ValueError(f"{src}:{lineno}: not linked text (REBEL / T-REx: text, entities, triples)")
    forms: dict[str, Counter] = {}
    known: dict[Fact, None] = {}
    for _, rec in records:
        for uri, form in _linked_aliases(rec):  # the surface forms the KG reader takes as aliases
            forms.setdefault(uri, Counter())[form] += 1
        for tr in rec["triples"]:
            f = linked_triple(tr)
            if f is not None:
                known.setdefault(f)
    surface = {u: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for u, c in forms.items()}
    assigned = {f: assignment(f, seed, heldout_share, kg_only_share) for f in known}
    kg_only_pairs = {(h, t) for (h, _, t), a in assigned.items() if a == "kg_only"}
    by_pair: dict[tuple[str, str], list[Fact]] = {}
    for f in known:
        by_pair.setdefault((f[0], f[2]), []).append(f)

    counts: Counter = Counter()
    in_kg: set[Fact] = set()
    stated: set[Fact] = set()
    written = []
    for lineno, rec in records:
        text = rec["text"]
        sents = _sentences(text)
        gold = _gold_links(rec.get("entities", []), text, "", None, None)
        if gold is None:
            raise ValueError(
                f"{src}:{lineno}: an entity is not {{uri, boundaries: [start, end], surfaceform}}"
            )
        links = [(x.start, x.end, x.target) for x in gold]
        uris_in: dict[int, set[str]] = {}
        for s, e, uri in links:
            k = _sentence_of(s, sents)
            if k is not None and e <= sents[k][1]:
                uris_in.setdefault(k, set()).add(uri)
        # the sentence stating each triple: the one holding its aligned object
        stating: list[tuple[Fact, int | None]] = []
        for tr in rec["triples"]:
            f = linked_triple(tr)
            if f is None:
                continue
            obj = _aligned(tr["object"], text)
            stating.append((f, _sentence_of(obj[0], sents) if obj else None))
        drop = {k for f, k in stating if k is not None and assigned[f] == "kg_only"}
        drop |= {
            k for k, us in uris_in.items() if any((a, b) in kg_only_pairs for a in us for b in us if a != b)
        }
        kept = [k for k in range(len(sents)) if k not in drop]
        counts["sentences"] += len(sents)
        counts["sentences_removed"] += len(drop)
        # the new text: the kept sentences joined by a space, each link moved with its sentence
        new_text, shift, entities = "", {}, []
        for k in kept:
            if new_text:
                new_text += " "
            shift[k] = len(new_text) - sents[k][0]
            new_text += text[sents[k][0] : sents[k][1]]
        for s, e, uri in links:
            k = _sentence_of(s, sents)
            if k in shift and e <= sents[k][1]:
                a, b = s + shift[k], e + shift[k]
                entities.append({"uri": uri, "boundaries": [a, b], "surfaceform": new_text[a:b]})
        triples = []
        for tr in rec["triples"]:
            f = linked_triple(tr)
            if f is not None and assigned[f] == "heldout":
                counts["triples_removed"] += 1
                continue
            # the KG reader reads uris and surface forms only: the old offsets would mislead
            triples.append(
                {
                    **tr,
                    "subject": {**tr["subject"], "boundaries": None},
                    "object": {**tr["object"], "boundaries": None},
                }
            )
            if f is not None:
                in_kg.add(f)
        split = in_valid_split(new_text, bool(entities), valid_fraction)
        if split is None:
            counts["documents_emptied"] += 1
        elif not split:
            counts["train_documents"] += 1
            for f, k in stating:
                if k is not None and k not in drop:
                    stated.add(f)
            for k in kept:  # a kept sentence that names both ends states the fact too
                us = uris_in.get(k, set())
                for pair in ((a, b) for a in us for b in us if a != b):
                    stated.update(by_pair.get(pair, ()))
        else:
            counts["valid_documents"] += 1
        written.append({**rec, "text": new_text, "entities": entities, "triples": triples})

    lines = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in written)
    atomic_write(out / "corpus.jsonl", lines.encode("utf-8"))

    def tsv_line(f: Fact) -> str:
        h, r, t = f
        return "\t".join((h, r, t, surface.get(h, h), surface.get(t, t))) + "\n"

    groups: dict[str, list[Fact]] = {g: [] for g in GROUPS}
    for f in known:
        g = ("stated" if f in stated else "kg_only") if f in in_kg else ("heldout" if f in stated else None)
        if g is None:
            counts["facts_in_neither"] += 1
        else:
            groups[g].append(f)
    for g, facts in groups.items():
        atomic_write(out / f"{g}.tsv", "".join(map(tsv_line, facts)).encode("utf-8"))
        counts[f"facts_{g}"] = len(facts)
    atomic_write(out / "known.tsv", "".join(map(tsv_line, known)).encode("utf-8"))
    counts["facts"] = len(known)
    counts.update({f"assigned_{a}": n for a, n in Counter(assigned.values()).items()})
    summary = {
        "source": str(src),
        "seed": seed,
        "heldout_share": heldout_share,
        "kg_only_share": kg_only_share,
        "valid_fraction": valid_fraction,
        **dict(sorted(counts.items())),
    }
    atomic_write(
        out / "split.json", (json.dumps(summary, indent=2) + "\n").encode()
    )  # last: the split is done
    return summary
