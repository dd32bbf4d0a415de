"""Activation checkpointing (model.activation_checkpointing) against none: peak memory and step time.

    python bench/activation_checkpointing.py                        # the default size: CPU, or the GPU
    python bench/activation_checkpointing.py --layers 16 --seq-len 2048 --batch 8 --dtype bf16   # a GPU

One training step is the plain model's forward and backward (LM loss plus router losses) on a random
batch; both settings run side by side in one invocation, on the same weights and batch, and the script
prints each one's figures and the ratios (checkpointing / none). Step times are medians over --reps
steps after --warmup.

Memory, as measured:
  CUDA  torch.cuda.max_memory_allocated over the timed steps (the allocator's peak), and that peak less
        what was allocated just before the first step (weights, gradients): the step's own memory,
        activations first among it.
  CPU   there is no allocator peak to read, so each setting runs in a fresh process of its own and
        reports its peak resident set size (getrusage ru_maxrss), and that peak less its resident size
        just before the first step (interpreter, torch, weights, gradients already allocated). Resident
        memory is what the kernel lends the process, counted by pages: an honest upper bound of what the
        step needs, not the sum of the tensors' sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsexpert.model import ModelConfig, MoEConfig, build_model  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_config(args: argparse.Namespace, checkpointing: bool) -> ModelConfig:
    return ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        d_ff=args.d_ff,
        max_seq_len=args.seq_len,
        activation_checkpointing=checkpointing,
        moe=MoEConfig(num_experts=args.experts, top_k=args.top_k),
    )


def rss_bytes() -> int:
    """Resident set size now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args: argparse.Namespace, checkpointing: bool, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(model_config(args, checkpointing), seed=0).to(device, DTYPES[args.dtype]).train()
    for p in model.parameters():  # gradients exist before the first step, as after any other step
        p.grad = torch.zeros_like(p)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)

    def step() -> None:
        model(x, x).loss.backward()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before = rss_bytes()
    times = []
    for i in range(args.warmup + args.reps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated(device)
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"peak": peak, "step": peak - before, "time": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)

    if args.child:  # one setting in this fresh process (CPU), reported as JSON
        print(json.dumps(measure(args, args.child == "on", device)))
        return

    results = {}
    for setting in ("off", "on"):
        if device.type == "cuda":
            results[setting] = measure(args, setting == "on", device)
            torch.cuda.empty_cache()
        else:
            out = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--child", setting],
                check=True,
                capture_output=True,
                text=True,
            )
            results[setting] = json.loads(out.stdout.strip().splitlines()[-1])
    n_params = sum(p.numel() for p in build_model(model_config(args, False), seed=0).parameters())
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of a separate process"
    print(
        f"activation checkpointing | {n_params / 1e6:.1f}M parameters: {args.layers} layers, D={args.d_model}, "
        f"{args.experts} experts top-{args.top_k}, batch {args.batch} x seq {args.seq_len}, {args.dtype} | "
        f"{device.type} ({torch.get_num_threads()} threads), torch {torch.__version__} | memory: {memory}; "
        f"time: median of {args.reps}"
    )
    print(f"{'':16} {'peak MiB':>10} {'step MiB':>10} {'step s':>8}")
    for setting, name in (("off", "none"), ("on", "checkpointing")):
        r = results[setting]
        print(f"{name:16} {r['peak'] / 2**20:10.1f} {r['step'] / 2**20:10.1f} {r['time']:8.3f}")
    off, on = results["off"], results["on"]
    print(
        f"{'ratio':16} {on['peak'] / off['peak']:10.2f} {on['step'] / off['step']:10.2f} "
        f"{on['time'] / off['time']:8.2f}   (checkpointing / none)"
    )


if __name__ == "__main__":
    main()
