"""A fine-tuned NER model leaves sparsexpert as a transformers token-classification model: the exported
folder loads with AutoModelForTokenClassification (no trust_remote_code), computes our head's logits on
every WNUT-16 dev sentence, and transformers' own NER pipeline with aggregation_strategy="simple", given the
raw sentences, finds exactly the entities (type and character span) of our predictions file.

That holds by construction, not by luck of a trained model: sparsexpert predicts an entity as "simple"
does, from the tag of every piece chunked over the pieces (fine-tuning trains every piece, as Hugging
Face's label_all_tokens does), and writes those entities with their character spans. Word-level
aggregations ("first", "average", "max") are not compared: the pipeline finds words by a heuristic (a
token right after a space starts a word) that splits a word whose first piece is the bare SentencePiece
mark "▁" in two."""

from __future__ import annotations

import json

import torch
import transformers
from conftest import REPO, TINY_MODEL, finetune_briefly, pretrain

from data_prep.tokenizer import load_tokenizer, text_start_id
from sparsexpert.finetune.config import TaskConfig
from sparsexpert.finetune.data import encode
from sparsexpert.finetune.model import TaskModel, TaskSpec
from sparsexpert.finetune.readers import read_ner
from sparsexpert.weights.export import export_hf, load_init, save_task_hf


def _pipeline_entities(folder, texts: list[str]) -> list[list[tuple[str, int, int]]]:
    """Per text, (type, start, end) of each entity transformers' pipeline finds; a span that starts at
    the space before a word (the offsets of a "▁" piece) starts at the word, and an entity of no word
    (only a "▁" piece) is none."""
    ner = transformers.pipeline("ner", model=str(folder), aggregation_strategy="simple")
    out = []
    for text, found in zip(texts, ner(texts)):
        spans = []
        for e in found:
            if not e["word"]:  # a bare "▁" piece: no character named (sparsexpert leaves these out)
                continue
            start = e["start"]
            while start < e["end"] and text[start] == " ":
                start += 1
            spans.append((e["entity_group"], start, e["end"]))
        out.append(spans)
    return out


def test_ner_exports_as_a_token_classification_model_the_pipeline_agrees_with(
    tmp_path, example_data, shared_data
):
    dev_file = shared_data / "ner" / "wnut16" / "dev.conll"
    dev = read_ner(dev_file)
    # the tiny model with 128 positions: the longest WNUT-16 dev sentence is 118 pieces of the example
    # world's 512-piece vocabulary, so every sentence is predicted whole and compared
    pre = tmp_path / "pre"
    pretrain(
        pre,
        1,
        REPO / "ds_configs" / "moe_z2.json",
        *TINY_MODEL,
        "--model.max_seq_len=128",
        f"--data.path={example_data}",
        "--train.max_steps=2",
        "--train.eval_every=0",
    )
    ft = tmp_path / "ft"
    finetune_briefly(ft, pre, "ner", dev_file, dev_file)
    said: list[str] = []
    export_hf(ft / "best", tmp_path / "hf", log=said.append)
    assert any("task 'ner' as MixtralForTokenClassification" in s for s in said), said
    folder = tmp_path / "hf" / "ner"
    model = transformers.AutoModelForTokenClassification.from_pretrained(folder)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    assert type(model).__name__ == "MixtralForTokenClassification"
    assert labels[0] == "O" and {"B-person", "I-person"} <= set(labels)  # our task labels, by id

    init = load_init(ft / "best")
    tok = load_tokenizer(init.tokenizer)
    enc = encode(
        TaskConfig(name="ner"), dev, labels, tok, text_start_id(tok), init.cfg.max_seq_len, str(dev_file)
    )
    # our entities file against the pipeline's entities, on every sentence that fits max_seq_len
    rows = [json.loads(x) for x in (ft / "predictions" / "ner_dev.entities.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [" ".join(ex.tokens) for ex in dev]
    ours = [[(e["type"], e["start"], e["end"]) for e in r["entities"]] for r in rows]
    for r in rows:  # each span is the text it names
        assert all(r["text"][e["start"] : e["end"]] == e["text"] for e in r["entities"])
    fits = [i for i, first in enumerate(enc.first_piece) if (first >= 0).all()]
    assert len(fits) == len(dev) == 250  # no sentence cut by max_seq_len (the pipeline does not cut)
    theirs = _pipeline_entities(folder, [rows[i]["text"] for i in fits])
    differ = [
        (rows[i]["text"], set(ours[i]) - set(t), set(t) - set(ours[i]))
        for i, t in zip(fits, theirs)
        if ours[i] != t
    ]
    assert not differ, (len(differ), differ[:3])
    n = sum(len(ours[i]) for i in fits)
    assert n > 1000, n  # a head near its random start: many entities

    # every token's logits, transformers' against our model's, on every sentence
    model = model.eval()
    ours_model = TaskModel(init.cfg, [TaskSpec("ner", "ner", labels)])
    ours_model.load_state_dict(init.state)
    ours_model.eval()
    for ids in enc.ids:
        x = torch.from_numpy(ids)[None]
        with torch.no_grad():
            want = ours_model(x, task=0, lengths=torch.tensor([x.shape[1]])).logits
            torch.testing.assert_close(model(x).logits, want, atol=1e-4, rtol=1e-4)


def test_heads_transformers_cannot_compute_are_refused_with_the_reason(tmp_path, tiny_pretrained):
    init = load_init(tiny_pretrained)
    for kind, says in (("classification", "reads the last token"), ("relation", "[E1] and [E2] markers")):
        task = {"name": kind, "kind": kind, "labels": ["a", "b"]}
        try:
            save_task_hf(init.cfg, init.state, init.tokenizer, task, {}, tmp_path / kind)
        except Exception as e:
            assert says in str(e), e
        else:
            raise AssertionError(f"{kind} was exported")
    task = {"name": "ner", "kind": "ner", "labels": ["O", "B-x", "I-x"]}
    for run, says in (
        ({"bidirectional": True}, "attend causally"),
        ({"task_aware_routing": True}, "task embedding"),
    ):
        try:
            save_task_hf(init.cfg, init.state, init.tokenizer, task, run, tmp_path / "x")
        except Exception as e:
            assert says in str(e), e
        else:
            raise AssertionError(f"{run} was exported")
