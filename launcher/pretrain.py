"""Pretrain a sparsexpert MoE language model with DeepSpeed.

Without --data.path, the built-in example (a synthetic knowledge world) is prepared into
<output_dir>/data first. Batch sizes, optimizer, schedule, precision and ZeRO stage come from the
DeepSpeed JSON; the model, data and loop from --config and dotted overrides.

CPU smoke run (one process, a few steps):
    deepspeed launcher/pretrain.py --ds_config ds_configs/moe_z2.json --train.max_steps=20

Two processes on CPU with expert parallelism over both (gloo):
    deepspeed --num_gpus 2 launcher/pretrain.py --ds_config ds_configs/moe_z2.json --model.moe.ep_size=2

One GPU node with 8 GPUs, experts split over 8 ranks:
    deepspeed --num_gpus 8 launcher/pretrain.py --ds_config ds_configs/moe_z2_bf16.json \\
        --config configs/moe_gpu_base.json --model.moe.ep_size=8 --output_dir runs/moe8

Several nodes with passwordless ssh (pdsh), started once on the first node (hostfile lines:
`node1 slots=8`); the output folder on a filesystem all nodes share:
    deepspeed --hostfile hostfile launcher/pretrain.py --ds_config ds_configs/moe_z2_bf16.json \\
        --data.path /shared/data/my_corpus --output_dir /shared/runs/moe

Several nodes without ssh: the same command on each node i = 0..N-1, with the same hostfile (DeepSpeed
reads the node count and slots from it); node 0 runs ranks 0..7 and the rendezvous at MASTER_ADDR:
    deepspeed --hostfile hostfile --no_ssh --node_rank=$i --num_nodes=$N --num_gpus 8 \\
        --master_addr=$MASTER_ADDR --master_port=29500 launcher/pretrain.py \\
        --ds_config ds_configs/moe_z2_bf16.json --data.path /shared/data/my_corpus --output_dir /shared/runs/moe

Slurm: launcher/slurm/pretrain.sbatch does the above with srun, one launcher per node:
    sbatch --nodes=4 --gpus-per-node=8 launcher/slurm/pretrain.sbatch --ds_config ds_configs/moe_z2_bf16.json \\
        --model.moe.ep_size=8 --data.path /shared/data/my_corpus --output_dir /shared/runs/moe

If a rank fails while training, every rank on every node exits within seconds with status 1, printing
`sparsexpert: training failed: rank 5 stopped responding ...` (the rank that failed); nothing hangs.

Knowledge-enhanced (see README "Knowledge-enhanced pretraining"): ERNIE-style entity fusion with
entity prediction and TransE, or K-BERT-style injection of verbalized triples:
    deepspeed launcher/pretrain.py --ds_config ds_configs/moe_z2.json --model.knowledge.mode=fusion
    deepspeed launcher/pretrain.py --ds_config ds_configs/moe_z2.json --model.knowledge.mode=inject
Then evaluate (perplexity, knowledge probe): launcher/evaluate.py; compare arms: launcher/ablate.py.

DeepSpeed-MoE's native layer instead of AutoEP (capacity-limited routing, Residual-MoE, pyramid
PR-MoE; ZeRO 0-2; see README "MoE backends"):
    deepspeed --num_gpus 2 launcher/pretrain.py --ds_config ds_configs/moe_z2.json --model.moe.ep_size=2 \
        --model.moe.backend=native --model.moe.capacity_factor=1.25 --model.moe.use_residual=true \
        --model.moe.num_experts_per_layer=[4,4,8,8]

Resume the latest complete checkpoint in the output folder; at another world size or ep_size
(ZeRO 1-3) it is resharded through DeepSpeed's universal checkpoint and checked (every rank's experts
by global id, the optimizer step). Keep the global batch: scale gradient_accumulation_steps.
    deepspeed launcher/pretrain.py --ds_config ds_configs/moe_z2.json --output_dir runs/pretrain --resume
    deepspeed --num_gpus 2 launcher/pretrain.py --ds_config ds_configs/moe_z2.json --output_dir runs/pretrain \
        --resume --model.moe.ep_size=2      # a 1-process run continued on 2 (micro x accum x 2 the same)

Start from existing weights (a run, a consolidated folder, a local Hugging Face Mixtral/Llama folder;
the data tokenized with its vocabulary, e.g. `python -m data_prep run ... --tokenizer /models/llama-small`),
a dense one upcycled into experts:
    deepspeed launcher/pretrain.py --ds_config ds_configs/moe_z2.json --data.path data/mine \
        --train.init=/models/llama-small --train.upcycle_experts=8

Afterwards: launcher/export.py (consolidated safetensors, Hugging Face folder), launcher/generate.py.

Watch it:  tensorboard --logdir runs/pretrain/tensorboard   (and runs/pretrain/metrics.jsonl)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sparsexpert import cli  # noqa: E402
from sparsexpert.train.config import RunConfig  # noqa: E402


def parse_args(argv: list[str] | None = None):
    """(launcher options, the run config, the DeepSpeed JSON with its --ds.* overrides)."""
    parser = cli.parser(__doc__, RunConfig, ds=True)
    parser.add_argument("--output_dir", default="runs/pretrain", help="everything the run writes goes here")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output folder that holds a run (its checkpoints, metrics and TensorBoard files go)",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    return cli.parse(parser, argv, RunConfig, ds=True)


def main(argv: list[str] | None = None) -> None:
    args, cfg, ds_json = parse_args(argv)

    from sparsexpert.harness import exit_on_stop
    from sparsexpert.train.trainer import pretrain, resolved_config

    with exit_on_stop():
        if args.print_config:
            if os.environ.get("RANK", "0") == "0":
                cli.print_config(resolved_config(cfg, ds_json, args.output_dir))
            return
        pretrain(cfg, ds_json, args.output_dir, resume=args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
    from sparsexpert.distributed.comm import finish

    finish()  # not interpreter finalization: a torch/gloo race there can abort a finished run (see finish)
