"""data_prep with knowledge: wiki links, alias linking, distant supervision, join and pack, on real data."""

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from conftest import kill_when

from data_prep.kg import Linker, Triple, check_aliases, read_aliases, read_triples
from data_prep.pack import EOS_ID, Packer
from data_prep.pipeline import PrepConfig, prepare, prepare_example
from data_prep.readers import DataError, read_corpus, read_mediawiki
from data_prep.wikitext import strip_wikitext
from sparsexpert.data import PackedDataset

REPO = Path(__file__).resolve().parents[1]
NATIONS_ALIASES = REPO / "data_prep" / "examples" / "nations_aliases.tsv"


def _world_args(world: dict[str, Path]) -> list[str]:
    """CLI inputs of a generated example world: its corpus, KG and aliases, matched case-exact."""
    return [
        "--corpus",
        str(world["corpus"]),
        "--kg",
        str(world["kg"]),
        "--aliases",
        str(world["aliases"]),
        "--case",
        "exact",
    ]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def _tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def test_wikitext_keeps_exact_link_spans():
    markup = (
        "{{Infobox|name=x {{nested}} }}'''Anarchism''' is a [[political philosophy]] that advocates "
        "[[self-governance|self-governed]] societies.<ref>cite [[Ignored]]</ref> See [[bus]]es, "
        "[[File:x.png|thumb|a [[link]] in a caption]] and [http://example.org an external label].\n"
        "== History ==\n[[Category:Political ideologies]]Text [[Peter Kropotkin|Kropotkin ]] wrote."
    )
    text, links = strip_wikitext(markup)
    got = [(text[link.start : link.end], link.target) for link in links]
    assert got == [
        ("political philosophy", "Political philosophy"),
        ("self-governed", "Self-governance"),
        ("buses", "Bus"),
        ("Kropotkin", "Peter Kropotkin"),
    ]
    assert text.startswith(
        "Anarchism is a political philosophy that advocates self-governed societies. See buses"
    )
    assert "an external label" in text and "History" in text and "Infobox" not in text and "cite" not in text


def test_real_wiki_dump_links_become_exact_mentions(shared_data):
    filtered = Counter()
    docs = {
        d.source.split(":", 1)[1].rsplit(":", 1)[-1]: d
        for d in read_mediawiki(shared_data / "wiki" / "enwiki-sample.xml.bz2", filtered)
    }
    assert len(docs) == 106 and filtered == {"redirect": 99, "not_an_article": 1}
    autism = docs["Autism"]
    spans = [(autism.text[link.start : link.end], link.target) for link in autism.links[:4]]
    assert spans == [
        ("neurodevelopmental disorder", "Neurodevelopmental disorder"),
        ("social interaction", "Interpersonal relationship"),
        ("verbal", "Language acquisition"),
        ("non-verbal communication", "Non-verbal communication"),
    ]
    assert autism.text.startswith("Autism is a neurodevelopmental disorder characterized by impaired social")
    total = sum(len(d.links) for d in docs.values())
    assert total > 20000
    for d in docs.values():
        for link in d.links:
            surface = d.text[link.start : link.end]
            assert surface and surface == surface.strip() and "[[" not in surface and "|" not in surface


def test_wiki_dump_to_shards_spans_decode_to_their_mentions(shared_data, tmp_path):
    cfg = PrepConfig(
        corpus=[str(shared_data / "wiki" / "enwiki-sample.xml.bz2")],
        output=str(tmp_path / "wiki"),
        vocab_size=4000,
        seq_len=256,
        workers=2,
    )
    m = prepare(cfg, log=lambda *_: None)
    assert m["documents_in"] == 206 and m["documents_written"] == 106
    assert m["documents_rejected"] == {"redirect": 99, "not_an_article": 1}
    assert m["documents_in"] == m["documents_written"] + sum(m["documents_rejected"].values())
    assert m["mentions"] > 20000 and m["spans"] > 15000
    ds = PackedDataset(tmp_path / "wiki", "train")
    spans = np.load(tmp_path / "wiki" / "train_spans.npy")
    entities = [line.split("\t") for line in (tmp_path / "wiki" / "entities.tsv").read_text().splitlines()]
    # No KG: every entity is a wiki link target; its surface is its id with underscores as spaces.
    assert all(surface == ent.replace("_", " ") for _, ent, surface in entities)
    names = {i: surface for i, _, surface in entities}
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "wiki" / "tokenizer.model"))
    rows = ds[spans[:300, 0]]
    exact = 0
    for (_row, s, e, ent), tokens in zip(spans[:300], rows):
        surface = sp.decode(tokens[s:e].tolist())
        assert 0 <= s < e <= ds.seq_len and surface.strip()
        exact += surface.lower() in names[str(ent)].lower() or names[str(ent)].lower() in surface.lower()
    assert exact > 150  # many surfaces are their target's title (the rest are anchor texts like "verbal")


def test_linker_longest_match_word_boundaries_and_case():
    aliases = {"nyc": ["New York City"], "ny": ["New York"], "york": ["York"], "us": ["US"], "uk": ["UK"]}
    text = "From New York City to York, not USA; the US and the uk."
    exact = [(text[m.start : m.end], m.entity) for m in Linker(aliases, "exact").find(text)]
    assert exact == [("New York City", "nyc"), ("York", "york"), ("US", "us")]
    ignore = [(text[m.start : m.end], m.entity) for m in Linker(aliases, "ignore").find(text)]
    assert ignore == [("New York City", "nyc"), ("York", "york"), ("US", "us"), ("uk", "uk")]


def test_kg_readers_and_their_errors(tmp_path):
    tsv = tmp_path / "kg.tsv"
    tsv.write_text("a\tr1\tb\nb\tr2\tc\n")
    nt = tmp_path / "kg.nt"
    nt.write_text("<http://x.org/a> <http://x.org/r1> <http://x.org/b> .\n")
    jl = tmp_path / "kg.jsonl"
    jl.write_text('{"head": "a", "relation": "r1", "tail": "b"}\n')
    assert read_triples(tsv) == [Triple("a", "r1", "b"), Triple("b", "r2", "c")]
    assert read_triples(nt) == [Triple("a", "r1", "b")] == read_triples(jl)
    tsv.write_text("a\tr1\tb\na\tr1\n")
    with pytest.raises(DataError, match=r"kg.tsv:2: expected 3 tab-separated columns .* found 2"):
        read_triples(tsv)
    nt.write_text("not a triple\n")
    with pytest.raises(DataError, match=r"kg.nt:1: not an N-Triples statement"):
        read_triples(nt)
    aliases = tmp_path / "aliases.tsv"
    aliases.write_text("a\tAlpha\nb\tBeta\n")
    triples = [Triple("a", "r1", "b"), Triple("b", "r2", "c")]
    with pytest.raises(DataError, match=r"triple 2 \(b, r2, c\) names entity 'c' with no alias"):
        check_aliases(triples, read_aliases(aliases, {"a", "b", "c"}), tsv, "fail")
    kept, missing = check_aliases(triples, read_aliases(aliases, {"a", "b", "c"}), tsv, "skip")
    assert kept == triples[:1] and missing == 1


def test_jsonl_bad_lines_fail_or_are_counted(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "one"}\n{"text": \n{"body": "x"}\n{"text": "two"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: malformed JSON"):
        list(read_corpus(jl, "text", Counter(), "fail"))
    rejected = Counter()
    docs = [d.text for d in read_corpus(jl, "text", rejected, "skip")]
    assert docs == ["one", "two"] and rejected == {"malformed_json": 1, "missing_text_field": 1}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        list(read_corpus(empty, "text", Counter(), "fail"))


def test_span_crossing_a_row_boundary_is_clipped_and_counted(tmp_path):
    p = Packer(tmp_path, "train", seq_len=4, dtype=np.dtype(np.uint16), rows_per_shard=100)
    p.add(np.array([10, 11, 12, 13, 14, 15]), spans=[(0, 2, 7), (2, 5, 8)], triples=[(0, 6, 3)])
    out = p.finish()
    spans = np.load(tmp_path / "train_spans.npy").tolist()
    assert spans == [[0, 0, 2, 7], [0, 2, 4, 8]] and out["spans_clipped"] == 1
    assert np.load(tmp_path / "train_triples.npy").tolist() == [
        [0, 3]
    ]  # row 1 (tokens 15, EOS) is incomplete
    assert np.fromfile(tmp_path / "train_00000.bin", dtype=np.uint16).tolist() == [10, 11, 12, 13]
    assert out["tokens_dropped_tail"] == 3 and EOS_ID == 2


def test_packing_documents_at_once_equals_one_at_a_time(tmp_path):
    """The pack stage hands a chunk's documents to the packer at once (add_docs): the shards, spans,
    row triples and counts equal those of adding the documents one by one, over pieces without EOS,
    spans crossing rows, evidence over several rows, repeated triples and shard boundaries."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(60):
        n = int(rng.integers(1, 40))
        starts = np.sort(rng.integers(0, n, int(rng.integers(0, 5))))
        spans = [(int(a), int(min(n, a + rng.integers(1, 6))), int(rng.integers(0, 9))) for a in starts]
        triples = []
        for _ in range(int(rng.integers(0, 4))):
            a = int(rng.integers(0, n))
            triples.append((a, int(min(n, a + rng.integers(0, 30))), int(rng.integers(0, 5))))
        docs.append((rng.integers(3, 500, n), spans, sorted(triples), bool(rng.random() > 0.2)))
    outs = {}
    for how in ("one", "many"):
        out = tmp_path / how
        out.mkdir()
        p = Packer(out, "train", seq_len=8, dtype=np.dtype(np.uint16), rows_per_shard=7)
        if how == "one":
            for ids, spans, triples, eos in docs:
                p.add(ids, spans, triples, eos=eos)
        else:
            cuts = [0, 1, 2, 10, 11, 30, 60]
            for a, b in zip(cuts, cuts[1:]):
                group = docs[a:b]
                spans, triples = (
                    np.array([(d, *x) for d, doc in enumerate(group) for x in doc[k]], np.int64).reshape(
                        -1, 4
                    )
                    for k in (1, 2)
                )
                p.add_docs(
                    np.concatenate([g[0] for g in group]).astype(np.int64),
                    np.array([len(g[0]) for g in group]),
                    np.array([g[3] for g in group]),
                    spans,
                    triples,
                )
        outs[how] = (p.finish(), {f.name: f.read_bytes() for f in sorted(out.iterdir())})
    assert outs["one"] == outs["many"]
    summary, files = outs["one"]
    assert summary["spans_clipped"] > 0 and len(summary["shards"]) > 3 and summary["row_triples"] > 20


def test_news_with_nations_distant_supervision(shared_data, tmp_path):
    out = tmp_path / "news"
    proc = _run_cli(
        "run",
        "--corpus",
        str(shared_data / "news" / "lee_background.txt"),
        "--kg",
        str(shared_data / "kg" / "nations" / "train.tsv"),
        "--aliases",
        str(NATIONS_ALIASES),
        "--case",
        "exact",
        "--output",
        str(out),
        "--vocab_size",
        "2000",
        "--seq_len",
        "128",
        "--workers",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["documents_in"] == 300 and m["documents_in"] == m["documents_written"] + sum(
        m["documents_rejected"].values()
    )
    assert m["mentions"] > 200 and m["triples_attached"] > 300 and m["relations"] == 55
    assert f"triples attached {m['triples_attached']}" in proc.stdout
    # the tokenizer stage counted the documents: the join's progress has a total (share, rate, ETA)
    n = m["documents_written"]
    assert f"data_prep join {n:,}/{n:,} docs | done in" in proc.stderr
    rows = [line.split("\t") for line in (out / "triples.tsv").read_text().splitlines()]
    # Every triple of the vocabulary, attached or not.
    assert len(rows) == m["kg_triples"] + m["triples_new_from_extractor"] == m["kg_triples"]
    assert [int(row[0]) for row in rows] == list(range(len(rows)))
    attached = [row for row in rows if int(row[4]) > 0]
    assert len(attached) == m["distinct_triples_attached"] < len(rows)
    assert sum(int(row[4]) for row in attached) == m["triples_attached"]
    assert ["usa", "uk"] in [[row[1], row[3]] for row in attached]
    assert {row[5] for row in attached} == {"kg"}  # "A United States ... a British man"
    assert sum(m["triples_per_relation"].values()) == m["triples_attached"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["mentions_per_1000_tokens"] > 0 and stats["top_relations"]
    assert _run_cli("stats", str(out)).stdout.strip().startswith("{")

    # The link and extract stages on their own find exactly what the join attached.
    inputs = [
        "--corpus",
        str(shared_data / "news" / "lee_background.txt"),
        "--kg",
        str(shared_data / "kg" / "nations" / "train.tsv"),
        "--aliases",
        str(NATIONS_ALIASES),
        "--case",
        "exact",
    ]
    assert _run_cli("link", *inputs, "--output", str(tmp_path / "link")).returncode == 0
    lines = [json.loads(x) for x in (tmp_path / "link" / "mentions.jsonl").read_text().splitlines()]
    assert len(lines) == m["documents_written"] and sum(len(x["mentions"]) for x in lines) == m["mentions"]
    assert all(s_ in ("Indian", "India") for x in lines for _, _, ent, s_ in x["mentions"] if ent == "india")
    assert _run_cli("extract", *inputs, "--output", str(tmp_path / "ext")).returncode == 0
    found = [x.split("\t") for x in (tmp_path / "ext" / "extracted_kg.tsv").read_text().splitlines()]
    assert (
        sum(int(x[3]) for x in found) == m["triples_attached"]
        and len(found) == m["distinct_triples_attached"]
    )

    bad = tmp_path / "bad.tsv"
    bad.write_text("usa\tally\n")
    proc = _run_cli(
        "run",
        "--corpus",
        str(shared_data / "news" / "lee_background.txt"),
        "--kg",
        str(bad),
        "--output",
        str(tmp_path / "x"),
        "--dry_run",
    )
    assert proc.returncode == 2 and "bad.tsv:1: expected 3 tab-separated columns" in proc.stderr


def test_output_does_not_depend_on_workers(tmp_path):
    digests = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare_example(
            out, PrepConfig(vocab_size=300, seq_len=64, workers=workers, chunk_docs=100), log=lambda *_: None
        )
        files = sorted(p for p in out.iterdir() if p.name != "manifest.json")
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    assert digests[0] == digests[1]
    m = json.loads((tmp_path / "w2" / "manifest.json").read_text())
    assert m["triples_attached"] > 1000 and m["spans"] > 5000 and m["entities"] > 200
    # Spilled to disk as documents go, the arrays still come out ordered by row, row triples unique.
    spans = np.load(tmp_path / "w2" / "train_spans.npy")
    triples = np.load(tmp_path / "w2" / "train_triples.npy")
    assert (np.diff(spans[:, 0]) >= 0).all() and len(spans) == m["splits"]["train"]["spans"]
    assert [tuple(t) for t in triples.tolist()] == sorted({tuple(t) for t in triples.tolist()})
    rows = len(PackedDataset(tmp_path / "w2", "train"))
    assert spans[:, 0].max() < rows and triples[:, 0].max() < rows
    assert m["splits"]["train"]["rows_with_entity"] == len(np.unique(spans[:, 0]))
    # entities.tsv names each entity as the text does; triples.tsv lists the whole KG, attached or
    # not, the held-out facts (in kg.tsv, stated by no document) included.
    from data_prep.example_world import WorldSpec, build_world, heldout_facts

    entities, facts = build_world(WorldSpec())
    names = {e.id: e.name for e in entities}
    surfaces = {ent: surface for _, ent, surface in _tsv(tmp_path / "w2" / "entities.tsv")}
    assert surfaces["person_0000"] == names["person_0000"] and surfaces == names
    rows = _tsv(tmp_path / "w2" / "triples.tsv")
    assert len(rows) == m["kg_triples"] + m["triples_new_from_extractor"] == len(facts)
    hits = {(h, r, t): int(n) for _, h, r, t, n, _ in rows}
    heldout = heldout_facts(WorldSpec(), facts)
    assert len(heldout) == 91 and all(hits[f] == 0 for f in heldout)  # in the KG, attached to no row


def test_parquet_reader(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["first doc", None, "second doc"]}), path)
    with pytest.raises(DataError, match=r"c.parquet: no column 'text'"):
        list(read_corpus(path, "text", Counter(), "fail"))
    rejected = Counter()
    assert [d.text for d in read_corpus(path, "body", rejected, "skip")] == ["first doc", "second doc"]
    assert rejected == {"missing_text_field": 1}


def test_fast_token_offsets_equal_sentencepiece_offsets(tmp_path):
    """Offsets from the piece-length table (identity tokenizer) equal those SentencePiece reports."""
    from data_prep.pipeline import train_tokenizer
    from data_prep.tokenizer import SentencePieceTokenizer

    docs = [f"Ünïcode façade №{i}:  two  spaces, a tab\there, and 東京 at the end." for i in range(200)]
    tok = SentencePieceTokenizer(
        train_tokenizer(iter(docs), tmp_path / "t.model", PrepConfig(vocab_size=200))
    )
    assert tok.lengths is not None
    for text in (docs[7], " leading space and Ü", "unseen ☃ snowman"):
        (ids,) = tok.encode([text])
        fast = tok.char_bounds(text, ids)
        table, tok.lengths = tok.lengths, None
        slow = tok.char_bounds(text, ids)
        tok.lengths = table
        assert fast[0].tolist() == slow[0].tolist() and fast[1].tolist() == slow[1].tolist(), text


def test_hugging_face_tokenizer_folder(tmp_path, shared_data):
    """A local Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) instead of
    SentencePiece: its EOS separates documents and the spans still decode to their mentions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    news = shared_data / "news" / "lee_background.txt"
    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train(
        [str(news)], trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<pad>", "<|endoftext|>"])
    )
    folder = tmp_path / "hf_tok"
    folder.mkdir()
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<pad>"})
    )
    (folder / "model.safetensors").write_bytes(b"weights")  # a model folder: its weights stay behind
    out = tmp_path / "news_hf"
    m = prepare(
        PrepConfig(
            corpus=[str(news)],
            output=str(out),
            tokenizer=str(folder),
            kg=str(shared_data / "kg" / "nations" / "train.tsv"),
            aliases=str(NATIONS_ALIASES),
            case="exact",
            seq_len=128,
        ),
        log=lambda *_: None,
    )
    eos = hf.token_to_id("<|endoftext|>")
    assert (
        m["tokenizer"]["type"] == "huggingface"
        and m["tokenizer"]["eos_id"] == eos
        and m["tokenizer"]["pad_id"] == 1
    )
    assert (out / "tokenizer" / "tokenizer.json").is_file() and m["triples_attached"] > 300
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    ds = PackedDataset(out, "train")
    assert (ds[np.arange(len(ds))] == eos).sum() > 200  # document boundaries
    spans = np.load(out / "train_spans.npy")
    entities = [line.split("\t") for line in (out / "entities.tsv").read_text().splitlines()]
    names = {i: ent for i, ent, _ in entities}
    aliases, first = {}, {}
    for line in NATIONS_ALIASES.read_text().splitlines():
        entity, alias = line.split("\t")
        aliases.setdefault(entity, set()).add(alias)
        first.setdefault(entity, alias)
    assert all(surface == first[ent] for _, ent, surface in entities)  # the first alias
    for (_row, s, e, ent), tokens in zip(spans[:100], ds[spans[:100, 0]]):
        assert hf.decode(tokens[s:e].tolist()).strip() in aliases[names[str(ent)]]
    bad = tmp_path / "no_eos"
    bad.mkdir()
    Tokenizer(models.BPE(unk_token="<unk>")).save(str(bad / "tokenizer.json"))
    with pytest.raises(DataError, match="no end-of-sequence token"):
        prepare(
            PrepConfig(corpus=[str(news)], output=str(tmp_path / "x"), tokenizer=str(bad)),
            log=lambda *_: None,
        )


def _dataset_digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_scale_out_then_merge_equals_one_machine(tmp_path):
    from data_prep.example_world import WorldSpec, write_world
    from data_prep.pipeline import load_inputs, stage_join, stage_pack, stage_tokenizer

    world = write_world(tmp_path / "raw", WorldSpec(documents=600))
    base = dict(
        corpus=[str(world["corpus"])],
        kg=str(world["kg"]),
        aliases=str(world["aliases"]),
        case="exact",
        vocab_size=300,
        seq_len=64,
        chunk_docs=50,
    )
    one = prepare(PrepConfig(output=str(tmp_path / "one"), **base), log=lambda *_: None)
    cfg = PrepConfig(output=str(tmp_path / "many"), **base)
    with pytest.raises(DataError, match="every machine must use the same tokenizer"):
        prepare(PrepConfig(output=str(tmp_path / "many"), num_shards=3, **base), log=lambda *_: None)
    stage_tokenizer(cfg, log=lambda *_: None)
    for i in (2, 0):  # shard 1 is late
        assert (
            prepare(
                PrepConfig(output=str(tmp_path / "many"), num_shards=3, shard_index=i, **base),
                log=lambda *_: None,
            )
            == {}
        )
    with pytest.raises(DataError, match=r"4 of 12 chunks are not joined yet \(first: chunk 1,"):
        stage_pack(cfg, load_inputs(cfg), log=lambda *_: None)
    stage_join(
        PrepConfig(output=str(tmp_path / "many"), num_shards=3, shard_index=1, workers=2, **base),
        load_inputs(cfg),
        log=lambda *_: None,
    )
    merged = stage_pack(cfg, load_inputs(cfg), log=lambda *_: None)
    assert merged == one
    assert _dataset_digest(tmp_path / "many") == _dataset_digest(tmp_path / "one")
    assert not (tmp_path / "many.parts").exists()


FAKE_SBATCH = r"""#!/bin/bash
# Runs the job at once (its dependencies are done: jobs run in submission order), an array's tasks one
# after the other with Slurm's array variables; records each submission's options; prints a job id.
opts=()
while [[ $1 == --* ]]; do opts+=("$1"); shift; done
echo "${opts[*]} $(basename "$1") $2" >> "$LOG"
array="" cpus=1
for o in "${opts[@]}"; do
    case "$o" in --array=*) array="${o#--array=}" ;; --cpus-per-task=*) cpus="${o#--cpus-per-task=}" ;; esac
done
n=$(($(wc -l < "$LOG")))
if [[ -n "$array" ]]; then
    last="${array#0-}"
    for i in $(seq 0 "$last"); do
        SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_TASK_COUNT=$((last + 1)) SLURM_CPUS_PER_TASK=$cpus bash "$@" \
            > "$OUT/job$n.$i.out" 2>&1 || exit 1
    done
else
    SLURM_CPUS_PER_TASK=$cpus bash "$@" > "$OUT/job$n.out" 2>&1 || exit 1
fi
echo "$((1000 + n))"
"""


def test_slurm_template_joins_in_an_array_and_merges_what_one_machine_writes(tmp_path):
    """launcher/slurm/data_prep.sh submits the tokenizer, a join array of K tasks after it, and the merge
    after every task (afterok); run as a fake sbatch runs them, the dataset equals one machine's."""
    from data_prep.example_world import WorldSpec, write_world

    world = write_world(tmp_path / "raw", WorldSpec(documents=300))
    args = [*_world_args(world), "--vocab_size", "300", "--seq_len", "64", "--chunk_docs", "40"]
    assert _run_cli("run", *args, "--output", str(tmp_path / "one")).returncode == 0
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sbatch").write_text(FAKE_SBATCH)
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "LOG": str(tmp_path / "sbatch.log"),
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "JOIN_CPUS": "2",
        "SBATCH_ARGS": "--partition=cpu --time=01:00:00",
    }
    script = str(REPO / "launcher" / "slurm" / "data_prep.sh")
    res = subprocess.run(
        ["bash", script, "3", *args, "--output", str(tmp_path / "many")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr + "".join(p.read_text() for p in tmp_path.glob("job*.out"))
    assert "tokenizer job 1001, join array job 1002 (3 tasks), merge job 1003" in res.stdout
    log = (tmp_path / "sbatch.log").read_text().splitlines()
    assert log[0].startswith(
        "--parsable --partition=cpu --time=01:00:00 --cpus-per-task=2 data_prep.sbatch tokenizer"
    )
    assert "--dependency=afterok:1001 --kill-on-invalid-dep=yes --array=0-2" in log[1] and "join" in log[1]
    assert "--dependency=afterok:1002 --kill-on-invalid-dep=yes" in log[2] and log[2].endswith(
        "data_prep.sbatch merge"
    )
    assert "join task 1 of 3, 2 workers" in (tmp_path / "job2.1.out").read_text()
    assert _dataset_digest(tmp_path / "many") == _dataset_digest(tmp_path / "one")
    # the template refuses what it cannot run, naming the fix
    res = subprocess.run(["bash", script, "x"], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "SHARDS must be a positive number" in res.stderr
    sbatch = str(REPO / "launcher" / "slurm" / "data_prep.sbatch")
    res = subprocess.run(["bash", sbatch, "join", *args], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "join runs as an array job" in res.stderr


def test_interrupted_run_resumes_without_redoing_or_losing_documents(tmp_path, shared_data):
    args = [
        "run",
        "--corpus",
        str(shared_data / "wiki" / "enwiki-sample.xml.bz2"),
        "--vocab_size",
        "2000",
        "--seq_len",
        "256",
        "--chunk_docs",
        "2",
    ]
    clean = _run_cli(*args, "--output", str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "killed"
    chunks = tmp_path / "killed.parts" / "chunks"
    kill_when(
        [sys.executable, "-m", "data_prep", *args, "--output", str(out)],
        lambda: chunks.is_dir() and len(list(chunks.glob("chunk_*.npz"))) >= 10,
        timeout=120,
    )
    done = len(list(chunks.glob("chunk_*.npz")))
    assert 10 <= done < 53, "the run was not interrupted mid-way; the test proves nothing"
    resumed = _run_cli(*args, "--output", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed, {done} chunks were already done" in resumed.stdout
    assert _dataset_digest(out) == _dataset_digest(tmp_path / "clean")


def test_pluggable_extractor_adds_triples(tmp_path):
    """The reference InfixExtractor, loaded by module:Class with JSON arguments, finds "X works for Y"
    in the example world; its triples are attached and written with source "extracted" where new."""
    from data_prep.example_world import WorldSpec, write_world

    world = write_world(tmp_path / "raw", WorldSpec(documents=400))
    args = tmp_path / "patterns.json"
    args.write_text(json.dumps({"patterns": {"employs_person": ["employs"], "works_for": ["works for"]}}))
    out = tmp_path / "ex"
    proc = _run_cli(
        "run",
        *_world_args(world),
        "--output",
        str(out),
        "--vocab_size",
        "300",
        "--seq_len",
        "64",
        "--extractor",
        "data_prep.extractors:InfixExtractor",
        "--extractor_args",
        str(args),
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    rows = [line.split("\t") for line in (out / "triples.tsv").read_text().splitlines()]
    assert len(rows) == m["kg_triples"] + m["triples_new_from_extractor"]
    extracted = [r for r in rows if r[5] == "extracted"]
    assert all(int(r[4]) > 0 for r in extracted)  # new triples only come from attaching them
    kg = {tuple(line.split("\t")) for line in world["kg"].read_text().splitlines()}
    # "X works for Y" restates a KG fact: attached again, under the KG triple; "Y employs X" is a new relation.
    assert m["triples_attached_by_extractor"] > 20 and m["triples_new_from_extractor"] == len(extracted) > 10
    assert all(r[2] == "employs_person" and (r[3], "works_for", r[1]) in kg for r in extracted)
    assert "employs_person" in (out / "relations.tsv").read_text()
    bad = _run_cli(
        "run", "--corpus", str(world["corpus"]), "--output", str(tmp_path / "x"), "--extractor", "nope"
    )
    assert bad.returncode == 2 and "expected module:Class" in bad.stderr


def test_ingest_stage_counts_and_writes_nothing(tmp_path, shared_data):
    news = shared_data / "news" / "lee_background.txt"
    proc = _run_cli("ingest", "--corpus", str(news), "--output", str(tmp_path / "none"))
    assert proc.returncode == 0, proc.stderr
    assert (
        "'documents_in': 300, 'documents_written': 293, 'documents_rejected': {'duplicate': 7}" in proc.stdout
    )
    assert not (tmp_path / "none").exists() and not (tmp_path / "none.parts").exists()


def test_kept_parts_pack_again_at_another_length(tmp_path):
    """--keep_parts, then `merge --seq_len 96` on the same joined chunks, equals a fresh run at 96."""
    from data_prep.example_world import WorldSpec, write_world

    world = write_world(tmp_path / "raw", WorldSpec(documents=300))
    common = [
        *_world_args(world),
        "--vocab_size",
        "300",
        "--chunk_docs",
        "50",
    ]
    out = str(tmp_path / "kept")
    assert _run_cli("run", *common, "--output", out, "--seq_len", "64", "--keep_parts").returncode == 0
    assert (tmp_path / "kept.parts" / "chunks").is_dir()
    assert PackedDataset(out, "train").seq_len == 64
    proc = _run_cli("merge", *common, "--output", out, "--seq_len", "96")
    assert proc.returncode == 0, proc.stderr
    assert _run_cli("run", *common, "--output", str(tmp_path / "fresh"), "--seq_len", "96").returncode == 0
    assert _dataset_digest(tmp_path / "kept") == _dataset_digest(tmp_path / "fresh")
    assert not (tmp_path / "kept.parts").exists()  # the second merge did not keep them


def test_example_configs_run(tmp_path, shared_data):
    """The shipped example configs (paths relative to the repository root, next to ../shared)."""
    for name in ("news_nations", "wiki"):
        cfg = json.loads((REPO / "data_prep" / "examples" / f"{name}.json").read_text())
        assert all((REPO / p).exists() for p in cfg["corpus"])
    proc = _run_cli(
        "run", "--config", "data_prep/examples/news_nations.json", "--output", str(tmp_path / "nn")
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "nn" / "manifest.json").read_text())
    assert m["config"]["kg"].endswith("nations/train.tsv") and m["triples_attached"] > 300


def test_linked_text_is_corpus_kg_aliases_and_gold_links_in_one_input(shared_data, tmp_path):
    """The REBEL sample (Wikipedia abstracts, Wikidata links, aligned triples) given as --corpus and --kg:
    every gold link becomes a mention of its Q-id at its surface form, offsets that miss it realigned and
    counted; the KG is the records' triples with both ends linked; the aliases are their surface forms.
    Checked against an independent reading of the file."""
    rebel = shared_data / "rebel" / "rebel_sample.jsonl"
    records = [json.loads(line) for line in rebel.read_text().splitlines()]
    notes: Counter = Counter()
    docs = list(read_corpus(rebel, "text", notes, "fail"))
    assert len(docs) == len(records) == 800
    linked = exact = 0
    for doc, rec in zip(docs, records):
        assert doc.text == rec["text"]
        for link in doc.links:
            forms = {e["surfaceform"] for e in rec["entities"] if e["uri"] == link.target}
            assert doc.text[link.start : link.end] in forms
        starts = [link.start for link in doc.links]
        assert starts == sorted(starts) and all(a.end <= b.start for a, b in zip(doc.links, doc.links[1:]))
        for e in rec["entities"]:
            if e.get("uri") not in (None, "", "None"):
                linked += 1
                exact += rec["text"][slice(*e["boundaries"])] == e["surfaceform"]
    kept = sum(len(d.links) for d in docs)
    assert notes["links_unlinked"] == sum(len(r["entities"]) for r in records) - linked
    assert kept + notes["links_overlapping"] + notes["links_unaligned"] == linked
    assert (
        notes["links_realigned"] == linked - exact - notes["links_unaligned"] > 1000
    )  # REBEL's offsets drift

    out = tmp_path / "rebel"
    proc = _run_cli(
        "run", "--corpus", str(rebel), "--kg", str(rebel), "--output", str(out), "--vocab_size", "2000"
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert (
        m["config"]["aliases"] == str(rebel)
        and m["documents_written"] == 800
        and m["documents_rejected"] == {}
    )
    assert m["gold_links"] == {k: n for k, n in notes.items() if n}
    facts = {
        (t["subject"]["uri"], t["predicate"]["surfaceform"], t["object"]["uri"])
        for r in records
        for t in r["triples"]
        if t["subject"].get("uri") not in (None, "", "None")
        and t["object"].get("uri") not in (None, "", "None")
    }
    rows = [line.split("\t") for line in (out / "triples.tsv").read_text().splitlines()]
    assert {tuple(r[1:4]) for r in rows if r[5] == "kg"} == facts and len(facts) > 2000
    names = {
        line.split("\t")[1]: line.split("\t")[2] for line in (out / "entities.tsv").read_text().splitlines()
    }
    assert names["Q7835172"] == "Transportation Journal"
    assert m["mentions"] >= kept and m["triples_attached"] > 1500

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"text": "A b.", "entities": [{"uri": "Q1", "boundaries": "x"}], "triples": []}) + "\n"
    )
    proc = _run_cli("run", "--corpus", str(bad), "--output", str(tmp_path / "x"))
    assert proc.returncode == 2 and f"{bad}:1: an entity is not" in proc.stderr
