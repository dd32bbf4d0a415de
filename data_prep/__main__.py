"""Prepare pretraining shards.

    python -m data_prep example --output data/example
    python -m data_prep text --corpus news.txt more.txt --output data/news --vocab-size 8000 --seq-len 512

`example` generates the built-in synthetic knowledge world (corpus, KG, aliases) and prepares it;
`text` prepares plain-text corpora (one document a line). Either writes tokenizer.model,
train_*.bin / valid_*.bin and manifest.json (last) into --output.
"""

from __future__ import annotations

import argparse
import sys

from data_prep.pipeline import DataError, TextPrepConfig, prepare_example, prepare_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("example", "text"):
        p = sub.add_parser(name)
        p.add_argument("--output", required=True, help="dataset folder to write")
        p.add_argument("--vocab-size", type=int, default=TextPrepConfig.vocab_size)
        p.add_argument("--tokenizer-type", choices=["bpe", "unigram"], default=TextPrepConfig.tokenizer_type)
        p.add_argument("--seq-len", type=int, default=TextPrepConfig.seq_len)
        p.add_argument("--valid-fraction", type=float, default=TextPrepConfig.valid_fraction)
        p.add_argument("--workers", type=int, default=TextPrepConfig.threads, help="tokenizer threads")
        if name == "text":
            p.add_argument("--corpus", nargs="+", required=True, help="plain-text files, one document a line")
    args = parser.parse_args(argv)
    cfg = TextPrepConfig(
        vocab_size=args.vocab_size,
        tokenizer_type=args.tokenizer_type,
        seq_len=args.seq_len,
        valid_fraction=args.valid_fraction,
        threads=args.workers,
    )
    try:
        if args.command == "example":
            manifest = prepare_example(args.output, cfg)
        else:
            manifest = prepare_text(args.corpus, args.output, cfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rejected = ", ".join(f"{k} {v}" for k, v in manifest["documents_rejected"].items()) or "none"
    print(
        f"documents in {manifest['documents_in']}, written {manifest['documents_written']}, rejected: {rejected}; "
        f"tokens {manifest['tokens']} (tail dropped {manifest['tokens_dropped_tail']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
