"""Prepare pretraining shards from a corpus and, optionally, a knowledge graph.

    python -m data_prep run --corpus news.txt wiki.xml.bz2 --kg kg.tsv --aliases aliases.tsv \\
        --output data/news --workers 2 --seq-len 512 --vocab-size 8000
    python -m data_prep run --config prep.json            # the same fields as PrepConfig, as JSON
    python -m data_prep run ... --dry-run                 # validate the inputs only
    python -m data_prep example --output data/example     # the built-in synthetic knowledge world
    python -m data_prep stats data/news                   # print a prepared dataset's stats
    python -m data_prep relations --corpus news.txt --kg kg.tsv --aliases aliases.tsv --output data/rel
        [--case exact|ignore] [--valid-fraction 0.2] [--negative-ratio 1.0] [--seed 0]
        [--max-sentence-chars 400]   # relation classification by distant supervision (data_prep/relations.py)

Stages one by one (same flags as `run`): `ingest` reads and deduplicates and prints the counts;
`link` and `extract` write the mentions (mentions.jsonl) and the triples found in the text
(extracted_kg.tsv, counts per relation) into --output, for inspection; `tokenizer` trains the tokenizer, `join` links, extracts and joins (the part given by
--num-shards/--shard-index), `merge` packs all joined chunks into the output. Finished work is kept
in <output>.parts, so an interrupted run continues where it stopped; with --keep-parts it stays,
and `merge --seq-len N` packs the same joined chunks again at another length.
Scale-out over K machines sharing a filesystem:

    python -m data_prep tokenizer --corpus ... --output data/big            # once
    python -m data_prep join --corpus ... --output data/big --num-shards K --shard-index i   # machine i
    python -m data_prep merge --corpus ... --output data/big                # once, after all K

Writes tokenizer.model, {train,valid}_*.bin, *_spans.npy, *_triples.npy, entities.tsv,
relations.tsv, triples.tsv, stats.json and, last, manifest.json into --output. An existing
--output that is not a dataset data_prep wrote is refused unless --overwrite is given; an input
inside it is refused always. --max-doc-chars cuts longer documents into pieces;
--max-rejected-fraction bounds the share of invalid records --on-error skip may drop.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from data_prep.pipeline import (
    DataError,
    PrepConfig,
    load_inputs,
    prepare,
    prepare_example,
    stage_ingest,
    stage_join,
    stage_link_extract,
    stage_pack,
    stage_tokenizer,
)
from data_prep.relations import RelationsConfig, prepare_relations
from sparsexpert.config import ConfigError, from_dict, load_json

DEFAULTS = PrepConfig()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", help="dataset folder to write")
    p.add_argument("--vocab-size", type=int, default=DEFAULTS.vocab_size)
    p.add_argument("--tokenizer-type", choices=["bpe", "unigram"], default=DEFAULTS.tokenizer_type)
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len)
    p.add_argument("--valid-fraction", type=float, default=DEFAULTS.valid_fraction)
    p.add_argument(
        "--workers", type=int, default=DEFAULTS.workers, help="processes; output does not depend on it"
    )


def _add_inputs(p: argparse.ArgumentParser) -> None:
    """The corpus and KG options, shared by the stages and `relations`."""
    p.add_argument(
        "--corpus", nargs="+", help=".txt (a document a line), .jsonl, .parquet, MediaWiki .xml[.bz2]"
    )
    p.add_argument("--kg", help="triples: .tsv (head<TAB>relation<TAB>tail), .nt or .jsonl")
    p.add_argument("--aliases", help="entity_id<TAB>surface form; default: entity names")
    p.add_argument(
        "--text-field", default=DEFAULTS.text_field, help="JSONL field / Parquet column of the text"
    )
    p.add_argument("--case", choices=["ignore", "exact"], default=DEFAULTS.case, help="alias matching")
    p.add_argument("--on-error", choices=["fail", "skip"], default=DEFAULTS.on_error)


def _add_run_args(run: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_common(run)
    run.add_argument("--config", help="JSON file with PrepConfig fields; flags given override it")
    _add_inputs(run)
    run.add_argument(
        "--tokenizer",
        help="an existing tokenizer instead of training one: a SentencePiece .model, or a Hugging Face folder with tokenizer.json (a model folder: only its tokenizer files are copied)",
    )
    run.add_argument("--extractor", help="module:Class adding mentions and triples (data_prep/extractors.py)")
    run.add_argument("--extractor-args", help="JSON file of the extractor's keyword arguments")
    run.add_argument("--chunk-docs", type=int, default=DEFAULTS.chunk_docs, help="documents per unit of work")
    run.add_argument(
        "--num-shards", type=int, default=DEFAULTS.num_shards, help="machines sharing the join stage"
    )
    run.add_argument("--shard-index", type=int, default=DEFAULTS.shard_index, help="this machine's share")
    run.add_argument("--dry-run", action="store_true", help="validate the inputs and stop")
    run.add_argument(
        "--keep-parts", action="store_true", help="keep <output>.parts to re-pack with another --seq-len"
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output that is not a data_prep dataset (deleting what is in it)",
    )
    run.add_argument(
        "--max-rejected-fraction",
        type=float,
        default=DEFAULTS.max_rejected_fraction,
        help="with --on-error skip: fail when a larger share of the records is invalid",
    )
    run.add_argument(
        "--max-doc-chars",
        type=int,
        default=DEFAULTS.max_doc_chars,
        help="longer documents are cut at whitespace into pieces of at most this many characters",
    )
    return run


def _config(args: argparse.Namespace) -> PrepConfig:
    """PrepConfig from --config (checked whole: an unknown key, with the nearest name, or a wrong
    type is an error naming the file and the field) with the flags given on top."""
    base: dict = {}
    if getattr(args, "config", None):
        try:
            base = load_json(args.config)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(str(e)) from None
        if not isinstance(base, dict):
            raise DataError(f"{args.config}: expected a JSON object of PrepConfig fields")
    names = {f.name for f in fields(PrepConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names and v is not None}
    try:
        from_dict(PrepConfig, base)
    except ConfigError as e:
        raise DataError(f"{args.config}: {e}") from None
    for key, value in flags.items():
        if value != getattr(DEFAULTS, key) or key not in base:
            base[key] = value
    if not base.get("output"):
        raise DataError("no output folder: pass --output DIR")
    return from_dict(PrepConfig, base)  # PrepConfig.validate runs when the inputs are loaded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    stage_parsers = {}
    for name, help_ in (
        ("run", "corpus (+ KG) to shards: every stage"),
        ("ingest", "stage: read, normalize, deduplicate; print the counts, write nothing"),
        ("link", "stage on its own: mentions of every document to <output>/mentions.jsonl"),
        ("extract", "stage on its own: triples found in the text to <output>/extracted_kg.tsv"),
        ("tokenizer", "stage: train the tokenizer"),
        ("join", "stage: link, extract, join (this shard's chunks)"),
        ("merge", "stage: pack every joined chunk into the output"),
    ):
        stage_parsers[name] = _add_run_args(sub.add_parser(name, help=help_))
    example = sub.add_parser("example", help="the built-in synthetic knowledge world")
    _add_common(example)
    stats = sub.add_parser("stats", help="print the stats of a prepared dataset")
    stats.add_argument("dataset")
    rel = sub.add_parser("relations", help="relation-classification examples by distant supervision")
    _add_inputs(rel)
    rel.add_argument("--output", help="folder for train.jsonl, dev.jsonl, stats.json")
    rel.add_argument("--valid-fraction", type=float, default=RelationsConfig.valid_fraction)
    rel.add_argument(
        "--negative-ratio",
        type=float,
        default=RelationsConfig.negative_ratio,
        help="negatives per positive, at most",
    )
    rel.add_argument("--seed", type=int, default=RelationsConfig.seed, help="of the negative sample")
    rel.add_argument(
        "--max-sentence-chars", type=int, default=RelationsConfig.max_sentence_chars, help="longer: skipped"
    )
    args = parser.parse_args(argv)

    try:
        if args.command == "stats":
            path = Path(args.dataset) / "stats.json"
            if not path.is_file():
                raise DataError(f"{path}: no stats; is {args.dataset} a prepared dataset?")
            print(path.read_text())
            return 0
        if args.command == "relations":
            given = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(RelationsConfig)}}
            if not given.get("output"):
                raise DataError("no output folder: pass --output DIR")
            prepare_relations(RelationsConfig(**{k: v for k, v in given.items() if v is not None}))
            return 0
        cfg = _config(args)
        if args.command == "example":
            manifest = prepare_example(cfg.output, cfg)
        elif args.command == "ingest":
            load_inputs(cfg)
            stage_ingest(cfg)
            return 0
        elif args.command in ("link", "extract"):
            stage_link_extract(cfg, load_inputs(cfg), extract=args.command == "extract")
            return 0
        elif args.command == "tokenizer":
            load_inputs(cfg)
            print(f"tokenizer: {stage_tokenizer(cfg)}")
            return 0
        elif args.command == "join":
            stage_join(cfg, load_inputs(cfg))
            return 0
        elif args.command == "merge":
            manifest = stage_pack(cfg, load_inputs(cfg))
        else:
            manifest = prepare(cfg, dry_run=args.dry_run)
            if not manifest:  # a dry run, or one shard of several
                return 0
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rejected = ", ".join(f"{k} {v}" for k, v in manifest["documents_rejected"].items()) or "none"
    split = f" ({manifest['documents_split']} cut into pieces)" if manifest["documents_split"] else ""
    print(
        f"documents in {manifest['documents_in']}, written {manifest['documents_written']}{split}, rejected: {rejected}; "
        f"tokens {manifest['tokens']} (tail dropped {manifest['tokens_dropped_tail']}); mentions "
        f"{manifest['mentions']}; triples attached {manifest['triples_attached']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
