"""Run under a launcher with 2 ranks: after AutoEP has replaced our MoE blocks (ep_size=2), the
engine must compute what the plain model computes, router losses and expert counts included.

Writes one JSON line per rank to the file given as the last argument.
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sparsexpert.distributed import comm, parallel  # noqa: E402
from sparsexpert.model import ModelConfig, MoEConfig, build_model  # noqa: E402


def main() -> None:
    parallel.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig(
        vocab_size=101,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        max_seq_len=16,
        moe=MoEConfig(num_experts=4, top_k=2, num_shared_experts=1, aux_loss_coef=0.5, z_loss_coef=0.1),
    )
    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "expert_parallel": {"enabled": True},
    }
    ds = parallel.prepare_ds_config(ds, cfg, world, max_steps=1)
    model = build_model(cfg, seed=3)
    reference = copy.deepcopy(model)
    engine = parallel.initialize(model, ds)
    replaced = type(engine.module.layers[0].mlp).__name__

    x = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(rank))
    out = engine(x, x)
    ref = reference(x, x)
    out.loss.backward()  # plain autograd (ZeRO-0 adds no hooks): the rank-local gradient, before any all-reduce
    ref.loss.backward()
    gate_grad = engine.module.layers[0].mlp.router.gate.weight.grad
    expert_ids = {id(p) for n, p in engine.module.named_parameters() if ".experts." in n}
    groups = [
        {
            "name": g.get("name"),
            "moe": bool(g.get("moe")),
            "experts": sum(id(p) in expert_ids for p in g["params"]),
            "params": len(g["params"]),
        }
        for g in engine.basic_optimizer.param_groups
    ]
    result = {
        "param_groups": groups,
        "rank": rank,
        "replaced": replaced,
        "local_experts": engine.module.layers[0].mlp.experts.w1.shape[0],
        "logits_diff": (out.logits - ref.logits).abs().max().item(),
        "losses": [
            [getattr(out, k).item(), getattr(ref, k).item()] for k in ("lm_loss", "aux_loss", "z_loss")
        ],
        "counts_equal": torch.equal(out.expert_counts, ref.expert_counts),
        "gate_grad_diff": (gate_grad - reference.layers[0].mlp.gate.weight.grad).abs().max().item(),
    }
    with open(sys.argv[-1], "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
    comm.finish()  # a torch/gloo race at interpreter finalization can abort a finished run (see finish)
