"""Knowledge graph input: triples (TSV, N-Triples, JSONL), aliases, and the entity linker.

- `read_triples(path)`: `head<TAB>relation<TAB>tail` lines, N-Triples (`<h> <r> <t> .`), or JSONL
  objects with `head`, `relation`, `tail`. A bad line raises `DataError` with file:line.
- `read_aliases(path)`: `entity_id<TAB>surface form` lines; without a file, entity names serve as aliases.
- `Linker`: an Aho-Corasick automaton (pyahocorasick) over every alias; finds the longest
  non-overlapping matches that start and end on word boundaries, with a case policy. It holds the
  whole automaton in memory (about 100 MB per 100,000 entities of 2 aliases): data_prep links through
  the shared index of data_prep/kg_index.py, which finds the same mentions and is tested against this.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from data_prep.readers import DataError

_NT = re.compile(r'^\s*(<[^>]*>|_:\S+)\s+(<[^>]*>)\s+(<[^>]*>|_:\S+|"(?:[^"\\]|\\.)*"(?:\S*))\s*\.\s*$')


@dataclass(frozen=True)
class Triple:
    head: str
    relation: str
    tail: str


def _nt_term(term: str) -> str:
    if term.startswith("<") and term.endswith(">"):
        term = term[1:-1]
        return term.rsplit("/", 1)[-1].rsplit("#", 1)[-1] if "://" in term else term
    return term


def iter_triples(path: str | Path) -> Iterator[tuple[str, str, str]]:
    """(head, relation, tail) of every triple of a KG file, in file order, read in one pass. A bad line
    raises DataError with file:line; a file of no triples too."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such knowledge-graph file; check --kg")
    name = path.name.lower()
    n = 0
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip() or line.startswith("#"):
                    continue
                where = f"{path}:{lineno}"
                if name.endswith(".nt"):
                    m = _NT.match(line)
                    if not m:
                        raise DataError(
                            f"{where}: not an N-Triples statement (<h> <r> <t> .); fix or remove the line"
                        )
                    h, r, t = (_nt_term(x) for x in m.groups())
                elif name.endswith((".jsonl", ".json")):
                    try:
                        rec = json.loads(line)
                        if isinstance(rec, dict) and "triples" in rec:  # linked text (REBEL, T-REx)
                            for h, r, t in _linked_triples(rec):
                                n += 1
                                yield h, r, t
                            continue
                        h, r, t = str(rec["head"]), str(rec["relation"]), str(rec["tail"])
                    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                        raise DataError(
                            f"{where}: expected a JSON object with head, relation, tail, or a linked-text "
                            f"record with triples [{{subject, predicate, object}}] ({type(e).__name__}: {e})"
                        ) from e
                else:
                    cols = line.rstrip("\n").split("\t")
                    if len(cols) != 3 or not all(c.strip() for c in cols):
                        raise DataError(
                            f"{where}: expected 3 tab-separated columns head, relation, tail; "
                            f"found {len(cols)}"
                        )
                    h, r, t = (c.strip() for c in cols)
                n += 1
                yield h, r, t
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}: invalid UTF-8 ({e.reason} at byte {e.start}); re-encode as UTF-8"
            ) from e
    if not n:
        raise DataError(f"{path}: no triples; is this the right file?")


def _uri(term: dict) -> str | None:
    """A linked-text term's entity id; None for an unlinked one (no uri, or the string "None")."""
    uri = term.get("uri")
    return None if uri in (None, "", "None") else str(uri)


def linked_triple(tr: dict) -> tuple[str, str, str] | None:
    """A linked-text triple (REBEL / T-REx layout) as a KG fact: subject and object by their uri (a
    Wikidata Q-id, or a literal's value), the relation by the predicate's surface form ("country",
    "date of birth"), or its uri where it has none. None: an end is unlinked (no uri), so no KG fact."""
    h, t = _uri(tr["subject"]), _uri(tr["object"])
    if h is None or t is None:
        return None
    return h, str(tr["predicate"].get("surfaceform") or tr["predicate"]["uri"]), t


def _linked_triples(rec: dict) -> Iterator[tuple[str, str, str]]:
    """A linked-text record's triples that are KG facts (linked_triple)."""
    for tr in rec["triples"]:
        fact = linked_triple(tr)
        if fact is not None:
            yield fact


def _linked_aliases(rec: dict) -> Iterator[tuple[str, str]]:
    """(entity id, surface form) of a linked-text record's entities and triple ends."""
    terms = [
        *rec.get("entities", []),
        *(tr[k] for tr in rec.get("triples", []) for k in ("subject", "object")),
    ]
    for term in terms:
        uri, form = _uri(term), (term.get("surfaceform") or "").strip()
        if uri is not None and form and "\t" not in form and "\n" not in form:
            yield uri, form


def is_linked_text(path: str | Path | None) -> bool:
    """Whether a .jsonl/.json file holds linked text (REBEL / T-REx layout: text, entities, triples),
    which is corpus, KG and aliases at once. Reads the first record only."""
    if path is None or not str(path).lower().endswith((".jsonl", ".json")) or not Path(path).is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(rec, dict) and isinstance(rec.get("triples"), list) and "text" in rec
    return False


def default_aliases(kg: str | None, aliases: str | None) -> str | None:
    """The alias file a run uses: the one given; else a linked-text KG file itself (its entities'
    surface forms); else None (entity names, underscores as spaces)."""
    return aliases if aliases is not None or not is_linked_text(kg) else kg


def read_triples(path: str | Path) -> list[Triple]:
    """Every triple of a KG file as a list (small KGs; data_prep itself reads through kg_index)."""
    return [Triple(*t) for t in iter_triples(path)]


def iter_aliases(path: str | Path) -> Iterator[tuple[str, str]]:
    """(entity id, surface form) of every line of an alias file, in file order; a bad line raises
    DataError with file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such alias file; check --aliases")
    linked = is_linked_text(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if linked:
                try:
                    yield from _linked_aliases(json.loads(line))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                    raise DataError(
                        f"{path}:{lineno}: not a linked-text record ({type(e).__name__}: {e})"
                    ) from e
                continue
            cols = line.rstrip("\n").split("\t")
            if len(cols) != 2 or not cols[1].strip():
                raise DataError(
                    f"{path}:{lineno}: expected entity_id<TAB>surface form; found {len(cols)} columns"
                )
            yield cols[0], cols[1].strip()


def read_aliases(path: str | Path | None, entities: set[str]) -> dict[str, list[str]]:
    """entity id -> surface forms. Without a file, each entity's name (underscores as spaces) is its alias.
    An entity the KG does not have keeps its aliases: its mentions are linked, and the dataset lists it
    after the KG's entities."""
    if path is None:
        return {e: [e.replace("_", " ")] for e in sorted(entities)}
    aliases: dict[str, list[str]] = defaultdict(list)
    for entity, form in iter_aliases(path):
        aliases[entity].append(form)
    return dict(aliases)


def check_aliases(
    triples: list[Triple], aliases: dict[str, list[str]], kg_path: Path, on_error: str
) -> tuple[list[Triple], int]:
    """Triples whose head or tail has no alias cannot be found in text: error, or skip and count."""
    kept, missing = [], 0
    for i, t in enumerate(triples):
        if t.head in aliases and t.tail in aliases:
            kept.append(t)
            continue
        if on_error != "skip":
            who = t.head if t.head not in aliases else t.tail
            raise DataError(
                f"{kg_path}: triple {i + 1} ({t.head}, {t.relation}, {t.tail}) names entity {who!r} "
                "with no alias; add it to the alias file or pass --on_error skip"
            )
        missing += 1
    return kept, missing


def fold_case(text: str) -> str:
    """What case-insensitive matching compares, of a text and of an alias alike: lower case, character
    for character (the few characters whose lower case is two characters, such as "İ", stay as they
    are, so offsets in the text stay aligned)."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


class Mention(NamedTuple):
    start: int
    end: int
    entity: str


class Linker:
    """Longest-match, word-bounded alias matching. case: "exact" or "ignore"."""

    def __init__(self, aliases: dict[str, list[str]], case: str = "ignore"):
        import ahocorasick

        if case not in ("exact", "ignore"):
            raise DataError(f"case={case!r}: use 'exact' or 'ignore'")
        self.case = case
        self.automaton = ahocorasick.Automaton()
        owners: dict[str, str] = {}
        for entity in sorted(aliases):
            for alias in aliases[entity]:
                key = fold_case(alias) if case == "ignore" else alias
                owners.setdefault(key, entity)  # an alias shared by several entities goes to the first id
        for key, entity in owners.items():
            self.automaton.add_word(key, (len(key), entity))
        self.automaton.make_automaton()
        self.empty = not owners

    @staticmethod
    def _boundary(text: str, i: int) -> bool:
        return i <= 0 or i >= len(text) or not (text[i - 1].isalnum() and text[i].isalnum())

    def find(self, text: str) -> list[Mention]:
        if self.empty:
            return []
        hay = fold_case(text) if self.case == "ignore" else text
        candidates = []
        for end_idx, (length, entity) in self.automaton.iter(hay):
            start, end = end_idx - length + 1, end_idx + 1
            if self._boundary(text, start) and self._boundary(text, end):
                candidates.append((start, -(end - start), entity))
        candidates.sort()
        out, taken_until = [], 0
        # Leftmost-longest: scan by start, take the longest at each start, skip overlaps.
        for start, neg_len, entity in candidates:
            if start < taken_until:
                continue
            out.append(Mention(start, start - neg_len, entity))
            taken_until = start - neg_len
        return out
