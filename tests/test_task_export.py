"""A fine-tuned NER model leaves sparsexpert as a transformers token-classification model: the exported
folder loads with AutoModelForTokenClassification (no trust_remote_code), computes our head's logits on
every WNUT-16 dev sentence, and transformers' own NER pipeline, given the raw sentences, labels each word's
first piece as our predictions file labels the word.

Why token level and not the pipeline's word aggregation: sparsexpert trains and predicts a word by its
first piece (BERT's convention), which aggregation_strategy="first" reproduces only where the pipeline
finds the same words; it finds them by a heuristic (a token right after a space starts a word) that splits
a word whose first piece is the bare SentencePiece word-start mark "▁" in two. With the example world's
512-piece vocabulary that is nearly every WNUT sentence. "simple" labels every piece by its own argmax,
which the head was never trained for."""

from __future__ import annotations

import torch
import transformers
from conftest import finetune_briefly

from data_prep.tokenizer import load_tokenizer, text_start_id
from sparsexpert.finetune.config import TaskConfig
from sparsexpert.finetune.data import encode
from sparsexpert.finetune.model import TaskModel, TaskSpec
from sparsexpert.finetune.readers import read_ner
from sparsexpert.weights.export import export_hf, load_init, save_task_hf


def _pipeline_first_pieces(folder, sentences: list[list[str]]) -> list[dict[int, tuple[str, str]]]:
    """Per sentence, {token index: (piece, label)} from transformers' pipeline on the raw text."""
    ner = transformers.pipeline(
        "token-classification", model=str(folder), aggregation_strategy="none", ignore_labels=[]
    )
    return [
        {t["index"]: (t["word"], t["entity"]) for t in out} for out in ner([" ".join(x) for x in sentences])
    ]


def test_ner_exports_as_a_token_classification_model_the_pipeline_agrees_with(
    tmp_path, tiny_pretrained, shared_data
):
    dev_file = shared_data / "ner" / "wnut16" / "dev.conll"
    dev = read_ner(dev_file)
    ft = tmp_path / "ft"
    finetune_briefly(ft, tiny_pretrained, "ner", dev_file, dev_file)
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
    # our predictions file, word by word, against the pipeline's label of each word's first piece
    rows = [x.splitlines() for x in (ft / "predictions" / "ner_dev.conll").read_text().strip().split("\n\n")]
    ours = [[r.split("\t")[2] for r in x] for x in rows]
    assert sum(t != "O" for tags in ours for t in tags) > 100  # a head near its random start: many entities
    theirs = _pipeline_first_pieces(folder, [ex.tokens for ex in dev])
    compared = skipped = 0
    for ids, first, tags, pipe in zip(enc.ids, enc.first_piece, ours, theirs):
        if (first < 0).any():
            # longer than the model's max_seq_len (64 here): fine-tuning leaves out the words that do
            # not fit, the pipeline does not cut
            skipped += 1
            continue
        for f, tag in zip(first, tags):
            if f < 0:
                continue  # a word cut by max_len: not scored
            assert pipe[f] == (tok.sp.id_to_piece(int(ids[f])), tag)  # the same piece, the same label
            compared += 1
    assert compared > 1000, (skipped, compared)  # measured: 1,275 words of 103 sentences; 147 cut

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
