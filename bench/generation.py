"""Generation with the key-value cache against recomputing the context for every token: tokens/s.

    python bench/generation.py                                   # CPU: the default size
    python bench/generation.py --device cuda --d_model 1024 --layers 8 --max_seq_len 2048 --new 512

A random MoE of the given size (greedy decoding, no end-of-sequence, so both settings produce exactly
--new tokens per prompt), for one prompt and for a batch of --batch prompts of different lengths; both
settings run side by side in one invocation on the same weights and prompts, after one warm-up run
each. Prints new tokens per second (all rows), the ratio cache / recompute, and whether the tokens are
equal (they must be: tests/test_generate.py checks it at a small size).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsexpert.generate import generate_batch  # noqa: E402
from sparsexpert.model import ModelConfig, MoEConfig, build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (the batch: 1/2 to 1x this)")
    p.add_argument("--new", type=int, default=256, help="new tokens per prompt")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=max(1, args.d_model // 64),
        d_ff=4 * args.d_model,
        max_seq_len=args.max_seq_len,
        moe=MoEConfig(num_experts=args.experts, top_k=args.top_k),
    )
    model = build_model(cfg, seed=0).to(args.device).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.linspace(args.prompt // 2, args.prompt, args.batch).long().tolist()
    batch = [torch.randint(0, args.vocab, (n,), generator=g).tolist() for n in lengths]
    print(
        f"model: d_model {args.d_model}, {args.layers} layers, {args.experts} experts top-{args.top_k}, "
        f"{sum(q.numel() for q in model.parameters()) / 1e6:.1f}M parameters, {args.device}, "
        f"torch threads {torch.get_num_threads()}; {args.new} new tokens per prompt"
    )
    print(f"{'prompts':>22} | {'recompute tok/s':>15} | {'cache tok/s':>11} | {'ratio':>6} | same tokens")
    for name, prompts in (
        (f"1 x {args.prompt} tokens", [batch[-1]]),
        (f"{args.batch} x {lengths[0]}-{lengths[-1]}", batch),
    ):
        rates, outs = {}, {}
        for use_cache in (False, True):
            generate_batch(model, prompts, 4, use_cache=use_cache)  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs[use_cache] = generate_batch(model, prompts, args.new, use_cache=use_cache)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            rates[use_cache] = len(prompts) * args.new / (time.perf_counter() - t0)
        print(
            f"{name:>22} | {rates[False]:15.1f} | {rates[True]:11.1f} | {rates[True] / rates[False]:5.1f}x | "
            f"{outs[True] == outs[False]}"
        )


if __name__ == "__main__":
    main()
