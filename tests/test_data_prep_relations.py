"""data_prep relations: relation-classification examples by distant supervision, by hand and on real data."""

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from data_prep.__main__ import main
from data_prep.kg import read_aliases, read_triples
from data_prep.readers import DataError
from data_prep.relations import RelationsConfig, prepare_relations

REPO = Path(__file__).resolve().parents[1]
NATIONS_ALIASES = REPO / "data_prep" / "examples" / "nations_aliases.tsv"
FILES = ("train.jsonl", "dev.jsonl", "stats.json")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", "relations", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _examples(out: Path) -> dict[str, list[dict]]:
    return {
        split: [
            json.loads(line) for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        for split in ("train", "dev")
    }


def _ex(text, e1, e2, label, e1_id, e2_id):
    return {"text": text, "e1": list(e1), "e2": list(e2), "label": label, "e1_id": e1_id, "e2_id": e2_id}


S1 = "Paris is the capital of France."
S2 = "Berlin is in Germany and France is nearby."
S3 = "Paris is French."
S4 = "Paris, Paris and France."
LONG = "Berlin and Germany appear in this sentence, which is much longer than the limit set."


@pytest.fixture
def small(tmp_path) -> dict[str, Path]:
    kg = tmp_path / "kg.tsv"
    kg.write_text(
        "paris\tlocated_in\tfrance\nparis\tcapital_of\tfrance\nberlin\tcapital_of\tgermany\n"
        "france\tborders\tgermany\n"
    )
    aliases = tmp_path / "aliases.tsv"
    aliases.write_text("paris\tParis\nfrance\tFrance\nfrance\tFrench\ngermany\tGermany\nberlin\tBerlin\n")
    corpus = tmp_path / "corpus.txt"
    doc = f"{S1} {S2} {S3}"
    corpus.write_text(f"{doc}\n{doc}\n\n{LONG} {S4}\nno entity here. paris and france in lower case.\n")
    return {"corpus": corpus, "kg": kg, "aliases": aliases, "tmp": tmp_path}


def _config(small, name: str, **kw) -> RelationsConfig:
    return RelationsConfig(
        corpus=[str(small["corpus"])],
        kg=str(small["kg"]),
        aliases=str(small["aliases"]),
        case="exact",
        output=str(small["tmp"] / name),
        max_sentence_chars=60,
        **kw,
    )


# Every example of the small corpus, in corpus order (the duplicate document is read once).
ALL = [
    _ex(S1, (0, 5), (24, 30), "capital_of", "paris", "france"),  # two relations: the first sorted
    _ex(S1, (24, 30), (0, 5), "no_relation", "france", "paris"),
    _ex(S2, (0, 6), (13, 20), "capital_of", "berlin", "germany"),
    _ex(S2, (0, 6), (25, 31), "no_relation", "berlin", "france"),
    _ex(S2, (13, 20), (0, 6), "no_relation", "germany", "berlin"),
    _ex(S2, (13, 20), (25, 31), "no_relation", "germany", "france"),
    _ex(S2, (25, 31), (0, 6), "no_relation", "france", "berlin"),
    _ex(S2, (25, 31), (13, 20), "borders", "france", "germany"),
    _ex(S3, (0, 5), (9, 15), "capital_of", "paris", "france"),
    _ex(S3, (9, 15), (0, 5), "no_relation", "france", "paris"),
    _ex(S4, (0, 5), (17, 23), "capital_of", "paris", "france"),  # the first "Paris" only
    _ex(S4, (17, 23), (0, 5), "no_relation", "france", "paris"),
]


def test_small_corpus_exact_examples(small):
    stats = prepare_relations(_config(small, "all", negative_ratio=100.0, valid_fraction=0.0), log=print)
    out = small["tmp"] / "all"
    got = _examples(out)
    assert got == {"train": ALL, "dev": []}
    surfaces = {
        "paris": {"Paris"},
        "france": {"France", "French"},
        "germany": {"Germany"},
        "berlin": {"Berlin"},
    }
    for ex in ALL:
        assert ex["text"][slice(*ex["e1"])] in surfaces[ex["e1_id"]]
        assert ex["text"][slice(*ex["e2"])] in surfaces[ex["e2_id"]]
    assert stats == json.loads((out / "stats.json").read_text())
    assert stats["documents_in"] == 5 and stats["documents"] == 3
    assert stats["documents_rejected"] == {"duplicate": 1, "empty": 1}
    assert (
        stats["sentences"] == 3 + 2 + 2 and stats["skipped_long"] == 1 and stats["sentences_with_pair"] == 4
    )
    assert stats["positives"] == 5 and stats["positives_per_relation"] == {"capital_of": 4, "borders": 1}
    assert stats["multi_relation_pairs"] == 3
    assert (stats["negatives"], stats["negatives_kept"], stats["negatives_dropped"]) == (7, 7, 0)
    assert (stats["train"], stats["dev"]) == (12, 0)
    assert stats["labels"] == ["no_relation", "borders", "capital_of"] and stats["kg_relations"] == 3

    # Every sentence in dev; a longer limit keeps the long sentence.
    stats = prepare_relations(_config(small, "dev", valid_fraction=1.0, negative_ratio=100.0), log=print)
    assert _examples(small["tmp"] / "dev") == {"train": [], "dev": ALL}
    cfg = _config(small, "long", negative_ratio=100.0)
    cfg.max_sentence_chars = 400
    stats = prepare_relations(cfg, log=print)
    assert stats["skipped_long"] == 0 and stats["positives"] == 6 and stats["negatives"] == 8


def test_small_corpus_negative_sample_and_split(small):
    positives = [ex for ex in ALL if ex["label"] != "no_relation"]
    negatives = [ex for ex in ALL if ex["label"] == "no_relation"]
    samples = {}
    for seed in range(6):
        stats = prepare_relations(_config(small, f"s{seed}", negative_ratio=0.4, seed=seed), log=print)
        got = _examples(small["tmp"] / f"s{seed}")
        examples = got["train"] + got["dev"]
        kept = [ex for ex in examples if ex["label"] == "no_relation"]
        # All positives; int(0.4 * 5) = 2 negatives, a sample of the negatives, in corpus order.
        assert [ex for ex in examples if ex["label"] != "no_relation"] == [
            ex for ex in positives if ex in examples
        ]
        assert sorted(map(json.dumps, positives)) == sorted(
            json.dumps(ex) for ex in examples if ex["label"] != "no_relation"
        )
        assert len(kept) == 2 == stats["negatives_kept"] and stats["negatives_dropped"] == 5
        assert all(ex in negatives for ex in kept)
        assert kept == sorted(kept, key=negatives.index)
        assert stats["train"] + stats["dev"] == len(examples) == 7
        # Split by sentence: no sentence in both.
        assert not {ex["text"] for ex in got["train"]} & {ex["text"] for ex in got["dev"]}
        samples[seed] = tuple(map(json.dumps, kept))
    assert len(set(samples.values())) > 1  # the seed chooses the sample
    again = prepare_relations(_config(small, "again", negative_ratio=0.4, seed=3), log=print)
    assert again["negatives_kept"] == 2
    for name in FILES[:2]:
        assert (small["tmp"] / "again" / name).read_bytes() == (small["tmp"] / "s3" / name).read_bytes()
    # The split goes by a hash of the sentence (crc32 % 10000 < fraction * 10000): S2 (2535) and S3
    # (6054) are in dev at 0.7, S1 (9165) and S4 (7629) in train.
    stats = prepare_relations(_config(small, "split", negative_ratio=100.0, valid_fraction=0.7), log=print)
    got = _examples(small["tmp"] / "split")
    # "borders" is only in S3: no training example, so its dev example is left out and counted
    assert got["dev"] == [ex for ex in ALL if ex["text"] in (S2, S3) and ex["label"] != "borders"]
    assert got["train"] == [ex for ex in ALL if ex["text"] in (S1, S4)]
    assert (stats["train"], stats["dev"]) == (4, 7)
    assert stats["dev_left_out_relation_not_in_train"] == {"borders": 1}
    stats = prepare_relations(_config(small, "none", negative_ratio=0.0), log=print)
    assert stats["negatives_kept"] == 0 and stats["train"] + stats["dev"] == 5


def test_bad_inputs_name_the_file(small, tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("paris\tcapital_of\tfrance\nparis\tcapital_of\n")
    args = [
        "--corpus",
        str(small["corpus"]),
        "--aliases",
        str(small["aliases"]),
        "--output",
        str(tmp_path / "x"),
    ]
    proc = _run_cli(*args, "--kg", str(bad))
    assert proc.returncode == 2 and "bad.tsv:2: expected 3 tab-separated columns" in proc.stderr
    assert main(["relations", *args]) == 2 and "no knowledge graph: pass --kg" in capsys.readouterr().err
    missing = str(tmp_path / "missing.txt")
    assert (
        main(["relations", "--corpus", missing, "--kg", str(small["kg"]), "--output", str(tmp_path / "x")])
        == 2
    )
    assert f"{missing}: no such corpus file" in capsys.readouterr().err
    # Case-exact aliases match nothing in a lower-case corpus: no positives is an error, not an empty dataset.
    lower = tmp_path / "lower.txt"
    lower.write_text("paris is the capital of france.\n")
    with pytest.raises(DataError, match=r"lower.txt: no sentence mentions two entities related in .*kg.tsv"):
        prepare_relations(
            RelationsConfig(
                corpus=[str(lower)],
                kg=str(small["kg"]),
                aliases=str(small["aliases"]),
                case="exact",
                output=str(tmp_path / "y"),
            )
        )
    with pytest.raises(DataError, match="negative_ratio=-1"):
        prepare_relations(
            RelationsConfig(
                corpus=[str(lower)], kg=str(small["kg"]), output=str(tmp_path / "y"), negative_ratio=-1
            )
        )
    assert not (tmp_path / "x").exists()


def test_news_with_nations(shared_data, tmp_path):
    news = shared_data / "news" / "lee_background.txt"
    kg_path = shared_data / "kg" / "nations" / "train.tsv"
    out = tmp_path / "rel"
    inputs = [
        "--corpus",
        str(news),
        "--kg",
        str(kg_path),
        "--aliases",
        str(NATIONS_ALIASES),
        "--case",
        "exact",
    ]
    proc = _run_cli(*inputs, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    index_line, line = proc.stdout.splitlines()
    assert index_line.startswith("data_prep kg index: 14 entities, 55 relations, 1,592 triples")
    assert (
        line.startswith("data_prep relations: documents 293,")
        and f"positives {stats['positives']} over" in line
    )

    triples = read_triples(kg_path)
    relations = defaultdict(set)
    for t in triples:
        relations[(t.head, t.tail)].add(t.relation)
    aliases = read_aliases(NATIONS_ALIASES, set())
    got = _examples(out)
    examples = got["train"] + got["dev"]
    for ex in examples:
        text, e1, e2 = ex["text"], ex["e1"], ex["e2"]
        assert len(text) <= 400 and ex["e1_id"] != ex["e2_id"]
        assert text[e1[0] : e1[1]] in aliases[ex["e1_id"]] and text[e2[0] : e2[1]] in aliases[ex["e2_id"]]
        assert e1[1] <= e2[0] or e2[1] <= e1[0]
        pair = (ex["e1_id"], ex["e2_id"])
        if ex["label"] == "no_relation":
            assert pair not in relations
        else:
            assert ex["label"] == min(relations[pair])  # the first of the KG's sorted relations
    assert not {ex["text"] for ex in got["train"]} & {ex["text"] for ex in got["dev"]}

    pos = [ex for ex in examples if ex["label"] != "no_relation"]
    assert stats["documents_in"] == 300 and stats["documents"] == 293
    assert stats["positives"] == len(pos) == sum(stats["positives_per_relation"].values()) > 50
    assert stats["negatives_kept"] == len(examples) - len(pos) <= 1.0 * stats["positives"]
    assert stats["negatives"] == stats["negatives_kept"] + stats["negatives_dropped"]
    assert stats["train"] + stats["dev"] == stats["positives"] + stats["negatives_kept"] == len(examples)
    assert (stats["train"], stats["dev"]) == (len(got["train"]), len(got["dev"])) and stats["dev"] > 0
    assert stats["multi_relation_pairs"] <= stats["positives"] and stats["skipped_long"] >= 0
    assert stats["sentences_with_pair"] <= stats["sentences"] - stats["skipped_long"]
    assert set(stats["labels"]) == {ex["label"] for ex in examples} | {"no_relation"}
    assert ("usa", "uk") in {(ex["e1_id"], ex["e2_id"]) for ex in pos}  # "A United States ... a British man"

    # The same inputs again, in process this time: byte-identical output.
    prepare_relations(
        RelationsConfig(
            corpus=[str(news)],
            kg=str(kg_path),
            aliases=str(NATIONS_ALIASES),
            case="exact",
            output=str(tmp_path / "b"),
        ),
        log=print,
    )
    for name in FILES:
        assert (out / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
