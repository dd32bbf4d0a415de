"""Evaluate a pretraining run's latest checkpoint: perplexity, knowledge probe, link prediction.

Any number of processes: the checkpoint's full weights (written at any world size, ep_size or ZeRO
stage) are loaded, then DeepSpeed shards the experts over the processes at hand (model.moe.ep_size
kept where it divides their number, else the largest that does); the scoring is split over them.
Results are printed and written to <run>/eval.json. If a rank fails, every rank stops within seconds
naming it (exit status 1).

Built-in knowledge world (the README's main job writes runs/pretrain and runs/pretrain/data_raw):
    deepspeed launcher/evaluate.py --run runs/pretrain --probe_world runs/pretrain/data_raw

News + Nations: link prediction on the Nations test split, filtered against every known triple:
    deepspeed launcher/evaluate.py --run runs/nations \\
        --link_test ../shared/data/kg/nations/test.tsv \\
        --link_known ../shared/data/kg/nations/train.tsv ../shared/data/kg/nations/valid.tsv

Linked text (launcher/ablate.py --corpus rebel writes these files): facts by group, tails ranked among those
seen with the relation, at most 100 each; link prediction of the held-out facts among as many:
    deepspeed launcher/evaluate.py --run runs/ablation_rebel/none --probe_facts runs/ablation_rebel/split/{heldout,kg_only,stated}.tsv \\
        --probe_known runs/ablation_rebel/split/known.tsv --link_test runs/ablation_rebel/split/heldout.tsv \\
        --link_known runs/ablation_rebel/split/known.tsv --max_candidates 100

Two processes (of a run trained on any number):
    deepspeed --num_gpus 2 launcher/evaluate.py --run runs/pretrain2 --probe_world runs/pretrain2/data_raw
    torchrun --nproc_per_node 2 launcher/evaluate.py --run_dir runs/pretrain2   # --run is torchrun's --run-path
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run",
        "--run_dir",
        dest="run",
        required=True,
        help="a pretraining output folder (with checkpoints/); under torchrun write --run_dir (torchrun's own "
        "parser takes --run for its --run-path)",
    )
    parser.add_argument(
        "--probe_world", help="the built-in world's raw folder (kg.tsv, heldout.tsv, aliases.tsv)"
    )
    parser.add_argument(
        "--max_facts", type=int, default=60, help="probe facts per group (held out, stated); 0 = all"
    )
    parser.add_argument(
        "--probe_facts",
        nargs="*",
        default=[],
        help="the knowledge probe on any KG: files of facts (head<TAB>relation<TAB>tail[<TAB>head words<TAB>tail "
        "words]), one group each, tails ranked among those seen with the relation (see --probe_known, --max_candidates)",
    )
    parser.add_argument(
        "--probe_known",
        nargs="*",
        default=[],
        help="every known fact: the probe's candidate pools and filter",
    )
    parser.add_argument("--link_test", help="test triples (head<TAB>relation<TAB>tail) for link prediction")
    parser.add_argument(
        "--link_known", nargs="*", default=[], help="other true triples, filtered from rankings"
    )
    parser.add_argument("--max_triples", type=int, default=0, help="test triples to rank; 0 = all")
    parser.add_argument(
        "--max_candidates",
        type=int,
        default=0,
        help="link prediction on a large KG: rank each answer among at most this many entities seen with the "
        "query's relation (filtered, sampled with seed 0; the random baseline over the same sets); 0 = all entities",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    args = parser.parse_args(argv)
    if args.probe_world and args.probe_facts:
        parser.error("give --probe_world (the built-in world) or --probe_facts (any KG), not both")

    from sparsexpert.evaluate import evaluate

    evaluate(
        args.run,
        args.probe_world,
        args.link_test,
        args.link_known,
        args.max_facts,
        args.max_triples,
        args.max_candidates,
        args.probe_facts,
        args.probe_known,
    )


if __name__ == "__main__":
    main()
    from sparsexpert.distributed.comm import finish

    finish()  # not interpreter finalization: a torch/gloo race there can abort a finished run (see finish)
