"""Fine-tune a pretrained sparsexpert model on NER, classification or relation extraction, or on
several tasks at once, with DeepSpeed (same configs, ZeRO 0-2, expert parallelism, several nodes).

One task (NER on WNUT-16 from a pretraining run):
    deepspeed launcher/finetune.py --ds_config ds_configs/moe_z2.json --init runs/pretrain \\
        --task ner --train ../shared/data/ner/wnut16/train.conll --dev ../shared/data/ner/wnut16/dev.conll

Classification (JSONL or CSV with text,label) and relation classification (JSONL from
`python -m data_prep relations`):
    deepspeed launcher/finetune.py --ds_config ds_configs/moe_z2.json --init runs/pretrain \\
        --task classification --train train.csv --dev dev.csv
    deepspeed launcher/finetune.py --ds_config ds_configs/moe_z2.json --init runs/news \\
        --task relation --train data/re/train.jsonl --dev data/re/dev.jsonl

A JSON config (tasks, sampling, techniques, the loop; fields as in sparsexpert/finetune/config.py,
e.g. configs/finetune_ner_wnut16.json), several tasks over one backbone by listing them under "tasks",
two processes with experts split over both:
    deepspeed --num_gpus 2 launcher/finetune.py --ds_config ds_configs/moe_z2.json \\
        --config configs/finetune_ner_wnut16.json --model.moe.ep_size=2

The loop and techniques as config fields, the same language as pretraining (`--help` lists them all;
`--a.b=value` or `--a.b value`): --train.max_steps=300 --train.eval_every=50 --train.patience=3;
--adversarial.method=fgm|pgd --adversarial.epsilon=1.0; --distill.teacher=runs/ner_big
--distill.alpha=0.5 --distill.temperature=2; --freeze_embeddings; --train.upcycle_experts=8 with a dense
--init checkpoint. DeepSpeed settings: --ds.optimizer.params.lr=5e-4 --ds.train_micro_batch_size_per_gpu=16.
Check what a command will run with: add --print_config.

--init also takes a consolidated folder (launcher/export.py) or a Hugging Face folder on local disk:
a Mixtral-style MoE as it is, a dense Llama-style model upcycled (--train.upcycle_experts 8):
    deepspeed launcher/finetune.py --ds_config ds_configs/moe_z2.json --init /models/llama-small \
        --train.upcycle_experts 8 --task ner --train ../shared/data/ner/wnut16/train.conll \
        --dev ../shared/data/ner/wnut16/dev.conll

Writes into --output_dir: metrics.jsonl, tensorboard/, best/ (best dev checkpoint), predictions/,
results.json; prints the entity-level report (NER) of the best dev evaluation.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sparsexpert import cli  # noqa: E402
from sparsexpert.finetune.config import FinetuneConfig, TaskConfig  # noqa: E402


def parse_args(argv: list[str] | None = None):
    """(launcher options, the fine-tuning config with --init/--task/--train/--dev/--test folded in, the
    DeepSpeed JSON with its --ds.* overrides)."""
    parser = cli.parser(__doc__, FinetuneConfig, ds=True)
    parser.add_argument(
        "--init", help="shorthand for --train.init: the checkpoint or model folder to start from"
    )
    parser.add_argument("--task", choices=["ner", "classification", "relation"], help="a single task's kind")
    parser.add_argument("--train", help="the single task's training file")
    parser.add_argument("--dev", help="the single task's dev file")
    parser.add_argument("--test", help="the single task's test file (optional)")
    parser.add_argument("--output_dir", default="runs/finetune", help="everything the run writes goes here")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --output_dir from its checkpoints/"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output folder that holds a run (its files go)",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args, cfg, ds_json = cli.parse(parser, argv, FinetuneConfig, ds=True)
    if args.init:
        cfg.train.init = args.init
    if args.task:
        cfg.tasks = [
            TaskConfig(kind=args.task, train=args.train or "", dev=args.dev or "", test=args.test or "")
        ]
    elif args.train or args.dev or args.test:
        parser.error("--train/--dev/--test name a single task's files: give its kind with --task")
    return args, cfg, ds_json


def main(argv: list[str] | None = None) -> None:
    args, cfg, ds_json = parse_args(argv)

    from sparsexpert.finetune.trainer import Finetuner
    from sparsexpert.harness import exit_on_stop

    with exit_on_stop():
        if args.print_config:
            cfg.validate()
            if os.environ.get("RANK", "0") == "0":
                cli.print_config({"run": asdict(cfg), "ds_json": ds_json})
            return
        Finetuner(cfg, ds_json, args.output_dir, args.resume, args.overwrite).train()


if __name__ == "__main__":
    main()
    from sparsexpert.distributed.comm import finish

    finish()  # not interpreter finalization: a torch/gloo race there can abort a finished run (see finish)
