"""The compact KG index (data_prep/kg_index.py) against the in-memory reference it replaces: the
pyahocorasick Linker for alias matching, and the KG as Python objects (read_triples, check_aliases, a
sorted set, a dict of pairs) for the triples and the pair lookup."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data_prep.example_world import write_world
from data_prep.kg import Linker, Triple, check_aliases, read_aliases, read_triples
from data_prep.kg_index import KGIndex, PairIndex, build, load_or_build
from data_prep.readers import DataError


def _reference(kg, aliases, case, on_error="fail"):
    triples = read_triples(kg)
    al = read_aliases(aliases, {t.head for t in triples} | {t.tail for t in triples})
    kept, missing = check_aliases(triples, al, kg, on_error)
    ordered = sorted(set(kept), key=lambda t: (t.head, t.relation, t.tail))
    pairs: dict[tuple[str, str], list[int]] = {}
    for i, t in enumerate(ordered):
        pairs.setdefault((t.head, t.tail), []).append(i)
    return ordered, al, missing, pairs


def _open(tmp_path, kg, aliases, case, on_error="fail", name: str = "") -> KGIndex:
    folder = tmp_path / f"index-{case}-{on_error}{name}"
    folder.mkdir(parents=True)
    meta = build(folder, str(kg), str(aliases) if aliases else None, case, on_error)
    (folder / "meta.json").write_text(__import__("json").dumps(meta))
    return KGIndex.open(folder)


def _tricky_kg(tmp_path):
    """Aliases that test the matcher's rules: one alias a prefix of another (longest wins), one alias
    shared by two entities (the smaller name owns it), overlapping matches, case, characters whose
    lower case is longer, punctuation inside aliases, an alias-only entity, a chain of overlaps (the
    second overlaps the first and is not taken, so the third, which overlaps only the second, is), triples with no alias (one of
    them the only triple of its relation)."""
    kg = tmp_path / "kg.tsv"
    kg.write_text(
        "New_York\tin\tUSA\nNew_York_City\tin\tUSA\nzeta\tnear\talpha\nalpha\tnear\tzeta\n"
        "İzmir\tin\tTürkiye\nStraße\tin\tDeutschland\nAT&T\tbased_in\tUSA\nNoAlias\tin\tUSA\n"
        "New_York\tin\tUSA\nNoAlias\tonly_here\tUSA\n"
    )
    al = tmp_path / "aliases.tsv"
    al.write_text(
        "New_York\tNew York\nNew_York_City\tNew York City\nUSA\tUSA\nUSA\tUnited States\n"
        "zeta\tTwin\nalpha\tTwin\nalpha\tAlpha\nİzmir\tİzmir\nTürkiye\tTürkiye\n"
        "Straße\tStraße\nDeutschland\tDeutschland\nAT&T\tAT&T\nOnlyAlias\tLone Star\n"
        "alpha\tAlpha Beta\nzeta\tBeta Gamma Delta\nUSA\tDelta Epsilon\n"
    )
    return kg, al


TEXTS = [
    "New York City is in the USA; New York is too. NEW YORK CITY, new york city.",
    "Twin and Alpha: twin towers, Twins, AlphaTwin, Twin.",
    "İzmir lies in Türkiye. İZMİR, izmir. Straße in Deutschland, STRASSE, straße.",
    "AT&T and AT&Ts, xAT&T, (AT&T), Lone Star, Lone Stars, United States of America.",
    "",
    "New York City City, New York New York City",
    "Alpha Beta Gamma Delta Epsilon; Beta Gamma Delta Epsilon, alpha beta gamma delta epsilon.",
]


def _random_texts(aliases: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    fill = ["the", "of", ",", ".", "x", "City", "and", "-", "New", "York", "ß", "İ", "AT", "&", "T"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 30)):
            w = rng.choice(aliases) if rng.random() < 0.4 else rng.choice(fill)
            w = w.upper() if rng.random() < 0.1 else w.lower() if rng.random() < 0.1 else w
            parts.append(w)
        out.append(rng.choice([" ", "", "  "]).join(parts) if rng.random() < 0.2 else " ".join(parts))
    return out


@pytest.fixture(params=["compiled", "numpy"])
def matcher_kind(request, monkeypatch) -> str:
    """Each test that takes it runs twice: with the compiled helpers (data_prep/_native.c, which the
    install builds) and with NumPy alone (arrays.NATIVE = False)."""
    from data_prep import arrays

    if request.param == "compiled":
        assert arrays._native is not None, (
            "data_prep._native is not built: see test_the_compiled_helpers_are_built"
        )
    monkeypatch.setattr(arrays, "NATIVE", request.param == "compiled")
    return request.param


def test_the_compiled_helpers_are_built():
    """`pip install -e .` builds data_prep/_native.c (setup.py). The extension is optional, so an install
    without a C compiler succeeds and data_prep falls back to NumPy, slower: this test is what tells CI
    that the fast path is the one it ran."""
    from data_prep import arrays

    assert arrays._native is not None and arrays.native() is not None, (
        "data_prep._native is not built: install a C compiler and the Python headers (Debian: gcc python3-dev), "
        'then `pip install -e ".[test]"` again'
    )


@pytest.mark.parametrize("case", ["exact", "ignore"])
def test_alias_matching_equals_aho_corasick(tmp_path, case, matcher_kind):
    kg, al = _tricky_kg(tmp_path)
    _, aliases, _, _ = _reference(kg, al, case, "skip")
    index = _open(tmp_path, kg, al, case, "skip")
    ref, ours = Linker(aliases, case), index.matcher()
    surfaces = [a for forms in aliases.values() for a in forms]
    texts = TEXTS + _random_texts(surfaces, 400, seed=1)
    found = 0
    for text in texts:
        want = ref.find(text)
        assert ours.find(text) == want, text
        found += len(want)
    assert found > 500
    assert ours.find_many(texts) == [ref.find(t) for t in texts]  # one pass over the texts joined

    world = write_world(tmp_path / "world")
    _, aliases, _, _ = _reference(world["kg"], world["aliases"], case)
    index = _open(tmp_path / "world", world["kg"], world["aliases"], case)
    ref, ours = Linker(aliases, case), index.matcher()
    docs = world["corpus"].read_text().splitlines()
    assert sum(len(ref.find(d)) for d in docs) > 5000
    for doc in docs:
        assert ours.find(doc) == ref.find(doc)
    assert ours.find_many(docs) == [ref.find(d) for d in docs]


def test_hash_hits_are_checked_byte_for_byte(tmp_path):
    """The matcher checks every hash hit against the key's UTF-8 bytes, all hits at once: the check
    equals Python's string comparison for every pair of a text piece and a key of its length."""
    from data_prep.kg_index import _code_points

    kg, al = _tricky_kg(tmp_path)
    m = _open(tmp_path, kg, al, "exact", "skip").matcher()
    keys = [m.keys[k] for k in range(len(m.keys))]
    hay = "\0".join(TEXTS)
    cp = _code_points(hay)
    byte_at = np.concatenate([[0], np.cumsum(1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000))])
    utf8 = np.frombuffer(hay.encode(), np.uint8)
    s, k = [], []
    for start in range(len(hay)):
        for j, key in enumerate(keys):
            if start + len(key) <= len(hay):
                s.append(start)
                k.append(j)
    s_, k_ = np.array(s), np.array(k)
    e_ = s_ + np.array([len(keys[j]) for j in k])
    got = m._same_text(utf8, byte_at[s_], byte_at[e_], k_)
    want = np.array([hay[a:b] == keys[j] for a, b, j in zip(s_.tolist(), e_.tolist(), k)])
    assert want.sum() > 20 and (~want).sum() > 1000
    assert np.array_equal(got, want)


def test_triples_and_pairs_equal_the_python_objects(tmp_path):
    kg, al = _tricky_kg(tmp_path)
    with pytest.raises(DataError, match=r"kg.tsv: triple 8 \(NoAlias, in, USA\) names entity 'NoAlias'"):
        _open(tmp_path, kg, al, "exact", "fail")
    ordered, aliases, missing, pairs = _reference(kg, al, "exact", "skip")
    index = _open(tmp_path, kg, al, "exact", "skip")
    assert index.meta["kg_triples_without_alias"] == missing == 2
    assert [index.triple(i) for i in range(len(index.triples))] == ordered
    assert all(index.triple_index(t) == i for i, t in enumerate(ordered))
    assert index.triple_index(Triple("USA", "in", "New_York")) == -1
    assert index.triple_index(Triple("New_York", "nowhere", "USA")) == -1
    pair = PairIndex(index)
    names = sorted({t.head for t in ordered} | {t.tail for t in ordered} | {"OnlyAlias", "nobody"})
    for a in names:
        for b in names:
            assert pair.get((a, b), ()) == pairs.get((a, b), ())
    # every entity with an alias or in a triple, sorted; in_kg marks those of a (kept or not) triple
    assert index.names.to_list() == sorted(set(aliases) | {"NoAlias"})
    kg_names = [n for k, n, _ in index.kg_entities()]  # the entities of the triples kept
    assert kg_names == sorted({x for t in ordered for x in (t.head, t.tail)})
    assert dict((n, s) for _, n, s in index.kg_entities())["USA"] == "USA"
    assert index.relations == ["based_in", "in", "near"]  # not only_here: its one triple has no alias

    world = write_world(tmp_path / "world")
    ordered, aliases, missing, pairs = _reference(world["kg"], world["aliases"], "exact")
    index = _open(tmp_path / "world", world["kg"], world["aliases"], "exact")
    assert [index.triple(i) for i in range(len(index.triples))] == ordered
    pair = PairIndex(index)
    for (a, b), want in pairs.items():
        assert pair.get((a, b)) == want


def test_index_is_built_once_and_rebuilt_when_an_input_changes(tmp_path):
    kg, al = _tricky_kg(tmp_path)
    said: list[str] = []
    folder = tmp_path / "out.kgindex"
    first = load_or_build(folder, str(kg), str(al), "exact", "skip", log=said.append)
    again = load_or_build(folder, str(kg), str(al), "exact", "skip", log=said.append)
    assert "built into" in said[0] and "reused from" in said[1], said
    assert np.array_equal(first.triples, again.triples)
    kg.write_text(kg.read_text() + "USA\tnear\tDeutschland\n")
    grown = load_or_build(folder, str(kg), str(al), "exact", "skip", log=said.append)
    assert "built into" in said[2] and len(grown.triples) == len(first.triples) + 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no leftovers
    want = np.array(grown.triples)
    with open(folder / "triples.npy", "r+b") as f:  # a damaged file: found by its checksum, built again
        f.seek(-1, 2)
        f.write(b"\x7f")
    again = load_or_build(folder, str(kg), str(al), "exact", "skip", log=said.append)
    assert "triples.npy does not match its checksum" in said[3] and "built into" in said[4]
    assert np.array_equal(again.triples, want)
    foreign = tmp_path / "mine.kgindex"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a KG index data_prep wrote"):
        load_or_build(foreign, str(kg), str(al), "exact", "skip")
    (foreign / "meta.json").write_text('{"format": "someone-else/1"}')  # a meta.json, but not ours
    with pytest.raises(DataError, match="not a KG index data_prep wrote"):
        load_or_build(foreign, str(kg), str(al), "exact", "skip")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_every_kg_layout_gives_the_same_index(tmp_path):
    """pyarrow reads a clean TSV; comments, padded values, CRLF, N-Triples and JSONL go through the
    line-by-line reader: the same index either way, and a bad line is named by file and line."""
    kg, al = _tricky_kg(tmp_path)
    want = _open(tmp_path, kg, al, "exact", "skip")
    rows = [line.split("\t") for line in kg.read_text().splitlines()]
    variants = {
        "commented.tsv": "# a comment\n" + kg.read_text(),
        "padded.tsv": "".join(f" {h}\t{r} \t{t}\n" for h, r, t in rows),
        "crlf.tsv": kg.read_text().replace("\n", "\r\n"),
        "kg.jsonl": "".join(
            __import__("json").dumps({"head": h, "relation": r, "tail": t}) + "\n" for h, r, t in rows
        ),
        "kg.nt": "".join(f"<{h}> <{r}> <{t}> .\n" for h, r, t in rows),
    }
    padded_aliases = tmp_path / "padded_aliases.tsv"
    padded_aliases.write_text(
        "".join(f"{e}\t {form} \n" for e, form in (line.split("\t") for line in al.read_text().splitlines()))
    )
    for name, text in variants.items():
        path = tmp_path / name
        path.write_text(text, newline="")
        for aliases in (al, padded_aliases):
            got = _open(tmp_path, path, aliases, "exact", "skip", name=f"-{name}-{aliases.stem}")
            assert np.array_equal(got.triples, want.triples), name
            assert got.names.to_list() == want.names.to_list() and got.relations == want.relations
            assert got.surfaces.to_list() == want.surfaces.to_list()
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tr\tb\nc\td\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: expected 3 tab-separated columns"):
        _open(tmp_path, bad, None, "exact")
    bad.write_text("a\tr\tb\nc\t \td\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: expected 3 tab-separated columns"):
        _open(tmp_path, bad, None, "exact", name="-empty-value")


def test_dataset_vocabularies_are_the_kg_as_python_objects_give_them(tmp_path):
    """entities.tsv and triples.tsv, written from the index by pyarrow, hold what the in-memory KG gives:
    the KG's entities sorted with their first alias, then the entities met only in text; every distinct
    KG triple sorted, then the extractor's."""
    from data_prep.pipeline import PrepConfig, prepare

    world = write_world(tmp_path / "world")
    extra = tmp_path / "aliases.tsv"  # an entity the KG does not have, found in the text by its alias
    extra.write_text(world["aliases"].read_text() + "Z_only\tKalo\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(world["corpus"].read_text() + "Kalo met Kalo.\n" * 3)
    out = tmp_path / "data"
    cfg = PrepConfig(
        corpus=[str(corpus)],
        output=str(out),
        kg=str(world["kg"]),
        aliases=str(extra),
        case="exact",
        vocab_size=512,
        seq_len=64,
    )
    said: list[str] = []
    manifest = prepare(cfg, log=said.append)
    ordered, aliases, _, _ = _reference(world["kg"], extra, "exact")
    kg_entities = sorted({x for t in ordered for x in (t.head, t.tail)})
    rows = [line.split("\t") for line in (out / "entities.tsv").read_text().splitlines()]
    assert [r[1] for r in rows] == [*kg_entities, "Z_only"]
    assert [r[2] for r in rows] == [aliases[e][0] for e in kg_entities] + ["Kalo"]
    assert [r[0] for r in rows] == [str(i) for i in range(len(rows))]
    rows = [line.split("\t") for line in (out / "triples.tsv").read_text().splitlines()]
    assert [Triple(*r[1:4]) for r in rows] == ordered and {r[5] for r in rows} == {"kg"}
    assert sum(int(r[4]) for r in rows) == manifest["triples_attached"] > 0
    assert manifest["entities"] == len(kg_entities) + 1
    # a second run reuses the index
    prepare(cfg, log=said.append)
    index_lines = [s for s in said if s.startswith("data_prep kg index")]
    assert len(index_lines) == 2 and " built into " in index_lines[0] and " reused from " in index_lines[1]

    # training reads the triples memory-mapped from kg_triples.npy: what parsing triples.tsv gives
    import shutil

    from sparsexpert.data.knowledge import DatasetKG

    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "kg_triples.npy").unlink()  # a dataset written before the file existed
    new_kg, old_kg = DatasetKG.load(out), DatasetKG.load(old)
    assert isinstance(new_kg.triples, np.memmap) and np.array_equal(new_kg.triples, old_kg.triples)
    assert (
        new_kg.n_entities == old_kg.n_entities == len(old_kg.entities) and new_kg.entities == old_kg.entities
    )
    assert new_kg.surfaces == old_kg.surfaces and new_kg.relations == old_kg.relations


def test_sentence_spans_of_joined_texts_equal_the_pattern_per_text(matcher_kind):
    """The join's sentences of many texts at once, from code points, equal the regular expression's
    on each text: every kind of whitespace (str.isspace, as the pattern's \\s), runs of it, ".", "!"
    and "?" with and without a space after, texts that end in one."""
    from data_prep.join import _sentences, sentence_spans
    from data_prep.kg_index import SEP, _code_points

    rng = random.Random(3)
    pieces = ["word", "Ab", ".", "!", "?", " ", "  ", "\n", "\t", "\u00a0", "\u2003", "\x1c", "x.y", "é", ","]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(500)]
    texts += ["One. Two! Three? Four", "End.", "a. ", "...  b", ""]
    offsets = np.cumsum([0, *(len(t) + 1 for t in texts)])
    starts, ends = sentence_spans(_code_points(SEP.join(texts)), offsets)
    want = [(s + int(offsets[d]), e + int(offsets[d])) for d, t in enumerate(texts) for s, e in _sentences(t)]
    assert list(zip(starts.tolist(), ends.tolist())) == want
    assert len(want) > 1000


@pytest.mark.parametrize("case", ["exact", "ignore"])
def test_joining_in_arrays_equals_one_document_at_a_time(tmp_path, case, monkeypatch, matcher_kind):
    """The join's array path (documents with alias matches alone, a batch at a time) gives the chunk the
    per-document path gives, byte for byte: the world's documents, texts with tokens of unknown length
    (characters the tokenizer never saw) and every kind of sentence end, documents with wiki links (the
    per-document path) among them, in one batch or in many small ones."""
    from collections import Counter

    from data_prep import join
    from data_prep.chunks import encode_chunk
    from data_prep.pipeline import PrepConfig, train_tokenizer
    from data_prep.readers import RawDoc
    from data_prep.wikitext import WikiLink

    world = write_world(tmp_path / "world")
    lines = world["corpus"].read_text().splitlines()
    tok = train_tokenizer(iter(lines), tmp_path / "tok.model", PrepConfig(vocab_size=300))
    aliases = tmp_path / "aliases.tsv"  # one alias across a sentence end: a mention in no sentence
    first = world["kg"].read_text().split("\t", 1)[0]
    aliases.write_text(world["aliases"].read_text() + f"{first}\tSt. Ulla\n")
    load_or_build(tmp_path / "index", str(world["kg"]), str(aliases), case, "fail", log=lambda *a: None)
    names = [line.split("\t")[1] for line in aliases.read_text().splitlines()] + ["St. Ulla"] * 20
    rng = random.Random(5)
    odd = ["☃", "\u00a0", "! ", "? ", ".\n", "\u2003", " ", " and ", ", ", "ǂ"]
    docs = [RawDoc(t, f"c:{i}") for i, t in enumerate(lines[:300])]
    for i in range(100):
        words = [
            rng.choice(names) if rng.random() < 0.5 else rng.choice(odd) for _ in range(rng.randint(1, 25))
        ]
        docs.append(RawDoc("".join(words).strip() or "x", f"odd:{i}"))
    alias_of = dict(line.split("\t", 1) for line in world["aliases"].read_text().splitlines())
    other = next(t.split("\t")[2] for t in world["kg"].read_text().splitlines() if t.startswith(first + "\t"))
    docs += [
        RawDoc(f"{alias_of[other]} met St. Ulla and {alias_of[first]}. Ulla left.", f"cross:{i}")
        for i in range(3)
    ]
    for i in range(0, len(docs), 37):  # a wiki link: that document's batch goes one document at a time
        t = docs[i].text
        docs[i] = RawDoc(t, docs[i].source, [WikiLink(0, min(3, len(t)), "Some_target")])
    docs[5].part, docs[5].last, docs[5].key = 1, False, 1234

    def chunk(arrays: bool, batch_chars: int) -> bytes:
        monkeypatch.setattr(join, "ARRAYS", arrays)
        monkeypatch.setattr(join, "BATCH_CHARS", batch_chars)
        join.init_worker(str(tok), str(tmp_path / "index"))
        return encode_chunk(join.process_chunk(docs), len(docs), Counter())

    want = chunk(False, 1 << 22)
    assert chunk(True, 1 << 22) == want
    from data_prep import arrays

    with monkeypatch.context() as m:  # the compiled helpers and NumPy alone give the same chunk
        m.setattr(arrays, "NATIVE", not arrays.NATIVE and arrays._native is not None)
        assert chunk(True, 1 << 22) == want
    assert chunk(True, 2000) == want  # many batches, some with links, some without
    assert chunk(False, 2000) == want
    monkeypatch.setattr(join, "_join", None)  # no document may take the per-document path
    links = [d for d in docs if d.links]
    for d in links:
        d.links = []
    assert chunk(True, 1 << 22) == chunk(True, 3000)


def test_sorted_unique_and_search_equal_numpy():
    """The hot paths' replacements of np.unique and np.searchsorted (data_prep.arrays) give NumPy's answers:
    empty arrays, many duplicates, uint64 hashes near 2**64, both sides; pairs by row."""
    from data_prep.arrays import search, sorted_unique, unique_pairs

    rng = np.random.default_rng(0)
    for a in (
        np.zeros(0, np.int64),
        np.array([5]),
        rng.integers(0, 7, 1000),
        rng.integers(0, 2**62, 5000),
        rng.integers(0, 2**64, 3000, dtype=np.uint64),
    ):
        assert np.array_equal(sorted_unique(a), np.unique(a)) and sorted_unique(a).dtype == a.dtype
        hay = np.sort(np.concatenate([a, a[: len(a) // 3]]))  # with duplicates
        needles = np.concatenate([a[::2], rng.permutation(a)[:50]]) if len(a) else a
        for side in ("left", "right"):
            assert np.array_equal(search(hay, needles, side), np.searchsorted(hay, needles, side)), side
    for (
        pairs
    ) in (  # the pack stage's (row, triple) pairs: np.unique(axis=0) by one sort of a key, else np.lexsort
        np.zeros((0, 2), np.int64),
        np.array([[3, 9]]),
        rng.integers(0, 5, (2000, 2)),
        np.stack([np.repeat(np.arange(10**9, 10**9 + 300), 4), rng.integers(0, 5_000_000, 1200)], 1),
        rng.integers(-(2**40), 2**62, (3000, 2)),  # ranges whose product overflows a key: np.lexsort
    ):
        want = np.unique(pairs, axis=0)
        got = unique_pairs(np.concatenate([pairs, pairs[::3]]))
        assert np.array_equal(got, want) and got.dtype == want.dtype


def _many_aliases_kg(tmp_path, n: int, seed: int):
    """n entities in a chain of triples, each with 1 to 3 random aliases: 1 to 4 words of letters (some not
    ASCII, some upper case), among them one- and two-character aliases, aliases that are prefixes of
    others, and aliases shared by two entities; enough keys of each length that the compiled lookups'
    sample (every 64th key) has many entries within a length."""
    rng = random.Random(seed)
    letters = "abcdefghij" + "ABCDE" + "éßİöø"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 6))) for _ in range(400)]
    kg, al = tmp_path / "kg.tsv", tmp_path / "aliases.tsv"
    kg.write_text("".join(f"E{i}\tr{i % 7}\tE{(i + 1) % n}\n" for i in range(n)))
    lines, surfaces = [], []
    for i in range(n):
        for _ in range(rng.randint(1, 3)):
            r = rng.random()
            if r < 0.05:
                alias = rng.choice(letters) + (rng.choice(letters) if rng.random() < 0.5 else "")
            elif r < 0.15 and surfaces:
                alias = rng.choice(surfaces) + (" " + rng.choice(words) if rng.random() < 0.7 else "")
            else:
                alias = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
            lines.append(f"E{i}\t{alias}\n")
            surfaces.append(alias)
    al.write_text("".join(lines))
    return kg, al, surfaces


@pytest.mark.parametrize("case", ["exact", "ignore"])
def test_matching_many_aliases_compiled_equals_numpy_and_aho_corasick(tmp_path, case, monkeypatch):
    """Thousands of aliases of every length from 1 to about 30 characters: the compiled scan, the NumPy
    matcher and pyahocorasick find the same mentions in texts made of aliases, their pieces and noise."""
    from data_prep import arrays

    kg, al, surfaces = _many_aliases_kg(tmp_path, 3000, seed=7)
    _, aliases, _, _ = _reference(kg, al, case, "skip")
    matcher = _open(tmp_path, kg, al, case, "skip").matcher()
    assert (
        len(matcher.keys) > 4000 and max(np.diff(matcher.bounds)) > 64 * 4
    )  # lengths of many sample entries
    rng = random.Random(8)
    pieces = surfaces + [w[: rng.randint(1, max(1, len(w) - 1))] for w in surfaces[:500]]
    texts = []
    for _ in range(300):
        parts = [
            rng.choice(pieces) if rng.random() < 0.6 else rng.choice([",", ".", "x", "-", "ß", "\u00a0"])
            for _ in range(rng.randint(0, 40))
        ]
        parts = [p.upper() if rng.random() < 0.1 else p for p in parts]
        texts.append(rng.choice([" ", "", " ", "  "]).join(parts))
    want = [Linker(aliases, case).find(t) for t in texts]
    assert sum(map(len, want)) > 2000
    got = {}
    for native in (True, False):
        monkeypatch.setattr(arrays, "NATIVE", native)
        got[native] = matcher.find_many(texts)
        assert [matcher.find(t) for t in texts[:50]] == want[:50]
    assert got[True] == want and got[False] == want


def _thue_morse(k: int, a: str, b: str) -> str:
    s = a
    for _ in range(k):
        s += s.translate(str.maketrans(a + b, b + a))
    return s


def test_a_hash_collision_is_resolved_by_the_text(tmp_path, matcher_kind):
    """A Thue-Morse word of 2048 characters and its complement have the same polynomial hash modulo 2**64
    for any odd base: with both as aliases, each text finds its own entity; with one alone, the other's
    text finds nothing."""
    from data_prep.kg_index import _code_points, _hashes, _prefix

    a, b = _thue_morse(11, "a", "b"), _thue_morse(11, "b", "a")
    g, p = _prefix(_code_points(a + b))
    h = _hashes(g, p, np.array([0, len(a)]), np.array([len(a), len(a) + len(b)]))
    assert a != b and h[0] == h[1]  # a real collision
    kg = tmp_path / "kg.tsv"
    kg.write_text("X\tr\tY\n")
    for name, aliases in (("both", f"X\t{a}\nY\t{b}\n"), ("one", f"Y\t{b}\n")):
        al = tmp_path / f"aliases-{name}.tsv"
        al.write_text(aliases)
        m = _open(tmp_path, kg, al, "exact", "skip", name=name).matcher()
        found = m.find_many([f"see {a} here", f"and {b}.", a + b, f"{a} {b}"])
        x = [] if name == "one" else [(4, 4 + len(a), "X")]
        assert [[tuple(m_) for m_ in f] for f in found] == [
            x,
            [(4, 4 + len(b), "Y")],
            [],
            ([(0, len(a), "X")] if name == "both" else []) + [(len(a) + 1, 2 * len(a) + 1, "Y")],
        ]


def test_text_classes_equal_str_methods():
    """The compiled character classes equal str.isalnum and str.isspace for every code point, surrogates
    included, read from strings of each width (Latin-1, two and four bytes a character)."""
    from data_prep.arrays import native
    from data_prep.kg_index import text_classes

    assert native() is not None
    everything = "".join(map(chr, range(0x110000)))
    want = np.array([c.isalnum() | c.isspace() << 1 for c in everything], np.uint8)
    assert np.array_equal(text_classes(everything), want)
    for text in ("plain ASCII, 1 2\t3", "Latin-1 \u00a0é\u00b2\x1c", "Straße\u2003İ☃", "𝒳 \U0001d7d8"):
        assert np.array_equal(text_classes(text), [c.isalnum() | c.isspace() << 1 for c in text])


def test_sorted_keys_equal_range_equals_numpy(monkeypatch):
    """SortedKeys.equal_range, compiled (a sample of every 64th key, then a window) and with NumPy, gives
    np.searchsorted's first position and count: arrays shorter than the sample's stride, of a length no
    multiple of it, runs of one value across the sample's entries, needles below and above every key,
    uint64 keys near 2**64."""
    from data_prep import arrays
    from data_prep.arrays import SortedKeys

    rng = np.random.default_rng(1)
    cases = [
        np.zeros(0, np.int64),
        np.array([7], np.int64),
        np.sort(rng.integers(0, 100, 50)),
        np.sort(rng.integers(0, 300, 10_001)),  # long runs of equal keys
        np.sort(rng.integers(0, 2**62, 100_003)),
        np.sort(rng.integers(2**63, 2**64 - 1, 70_000, dtype=np.uint64)),
    ]
    for keys in cases:
        top = int(keys[-1]) if len(keys) else 10
        needles = np.concatenate(
            [keys[::7], np.array([0, top, top + 1] if keys.dtype == np.int64 else [2**63, top], keys.dtype)]
        )
        needles = np.concatenate([needles, needles[: len(needles) // 2] + 1]).astype(keys.dtype)
        lo, hi = np.searchsorted(keys, needles, "left"), np.searchsorted(keys, needles, "right")
        for native in (True, False):
            monkeypatch.setattr(arrays, "NATIVE", native)
            first, count = SortedKeys(keys).equal_range(needles)
            assert np.array_equal(first, lo) and np.array_equal(count, hi - lo), (len(keys), native)


def test_attaching_mentions_and_triples_compiled_equals_numpy():
    """The last step of the join's array path (join._attach_compiled, data_prep/_native.c, against
    join._attach_numpy): each text's number of mentions, the mentions' token spans with their entities ranked
    by first mention, and the KG triples of each sentence's ordered entity pairs with the sentence's tokens.
    Random batches: empty texts, texts without a sentence, a mention or a token, gaps between sentences,
    mentions across a sentence end or covering no token (empty tokens), an entity met in several
    sentences, pairs with several triples whose indices do not follow the pairs' order (triples sorted by
    head, relation, tail)."""
    from types import SimpleNamespace

    from data_prep import join
    from data_prep.arrays import SortedKeys

    rng = np.random.default_rng(3)
    seen = {"triples": 0, "uncovered": 0, "no_sentence": 0}
    for _ in range(300):
        ne = int(rng.integers(2, 10))
        kg = np.unique(rng.integers(0, ne, (int(rng.integers(0, 80)), 3)) % [ne, 6, ne], axis=0)
        pair_key = kg[:, 0] * ne + kg[:, 2]
        pair_triple = np.argsort(pair_key, kind="stable")
        index = SimpleNamespace(
            n_entities=ne, triples=kg, pair_keys=SortedKeys(pair_key[pair_triple]), pair_triple=pair_triple
        )
        lengths = rng.integers(0, 100, int(rng.integers(1, 7)))
        offsets = np.cumsum([0, *(lengths + 1)])
        sentences, mentions, begin, end, n_tok = [], [], [], [], []
        for lo, n in zip(offsets[:-1].tolist(), lengths.tolist()):
            cuts = sorted({lo, lo + n, *(lo + rng.integers(0, n + 1, int(rng.integers(0, 6)))).tolist()})
            whitespace = rng.random() < 0.15  # a text of no sentence: its mentions belong to none
            seen["no_sentence"] += whitespace and n > 0
            for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
                a += int(rng.integers(0, 3)) if k else 0  # whitespace after a sentence end
                if b > a and not whitespace:
                    sentences.append((a, b))
            at = lo + int(rng.integers(0, 6))
            while (size := int(rng.integers(1, 10))) and at + size <= lo + n:
                mentions.append((at, at + size, int(rng.integers(0, ne))))
                at += size + int(rng.integers(0, 8))
            bounds = np.sort(rng.integers(0, n + 1, int(rng.integers(0, n // 2 + 2)))) + lo
            begin += bounds[:-1].tolist()
            end += bounds[1:].tolist()  # equal neighbours: a token of no character
            n_tok.append(max(len(bounds) - 1, 0))
        start_, end_, entity = np.array(mentions, np.int64).reshape(-1, 3).T
        sent = np.array(sentences, np.int64).reshape(-1, 2)
        args = (start_, end_, entity, offsets, sent[:, 0], sent[:, 1], index)
        tokens = (np.array(begin, np.int64), np.array(end, np.int64), np.append(0, np.cumsum(n_tok)))
        want = join._attach_numpy(*args, *tokens)
        got = join._attach_compiled(*args, *tokens)
        for name, g, w in zip(("n_mentions", "spans", "entity_ids", "triples"), got, want):
            assert np.array_equal(g, np.asarray(w).reshape(g.shape)), name
        seen["triples"] += len(want[3])
        seen["uncovered"] += int(want[0].sum()) - len(want[1])
    assert min(seen.values()) > 20, seen  # the cases named above were met
