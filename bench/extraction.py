"""Knowledge extraction with our own models, measured: the built-in world with facts held out of its KG,
and real text, the REBEL sample (Wikipedia abstracts, Wikidata links, aligned triples).

    python bench/extraction.py                         # both (../shared/data/rebel/rebel_sample.jsonl)
    python bench/extraction.py --no-world              # REBEL only
    python bench/extraction.py --pretrain-steps 600 --finetune-steps 800 --keep /tmp/rebel

The world: a tiny MoE pretrained on it, 30% of the facts its text states removed from the KG, `data_prep
bootstrap`; precision and recall of the new triples per threshold and per relation (the world is closed:
a triple outside its KG is false).

REBEL: the documents are split by a hash of their id: a quarter for testing, the rest for training. On the
training documents (their text, their gold entity links, the KG of their aligned triples): a small MoE
is pretrained, distant supervision (`data_prep relations`) builds relation examples, and the relation
extractor is fine-tuned from the pretrained model. On the test documents, with their gold links as the
mentions, it prints the precision and recall of the extracted triples against the test documents'
aligned triples (both ends linked), per relation and over a range of thresholds, next to the
distant-supervision baseline (the training KG's triples whose two entities meet in a test sentence:
it can only re-find facts the KG already holds), and the extractor's throughput in sentence pairs and
sentences per second and its share of a data_prep run's time. Every figure is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = ["--model.d_model=128", "--model.n_layers=2", "--model.n_heads=4", "--model.d_ff=256"]


def run(cmd: list[str], log: Path) -> float:
    t = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    if proc.returncode != 0:
        sys.exit(f"failed ({log}):\n" + log.read_text()[-3000:])
    return time.time() - t


def linked(term: dict) -> str | None:
    uri = term.get("uri")
    return None if uri in (None, "", "None") else str(uri)


def gold_triples(records: list[dict]) -> set[tuple[str, str, str]]:
    out = set()
    for r in records:
        for t in r["triples"]:
            h, o = linked(t["subject"]), linked(t["object"])
            if h and o:
                out.add((h, t["predicate"].get("surfaceform") or t["predicate"]["uri"], o))
    return out


def prf(found: set, gold: set) -> tuple[float, float, float]:
    tp = len(found & gold)
    p = tp / len(found) if found else 0.0
    r = tp / len(gold) if gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def curve(best: dict, gold: set, skip: set) -> None:
    """Precision and recall over thresholds of the triples found (not in `skip`) against `gold`."""
    print("  threshold | extracted | precision | recall | F1")
    for th in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
        found = {k for k, p in best.items() if p >= th and k not in skip}
        p, r, f = prf(found, gold)
        print(f"  {th:9.2f} | {len(found):9d} | {p:9.3f} | {r:6.3f} | {f:.3f}")


def world(root: Path, pretrain_steps: int, finetune_steps: int) -> None:
    """The built-in world with 30% of the facts its text states removed from the KG: `data_prep
    bootstrap` (threshold 0.3, so the curve starts there), scored against the removed facts (recall)
    and the whole KG (precision: the world is closed, a triple outside its KG is false)."""
    import random

    py = sys.executable
    pre = root / "world_pre"
    tiny = ["--model.d_model=64", "--model.n_layers=2", "--model.n_heads=4", "--model.d_ff=128"]
    t_pre = run(
        [py, "launcher/pretrain.py", "--ds_config", "ds_configs/moe_z2.json", "--output_dir", str(pre), *tiny]
        + [
            f"--train.max_steps={pretrain_steps}",
            "--train.eval_every=0",
            f"--train.save_every={pretrain_steps}",
        ]
        + ["--overwrite"],
        root / "world_pre.log",
    )
    raw = pre / "data_raw"
    facts = sorted(tuple(x.split("\t")) for x in (raw / "kg.tsv").read_text().splitlines())
    heldout = {tuple(x.split("\t")) for x in (raw / "heldout.tsv").read_text().splitlines()}
    stated = [f for f in facts if f not in heldout]
    random.Random(0).shuffle(stated)
    removed = set(stated[: int(0.3 * len(stated))])
    seed = root / "world_seed.tsv"
    seed.write_text("".join("\t".join(f) + "\n" for f in facts if f not in removed))
    shutil.rmtree(root / "world_boot", ignore_errors=True)
    inputs = ["--corpus", str(raw / "corpus.txt"), "--kg", str(seed), "--aliases", str(raw / "aliases.tsv")]
    t_boot = run(
        [py, "-m", "data_prep", "bootstrap", *inputs, "--case", "exact", "--init", str(pre)]
        + ["--output", str(root / "world_boot"), "--workers", "2", "--vocab_size", "1000"]
        + [f"--finetune_steps={finetune_steps}", "--threshold", "0.3"],
        root / "world_boot.log",
    )
    rows = [x.split("\t") for x in (root / "world_boot" / "dataset" / "triples.tsv").read_text().splitlines()]
    best = {tuple(r[1:4]): float(r[6]) for r in rows if r[5] == "extracted"}
    print(
        f"built-in world: {len(facts)} KG facts, {len(heldout)} stated nowhere, {len(removed)} of the stated "
        f"removed from the KG; pretraining {pretrain_steps} steps {t_pre:.0f} s, bootstrap ({finetune_steps} "
        f"fine-tuning steps, extraction on 2 workers) {t_boot:.0f} s"
    )
    every = set(facts)
    print("  new triples against the removed facts (recall) and the whole KG (precision):")
    print("  threshold | extracted | precision | recall of removed")
    for th in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
        found = {k for k, p in best.items() if p >= th}
        precision = len(found & every) / max(len(found), 1)
        print(f"  {th:9.2f} | {len(found):9d} | {precision:9.3f} | {len(found & removed) / len(removed):.3f}")
    print(
        f"  per relation at threshold 0.7:\n  {'relation':18s} {'removed':>8s} {'extracted':>9s} {'P':>6s} {'R':>6s}"
    )
    found = {k for k, p in best.items() if p >= 0.7}
    for rel in sorted({f[1] for f in facts}):
        g = {f for f in removed if f[1] == rel}
        fr = {k for k in found if k[1] == rel}
        p, r = len(fr & every) / max(len(fr), 1), len(fr & g) / max(len(g), 1)
        print(f"  {rel:18s} {len(g):8d} {len(fr):9d} {p:6.3f} {r:6.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "rebel" / "rebel_sample.jsonl"))
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--finetune-steps", type=int, default=600)
    ap.add_argument("--keep", default="", help="folder to keep the work in")
    ap.add_argument("--no-world", action="store_true", help="only the REBEL part")
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="extraction."))
    root.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    if not args.no_world:
        world(root, 200, 400)
        print()

    records = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    test_of = [zlib.crc32(str(r.get("docid", i)).encode()) % 4 == 0 for i, r in enumerate(records)]
    train = [r for r, t in zip(records, test_of) if not t]
    test = [r for r, t in zip(records, test_of) if t]
    for name, part in (("train", train), ("test", test)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    tr, te = str(root / "train.jsonl"), str(root / "test.jsonl")
    gold = gold_triples(test)
    kg_train = gold_triples(train)
    print(
        f"bench/extraction.py: {len(train)} training and {len(test)} test documents ({args.data}), in {root}"
    )
    print(
        f"  training KG: {len(kg_train)} triples; test documents: {len(gold)} aligned triples, "
        f"{len(gold & kg_train)} of them also in the training KG"
    )

    # pretraining on the training documents' text, then distant supervision and the extractor
    shutil.rmtree(root / "data", ignore_errors=True)
    t_prep = run(
        [
            py,
            "-m",
            "data_prep",
            "run",
            "--corpus",
            tr,
            "--kg",
            tr,
            "--case",
            "exact",
            "--output",
            str(root / "data"),
            "--vocab_size",
            "4000",
            "--seq_len",
            "128",
            "--workers",
            "2",
        ],
        root / "data.log",
    )
    t_pre = run(
        [
            py,
            "launcher/pretrain.py",
            "--ds_config",
            "ds_configs/moe_z2.json",
            "--output_dir",
            str(root / "pre"),
            "--data.path",
            str(root / "data"),
            *TINY,
            f"--train.max_steps={args.pretrain_steps}",
            "--train.eval_every=0",
            f"--train.save_every={args.pretrain_steps}",
            "--overwrite",
        ],
        root / "pre.log",
    )
    shutil.rmtree(root / "re", ignore_errors=True)
    run(
        [
            py,
            "-m",
            "data_prep",
            "relations",
            "--corpus",
            tr,
            "--kg",
            tr,
            "--case",
            "exact",
            "--output",
            str(root / "re"),
        ],
        root / "re.log",
    )
    stats = json.loads((root / "re" / "stats.json").read_text())
    t_ft = run(
        [
            py,
            "launcher/finetune.py",
            "--ds_config",
            "ds_configs/moe_z2.json",
            "--init",
            str(root / "pre"),
            "--task",
            "relation",
            "--train",
            str(root / "re" / "train.jsonl"),
            "--dev",
            str(root / "re" / "dev.jsonl"),
            "--output_dir",
            str(root / "ft"),
            f"--train.max_steps={args.finetune_steps}",
            f"--train.eval_every={max(1, args.finetune_steps // 6)}",
            "--overwrite",
        ],
        root / "ft.log",
    )
    res = json.loads((root / "ft" / "results.json").read_text())
    print(
        f"  data_prep {t_prep:.0f} s; pretraining {args.pretrain_steps} steps {t_pre:.0f} s; distant supervision "
        f"{stats['positives']} positives over {len(stats['positives_per_relation'])} relations, {stats['negatives_kept']} negatives; "
        f"fine-tuning {args.finetune_steps} steps {t_ft:.0f} s, dev micro F1 {res['best_dev_metric']:.3f}"
    )

    # extraction on the test documents, gold links as the mentions
    from data_prep.join import _sentences, distant_supervision, find_mentions
    from data_prep.kg import Mention
    from data_prep.kg_index import PairIndex
    from data_prep.model_extractor import ModelExtractor
    from data_prep.pipeline import PrepConfig, iter_docs, load_inputs

    x = ModelExtractor([str(root / "ft")], threshold=0.0)
    cfg = PrepConfig(corpus=[te], output=str(root / "probe"), kg=tr, case="exact")
    know = load_inputs(cfg, log=lambda *a: None)
    index = know.index
    assert index is not None
    pairs = PairIndex(index)
    best: dict[tuple[str, str, str], float] = {}
    counts: Counter[str] = Counter()
    baseline: set[tuple[str, str, str]] = set()
    n_sent = 0
    t = time.time()
    for doc in iter_docs(cfg, Counter(), Counter()):
        mentions, _ = find_mentions(doc, None, None)  # the gold links only
        n_sent += len(_sentences(doc.text))
        out = x.extract(doc.text, [Mention(*m) for m in mentions])
        counts.update(out.counts)
        for (_, _, tr_), p in zip(out.triples, out.scores):
            key = (tr_.head, tr_.relation, tr_.tail)
            best[key] = max(best.get(key, 0.0), p)
        for _, _, k in distant_supervision(doc.text, mentions, pairs):
            h = index.triple(k)
            baseline.add((h.head, h.relation, h.tail))
    t_x = time.time() - t
    scored = counts["pairs_scored"]
    print(
        f"  extractor: {scored} sentence pairs of {n_sent} sentences in {t_x:.1f} s on 1 process: "
        f"{scored / t_x:.0f} pairs/s, {n_sent / t_x:.0f} sentences/s"
    )

    print("\n  extracted triples against the test documents' aligned triples:")
    curve(best, gold, set())
    p, r, f = prf(baseline, gold)
    print(
        f"  distant supervision (training KG): {len(baseline)} found, precision {p:.3f}, recall {r:.3f}, F1 {f:.3f}"
    )
    new = {k for k, pp in best.items() if pp >= 0.5 and k not in kg_train}
    print(
        f"  extractor at 0.5, triples not in the training KG: {len(new)}, of them aligned in the test documents: {len(new & gold)}"
    )

    print("\n  per relation (threshold 0.5; relations with at least 5 aligned test triples):")
    print(f"  {'relation':50s} {'gold':>5s} {'P':>6s} {'R':>6s} {'DS R':>6s}")
    by_rel = Counter(k[1] for k in gold)
    found = {k for k, pp in best.items() if pp >= 0.5}
    for rel, n in by_rel.most_common():
        if n < 5:
            break
        g = {k for k in gold if k[1] == rel}
        fr = {k for k in found if k[1] == rel}
        p, r, _ = prf(fr, g)
        _, rb, _ = prf({k for k in baseline if k[1] == rel}, g)
        print(f"  {rel[:50]:50s} {n:5d} {p:6.3f} {r:6.3f} {rb:6.3f}")

    # the extractor's share of a data_prep run over the test documents (2 workers)
    xa = root / "x.json"
    xa.write_text(json.dumps({"threshold": 0.5}))
    common = [
        py,
        "-m",
        "data_prep",
        "run",
        "--corpus",
        te,
        "--kg",
        tr,
        "--case",
        "exact",
        "--tokenizer",
        str(root / "data" / "tokenizer.model"),
        "--workers",
        "2",
    ]
    shutil.rmtree(root / "plain", ignore_errors=True)
    shutil.rmtree(root / "with_x", ignore_errors=True)
    t_plain = run([*common, "--output", str(root / "plain")], root / "plain.log")
    t_with = run(
        [
            *common,
            "--output",
            str(root / "with_x"),
            "--extractor",
            str(root / "ft"),
            "--extractor_args",
            str(xa),
        ],
        root / "with_x.log",
    )
    print(
        f"\n  data_prep run over the test documents, 2 workers: {t_plain:.1f} s without the extractor, {t_with:.1f} s with it "
        f"(the extractor {100 * (t_with - t_plain) / t_with:.0f}% of the run)"
    )


if __name__ == "__main__":
    main()
