"""Run in a world of one: the native MoE backend (DeepSpeed-MoE's layer, swapped in as training does)
with and without activation checkpointing, on capacity-limited routing that draws random numbers
(Random Token Selection, Jitter noise) and drops assignments.

Writes one JSON line per case to the file given as the last argument: losses, the largest gradient
difference, and the drop counters after the forward and after the backward (which recomputes).
"""

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sparsexpert.distributed import comm, native_moe, parallel  # noqa: E402
from sparsexpert.model import ModelConfig, MoEConfig, build_model  # noqa: E402

CASES = [
    {"top_k": 1, "noisy_gate_policy": "Jitter"},  # use_rts defaults to true
    {"top_k": 2, "use_residual": True},
]


def run(moe: dict, checkpointing: bool) -> dict:
    cfg = ModelConfig(
        vocab_size=101,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        max_seq_len=16,
        activation_checkpointing=checkpointing,
        moe=MoEConfig(num_experts=4, backend="native", aux_loss_coef=0.5, z_loss_coef=0.1, **moe),
    )
    model = build_model(cfg, seed=3)
    native_moe.swap_in(model, cfg.moe, ep_size=1)
    model.train()
    x = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    out = model(x, x)
    drops = native_moe.drop_counts(model).tolist()
    out.loss.backward()
    return {
        "loss": out.loss.item(),
        "aux_z": [out.aux_loss.item(), out.z_loss.item()],
        "drops_forward": drops,
        "drops_after_backward": native_moe.drop_counts(model).tolist(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    }


def main() -> None:
    parallel.init_distributed()
    for moe in CASES:
        plain, ckpt = run(copy.deepcopy(moe), False), run(copy.deepcopy(moe), True)
        grads = plain.pop("grads")
        ckpt_grads = ckpt.pop("grads")
        row = {
            "case": moe,
            "plain": plain,
            "checkpointed": ckpt,
            "same_grad_names": sorted(grads) == sorted(ckpt_grads),
            "grad_diff": max((grads[k] - ckpt_grads[k]).abs().max().item() for k in grads),
        }
        with open(sys.argv[-1], "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
    comm.finish()  # a torch/gloo race at interpreter finalization can abort a finished run (see finish)
