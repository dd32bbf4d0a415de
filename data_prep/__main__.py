"""Prepare pretraining shards from a corpus and, optionally, a knowledge graph.

    python -m data_prep run --corpus news.txt wiki.xml.bz2 --kg kg.tsv --aliases aliases.tsv \\
        --output data/news --workers 2 --seq_len 512 --vocab_size 8000
    python -m data_prep run --config prep.json            # the same fields as PrepConfig, as JSON
    python -m data_prep run ... --dry_run                 # validate the inputs only
    python -m data_prep example --output data/example     # the built-in synthetic knowledge world
    python -m data_prep stats data/news                   # print a prepared dataset's stats
    python -m data_prep relations --corpus news.txt --kg kg.tsv --aliases aliases.tsv --output data/rel
        [--case exact|ignore] [--valid_fraction 0.2] [--negative_ratio 1.0] [--seed 0]
        [--max_sentence_chars 400]   # relation classification by distant supervision (data_prep/relations.py)
    python -m data_prep bootstrap --corpus news.txt --kg kg.tsv --aliases aliases.tsv --init runs/pretrain \
        --output runs/bootstrap [--threshold 0.7] [--finetune_steps 400] [--extract_corpus other.txt]
        # relations, a fine-tuned relation extractor, shards with KG and extracted triples (data_prep/bootstrap.py)

Options are the fields of PrepConfig (RelationsConfig for `relations`, BootstrapConfig for `bootstrap`), in the language of every
sparsexpert entry point: `--seq_len=512` or `--seq_len 512` (`--seq-len` works too), a list field
takes several values (`--corpus a.txt b.xml`), a bool field alone is true (`--keep_parts`); `--help`
after a command lists every field with its type, default and meaning; `--print_config` prints the
resolved config and exits.

Stages one by one (same options as `run`): `ingest` reads and deduplicates and prints the counts;
`link` and `extract` write the mentions (mentions.jsonl) and the triples found in the text
(extracted_kg.tsv, counts per relation) into --output, for inspection; `tokenizer` trains the tokenizer, `join` links, extracts and joins (the part given by
--num_shards/--shard_index), `merge` packs all joined chunks into the output. Finished work is kept
in <output>.parts, so an interrupted run continues where it stopped; with --keep_parts it stays,
and `merge --seq_len N` packs the same joined chunks again at another length.
Scale-out over K machines sharing a filesystem:

    python -m data_prep tokenizer --corpus ... --output data/big            # once
    python -m data_prep join --corpus ... --output data/big --num_shards K --shard_index i   # machine i
    python -m data_prep merge --corpus ... --output data/big                # once, after all K

With --kg, the KG is first read into a compact index in <output>.kgindex (data_prep/kg_index.py),
reused by later runs with the same KG, aliases, --case and --on_error, and memory-mapped by every worker.

Writes tokenizer.model, {train,valid}_*.bin, *_spans.npy, *_triples.npy, entities.tsv,
relations.tsv, triples.tsv, stats.json and, last, manifest.json into --output. An existing
--output that is not a dataset data_prep wrote is refused unless --overwrite is given; an input
inside it is refused always. --max_doc_chars cuts longer documents into pieces;
--max_rejected_fraction bounds the share of invalid records --on_error skip may drop.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from data_prep.bootstrap import BootstrapConfig, bootstrap
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
from sparsexpert import cli
from sparsexpert.config import ConfigError, from_dict, load_json

STAGES = (
    ("run", "corpus (+ KG) to shards: every stage"),
    ("ingest", "stage: read, normalize, deduplicate; print the counts, write nothing"),
    ("link", "stage on its own: mentions of every document to <output>/mentions.jsonl"),
    ("extract", "stage on its own: triples found in the text to <output>/extracted_kg.tsv"),
    ("tokenizer", "stage: train the tokenizer"),
    ("join", "stage: link, extract, join (this shard's chunks)"),
    ("merge", "stage: pack every joined chunk into the output"),
    (
        "example",
        "the built-in synthetic knowledge world (uses output, vocab_size, tokenizer_type, seq_len, valid_fraction, workers)",
    ),
)


def _sub(sub, name: str, help_: str, cls: type) -> argparse.ArgumentParser:
    """A subcommand whose options are the fields of `cls`, in the language of every entry point
    (sparsexpert/cli.py): --seq_len=512, --seq-len 512, --corpus a.txt b.xml, --keep_parts."""
    p = sub.add_parser(
        name,
        help=help_,
        description=help_,
        epilog=cli.fields_help(cls, ds=False),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--config", help=f"JSON file of {cls.__name__} fields; options given override it")
    p.add_argument(
        "--print_config", "--print-config", action="store_true", help="print the resolved config and exit"
    )
    return p


def _config(args: argparse.Namespace, rest: list[str], cls: type) -> Any:
    """`cls` from --config (checked whole: an unknown key, with the nearest name, or a wrong type is an
    error naming the file and the field) with the options given on top."""
    cfg = cls()
    if args.config:
        try:
            base = load_json(args.config)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(str(e)) from None
        if not isinstance(base, dict):
            raise DataError(f"{args.config}: expected a JSON object of {cls.__name__} fields")
        try:
            cfg = from_dict(cls, base)
        except ConfigError as e:
            raise DataError(f"{args.config}: {e}") from None
    pairs, _ = cli.split_overrides(rest, cls, ds=False)
    for key, raw in pairs:
        cli.set_field(cfg, key, raw)
    if not cfg.output:
        raise DataError("no output folder: pass --output DIR")
    return cfg  # validate() runs when the inputs are loaded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in STAGES:
        p = _sub(sub, name, help_, PrepConfig)
        if name == "run":
            p.add_argument("--dry_run", "--dry-run", action="store_true", help="validate the inputs and stop")
    stats = sub.add_parser("stats", help="print the stats of a prepared dataset")
    stats.add_argument("dataset")
    _sub(sub, "relations", "relation-classification examples by distant supervision", RelationsConfig)
    _sub(
        sub,
        "bootstrap",
        "relations, a fine-tuned relation extractor, shards with the KG and extracted triples",
        BootstrapConfig,
    )
    args, rest = parser.parse_known_args(argv)

    try:
        if args.command == "stats":
            path = Path(args.dataset) / "stats.json"
            if not path.is_file():
                raise DataError(f"{path}: no stats; is {args.dataset} a prepared dataset?")
            print(path.read_text())
            return 0
        if rest and args.command == "stats":
            raise DataError(f"stats takes a dataset folder only, not {' '.join(rest)}")
        kind = {"relations": RelationsConfig, "bootstrap": BootstrapConfig}.get(args.command, PrepConfig)
        cfg = _config(args, rest, kind)
        if args.print_config:
            cli.print_config(asdict(cfg))
            return 0
        if args.command == "relations":
            prepare_relations(cfg)
            return 0
        if args.command == "bootstrap":
            bootstrap(cfg)
            return 0
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
