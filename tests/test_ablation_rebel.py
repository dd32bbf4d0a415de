"""The real-data knowledge ablation's parts: facts held out of REBEL's linked text (checked against an
independent reading of the input and the output, and against data_prep's own valid split), and the
fact probe (checked against the same ranking computed plainly, one forward per candidate)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import deepspeed_cmd, run_cmd

from data_prep.join import _sentences
from data_prep.kg import iter_triples, linked_triple
from data_prep.pipeline import PrepConfig, prepare
from experiments.linked_split import GROUPS, assignment, split_linked_text
from sparsexpert.evaluate import relation_templates


def _facts(path: Path) -> list[tuple[str, str, str]]:
    return [tuple(line.split("\t")[:3]) for line in path.read_text(encoding="utf-8").splitlines()]  # type: ignore[misc]


def test_held_out_facts_leave_the_kg_and_kg_only_facts_leave_the_text(shared_data, tmp_path):
    src = shared_data / "rebel" / "rebel_sample.jsonl"
    out = tmp_path / "split"
    counts = split_linked_text(src, out, heldout_share=0.2, kg_only_share=0.2, valid_fraction=0.1)
    original = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    written = [json.loads(line) for line in (out / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(written) == len(original)
    groups = {g: _facts(out / f"{g}.tsv") for g in GROUPS}
    known = _facts(out / "known.tsv")
    every = {f for rec in original for tr in rec["triples"] if (f := linked_triple(tr)) is not None}
    assert set(known) == every and len(known) == counts["facts"] == 2126
    assert sum(map(len, groups.values())) + counts["facts_in_neither"] == len(known)
    # the draw: about the shares asked, by a hash of the fact (the same whatever the order)
    drawn = [assignment(f, 0, 0.2, 0.2) for f in known]
    assert abs(drawn.count("heldout") / len(known) - 0.2) < 0.03
    assert abs(drawn.count("kg_only") / len(known) - 0.2) < 0.03

    # the KG data_prep reads from the output: every fact but the held-out ones
    kg = set(iter_triples(out / "corpus.jsonl"))
    assert kg == {f for f, a in zip(known, drawn) if a != "heldout"}
    assert not kg & set(groups["heldout"]) and set(groups["stated"] + groups["kg_only"]) <= kg

    # links moved with their sentences
    for rec in written:
        for e in rec["entities"]:
            a, b = e["boundaries"]
            assert rec["text"][a:b] == e["surfaceform"]

    # data_prep's valid split is the one the groups were counted over
    data = tmp_path / "data"
    corpus = str(out / "corpus.jsonl")
    prepare(
        PrepConfig(corpus=[corpus], kg=corpus, output=str(data), vocab_size=2000, valid_fraction=0.1),
        log=lambda *a: None,
    )
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["splits"]["valid"]["documents"] == counts["valid_documents"] == 70
    assert manifest["splits"]["train"]["documents"] == counts["train_documents"]

    # read independently: which sentences of which training documents are left
    from data_prep.pipeline import in_valid_split

    train_text = " ".join(
        rec["text"] for rec in written if in_valid_split(rec["text"], bool(rec["entities"]), 0.1) is False
    )
    kg_only = set(groups["kg_only"])
    stated = set(groups["stated"])
    unstated = {(h, t) for h, _, t in kg_only}  # to training
    removed = {(h, t) for (h, _, t), a in zip(known, drawn) if a == "kg_only"}  # from every document
    for rec, old in zip(written, original):
        # no kept sentence names both ends of a fact the text must not state
        train = in_valid_split(rec["text"], bool(rec["entities"]), 0.1) is False
        for s, e in _sentences(rec["text"]):
            uris = {x["uri"] for x in rec["entities"] if s <= x["boundaries"][0] < e}
            pairs = {(a, b) for a in uris for b in uris if a != b}
            assert not pairs & removed and not (train and pairs & unstated)
        sents = [old["text"][s:e] for s, e in _sentences(old["text"])]
        for tr in old["triples"]:
            f = linked_triple(tr)
            b = tr["object"]["boundaries"]
            if f is None or not b or old["text"][b[0] : b[1]] != tr["object"]["surfaceform"]:
                continue
            sentence = next(x for (s, e), x in zip(_sentences(old["text"]), sents) if s <= b[0] < e)
            if f in kg_only:  # the sentence that states it is gone from every training document
                assert sentence not in train_text, (f, sentence)
            if assignment(f, 0, 0.2, 0.2) == "kg_only":  # and from its own document
                assert sentence not in rec["text"]
    # a stated fact's own sentence (exactly aligned object) survives in some training document
    found = 0
    for old in original:
        for tr in old["triples"]:
            f, b = linked_triple(tr), tr["object"]["boundaries"]
            if f in stated and b and old["text"][b[0] : b[1]] == tr["object"]["surfaceform"]:
                sentence = next(old["text"][s:e] for s, e in _sentences(old["text"]) if s <= b[0] < e)
                found += sentence in train_text
    assert found >= 0.8 * len(stated)
    assert min(counts[f"facts_{g}"] for g in GROUPS) > 200


def test_relation_templates_from_surface_forms():
    assert relation_templates("date of birth") == [
        "{h} date of birth {t}.",
        "The date of birth of {h} is {t}.",
    ]
    assert relation_templates("part of") == ["{h} part of {t}.", "{h} is part of {t}."]
    assert relation_templates("born_in") == ["{h} born in {t}.", "{h} is born in {t}."]


def test_fact_probe_equals_the_ranking_computed_plainly(tiny_pretrained, example_data, tmp_path):
    """Five held-out facts of the built-in world, every tail of their relation a candidate; one head
    written 100 times over, so that its sentences outgrow the model's 64 positions and lose their start."""
    raw = example_data.parent / f"{example_data.name}_raw"
    names = dict(
        line.split("\t", 1) for line in (raw / "aliases.tsv").read_text(encoding="utf-8").splitlines()
    )
    heldout = _facts(raw / "heldout.tsv")[:5]
    lines = []
    for k, (h, r, t) in enumerate(heldout):
        head = " ".join([names[h]] * (100 if k == 0 else 1))
        lines.append("\t".join((h, r, t, head, names[t])))
    (tmp_path / "facts.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    known = ["\t".join((h, r, t, names[h], names[t])) for h, r, t in _facts(raw / "kg.tsv")]
    (tmp_path / "known.tsv").write_text("\n".join(known) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    shutil.copytree(tiny_pretrained, run)
    out = tmp_path / "probe.json"
    script = "tests/scripts/fact_probe_reference.py"
    run_cmd(
        deepspeed_cmd(
            1, script, str(run), str(tmp_path / "facts.tsv"), str(tmp_path / "known.tsv"), str(out)
        ),
        tmp_path,
    )
    res = json.loads(out.read_text())
    got, want = res["got"]["facts"], res["want"]
    assert want["longest"] > res["max_len"] and want["n"] == got["text"]["n"] >= 4
    assert got["text"]["mrr"] == pytest.approx(want["mrr"], abs=1e-9)
    assert got["text"]["accuracy@1"] == pytest.approx(want["accuracy@1"], abs=1e-9)
    assert got["random"]["mrr"] == pytest.approx(want["random_mrr"], abs=1e-12)
    assert got["one_candidate"] == 5 - want["n"]
