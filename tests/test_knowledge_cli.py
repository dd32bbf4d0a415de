"""The evaluation and ablation commands end to end: real launches, real data."""

import json
import sys

from conftest import TINY_MODEL, run_cmd

FAST = [*TINY_MODEL, "--train.max_steps=8", "--train.save_every=0", "--train.eval_every=0"]


def _ablate(tmp_path, *args):
    cmd = [
        sys.executable,
        "launcher/ablate.py",
        "--output_dir",
        str(tmp_path),
        "--seq_len",
        "32",
        *args,
        *FAST,
    ]
    return run_cmd(cmd, tmp_path, timeout=600)


def _table(text: str) -> dict[str, list[str]]:
    lines = text.strip().splitlines()
    return {line.split(" | ")[0].strip(): [c.strip() for c in line.split(" | ")[1:]] for line in lines[2:]}


def test_ablation_on_the_knowledge_world(tmp_path):
    run = _ablate(tmp_path, "--corpus", "world", "--arms", "none", "fusion", "--max_facts", "4")
    text = (tmp_path / "ablation.txt").read_text()
    assert text in run.output
    header = text.splitlines()[0].split("|")
    assert [h.strip() for h in header[1:]] == ["none", "fusion"]
    rows = _table(text)
    # equal compute: same steps, tokens and backbone; the KG arm adds only its knowledge parameters
    for key in ("steps", "tokens trained", "backbone params total / active (M)"):
        assert rows[key][0] == rows[key][1], key
    assert rows["knowledge params (M)"][0] == "0.000" and float(rows["knowledge params (M)"][1]) > 0
    assert "probe heldout (text) acc@1 / MRR" in rows and "probe stated (text) acc@1 / MRR" in rows
    assert rows["probe heldout (embeddings) acc@1 / MRR"][0] == "-"  # only the fusion arm has embeddings
    assert rows["probe heldout (random) acc@1 / MRR"][0].startswith("0.004 / 0.02")  # 1 in 282 candidates
    for arm in ("none", "fusion"):
        res = json.loads((tmp_path / arm / "eval.json").read_text())
        assert res["step"] == 8 and 1 < res["perplexity"] < 2000
        probe = res["knowledge_probe"]
        assert probe["candidates"] == 282 and probe["heldout"]["text"]["n"] == 4
        assert 0 < probe["heldout"]["text"]["mrr"] <= 1
    fused = json.loads((tmp_path / "fusion" / "eval.json").read_text())
    assert fused["knowledge_probe"]["stated"]["embeddings"]["n"] == 4


def test_ablation_link_prediction_on_news_and_nations(tmp_path, shared_data):
    _ablate(tmp_path, "--corpus", "news-nations", "--arms", "fusion+triple_source=kg")
    text = (tmp_path / "ablation.txt").read_text()
    rows = _table(text)
    assert "link pred (text) MRR / H@1 / H@3 / H@10" in rows
    # uniformly random scores, filtered, over Nations' 14 countries (computed by hand from the splits)
    assert rows["link pred (random) MRR / H@1 / H@3 / H@10"][0] == "0.384 / 0.167 / 0.465 / 0.947"
    assert "link pred (embeddings) MRR / H@1 / H@3 / H@10" in rows
    for arm in ("fusion_triple_source-kg",):
        lp = json.loads((tmp_path / arm / "eval.json").read_text())["link_prediction"]
        assert lp["test_triples"] == 201 and lp["entities"] == 14
        # every test triple ranked twice (head and tail); Nations entities all have aliases
        assert lp["text"]["n"] == 2 * (201 - lp["skipped_not_in_vocabulary"]) > 300
        m = lp["text"]
        assert 1 / 14 <= m["mrr"] <= 1 and m["hits@1"] <= m["hits@3"] <= m["hits@10"] <= 1
    lp = json.loads((tmp_path / "fusion_triple_source-kg" / "eval.json").read_text())["link_prediction"]
    assert lp["embeddings"]["n"] == lp["text"]["n"]
