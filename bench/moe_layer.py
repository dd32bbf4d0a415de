"""MoE block versus a dense SwiGLU of equal active FLOPs: forward+backward time and activation memory.

    python bench/moe_layer.py                      # the default grid, fp32
    python bench/moe_layer.py --dtype bf16 --tokens 4096 --experts 8 --top-k 2

For each (tokens T, experts E, top-k K) it times, side by side in one process:
  dense   SwiGLU with hidden K*F (the FLOPs one token spends in K experts of width F)
  ours    sparsexpert's MoEBlock (router, sort, per-expert matmuls on unbound weights, combine)
  autoep  DeepSpeed AutoEP's replacement of our block (ep_size=1, so no collectives), grouped_mm
          and sequential-loop expert kernels
  native  DeepSpeed-MoE's own layer (model.moe.backend=native, ep_size=1) with capacity factor 1.0,
          1.25 and 2.0 (overflow dropped) and dropless
and prints each one's time and its ratio to dense, the bytes of tensors saved for backward
(activation memory) and their ratio to dense, and the share of token-expert assignments the native
layer dropped at each capacity (random inputs, router at init: near-uniform routing). Timings are
medians over --reps after --warmup runs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsexpert.model.moe import MoEBlock, SwiGLU  # noqa: E402

if TYPE_CHECKING:
    from sparsexpert.distributed.native_moe import NativeMoE


def autoep_block(block: MoEBlock, use_grouped_mm: bool) -> nn.Module:
    """Let AutoEP replace `block` exactly as deepspeed.initialize would, at ep_size=1."""
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config

    from sparsexpert.distributed.parallel import AUTOEP_MODULE_LAYOUT

    holder = nn.Module()
    holder.layers = nn.ModuleList([nn.Module()])
    holder.layers[0].mlp = copy.deepcopy(block)
    cfg = parse_autoep_config(
        {
            "enabled": True,
            "autoep_size": 1,
            "top_k": block.top_k,
            "use_grouped_mm": use_grouped_mm,
            **AUTOEP_MODULE_LAYOUT,
        }
    )
    auto = AutoEP(holder, cfg)
    auto.replace_moe_layers(auto.ep_parser(), ep_size=1, ep_rank=0)
    return holder.layers[0].mlp


NATIVE_CAPACITIES = (1.0, 1.25, 2.0, None)  # None: dropless


def native_name(capacity: float | None) -> str:
    return "native drop." if capacity is None else f"native c{capacity:g}"


def native_block(block: MoEBlock, capacity: float | None) -> NativeMoE:
    """DeepSpeed's native MoE layer holding `block`'s weights, as model.moe.backend=native builds it (ep_size=1)."""
    from sparsexpert.distributed import native_moe
    from sparsexpert.model.config import MoEConfig

    cfg = MoEConfig(
        num_experts=block.num_experts,
        top_k=block.top_k,
        backend="native",
        capacity_factor=capacity or 1.0,
        drop_tokens=capacity is not None,
        use_rts=False,
    )
    mlp = MoEBlock(block.gate.in_features, block.experts.w1.shape[1], block.num_experts, block.top_k)
    mlp.load_state_dict(block.state_dict())
    holder = nn.Module()
    holder.mlp = mlp
    native_moe.swap_in(holder, cfg, ep_size=1)
    native = holder.mlp
    if not isinstance(native, native_moe.NativeMoE):
        raise TypeError(f"swap_in left a {type(native).__name__}, not a NativeMoE")
    native.set_deepspeed_parallelism()
    return native


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward, weights excluded
    (they are the same storage as the parameters, which are not activation memory)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return sum(seen.values())


def time_fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, warmup: int, reps: int) -> float:
    times = []
    for i in range(warmup + reps):
        module.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        t0 = time.perf_counter()
        module(xi).backward(grad)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-expert", type=int, default=512)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    from sparsexpert.distributed.parallel import init_distributed

    init_distributed()  # a world of one: the native layer's expert-parallel group has one rank
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    D, F = args.d_model, args.d_expert
    print(
        f"MoE block vs dense SwiGLU of equal active FLOPs | D={D} F={F} {args.dtype} threads={args.threads} "
        f"torch {torch.__version__} | median of {args.reps}"
    )
    names = ["ours", "autoep gmm", "autoep loop", *map(native_name, NATIVE_CAPACITIES)]
    header = (
        f"{'T':>6} {'E':>3} {'K':>2} {'tok/exp':>7} | {'dense ms':>8} | "
        + " | ".join(f"{n:>13}" for n in names)
        + " | act mem vs dense: ours, autoep, native c1.25, dropless | dropped c1/1.25/2"
    )
    print(header)
    print("-" * len(header))
    for T in args.tokens:
        for E in args.experts:
            for K in args.top_k:
                torch.manual_seed(0)
                block = MoEBlock(D, F, E, K)
                for p in block.parameters():
                    nn.init.normal_(p, std=0.02)
                dense = SwiGLU(D, K * F)
                natives = {native_name(c): native_block(block, c) for c in NATIVE_CAPACITIES}
                impls: dict[str, nn.Module] = {
                    "dense": dense,
                    "ours": block,
                    "autoep gmm": autoep_block(block, True),
                    "autoep loop": autoep_block(block, False),
                    **natives,
                }
                impls = {k: m.to(dtype) for k, m in impls.items()}
                x = torch.randn(1, T, D, dtype=dtype)
                grad = torch.randn(1, T, D, dtype=dtype)
                ms = {k: 1e3 * time_fwd_bwd(m, x, grad, args.warmup, args.reps) for k, m in impls.items()}
                mem_of = ("dense", "ours", "autoep gmm", native_name(1.25), native_name(None))
                mem = {k: saved_bytes(impls[k], x.detach().requires_grad_(True)) for k in mem_of}
                dropped = []
                for c in NATIVE_CAPACITIES[:-1]:
                    layer = natives[native_name(c)]  # the module of impls, converted to dtype in place
                    with torch.no_grad():
                        layer(x)
                    if layer.dropped is None or layer.routed is None:
                        raise RuntimeError(f"{native_name(c)}: no drop counts after a forward")
                    dropped.append(f"{layer.dropped.item() / layer.routed.item():.1%}")
                cells = [f"{ms[k]:8.1f} {ms[k] / ms['dense']:4.2f}x" for k in names]
                mems = ", ".join(f"{mem[k] / mem['dense']:.2f}x" for k in mem_of[1:])
                print(
                    f"{T:>6} {E:>3} {K:>2} {T * K // E:>7} | {ms['dense']:8.1f} | "
                    + " | ".join(cells)
                    + f" | {mems} | {'/'.join(dropped)}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
