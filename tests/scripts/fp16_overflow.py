"""Run under a launcher (ep_size = world size): fp16 with DeepSpeed's dynamic loss scaling at ZeRO-2 with
AutoEP, starting from an absurd loss scale (2^40) so that the first steps overflow.

Writes one JSON line per rank to the file given as the last argument: per step the loss, the precision
state, whether the weights changed; and the dtypes the fp16 engine computes the router and rope in.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sparsexpert.distributed import comm, parallel  # noqa: E402
from sparsexpert.model import ModelConfig, MoEConfig, build_model  # noqa: E402

STEPS = 30


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
        moe=MoEConfig(num_experts=4, top_k=2, ep_size=world),
    )
    ds = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "expert_parallel": {"enabled": True},
        # hysteresis 1: every overflow halves the scale (DeepSpeed's default 2 halves at the second)
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 40, "hysteresis": 1},
    }
    ds = parallel.prepare_ds_config(ds, cfg, world, max_steps=STEPS)
    parallel.check_precision_supported(ds, torch.device("cpu"))
    engine = parallel.initialize(build_model(cfg, seed=3), ds)
    module = engine.module
    gate = module.layers[0].mlp.router.gate
    x = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(rank))

    steps = []
    for _ in range(STEPS):
        before = module.layers[0].attn.wq.weight.detach().clone()
        out = engine(x, x)
        engine.backward(out.loss)
        engine.step()
        changed = not torch.equal(before, module.layers[0].attn.wq.weight)
        steps.append({"loss": out.loss.item(), "changed": changed, **parallel.precision_state(engine)})
    recorder = module._router_recorder
    with torch.no_grad():
        module.hidden_states(x)
    gates = [layer.mlp.router.gate for layer in module.layers]
    result = {
        "rank": rank,
        "steps": steps,
        "param_dtype": str(gate.weight.dtype),
        "gate_classes": [type(g).__name__ for g in gates],
        "recorder_hooks_the_gates": all(a is b for a, b in zip(recorder._hooked, gates)),
        "recorded_logits_dtypes": [str(t.dtype) for t in recorder.logits],
        "rope_dtype": str(module.rope_cos.dtype),
    }
    with open(sys.argv[-1], "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
    comm.finish()  # a torch/gloo race at interpreter finalization can abort a finished run (see finish)
