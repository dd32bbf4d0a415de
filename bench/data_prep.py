"""data_prep throughput against the baseline a user would write, on the same input, in one run.

    python bench/data_prep.py                    # ~20 MB built from ../shared/data news + Wikipedia text
    python bench/data_prep.py --mb 50 --workers 2

Prints tokens/s of:
  bare tokenizer   SentencePiece encode of the documents in memory, batched, --workers threads (the limit)
  datasets.map     Hugging Face `datasets` text file -> .map(batched=True, num_proc=--workers) with the same model
  ours, text       data_prep from the corpus file to shards (ingest, encode, pack, manifest), --workers processes
  ours, KG join    the same plus alias linking and distant supervision against the Nations KG
and the entity linker's MB/s (one process), next to the in-memory Aho-Corasick automaton it replaced. The tokenizer is trained once beforehand, on one copy of the
distinct text, and given to every run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.join import link_many  # noqa: E402
from data_prep.kg import Linker, read_aliases, read_triples  # noqa: E402
from data_prep.kg_index import load_or_build  # noqa: E402
from data_prep.pipeline import PrepConfig, prepare, train_tokenizer  # noqa: E402
from data_prep.readers import read_mediawiki  # noqa: E402


def build_corpus(shared: Path, mb: float, out: Path) -> tuple[list[str], int]:
    from collections import Counter

    base = [
        line.strip()
        for line in (shared / "news" / "lee_background.txt").read_text().splitlines()
        if line.strip()
    ]
    base += [
        d.text.replace("\n", " ")
        for d in read_mediawiki(shared / "wiki" / "enwiki-sample.xml.bz2", Counter())
    ]
    docs, size, copy = [], 0, 0
    while size < mb * 1e6:  # distinct copies (a numbered prefix), so deduplication keeps them all
        for d in base:
            doc = f"Copy {copy}. {d}"
            docs.append(doc)
            size += len(doc.encode()) + 1
        copy += 1
    out.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return docs, len(base)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    args = p.parse_args()
    import sentencepiece as spm

    shared = Path(args.shared)
    work = Path(tempfile.mkdtemp(prefix="bench-data-prep-"))
    corpus = work / "corpus.txt"
    docs, n_base = build_corpus(shared, args.mb, corpus)
    mb = corpus.stat().st_size / 1e6
    cfg = PrepConfig(
        corpus=[str(corpus)], output="", vocab_size=args.vocab_size, workers=args.workers, seq_len=512
    )
    model = train_tokenizer(iter(docs[:n_base]), work / "tok.model", cfg)  # one copy holds all the text
    sp = spm.SentencePieceProcessor(model_file=str(model))
    print(f"input: {len(docs):,} documents, {mb:.1f} MB; {args.workers} workers; vocab {args.vocab_size}")

    t0 = time.perf_counter()
    n_tokens = sum(len(x) for x in sp.encode(docs, num_threads=args.workers))
    bare = n_tokens / (time.perf_counter() - t0)

    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()

    def tokenize(batch, _sp={}):  # noqa: B006 - one processor per worker process
        if "sp" not in _sp:
            _sp["sp"] = spm.SentencePieceProcessor(model_file=str(model))
        return {"ids": _sp["sp"].encode(batch["text"])}

    t0 = time.perf_counter()
    ds = load_dataset("text", data_files=str(corpus), split="train", cache_dir=str(work / "hf"))
    ds = ds.map(tokenize, batched=True, num_proc=args.workers, remove_columns=["text"])
    ds.save_to_disk(str(work / "hf_out"))
    hf = n_tokens / (time.perf_counter() - t0)

    results = {}
    kg, aliases = (
        shared / "kg" / "nations" / "train.tsv",
        REPO / "data_prep" / "examples" / "nations_aliases.tsv",
    )
    for name, join in (("text", False), ("KG join", True)):
        run_cfg = PrepConfig(
            corpus=[str(corpus)],
            output=str(work / name.replace(" ", "_")),
            tokenizer=str(model),
            workers=args.workers,
            seq_len=512,
            kg=str(kg) if join else None,
            aliases=str(aliases) if join else None,
            case="exact" if join else "ignore",
        )
        t0 = time.perf_counter()
        manifest = prepare(run_cfg, log=lambda *_: None)
        results[name] = (manifest["tokens"] + manifest["tokens_dropped_tail"]) / (time.perf_counter() - t0)

    triples = read_triples(kg)
    reference = Linker(read_aliases(aliases, {t.head for t in triples} | {t.tail for t in triples}), "exact")
    index = load_or_build(work / "kg.kgindex", str(kg), str(aliases), "exact", "fail", log=lambda *_: None)
    matcher = index.matcher()
    sample = docs[: max(1, len(docs) // 4)]
    mb = sum(len(d.encode()) for d in sample) / 1e6
    link_mbs = {}
    matcher.find(sample[0])  # once-per-process set-up (the index's character tables) not timed
    t0 = time.perf_counter()
    link_many(matcher, sample)  # as the join stage calls it: about 1 M characters a pass
    link_mbs["KG index"] = mb / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for d in sample:
        reference.find(d)
    link_mbs["Aho-Corasick"] = mb / (time.perf_counter() - t0)

    print(f"{'':18} {'M tokens/s':>10} {'vs datasets.map':>16} {'vs bare tokenizer':>18}")
    rows = [
        ("bare tokenizer", bare),
        ("datasets.map", hf),
        ("ours, text", results["text"]),
        ("ours, KG join", results["KG join"]),
    ]
    for name, v in rows:
        print(f"{name:18} {v / 1e6:10.2f} {v / hf:15.2f}x {v / bare:17.2f}x")
    print(
        f"KG join costs {results['text'] / results['KG join'] - 1:+.0%} over text only; "
        f"entity linking {link_mbs['KG index']:.1f} MB/s (one process; the in-memory Aho-Corasick automaton, "
        f"which every worker would hold whole: {link_mbs['Aho-Corasick']:.1f} MB/s)"
    )


if __name__ == "__main__":
    main()
