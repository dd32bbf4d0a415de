"""The fact probe of a run, and the same ranking computed plainly (run by tests/test_ablation_rebel.py).

sparsexpert.evaluate.fact_probe batches every candidate of every template, averages over templates
by reshaping, cuts sequences longer than the model's max_seq_len and ranks the answer it put first.
Here each candidate sentence is one forward of its own, the candidate pools are built from the
files by hand and the ranks counted by hand; both results are written as JSON:

    python tests/scripts/fact_probe_reference.py RUN FACTS.tsv KNOWN.tsv OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from data_prep.tokenizer import load_tokenizer  # noqa: E402
from sparsexpert.data.shards import read_manifest  # noqa: E402
from sparsexpert.distributed import comm  # noqa: E402
from sparsexpert.distributed.device import to_device  # noqa: E402
from sparsexpert.evaluate import Scorer, fact_probe, open_checkpoint, relation_templates  # noqa: E402


def rows(path: str) -> list[list[str]]:
    return [line.split("\t") for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def main(run: str, facts_file: str, known_file: str, out: str) -> None:
    pt = open_checkpoint(run)
    eos = int(read_manifest(pt.data_dir)["tokenizer"]["eos_id"])
    max_len = pt.cfg.model.max_seq_len
    got = fact_probe(pt, Scorer(pt.engine, eos, max_len=max_len), [facts_file], [known_file], max_facts=0)

    tok = load_tokenizer(pt.tokenizer_file)

    def enc(s: str) -> list[int]:
        return [int(i) for i in tok.encode([s])[0]] if s.strip() else []

    facts, known = rows(facts_file), rows(known_file)
    surface = {}
    for r in facts + known:
        if len(r) >= 5:
            surface.setdefault(r[0], r[3])
            surface.setdefault(r[2], r[4])
    all_known = {tuple(r[:3]) for r in facts + known}

    @torch.no_grad()
    def logp(seq: list[int], start: int) -> float:
        cut = max(len(seq) - max_len, 0)
        seq, start = seq[cut:], max(start - cut, 1)
        x = to_device(torch.tensor([seq]), next(pt.engine.parameters()).device)
        lp = F.log_softmax(pt.engine(x).logits.float()[0, :-1], dim=-1)
        return float(sum(lp[t - 1, seq[t]] for t in range(start, len(seq))))

    ranks, pools = [], []
    for h, r, t, *_ in facts:
        pool = sorted(
            {b for a, q, b in all_known if q == r} - {b for a, q, b in all_known if (a, q) == (h, r)} | {t}
        )
        if len(pool) < 2:
            continue
        pools.append(len(pool))
        score = {}
        for c in pool:
            total = 0.0
            for tp in relation_templates(r):
                before, rest = tp.split("{h}")
                prompt = enc(before.strip()) + enc(surface.get(h, h)) + enc(rest[: rest.index("{t}")].strip())
                total += logp(prompt + enc(surface.get(c, c) + "."), len(prompt))
            score[c] = total / len(relation_templates(r))
        s = np.array(list(score.values()))
        ranks.append(1 + float((s > score[t]).sum()) + 0.5 * float((s == score[t]).sum() - 1))
    want = {
        "n": len(ranks),
        "mrr": float(np.mean(1 / np.array(ranks))),
        "accuracy@1": float(np.mean(np.array(ranks) <= 1)),
        "random_mrr": float(np.mean([sum(1 / k for k in range(1, n + 1)) / n for n in pools])),
        "longest": max(len(enc(surface.get(f[0], f[0]))) for f in facts),
    }
    if comm.rank() == 0:
        Path(out).write_text(json.dumps({"got": got, "want": want, "max_len": max_len}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
    comm.finish()
