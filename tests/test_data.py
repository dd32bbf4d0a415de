"""The text-to-shards core of data_prep, and the order in which ranks read the shards."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import former_data_path as former
import numpy as np
import pytest
import sentencepiece as spm
import torch

from data_prep.example_world import RELATIONS, WorldSpec, build_world, write_world
from data_prep.pipeline import EOS_ID, DataError, PrepConfig, pack, prepare_text
from sparsexpert.data import BatchPlan, PackedDataset
from sparsexpert.data.format import FORMAT


def test_example_world_states_its_facts(tmp_path):
    paths = write_world(tmp_path, WorldSpec(documents=50, seed=3))
    entities, triples = build_world(WorldSpec(documents=50, seed=3))
    names = {e.id: e.name for e in entities}
    text = paths["corpus"].read_text()
    assert len(text.splitlines()) == 50
    kg = [line.split("\t") for line in paths["kg"].read_text().splitlines()]
    assert [tuple(t) for t in kg] == triples
    # Every born_in fact of a person whose document comes first mentions both names in one sentence.
    stated = sum(1 for h, r, t in triples if any(names[h] in s and names[t] in s for s in text.split(".")))
    assert stated > 30
    assert write_world(tmp_path / "again", WorldSpec(documents=50, seed=3))["corpus"].read_text() == text


def _stated(text: str, names: dict[str, str], fact: tuple[str, str, str]) -> bool:
    h, r, t = fact
    return any(template.format(h=names[h], t=names[t]) in text for template in RELATIONS[r][2])


def test_example_world_never_states_its_heldout_facts(tmp_path):
    """A seeded share of the facts is in kg.tsv and heldout.tsv but in no document: only the KG has them."""
    spec = WorldSpec(
        countries=3,
        cities_per_country=3,
        people=30,
        companies=6,
        universities=4,
        documents=400,
        seed=5,
        heldout_fraction=0.2,
    )
    paths = write_world(tmp_path / "small", spec)
    entities, triples = build_world(spec)
    names = {e.id: e.name for e in entities}
    text = paths["corpus"].read_text()
    heldout = [tuple(line.split("\t")) for line in paths["heldout"].read_text().splitlines()]
    kg = [tuple(line.split("\t")) for line in paths["kg"].read_text().splitlines()]
    assert kg == triples and len(heldout) == round(0.2 * len(triples)) > 10
    assert heldout == [t for t in triples if t in set(heldout)]  # in triple-list order
    assert not [f for f in heldout if _stated(text, names, f)]
    # ... nor linked by another fact, which a sentence naming both would get attached to it.
    linked = Counter(frozenset((h, t)) for h, _, t in triples)
    assert all(linked[frozenset((h, t))] == 1 for h, _, t in heldout)
    rest = [f for f in triples if f not in set(heldout)]
    assert sum(_stated(text, names, f) for f in rest) > 0.9 * len(rest)
    assert write_world(tmp_path / "again", spec)["heldout"].read_text() == paths["heldout"].read_text()
    # The default world: a tenth held out, and most of the other facts stated.
    default = write_world(tmp_path / "default")
    entities, triples = build_world(WorldSpec())
    names = {e.id: e.name for e in entities}
    text = default["corpus"].read_text()
    heldout = {tuple(line.split("\t")) for line in default["heldout"].read_text().splitlines()}
    assert len(heldout) == round(0.1 * len(triples)) and not [f for f in heldout if _stated(text, names, f)]
    rest = [f for f in triples if f not in heldout]
    assert sum(_stated(text, names, f) for f in rest) > 0.9 * len(rest)


def test_pipeline_counts_rejects_and_round_trips(tmp_path):
    corpus = tmp_path / "c.txt"
    docs = [f"Document number {i} talks about the city of Kalo and the river Ven." for i in range(300)]
    corpus.write_text("\n".join(docs[:150] + ["", "   ", docs[3]] + docs[150:]) + "\n")
    m = prepare_text(
        [corpus],
        tmp_path / "out",
        PrepConfig(vocab_size=128, seq_len=16, valid_fraction=0.1),
        log=lambda *_: None,
    )
    assert m["documents_in"] == 303
    assert m["documents_rejected"] == {"empty": 2, "duplicate": 1}
    assert m["documents_in"] == m["documents_written"] + sum(m["documents_rejected"].values())
    assert m["splits"]["train"]["documents"] + m["splits"]["valid"]["documents"] == 300
    assert 0 < m["splits"]["valid"]["documents"] < 60
    ds = PackedDataset(tmp_path / "out", "train")
    assert (
        ds.seq_len == 16 and len(ds) * 16 + len(PackedDataset(tmp_path / "out", "valid")) * 16 == m["tokens"]
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    first = ds[np.array([0])][0].tolist()
    eos = first.index(EOS_ID)
    assert sp.decode(first[:eos]) in docs  # a whole document, then the boundary
    for shard in m["splits"]["train"]["shards"]:
        assert hashlib.sha256((tmp_path / "out" / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]


def test_pipeline_is_deterministic(tmp_path):
    corpus = write_world(tmp_path / "raw", WorldSpec(documents=200))["corpus"]
    cfg = PrepConfig(vocab_size=256, seq_len=32)
    a = prepare_text([corpus], tmp_path / "a", cfg, log=lambda *_: None)
    b = prepare_text([corpus], tmp_path / "b", cfg, log=lambda *_: None)
    for split in ("train", "valid"):
        assert [s["sha256"] for s in a["splits"][split]["shards"]] == [
            s["sha256"] for s in b["splits"][split]["shards"]
        ]
    assert (tmp_path / "a/tokenizer.model").read_bytes() == (tmp_path / "b/tokenizer.model").read_bytes()


def test_pack_marks_boundaries_and_counts_the_tail():
    rows, dropped = pack([[5, 6, 7], [8, 9]], seq_len=3, dtype=np.dtype(np.uint16))
    assert rows.tolist() == [[5, 6, 7], [EOS_ID, 8, 9]] and dropped == 1


def test_bad_input_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nalso fine\nbroken \xff\xfe here\n")
    with pytest.raises(DataError, match=r"bad.txt:3: invalid UTF-8 at byte 7"):
        prepare_text([bad], tmp_path / "o", log=lambda *_: None)
    with pytest.raises(DataError, match=r"missing.txt: no such corpus file"):
        prepare_text([tmp_path / "missing.txt"], tmp_path / "o", log=lambda *_: None)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(
        DataError, match=r"empty.txt: no usable documents \(2 read, rejected \{'empty': 2\}\)"
    ):
        prepare_text([empty], tmp_path / "o", log=lambda *_: None)
    assert not (tmp_path / "o").exists()


def test_truncated_shard_is_refused(example_data, tmp_path):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(example_data, copy)
    shard = copy / json.loads((copy / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train_00000.bin: missing or of the wrong size"):
        PackedDataset(copy, "train")


def test_ranks_and_accumulation_steps_cover_the_global_batch():
    n = 37
    one = BatchPlan(n, micro=3, grad_accum=2, dp=1, rank=0, seed=9)
    two = [BatchPlan(n, micro=3, grad_accum=1, dp=2, rank=r, seed=9) for r in range(2)]
    for g in range(20):  # crosses several epochs
        assert one.rows(g, 0).tolist() == two[0].rows(g, 0).tolist()
        assert one.rows(g, 1).tolist() == two[1].rows(g, 0).tolist()
    # One epoch of the stream visits every row once.
    stream = np.concatenate([one.rows(g, m) for g in range(20) for m in range(2)])
    assert sorted(stream[:n].tolist()) == list(range(n))


def _write_shards(out, sizes: list[int], seq_len: int, dtype: str) -> None:
    """A hand-made dataset: train shards of the given numbers of rows, row r holding r * 1000 + column."""
    out.mkdir()
    shards, first = [], 0
    for n, size in enumerate(sizes):
        rows = (np.arange(first, first + size)[:, None] * 1000 + np.arange(seq_len)).astype(dtype)
        rows.tofile(out / f"train_{n:05d}.bin")
        sha = hashlib.sha256(rows.tobytes()).hexdigest()
        shards.append({"file": f"train_{n:05d}.bin", "num_sequences": size, "sha256": sha})
        first += size
    manifest = {
        "format": FORMAT,
        "seq_len": seq_len,
        "dtype": dtype,
        "tokenizer": {"vocab_size": 1 << 16},
        "splits": {"train": {"shards": shards}},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_vectorized_gather_matches_the_per_row_reference(tmp_path, dtype):
    seq_len = 6
    _write_shards(tmp_path / "d", [5, 1, 7, 3], seq_len, dtype)  # a one-row shard among them
    ds = PackedDataset(tmp_path / "d", "train")
    assert len(ds) == 16
    cases = {
        "across shards, unsorted": np.array([12, 0, 5, 6, 15, 3]),
        "repeated": np.array([7, 7, 2, 7, 2, 13, 13]),
        "single": np.array([9]),
        "every row, reversed": np.arange(16)[::-1],
        "one shard": np.array([8, 6, 11]),
        "a list": [4, 5, 6],
    }
    for name, idx in cases.items():
        want = former.gather(ds, idx)
        rows = ds.rows(idx)
        assert rows.dtype == np.int64 and rows.shape == (len(idx), seq_len), name
        assert torch.equal(torch.from_numpy(rows), want), name
        got = ds[idx]
        assert got.dtype == torch.long and torch.equal(got, want), name
        assert np.array_equal(rows[:, 0] // 1000, np.asarray(idx)), name  # the rows asked for, in order
    assert ds.rows(np.zeros(0, dtype=np.int64)).shape == (0, seq_len)
    for bad in ([16], [-1], [3, 99]):
        with pytest.raises(IndexError, match=r"row indices must be in \[0, 16\)"):
            ds.rows(bad)


def test_vectorized_gather_matches_on_the_example_world(example_data):
    ds = PackedDataset(example_data, "train")
    idx = BatchPlan(len(ds), micro=64, grad_accum=1, dp=1, rank=0, seed=4).rows(3, 0)
    idx = np.concatenate([idx, idx[:5], [len(ds) - 1, 0]])
    assert torch.equal(torch.from_numpy(ds.rows(idx)), former.gather(ds, idx))


def test_duplicate_filter_decides_as_a_set_in_at_most_32_bytes_a_document():
    """The ingest stage's filter against a Python set of the texts: the same first-seen decisions over
    texts with many repeats, through several growths of its table, 16 to 32 bytes a document."""
    import random

    from data_prep.dedup import SeenDigests

    rng = random.Random(0)
    texts = [f"document {rng.randrange(60_000)}" for _ in range(100_000)]
    seen, ref = SeenDigests(), set()
    for t in texts:
        new = t not in ref
        ref.add(t)
        assert seen.add(t) == new
    assert not seen.runs and seen.n == len(ref)
    assert 16 * len(ref) <= seen.nbytes <= 32 * len(ref)  # a quarter to half full


def test_duplicate_filter_memory_is_bounded_and_spills_exactly_to_disk(tmp_path):
    """With a 64 KiB budget, 60,000 distinct texts (16 x what fits) spill to sorted runs on disk,
    merged as a binary counter merges: decisions still equal a Python set's, the table never
    outgrows the budget, the runs hold each key once, sorted, and close() deletes them."""
    import random

    from data_prep.dedup import SeenDigests

    rng = random.Random(1)
    texts = [f"doc {rng.randrange(60_000)}" for _ in range(150_000)]
    ref: set[str] = set()
    most_runs = 0
    with SeenDigests(memory_bytes=64 << 10, spill_dir=tmp_path, block=1000) as seen:
        for t in texts:
            new = t not in ref
            ref.add(t)
            assert seen.add(t) == new
            assert seen.nbytes <= 64 << 10
            most_runs = max(most_runs, len(seen.runs))
        assert len(seen) == len(ref) and seen.spilled > 0
        keys = np.concatenate([np.asarray(r) for r in seen.runs] + [seen.table[seen.table != 0]])
        assert len(np.unique(keys)) == len(keys) == len(ref)
        assert all(np.all(np.asarray(r)[1:] > np.asarray(r)[:-1]) for r in seen.runs)
        # runs of 4,096 keys: at most log2(60,000 / 4,096) + 2 of them at any time
        assert 2 <= most_runs <= 6, most_runs
        folder = seen._folder
        assert folder is not None and folder.parent == tmp_path
        assert sorted(p.name for p in folder.iterdir()) == sorted(Path(r.filename).name for r in seen.runs)
    assert not folder.exists() and list(tmp_path.iterdir()) == []
