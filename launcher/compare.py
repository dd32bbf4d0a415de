"""Fine-tuning comparison at equal compute: (a) MoE pretrained with the KG, (b) the same MoE
without the KG, (c) a dense model with the same active parameters, (d) the MoE from scratch.

Pretraining (a-c) on news + the Wikipedia sample joined with the Nations KG, same steps and
tokens; fine-tuning all four on the task with the same steps and batch; prints and writes
<output_dir>/comparison.txt (dev metrics, parameters, active parameters, tokens/s).

WNUT-16 NER:
    python launcher/compare.py --output_dir runs/compare_wnut --pretrain_steps 600 \\
        --task ner --train ../shared/data/ner/wnut16/train.conll --dev ../shared/data/ner/wnut16/dev.conll \\
        --train.max_steps=800 --train.eval_every=100

Two processes per run, experts split over both: add --num_gpus 2 --model.moe.ep_size=2.
Fine-tuning overrides are plain (`--train.max_steps=800`); model overrides (`--model.d_model=256`) shape
every arm. --reuse keeps runs already done in --output_dir. --seeds N runs every arm N times and gives each
metric as mean ± sd [95% interval] with a paired t-test of each arm against b); --jobs 2 runs two seeds
side by side (each run's own processes; on a machine with room for both).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> None:
    from sparsexpert import cli
    from sparsexpert.config import ConfigError
    from sparsexpert.finetune.config import FinetuneConfig

    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="Fine-tuning options (--model.* also shape the pretrained models):\n\n"
        + cli.fields_help(FinetuneConfig, ds=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--output_dir", default="runs/compare")
    parser.add_argument("--ds_config", default="ds_configs/moe_z2.json")
    parser.add_argument("--num_gpus", type=int, default=1)
    parser.add_argument("--pretrain_steps", type=int, default=600)
    parser.add_argument(
        "--kg_arm", default="fusion", help="knowledge mode of arm (a), as in launcher/ablate.py"
    )
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs per arm (seed s: initialization, data order, heads); metrics as mean ± sd [95%% interval], "
        "each arm against b) by a paired t-test over the seeds (one seed: a paired bootstrap over dev examples)",
    )
    parser.add_argument(
        "--data", help="a prepared dataset to pretrain on instead of news + Wikipedia + Nations"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="seeds run side by side (each seed's arms one after the other), where the machine has room",
    )
    parser.add_argument("--task", required=True, choices=["ner", "classification", "relation"])
    parser.add_argument("--train", required=True)
    parser.add_argument("--dev", required=True)
    args, rest = parser.parse_known_args(argv)
    try:  # checked before anything starts, in the fine-tuning launcher's language
        pairs, ds_pairs = cli.split_overrides(rest, FinetuneConfig, ds=True)
    except ConfigError as e:
        parser.error(str(e))
    model = [cli.as_option(k, v) for k, v in pairs if k.startswith("model.")]
    finetune = [cli.as_option(k, v) for k, v in pairs if not k.startswith("model.")]
    finetune += [cli.as_option(f"ds.{k}", v) for k, v in ds_pairs]

    from experiments.compare import run_comparison

    task = ["--task", args.task, "--train", args.train, "--dev", args.dev]
    run_comparison(
        task,
        args.output_dir,
        args.ds_config,
        args.num_gpus,
        model,
        args.pretrain_steps,
        finetune,
        args.kg_arm,
        args.seq_len,
        args.reuse,
        args.data,
        args.seeds,
        args.jobs,
    )


if __name__ == "__main__":
    main()
