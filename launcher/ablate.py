"""Ablation: the same MoE pretrained text-only and KG-joined at equal compute, evaluated side by side.

Each arm is a full pretraining run (launched with `deepspeed`, like launcher/pretrain.py) on the same
prepared dataset, then launcher/evaluate.py; the table is printed and written to
<output_dir>/ablation.txt. Arms: `none` (text only), `inject` (K-BERT), `fusion` (ERNIE + entity
prediction + TransE on attached triples), `fusion+triple_source=kg` (TransE on the whole KG), ...

Built-in knowledge world (knowledge probe on held-out and stated facts):
    python launcher/ablate.py --corpus world --arms none inject fusion --output_dir runs/ablation_world \\
        --ds_config ds_configs/moe_z2.json --train.max_steps=400

News + Nations KG (link prediction on the Nations test split, filtered):
    python launcher/ablate.py --corpus news-nations --arms none inject fusion+triple_source=kg+triple_score=distmult \\
        --output_dir runs/ablation_nations --ds_config ds_configs/moe_z2.json --train.max_steps=400

REBEL's linked Wikipedia abstracts (../shared/data/rebel): 20% of the facts held out of the KG, the
sentences stating another 20% removed from the text; perplexity on held-out documents, the probe of each
group of facts and link prediction of the held-out ones (text and embeddings, 100 relation-constrained
candidates), three seeds per arm:
    python launcher/ablate.py --corpus rebel --arms none inject fusion --seeds 3 --max_facts 100 \\
        --output_dir runs/ablation_rebel --ds_config ds_configs/moe_z2.json --train.max_steps=600

Two arms' runs side by side (each pretraining then its evaluation; one process each here), on a machine
with room for both: add --jobs 2.

Two processes per arm, experts split over both:
    python launcher/ablate.py --corpus world --num_gpus 2 --arms none inject --model.moe.ep_size=2 ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> None:
    from sparsexpert import cli
    from sparsexpert.config import ConfigError
    from sparsexpert.train.config import RunConfig

    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="Every arm's pretraining takes these (the fields of launcher/pretrain.py):\n\n"
        + cli.fields_help(RunConfig, ds=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--corpus", choices=["world", "news-nations", "rebel"], default="world")
    parser.add_argument(
        "--arms", nargs="+", default=["none", "inject", "fusion"], help="knowledge modes to compare"
    )
    parser.add_argument("--output_dir", default="runs/ablation")
    parser.add_argument("--ds_config", default="ds_configs/moe_z2.json")
    parser.add_argument("--num_gpus", type=int, default=1, help="processes per arm")
    parser.add_argument("--seq_len", type=int, default=128, help="row length of the prepared dataset")
    parser.add_argument("--max_facts", type=int, default=60, help="probe facts per group")
    parser.add_argument(
        "--max_triples", type=int, default=0, help="link prediction: test triples to rank (sampled); 0 = all"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="arms already trained in --output_dir are only re-evaluated"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="pretrainings per arm (seed s: initialization and data order); figures as mean ± sd [95%% interval], "
        "each arm against the first by a paired t-test over the seeds",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs side by side (each an arm and seed's pretraining, then its evaluation): where the machine has "
        "room for several (each --num_gpus processes); tokens/s is then measured under the shared load",
    )
    args, rest = parser.parse_known_args(argv)
    try:  # checked here, before the first arm starts, in the pretraining launcher's language
        pairs, ds_pairs = cli.split_overrides(rest, RunConfig, ds=True)
    except ConfigError as e:
        parser.error(str(e))
    overrides = [cli.as_option(k, v) for k, v in pairs] + [cli.as_option(f"ds.{k}", v) for k, v in ds_pairs]

    from experiments.ablation import run_ablation

    run_ablation(
        args.corpus,
        args.arms,
        args.output_dir,
        args.ds_config,
        args.num_gpus,
        overrides,
        args.seq_len,
        (["--max_facts", str(args.max_facts)] if args.corpus in ("world", "rebel") else [])
        + (["--max_triples", str(args.max_triples)] if args.corpus in ("news-nations", "rebel") else []),
        args.reuse,
        args.seeds,
        args.jobs,
    )


if __name__ == "__main__":
    main()
