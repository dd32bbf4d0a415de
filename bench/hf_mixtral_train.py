"""Train Hugging Face's MixtralForCausalLM on our shards under the same DeepSpeed config (AutoEP
preset "mixtral"); the baseline of bench/pretrain_throughput.py. Writes metrics.jsonl like ours.

    deepspeed --num_gpus 2 bench/hf_mixtral_train.py --ds_config ds_configs/moe_z2.json \\
        --data DIR --output_dir OUT --d_model 256 --n_layers 4 --n_heads 4 --d_expert 512 --experts 8 --top_k 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsexpert.config import load_json  # noqa: E402
from sparsexpert.data.shards import BatchPlan, PackedDataset, ShardLoader  # noqa: E402
from sparsexpert.distributed import comm, parallel  # noqa: E402
from sparsexpert.distributed.device import to_device  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("ds_config", "data", "output_dir"):
        p.add_argument(f"--{name}", required=True)
    for name, default in (
        ("d_model", 256),
        ("n_layers", 4),
        ("n_heads", 4),
        ("d_expert", 512),
        ("experts", 8),
        ("top_k", 2),
        ("max_steps", 40),
        ("log_every", 10),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()

    from transformers import MixtralConfig, MixtralForCausalLM

    device = parallel.init_distributed()
    rank, world = comm.rank(), comm.world_size()
    data = PackedDataset(args.data, "train")
    vocab = data.manifest["tokenizer"]["vocab_size"]
    # attn_implementation is one of PreTrainedConfig's keyword arguments (its __post_init__ takes **kwargs),
    # which the signature transformers' @strict dataclass shows to type checkers leaves out
    cfg = MixtralConfig(  # type: ignore[call-arg]
        vocab_size=vocab,
        hidden_size=args.d_model,
        intermediate_size=args.d_expert,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=data.seq_len,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg)
    ds = load_json(args.ds_config)
    ds["expert_parallel"] = {"enabled": True, "autoep_size": world}
    ds.setdefault("steps_per_print", 10**9)
    sched = ds.get("scheduler", {}).get("params")
    if sched is not None:
        sched["total_num_steps"] = args.max_steps
    triplet = parallel.batch_triplet(ds, world)
    engine = parallel.initialize(model, ds)
    loader = ShardLoader(data, BatchPlan(len(data), triplet.micro, triplet.grad_accum, world, rank, 1234))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "metrics.jsonl", "w") if rank == 0 else None
    tokens_per_step = triplet.global_batch * data.seq_len
    t0 = time.time()
    for step in range(1, args.max_steps + 1):
        for m in range(triplet.grad_accum):
            x = to_device(loader.batch(step - 1, m), device)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
        if step % args.log_every == 0:
            comm.barrier()
            elapsed = time.time() - t0
            if log:
                log.write(
                    json.dumps(
                        {
                            "step": step,
                            "loss": loss.item(),
                            "tokens_per_s": tokens_per_step * args.log_every / elapsed,
                        }
                    )
                    + "\n"
                )
                log.flush()
            t0 = time.time()


if __name__ == "__main__":
    main()
