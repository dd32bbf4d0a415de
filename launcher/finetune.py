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

Several tasks over one backbone (tasks, sampling, techniques in a JSON config; fields as in
sparsexpert/finetune/config.py), two processes with experts split over both:
    deepspeed --num_gpus 2 launcher/finetune.py --ds_config ds_configs/moe_z2.json --config multitask.json \\
        --model.moe.ep_size=2

Techniques (dotted overrides): --adversarial.method=fgm|pgd --adversarial.epsilon=1.0;
--distill.teacher=runs/ner_big --distill.alpha=0.5 --distill.temperature=2; --patience=3;
--freeze_embeddings=true; --upcycle_experts=8 with a dense --init checkpoint.

--init also takes a consolidated folder (launcher/export.py) or a Hugging Face folder on local disk:
a Mixtral-style MoE as it is, a dense Llama-style model upcycled (--upcycle_experts 8):
    deepspeed launcher/finetune.py --ds_config ds_configs/moe_z2.json --init /models/llama-small \
        --upcycle_experts 8 --task ner --train ../shared/data/ner/wnut16/train.conll \
        --dev ../shared/data/ner/wnut16/dev.conll

Writes into --output_dir: metrics.jsonl, tensorboard/, best/ (best dev checkpoint), predictions/,
results.json; prints the entity-level report (NER) of the best dev evaluation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sparsexpert.config import apply_overrides, from_dict, load_json  # noqa: E402
from sparsexpert.finetune.config import FinetuneConfig, TaskConfig  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ds_config", required=True, help="DeepSpeed JSON (see ds_configs/)")
    parser.add_argument("--config", help="fine-tuning config JSON (FinetuneConfig fields)")
    parser.add_argument("--init", help="checkpoint to start from: a run folder or a tag")
    parser.add_argument("--task", choices=["ner", "classification", "relation"], help="a single task's kind")
    parser.add_argument("--train", help="the single task's training file")
    parser.add_argument("--dev", help="the single task's dev file")
    parser.add_argument("--test", help="the single task's test file (optional)")
    parser.add_argument("--output_dir", default="runs/finetune")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --output_dir from its checkpoints/"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output folder that holds a run (its files go)",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            parser.error(f"unrecognized argument {item!r} (overrides look like --max_steps=300)")
    cfg = from_dict(FinetuneConfig, load_json(args.config)) if args.config else FinetuneConfig()
    if args.init:
        cfg.init = args.init
    if args.task:
        cfg.tasks = [
            TaskConfig(kind=args.task, train=args.train or "", dev=args.dev or "", test=args.test or "")
        ]
    apply_overrides(cfg, rest)

    from sparsexpert.config import ConfigError
    from sparsexpert.finetune.trainer import Finetuner
    from sparsexpert.harness import RunStopped
    from sparsexpert.train.checkpoint import CheckpointError, NoSpaceError

    try:
        Finetuner(cfg, load_json(args.ds_config), args.output_dir, args.resume, args.overwrite).train()
    except (
        RunStopped,
        CheckpointError,
        NoSpaceError,
        ConfigError,
    ) as stop:  # explained in its message: no traceback
        print(f"sparsexpert: {stop}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
    from sparsexpert.comm import finish

    finish()  # not interpreter finalization: a torch/gloo race there can abort a finished run (see finish)
