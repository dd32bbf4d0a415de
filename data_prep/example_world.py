"""The built-in example: a small synthetic "knowledge world" of entities and facts stated in text.

Deterministic for a given seed. It writes what a real corpus plus knowledge graph would give us:

- `corpus.txt`: one document a line; each document is about one entity and states some of its
  facts in sentences drawn from several templates per relation.
- `kg.tsv`: every fact as `head<TAB>relation<TAB>tail` (entity ids), the held-out ones included.
- `heldout.tsv`: the held-out facts, `head<TAB>relation<TAB>tail`, in the order of kg.tsv: a share
  (`WorldSpec.heldout_fraction`) of the facts, chosen with the seed, that no document states (and
  whose two entities no other fact links, so distant supervision attaches them to no sentence).
- `aliases.tsv`: `entity_id<TAB>surface form` (the name the text uses).

Entities have invented names, so a model can only learn the facts from this corpus and its KG; the
held-out facts only from the KG (the knowledge probe asks about them).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ren",
    "tas",
    "vo",
    "bel",
    "dor",
    "fin",
    "gar",
    "hal",
    "jun",
    "kes",
    "lin",
    "mar",
    "nor",
    "pel",
    "quin",
    "ros",
    "sel",
    "tor",
    "ul",
    "ven",
    "wil",
    "yan",
    "zor",
    "bri",
    "cal",
]

# relation -> (head type, tail type, sentence templates with {h} and {t})
RELATIONS: dict[str, tuple[str, str, list[str]]] = {
    "located_in": (
        "city",
        "country",
        ["{h} is a city in {t}.", "{h} lies in {t}.", "The city of {h} is part of {t}."],
    ),
    "capital_of": ("city", "country", ["{h} is the capital of {t}.", "The capital of {t} is {h}."]),
    "born_in": (
        "person",
        "city",
        ["{h} was born in {t}.", "{t} is the birthplace of {h}.", "{h} grew up in {t}."],
    ),
    "citizen_of": ("person", "country", ["{h} is a citizen of {t}.", "{h} holds the citizenship of {t}."]),
    "works_for": ("person", "company", ["{h} works for {t}.", "{h} is employed by {t}.", "{t} employs {h}."]),
    "studied_at": ("person", "university", ["{h} studied at {t}.", "{h} graduated from {t}."]),
    "headquartered_in": (
        "company",
        "city",
        ["{h} is headquartered in {t}.", "The head office of {h} is in {t}."],
    ),
    "founded_by": ("company", "person", ["{h} was founded by {t}.", "{t} founded {h}."]),
    "university_in": ("university", "city", ["{h} is a university in {t}.", "{h} has its campus in {t}."]),
}
FILLER = [
    "It is often mentioned in the news.",
    "Many people know about it.",
    "There is more to say about this.",
    "Records of this go back many years.",
    "This is well documented.",
]
SUFFIX = {"city": "", "country": "ia", "company": " Corp", "university": " University", "person": ""}


@dataclass
class Entity:
    id: str
    type: str
    name: str


@dataclass
class WorldSpec:
    """Size of the generated world."""

    countries: int = 8
    cities_per_country: int = 4
    people: int = 200
    companies: int = 30
    universities: int = 12
    documents: int = 3000
    seed: int = 1234
    heldout_fraction: float = 0.1
    """Share of facts the corpus never states; the KG (kg.tsv) still holds them: they are the
    knowledge probe's held-out facts, which only the KG can teach."""


def _name(rng: random.Random, used: set[str], etype: str) -> str:
    while True:
        base = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if etype == "person":
            base = f"{base} {''.join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()}"
        name = base + SUFFIX[etype]
        if name not in used:
            used.add(name)
            return name


def build_world(spec: WorldSpec) -> tuple[list[Entity], list[tuple[str, str, str]]]:
    rng = random.Random(spec.seed)
    used: set[str] = set()
    ents: dict[str, list[Entity]] = {t: [] for t in SUFFIX}

    def add(etype: str) -> Entity:
        e = Entity(f"{etype}_{len(ents[etype]):04d}", etype, _name(rng, used, etype))
        ents[etype].append(e)
        return e

    triples: list[tuple[str, str, str]] = []
    for _ in range(spec.countries):
        country = add("country")
        cities = [add("city") for _ in range(spec.cities_per_country)]
        for c in cities:
            triples.append((c.id, "located_in", country.id))
        triples.append((cities[0].id, "capital_of", country.id))
    city_country = {h: t for h, r, t in triples if r == "located_in"}
    for _ in range(spec.universities):
        u = add("university")
        triples.append((u.id, "university_in", rng.choice(ents["city"]).id))
    for _ in range(spec.people):
        add("person")
    for _ in range(spec.companies):
        co = add("company")
        triples.append((co.id, "headquartered_in", rng.choice(ents["city"]).id))
        triples.append((co.id, "founded_by", rng.choice(ents["person"]).id))
    for p in ents["person"]:
        city = rng.choice(ents["city"])
        triples.append((p.id, "born_in", city.id))
        triples.append((p.id, "citizen_of", city_country[city.id]))
        triples.append((p.id, "works_for", rng.choice(ents["company"]).id))
        triples.append((p.id, "studied_at", rng.choice(ents["university"]).id))
    return [e for t in ents.values() for e in t], triples


def heldout_facts(spec: WorldSpec, triples: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The facts no document states: round(heldout_fraction * facts) of them, drawn with the seed,
    in the order of the triple list. Only facts whose two entities no other fact links are drawn:
    distant supervision attaches every KG triple between two entities to a sentence naming both, so
    a capital's located_in would otherwise be attached to the sentences stating its capital_of (and
    a founder's works_for to those stating founded_by)."""
    if not 0 <= spec.heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={spec.heldout_fraction}: must be in [0, 1)")
    n = round(spec.heldout_fraction * len(triples))
    pairs = Counter(frozenset((h, t)) for h, _, t in triples)
    eligible = [i for i, (h, _, t) in enumerate(triples) if pairs[frozenset((h, t))] == 1]
    if n > len(eligible):
        raise ValueError(f"heldout_fraction={spec.heldout_fraction}: more facts than can be held out")
    chosen = set(random.Random(spec.seed + 2).sample(eligible, n))
    return [t for i, t in enumerate(triples) if i in chosen]


def write_world(out_dir: str | Path, spec: WorldSpec | None = None) -> dict[str, Path]:
    """Write corpus.txt, kg.tsv, heldout.tsv and aliases.tsv into out_dir; return their paths
    (keys corpus, kg, heldout, aliases)."""
    spec = spec or WorldSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entities, triples = build_world(spec)
    heldout = heldout_facts(spec, triples)
    held = set(heldout)
    by_id = {e.id: e for e in entities}
    facts_of: dict[str, list[tuple[str, str, str]]] = {e.id: [] for e in entities}
    for tr in triples:
        if tr in held:  # in the KG only
            continue
        facts_of[tr[0]].append(tr)
        facts_of[tr[2]].append(tr)

    rng = random.Random(spec.seed + 1)
    docs = []
    subjects = [e for e in entities if facts_of[e.id]]
    for i in range(spec.documents):
        subj = subjects[i % len(subjects)] if i < len(subjects) else rng.choice(subjects)
        facts = facts_of[subj.id][:]
        rng.shuffle(facts)
        sents = []
        for h, r, t in facts[: rng.randint(2, 6)]:
            template = rng.choice(RELATIONS[r][2])
            sents.append(template.format(h=by_id[h].name, t=by_id[t].name))
            if rng.random() < 0.15:
                sents.append(rng.choice(FILLER))
        docs.append(" ".join(sents))

    paths = {
        "corpus": out / "corpus.txt",
        "kg": out / "kg.tsv",
        "heldout": out / "heldout.tsv",
        "aliases": out / "aliases.tsv",
    }
    paths["corpus"].write_text("\n".join(docs) + "\n", encoding="utf-8")
    paths["kg"].write_text("".join(f"{h}\t{r}\t{t}\n" for h, r, t in triples), encoding="utf-8")
    paths["heldout"].write_text("".join(f"{h}\t{r}\t{t}\n" for h, r, t in heldout), encoding="utf-8")
    paths["aliases"].write_text("".join(f"{e.id}\t{e.name}\n" for e in entities), encoding="utf-8")
    return paths
