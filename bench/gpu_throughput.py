"""GPU figures: tokens/s, MFU and peak memory of the MoE and of its dense twin (the same active
parameters per token) at a size that fills a GPU, bf16, side by side in one run.

    python bench/gpu_throughput.py                       # 1 GPU: d_model 1024, 8 layers, 16 experts top-2, seq 2048
    python bench/gpu_throughput.py --gpus 8 --experts 64 --d_model 2048 --n_layers 16 --micro 4
    python bench/gpu_throughput.py --activation_checkpointing   # also the MoE with recomputation
    python bench/gpu_throughput.py --cpu                 # tiny sizes on DeepSpeed's CPU accelerator: checks the script

Each configuration is a real `launcher/pretrain.py` run (through `deepspeed --num_gpus N` for N > 1)
on the built-in example world prepared at the sequence length; tokens/s is the mean of the logged
intervals after the first (start-up and warm-up excluded); peak memory is the largest
torch.cuda.max_memory_allocated the run logged. MFU = tokens/s x FLOPs per token / peak FLOP/s per GPU
(`sparsexpert.metrics.mfu`), with the FLOPs per token the runs log (`sparsexpert.metrics.flops_per_token`:
6 x the active parameters that multiply + 12 x layers x seq x d_model, forward and backward) and the
peak of a bf16 matmul measured on this GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def matmul_peak(device: str, dtype: torch.dtype, n: int, reps: int = 20) -> float:
    """FLOP/s of an n x n x n matmul on one device."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--d_model", type=int, default=1024)
    p.add_argument("--n_layers", type=int, default=8)
    p.add_argument("--n_heads", type=int, default=16)
    p.add_argument("--d_expert", type=int, default=2816, help="each expert's hidden size")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro", type=int, default=4, help="sequences per GPU and micro-batch")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--activation_checkpointing", action="store_true", help="add the MoE with recomputation")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on DeepSpeed's CPU accelerator (fp32)")
    p.add_argument("--out", help="folder for the runs (default: a temporary one)")
    args = p.parse_args()
    if args.cpu:
        args.gpus, args.d_model, args.n_layers, args.n_heads = 1, 64, 2, 4
        args.d_expert, args.experts, args.seq, args.micro, args.steps = 128, 4, 64, 4, 6

    from data_prep.pipeline import PrepConfig, prepare_example
    from sparsexpert.data.format import is_dataset
    from sparsexpert.data.shards import read_manifest
    from sparsexpert.metrics import flops_per_token, mfu
    from sparsexpert.model import ModelConfig, MoEConfig
    from sparsexpert.model.transformer import Transformer

    work = Path(args.out or tempfile.mkdtemp(prefix="sparsexpert-gpu-bench-"))
    data = work / f"data_{args.seq}"
    vocab = 4096 if not args.cpu else 512
    if not is_dataset(data):
        prepare_example(data, PrepConfig(vocab_size=vocab, seq_len=args.seq), log=lambda *_: None)
    vocab = read_manifest(data)["tokenizer"]["vocab_size"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.cpu:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    ds = json.loads((REPO / "ds_configs" / ("moe_z2.json" if args.cpu else "moe_z2_bf16.json")).read_text())
    ds["train_micro_batch_size_per_gpu"] = args.micro
    ds_path = work / "ds.json"
    ds_path.write_text(json.dumps(ds))

    D, L, F, E, K, S = args.d_model, args.n_layers, args.d_expert, args.experts, args.top_k, args.seq
    shape = [f"--model.d_model={D}", f"--model.n_layers={L}", f"--model.n_heads={args.n_heads}"]
    shape += [f"--model.max_seq_len={S}", f"--model.vocab_size={vocab}"]
    variants = {
        "MoE": [f"--model.moe.num_experts={E}", f"--model.moe.top_k={K}", f"--model.d_ff={F}"],
        "dense twin": ["--model.moe.num_experts=0", f"--model.d_ff={K * F}"],
    }
    if args.activation_checkpointing:
        variants["MoE, recomputed"] = [*variants["MoE"], "--model.activation_checkpointing=true"]

    def flops(extra: list[str]) -> float:
        moe = "--model.moe.num_experts=0" not in extra
        cfg = ModelConfig(
            vocab_size=vocab,
            d_model=D,
            n_layers=L,
            n_heads=args.n_heads,
            d_ff=F if moe else K * F,
            max_seq_len=S,
        )
        cfg.moe = MoEConfig(num_experts=E if moe else 0, top_k=K)
        with torch.device("meta"):
            return flops_per_token(cfg, Transformer(cfg).num_params()["active"], S)

    device = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.cpu else torch.bfloat16
    peak = matmul_peak(device, dtype, 1024 if args.cpu else 8192)
    name = "CPU" if args.cpu else torch.cuda.get_device_name(0)
    print(
        f"{args.gpus} x {name}: measured {dtype} matmul peak {peak / 1e12:.1f} TFLOP/s per device | "
        f"D={D} L={L} E={E} top-{K} F={F} seq {S} micro {args.micro} vocab {vocab} | {args.steps} steps",
        flush=True,
    )
    # label, tokens/s, MFU, peak memory (GB), last loss; None where the run failed
    rows: list[tuple[str, float | None, float | None, float | None, float | None]] = []
    for label, extra in variants.items():
        out = work / label.replace(" ", "_").replace(",", "")
        script = [
            "launcher/pretrain.py",
            "--ds_config",
            str(ds_path),
            "--output_dir",
            str(out),
            f"--data.path={data}",
        ]
        script += [
            *shape,
            *extra,
            f"--train.max_steps={args.steps}",
            "--train.log_every=5",
            "--train.eval_every=0",
        ]
        script += [
            "--train.save_every=0",
            "--train.tensorboard=false",
            f"--model.moe.ep_size={args.gpus if 'MoE' in label else 0}",
        ]
        if args.gpus > 1:
            cmd = [
                str(Path(sys.executable).with_name("deepspeed")),
                "--num_gpus",
                str(args.gpus),
                "--master_port",
                str(free_port()),
                *script,
            ]
        else:
            cmd = [sys.executable, *script]
            env["MASTER_PORT"] = str(free_port())
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(f"{label}: failed\n{(proc.stdout + proc.stderr)[-3000:]}", flush=True)
            rows.append((label, None, None, None, None))
            continue
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        tps = sum(r["tokens_per_s"] for r in recs[1:]) / max(len(recs[1:]), 1)
        mem = max((r.get("max_memory_gb", 0.0) for r in recs), default=0.0)
        rows.append((label, tps, mfu(tps, flops(extra), args.gpus, peak), mem, recs[-1]["loss"]))
    print(f"{'':18} {'tokens/s':>12} {'vs dense':>9} {'MFU':>7} {'peak GB':>8} {'loss':>8}")
    dense = next((r[1] for r in rows if r[0] == "dense twin"), None)
    for label, tps, util, mem, loss in rows:
        if tps is None:
            print(f"{label:18} {'failed':>12}")
            continue
        ratio = f"{tps / dense:8.2f}x" if dense else f"{'-':>9}"
        print(f"{label:18} {tps:12,.0f} {ratio} {util:7.1%} {mem:8.2f} {loss:8.3f}")


if __name__ == "__main__":
    main()
