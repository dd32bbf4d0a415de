"""Fine-tuning readers (NER, classification, relations) on real WNUT-16 data and on small bad files, and
the fine-tuning metrics checked against seqeval, scikit-learn and hand computations."""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import pytest
from seqeval.metrics import classification_report
from seqeval.metrics.sequence_labeling import get_entities as seqeval_get_entities

from sparsexpert.finetune.metrics import (
    classification_scores,
    entity_report,
    format_report,
    get_entities,
    relation_scores,
)
from sparsexpert.finetune.readers import (
    ClassificationExample,
    FinetuneDataError,
    NerExample,
    RelationExample,
    label_vocab,
    read_classification,
    read_ner,
    read_relations,
)

WNUT_TYPES = {
    "company",
    "facility",
    "geo-loc",
    "movie",
    "musicartist",
    "other",
    "person",
    "product",
    "sportsteam",
    "tvshow",
}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def raises_at(path: Path, line: int | None, call, *args, **kwargs) -> str:
    """The message of the FinetuneDataError that `call` raises; it must name `path:line` (or `path`)."""
    with pytest.raises(FinetuneDataError) as info:
        call(path, *args, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: "), message
    return message


# ---------------------------------------------------------------------------------------------- readers


@pytest.fixture(scope="module")
def wnut16(shared_data) -> dict[str, list[NerExample]]:
    root = shared_data / "ner" / "wnut16"
    return {split: read_ner(root / f"{split}.conll") for split in ("train", "dev")}


def test_read_ner_wnut16(wnut16):
    assert len(wnut16["train"]) == 1800
    assert len(wnut16["dev"]) == 250
    for examples in wnut16.values():
        assert all(len(ex.tokens) == len(ex.tags) > 0 for ex in examples)
        types = {tag[2:] for ex in examples for tag in ex.tags if tag != "O"}
        assert types == WNUT_TYPES
    first = wnut16["train"][0]
    assert first.tokens[:3] == ["@paulwalk", "It", "'s"]
    assert first.tokens[14:17] == ["Empire", "State", "Building"]
    assert first.tags[14:17] == ["B-facility", "I-facility", "I-facility"]
    vocab = label_vocab(tag for ex in wnut16["train"] for tag in ex.tags)
    assert vocab[0] == "O" and vocab[1:] == sorted(vocab[1:])
    assert set(vocab[1:]) == {f"{p}-{t}" for p in "BI" for t in WNUT_TYPES}


def test_read_ner_conll_variants_and_jsonl(tmp_path):
    expected = [
        NerExample(["EU", "rejects", "German", "call"], ["B-ORG", "O", "B-MISC", "O"]),
        NerExample(["Peter", "Blackburn"], ["B-PER", "I-PER"]),
    ]
    tab = write(
        tmp_path / "a.conll",
        "EU\tB-ORG\nrejects\tO\nGerman\tB-MISC\ncall\tO\n\nPeter\tB-PER\nBlackburn\tI-PER\n",
    )
    space = write(
        tmp_path / "b.txt", "EU B-ORG\nrejects O\nGerman B-MISC\ncall O\n\nPeter B-PER\nBlackburn I-PER"
    )
    conll03 = write(
        tmp_path / "c.bio",
        "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\r\nrejects VBZ B-VP O\r\nGerman JJ B-NP B-MISC\r\n"
        "call NN I-NP O\r\n\n\n  \n-DOCSTART- -X- -X- O\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\n",
    )
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"tokens": ex.tokens, "tags": ex.tags} for ex in expected])
    columns = write(
        tmp_path / "e.tsv",
        "EU\tNNP\t\tB-ORG\t\nrejects\tVBZ\t\tO\nGerman \tJJ\tB-MISC\ncall\tO\n\n"
        "Peter\tB-PER \nBlackburn\tI-PER\n\n",
    )
    for path in (tab, space, conll03, jsonl, columns):
        assert read_ner(path) == expected, path


@pytest.mark.parametrize(
    "name, text, line, says",
    [
        ("tag.conll", "EU\tB-ORG\nsays\tO\n\nHe\tB-\n", 4, "bad tag 'B-'"),
        ("scheme.conll", "EU\tS-ORG\n", 1, "bad tag 'S-ORG'"),
        ("lower.conll", "EU\tb-ORG\n", 1, "bad tag 'b-ORG'"),
        ("column.conll", "EU\tB-ORG\nsays\n", 2, "expected 'token<TAB>tag', got 1 column"),
        ("empty_tag.conll", "EU\t \n", 1, "got 1 column"),
        ("no_token.conll", "\tO\n", 1, "empty token"),
        ("utf8.conll", "EU\tB-ORG\nd\xe9j\xe0\tO\n", 2, "invalid UTF-8"),
        ("empty.conll", "", None, "no sentences"),
        ("docstart.conll", "-DOCSTART- -X- O\n\n\n", None, "no sentences"),
        (
            "lengths.jsonl",
            '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n',
            2,
            "2 tokens but 1 tags",
        ),
        (
            "tags.jsonl",
            '{"tokens": ["a"], "tags": ["O"]}\n\n{"tokens": ["a"], "tags": ["X-PER"]}\n',
            3,
            "bad tag 'X-PER'",
        ),
        ("field.jsonl", '{"tokens": ["a"], "labels": ["O"]}\n', 1, "missing field 'tags'"),
        ("json.jsonl", '{"tokens": ["a"], "tags": ["O"]\n', 1, "malformed JSON"),
        ("list.jsonl", '["a", "O"]\n', 1, "expected a JSON object"),
        ("types.jsonl", '{"tokens": "a b", "tags": ["O", "O"]}\n', 1, "lists of strings"),
        ("blank.jsonl", '{"tokens": [], "tags": []}\n', 1, "empty sentence"),
        ("empty.jsonl", "\n\n", None, "no sentences"),
    ],
)
def test_read_ner_errors_name_file_and_line(tmp_path, name, text, line, says):
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1") if name == "utf8.conll" else text.encode())
    assert says in raises_at(path, line, read_ner)


def test_read_classification_jsonl_and_csv(tmp_path):
    jsonl = write_jsonl(
        tmp_path / "a.jsonl",
        [{"sentence": "great film", "y": 1, "id": 7}, {"sentence": "dull, long", "y": "neg"}],
    )
    assert read_classification(jsonl, text_field="sentence", label_field="y") == [
        ClassificationExample("great film", "1"),
        ClassificationExample("dull, long", "neg"),
    ]
    csv_path = write(
        tmp_path / "a.csv", 'id,text,label\n1,great film,pos\n2,"dull, long\nand ""flat""",neg\n\n'
    )
    assert read_classification(csv_path) == [
        ClassificationExample("great film", "pos"),
        ClassificationExample('dull, long\nand "flat"', "neg"),
    ]


@pytest.mark.parametrize(
    "name, text, line, says",
    [
        ("field.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', 2, "missing field 'label'"),
        ("text.jsonl", '{"text": ["a"], "label": "x"}\n', 1, "'text' must be a string"),
        ("label.jsonl", '{"text": "a", "label": true}\n', 1, "'label' must be a string or an integer"),
        ("header.csv", "sentence,label\na,x\n", 1, "no column 'text'"),
        ("short.csv", "text,label\na,x\nb\n", 3, "fewer columns than the header"),
        ("empty.csv", "text,label\n", None, "no examples"),
        ("empty.jsonl", "", None, "no examples"),
        ("data.tsv", "text\tlabel\na\tx\n", None, "use a .jsonl or .csv file"),
    ],
)
def test_read_classification_errors_name_file_and_line(tmp_path, name, text, line, says):
    assert says in raises_at(write(tmp_path / name, text), line, read_classification)


def test_read_relations(tmp_path):
    text = "Marie Curie was born in Warsaw."
    path = write_jsonl(
        tmp_path / "rel.jsonl",
        [
            {"text": text, "e1": [0, 11], "e2": [24, 30], "label": "per:city_of_birth"},
            {"text": text, "e1": [24, 30], "e2": [0, 5], "label": "no_relation"},
        ],
    )
    examples = read_relations(path)
    assert examples == [
        RelationExample(text, (0, 11), (24, 30), "per:city_of_birth"),
        RelationExample(text, (24, 30), (0, 5), "no_relation"),
    ]
    assert text[slice(*examples[0].e1)] == "Marie Curie" and text[slice(*examples[0].e2)] == "Warsaw"


@pytest.mark.parametrize(
    "record, says",
    [
        ({"text": "ab cd", "e1": [0, 2], "e2": [3, 6], "label": "r"}, "e2 span [3, 6) is empty or outside"),
        ({"text": "ab cd", "e1": [-1, 2], "e2": [3, 5], "label": "r"}, "e1 span [-1, 2) is empty or outside"),
        ({"text": "ab cd", "e1": [2, 2], "e2": [3, 5], "label": "r"}, "e1 span [2, 2) is empty"),
        ({"text": "ab cd", "e1": [0, 4], "e2": [3, 5], "label": "r"}, "overlap"),
        ({"text": "ab cd", "e1": [0, 2], "e2": [0, 2], "label": "r"}, "overlap"),
        ({"text": "ab cd", "e1": [0, 2], "e2": 3, "label": "r"}, "e2 must be [start, end]"),
        ({"text": "ab cd", "e1": [0, 2.0], "e2": [3, 5], "label": "r"}, "e1 must be [start, end]"),
        ({"text": "ab cd", "e1": [0, 2], "e2": [3, 5]}, "missing field 'label'"),
    ],
)
def test_read_relations_errors_name_file_and_line(tmp_path, record, says):
    good = {"text": "ab cd", "e1": [0, 2], "e2": [3, 5], "label": "r"}
    path = write_jsonl(tmp_path / "rel.jsonl", [good, good, record])
    assert says in raises_at(path, 3, read_relations)


def test_label_vocab():
    assert label_vocab(["pos", "neg", "pos", "neutral"]) == ["neg", "neutral", "pos"]
    assert label_vocab(iter(["I-PER", "O", "B-PER", "B-LOC", "O"])) == ["O", "B-LOC", "B-PER", "I-PER"]
    assert label_vocab([]) == []


# ---------------------------------------------------------------------------------------------- metrics


def seqeval_report(y_true: list[list[str]], y_pred: list[list[str]], **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return classification_report(y_true, y_pred, **kwargs)


def assert_same_report(y_true: list[list[str]], y_pred: list[list[str]]) -> None:
    """entity_report equals seqeval's dict report: the same keys in the same order, numbers to 1e-12; where
    seqeval's macro average is NaN (no chunk at all) ours is 0.0."""
    ours, theirs = entity_report(y_true, y_pred), seqeval_report(y_true, y_pred, output_dict=True)
    assert list(ours) == list(theirs)
    for name, row in theirs.items():
        assert list(ours[name]) == list(row)
        for key, value in row.items():
            if math.isnan(value):
                assert (name, len(ours)) == ("macro avg", 3) and ours[name][key] == 0.0
            else:
                assert ours[name][key] == pytest.approx(float(value), abs=1e-12), (name, key)
        assert type(ours[name]["support"]) is int


HAND_CASES = [
    # I after O starts a chunk; a sentence may end inside a chunk.
    (["O", "I-PER", "I-PER", "O", "B-LOC", "I-LOC"], ["O", "B-PER", "I-PER", "O", "B-LOC", "O"]),
    # A type switch I-X I-Y, and B-X I-Y, split chunks.
    (
        ["B-PER", "I-PER", "I-LOC", "O", "B-ORG", "I-MISC"],
        ["B-PER", "I-PER", "B-LOC", "O", "B-ORG", "B-MISC"],
    ),
    # Adjacent B-X B-X are two chunks; I-X after B-Y starts a chunk.
    (["B-LOC", "B-LOC", "I-LOC", "B-PER", "I-ORG"], ["B-LOC", "I-LOC", "I-LOC", "I-PER", "I-ORG"]),
    # IOBES tags: E ends and S is a chunk of one, I after E/S starts one.
    (
        ["B-PER", "E-PER", "S-LOC", "O", "B-ORG", "I-ORG", "E-ORG", "E-ORG"],
        ["B-PER", "I-PER", "S-LOC", "I-LOC", "S-ORG", "B-ORG", "E-ORG", "O"],
    ),
    (
        ["O", "E-PER", "S-PER", "E-PER", "I-MISC", "S-MISC"],
        ["S-PER", "S-PER", "B-PER", "E-LOC", "E-MISC", "I-MISC"],
    ),
    # Empty predictions.
    (["B-PER", "I-PER", "O", "B-LOC"], ["O", "O", "O", "O"]),
    # Bare prefixes ("B", "I") are chunks of type "_".
    (["B", "I", "O", "B-PER"], ["B", "O", "I", "B-PER"]),
]


def test_get_entities_matches_seqeval():
    for gold, pred in HAND_CASES:
        for tags in (gold, pred):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert get_entities(tags) == seqeval_get_entities(tags), tags
    assert get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert get_entities(["O", "I-PER", "I-LOC", "B-LOC", "E-LOC", "S-LOC"]) == [
        ("PER", 1, 1),
        ("LOC", 2, 2),
        ("LOC", 3, 4),
        ("LOC", 5, 5),
    ]


def test_entity_report_matches_seqeval_on_hand_cases():
    for gold, pred in HAND_CASES:
        assert_same_report([gold], [pred])
        assert_same_report([pred], [gold])
    # Chunks do not run across sentence boundaries.
    assert_same_report([["O", "B-PER"], ["I-PER", "O"]], [["O", "B-PER"], ["B-PER", "O"]])
    assert_same_report([gold for gold, _ in HAND_CASES], [pred for _, pred in HAND_CASES])
    assert_same_report([["O", "O"]], [["O", "B-PER"]])
    assert_same_report([["O", "O"]], [["O", "O"]])
    report = entity_report([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-PER"]])
    assert report["PER"] == {"precision": 0.5, "recall": 1.0, "f1-score": pytest.approx(2 / 3), "support": 1}
    assert report["LOC"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 1}
    assert report["micro avg"] == {"precision": 0.5, "recall": 0.5, "f1-score": 0.5, "support": 2}


@pytest.mark.parametrize(
    "tagset", [["O", "B-a", "I-a", "B-b", "I-b"], ["O", "B-a", "I-a", "E-a", "S-a", "I-b", "S-b"]]
)
def test_entity_report_matches_seqeval_on_random_sequences(tagset):
    rng = random.Random(1234)
    for _ in range(300):
        lengths = [rng.randint(0, 12) for _ in range(rng.randint(1, 4))]
        y_true = [rng.choices(tagset, k=n) for n in lengths]
        y_pred = [rng.choices(tagset, k=n) for n in lengths]
        for tags in y_true:
            assert get_entities(tags) == seqeval_get_entities(tags)
        assert_same_report(y_true, y_pred)


def corrupt(sentences: list[list[str]], every: int, seed: int = 0) -> list[list[str]]:
    """A copy with every `every`-th tag (counting across sentences) replaced by a different tag."""
    tagset = sorted({tag for tags in sentences for tag in tags})
    rng = random.Random(seed)
    out, n = [], 0
    for tags in sentences:
        copy = list(tags)
        for i, tag in enumerate(tags):
            n += 1
            if n % every == 0:
                copy[i] = rng.choice([t for t in tagset if t != tag])
        out.append(copy)
    return out


def test_entity_report_matches_seqeval_on_wnut16_dev(wnut16):
    gold = [ex.tags for ex in wnut16["dev"]]
    pred = corrupt(gold, every=7)
    assert sum(g != p for gs, ps in zip(gold, pred) for g, p in zip(gs, ps)) == sum(map(len, gold)) // 7
    assert_same_report(gold, pred)
    report = entity_report(gold, pred)
    assert set(report) == WNUT_TYPES | {"micro avg", "macro avg", "weighted avg"}
    assert 0.1 < report["micro avg"]["f1-score"] < 0.9
    assert report["micro avg"]["support"] == sum(1 for tags in gold for tag in tags if tag.startswith("B-"))
    perfect = entity_report(gold, gold)
    assert all(row["f1-score"] == 1.0 for row in perfect.values())


def test_format_report_matches_seqeval_text(wnut16):
    gold = [ex.tags for ex in wnut16["dev"]]
    pred = corrupt(gold, every=5, seed=1)
    assert format_report(entity_report(gold, pred)) == seqeval_report(gold, pred)
    assert format_report(entity_report(gold, pred), digits=4) == seqeval_report(gold, pred, digits=4)
    assert "weighted avg" in format_report(entity_report([["O"]], [["O"]]))


def test_entity_report_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 gold items but 1 predictions"):
        entity_report([["O"], ["O"]], [["O"]])
    with pytest.raises(ValueError, match="sentence 1: 2 gold tags but 1 predicted"):
        entity_report([["O"], ["O", "O"]], [["O"], ["O"]])


def test_classification_scores_by_hand():
    y_true = ["a", "a", "b", "b", "c"]
    y_pred = ["a", "b", "b", "b", "d"]
    # a: p 1, r 1/2, f 2/3; b: p 2/3, r 1, f 4/5; c and d: f 0.
    scores = classification_scores(y_true, y_pred)
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 4)
    assert classification_scores(["x", "y"], ["x", "y"]) == {"accuracy": 1.0, "macro_f1": 1.0}
    with pytest.raises(ValueError):
        classification_scores(["x"], [])
    with pytest.raises(ValueError):
        classification_scores([], [])


def test_classification_scores_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(5)
    for _ in range(50):
        n = rng.randint(1, 40)
        y_true = rng.choices("abcde", k=n)
        y_pred = rng.choices("abcdef", k=n)
        scores = classification_scores(y_true, y_pred)
        assert scores["accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred), abs=1e-12)
        expected = metrics.f1_score(y_true, y_pred, average="macro", zero_division=0)
        assert scores["macro_f1"] == pytest.approx(expected, abs=1e-12)


def test_relation_scores_by_hand():
    y_true = ["no_relation", "founded", "born_in", "born_in", "no_relation", "founded"]
    y_pred = ["born_in", "founded", "no_relation", "born_in", "no_relation", "born_in"]
    # guessed 4 (items 0, 1, 3, 5), correct 2 (1, 3), gold positives 4 (1, 2, 3, 5); 3 of 6 equal.
    scores = relation_scores(y_true, y_pred)
    assert scores == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "accuracy": 0.5}
    scores = relation_scores(["none", "r", "r"], ["r", "r", "none"], negative="none")
    assert (
        scores["precision"] == 0.5 and scores["recall"] == 0.5 and scores["accuracy"] == pytest.approx(1 / 3)
    )
    # Nothing guessed: precision (undefined) and F1 are 0; all negative and right: accuracy 1.
    assert relation_scores(["no_relation", "r"], ["no_relation", "no_relation"]) == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "accuracy": 0.5,
    }
    assert relation_scores(["no_relation"], ["no_relation"])["accuracy"] == 1.0


def _hf_ner(examples: list[NerExample]):
    """A `datasets` split in conll2003's and wnut_17's layout: tokens, integer ner_tags, ClassLabel."""
    import datasets

    names = label_vocab(t for ex in examples for t in ex.tags)
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names)),
        }
    )
    rows = {
        "id": [str(i) for i in range(len(examples))],
        "tokens": [ex.tokens for ex in examples],
        "ner_tags": [[names.index(t) for t in ex.tags] for ex in examples],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def test_read_ner_and_classification_saved_by_hugging_face_datasets(tmp_path, wnut16):
    """A split saved with save_to_disk reads as the same sentences, ClassLabel ids mapped to their
    names; a DatasetDict's root folder is refused naming its splits."""
    import datasets

    dd = datasets.DatasetDict({"train": _hf_ner(wnut16["train"][:300]), "validation": _hf_ner(wnut16["dev"])})
    dd.save_to_disk(str(tmp_path / "wnut"))
    assert read_ner(tmp_path / "wnut" / "train") == wnut16["train"][:300]
    assert read_ner(tmp_path / "wnut" / "validation") == wnut16["dev"]
    with pytest.raises(
        FinetuneDataError, match=r"wnut: a DatasetDict with the splits \['train', 'validation'\]"
    ):
        read_ner(tmp_path / "wnut")

    labels = datasets.ClassLabel(names=["negative", "positive"])
    cls = datasets.Dataset.from_dict(
        {"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]},
        features=datasets.Features({"sentence": datasets.Value("string"), "label": labels}),
    )
    cls.save_to_disk(str(tmp_path / "sst"))
    got = read_classification(tmp_path / "sst", text_field="sentence")
    assert [(e.text, e.label) for e in got] == [
        ("good", "positive"),
        ("bad", "negative"),
        ("fine", "positive"),
    ]
    with pytest.raises(FinetuneDataError, match=r"sst: no column 'text'"):
        read_classification(tmp_path / "sst")


def test_ner_trains_every_piece_and_predicts_entities_as_they_chunk_over_pieces(example_data):
    """encode: a word's first piece carries its tag, the others its inside form. ner_decode: entities are
    the chunks of the per-piece tags with their character spans (a chunk of only a bare "▁" names no
    character and is none), and each word's tag is those entities seen word by word."""
    from data_prep.tokenizer import load_tokenizer
    from sparsexpert.finetune.config import TaskConfig
    from sparsexpert.finetune.data import encode, ner_decode

    tok = load_tokenizer(example_data / "tokenizer.model")
    labels = ["O", "B-per", "I-per", "B-loc", "I-loc"]
    words = ["Mariposa", "Okonkwo", "visited", "Zanzibar", "."]
    ex = NerExample(words, ["B-per", "I-per", "O", "B-loc", "O"])
    enc = encode(TaskConfig(name="ner"), [ex], labels, tok, 1, 64, "x")
    pieces = [list(tok.encode([w])[0]) for w in words]
    assert all(len(p) > 1 for p in pieces[:4])  # every name is cut into pieces by a 512-piece vocabulary
    want = [-100]
    for p, tag in zip(pieces, ex.tags):
        inside = {"B-per": 2, "I-per": 2, "B-loc": 4, "O": 0}[tag]
        want += [labels.index(tag)] + [inside] * (len(p) - 1)
    assert enc.labels[0].tolist() == want
    first = enc.first_piece[0]
    text = " ".join(words)
    starts = [text.index(w) for w in words]
    bounds = enc.char_bounds[0]
    for w, a, b in zip(words, first, enc.piece_end[0]):  # a word's pieces tile it, <unk> pieces too
        assert bounds[a, 0] == starts[words.index(w)] and bounds[b - 1, 1] == bounds[a, 0] + len(w)
        assert (bounds[a + 1 : b, 0] == bounds[a : b - 1, 1]).all()

    def decode(tags: list[str]):
        return ner_decode(enc, 0, [0] + [labels.index(t) for t in tags], labels)

    n = [len(p) for p in pieces]
    # a well-behaved prediction: the gold pieces' labels give the gold words and spans
    got = decode([labels[i] for i in want[1:]])
    assert got.tags == ex.tags and got.inside_word == 0
    assert [(e["type"], e["text"]) for e in got.entities] == [
        ("per", "Mariposa Okonkwo"),
        ("loc", "Zanzibar"),
    ]
    # an entity that starts inside a word keeps its span; the word tag covers the word
    tags = ["O"] * sum(n)
    tags[1 : n[0]] = ["B-loc"] + ["I-loc"] * (n[0] - 2)  # all of Mariposa but its first piece
    got = decode(tags)
    assert got.tags == ["B-loc", "O", "O", "O", "O"] and got.inside_word == 1
    e = got.entities[0]
    assert (e["start"], e["end"]) == (int(enc.char_bounds[0][2, 0]), len("Mariposa"))
    assert e["text"] == text[e["start"] : e["end"]] and e["start"] > starts[0]
    # two entities in one word: both kept, the word takes the first one's tag
    tags = ["O"] * sum(n)
    tags[0], tags[1] = "B-per", "B-loc"
    got = decode(tags)
    assert got.tags[0] == "B-per" and [x["type"] for x in got.entities] == ["per", "loc"]
    # Okonkwo's first piece is a bare "▁": alone it names no character and is no entity
    assert tok.sp.id_to_piece(int(enc.ids[0][first[1]])) == "▁"
    tags = ["O"] * sum(n)
    tags[first[1] - 1] = "B-per"
    got = decode(tags)
    assert got.entities == [] and got.empty == 1 and got.tags == ["O"] * 5
    tags[first[1]] = "I-per"  # with the piece after it, it starts the word
    got = decode(tags)
    assert [(x["start"], x["end"]) for x in got.entities] == [(starts[1], starts[1] + 1)]
    assert got.tags == ["O", "B-per", "O", "O", "O"]
