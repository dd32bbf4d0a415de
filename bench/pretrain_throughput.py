"""Pretraining throughput: our MoE vs the dense model of equal active parameters vs Hugging Face's
MixtralForCausalLM of the same size, 2 ranks, ZeRO-2, fp32 and bf16, one after the other in one run.

    python bench/pretrain_throughput.py                  # prepares the example data into /tmp
    python bench/pretrain_throughput.py --steps 60 --precisions fp32
    # this checkout against another (e.g. `git worktree add /tmp/before HEAD~1`), launches interleaved
    python bench/pretrain_throughput.py --baseline /tmp/before --skip_hf --repeats 2

Each configuration is a real `deepspeed --num_gpus 2` launch; tokens/s is the mean over the logged
intervals after the first (start-up excluded). MFU = achieved model FLOP/s over the matmul peak
measured here with the same thread count (2 ranks x OMP_NUM_THREADS threads), with the FLOPs per
token the runs log (`sparsexpert.metrics.flops_per_token`: 6 x the active parameters that multiply
+ 12 x layers x seq_len x d_model, forward and backward) and `sparsexpert.metrics.mfu`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def matmul_peak_flops(threads: int, dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def launch(script: str, args: list[str], out: Path, repo: Path = REPO) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", script, *args]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--d_expert", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--skip_hf", action="store_true")
    p.add_argument(
        "--baseline", type=Path, help="another checkout of sparsexpert: its launches alternate with ours"
    )
    p.add_argument("--repeats", type=int, default=1, help="launches of each configuration (means reported)")
    args = p.parse_args()

    from data_prep.pipeline import PrepConfig, prepare_example
    from sparsexpert.metrics import flops_per_token, mfu
    from sparsexpert.model import ModelConfig, MoEConfig, build_model

    work = Path(tempfile.mkdtemp(prefix="sparsexpert-bench-"))
    data = work / "data"
    prepare_example(data, PrepConfig(vocab_size=1024, seq_len=128), log=lambda *_: None)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    D, L, F, E, K = args.d_model, args.n_layers, args.d_expert, args.experts, args.top_k
    common = [
        f"--data.path={data}",
        f"--train.max_steps={args.steps}",
        "--train.log_every=10",
        "--train.save_every=0",
        f"--model.d_model={D}",
        f"--model.n_layers={L}",
        "--model.n_heads=4",
        "--model.max_seq_len=128",
        "--train.tensorboard=false",
    ]
    variants = {
        "sparsexpert MoE": [
            f"--model.moe.num_experts={E}",
            f"--model.moe.top_k={K}",
            f"--model.d_ff={F}",
            "--model.moe.ep_size=2",
        ],
        "dense (equal active)": ["--model.moe.num_experts=0", f"--model.d_ff={K * F}"],
    }
    seq = 128

    moe_cfg = ModelConfig(
        vocab_size=1024,
        d_model=D,
        n_layers=L,
        n_heads=4,
        d_ff=F,
        max_seq_len=seq,
        moe=MoEConfig(num_experts=E, top_k=K),
    )
    moe = build_model(moe_cfg, 0)
    fpt = flops_per_token(moe_cfg, moe.num_params()["active"], seq)
    print(
        f"model: D={D} L={L} E={E} top-{K} F={F}, {moe.num_params()['total'] / 1e6:.2f}M params, "
        f"{moe.num_params()['active'] / 1e6:.2f}M active; 2 ranks x {threads} threads; {args.steps} steps"
    )
    for precision in args.precisions:
        ds = REPO / "ds_configs" / ("moe_z2_bf16.json" if precision == "bf16" else "moe_z2.json")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        peak = matmul_peak_flops(threads, dtype)  # per rank
        results = {}
        trees = {"": REPO} if args.baseline is None else {"": REPO, " (baseline)": args.baseline.resolve()}
        for name, extra in variants.items():
            for tag, repo in trees.items():
                tps, loss = [], None
                for i in range(args.repeats):
                    out = work / f"{precision}-{name.split()[0]}{tag.strip(' ()')}-{i}"
                    shutil.rmtree(out, ignore_errors=True)
                    recs = launch(
                        "launcher/pretrain.py",
                        ["--ds_config", str(ds), "--output_dir", str(out), *common, *extra],
                        out,
                        repo,
                    )
                    tps.append(sum(r["tokens_per_s"] for r in recs[1:]) / len(recs[1:]))
                    loss = recs[-1]["lm_loss"]
                results[name + tag] = (sum(tps) / len(tps), loss)
        if not args.skip_hf:
            out = work / f"{precision}-hf"
            recs = launch(
                "bench/hf_mixtral_train.py",
                [
                    "--ds_config",
                    str(ds),
                    "--data",
                    str(data),
                    "--output_dir",
                    str(out),
                    f"--d_model={D}",
                    f"--n_layers={L}",
                    f"--d_expert={F}",
                    f"--experts={E}",
                    f"--top_k={K}",
                    f"--max_steps={args.steps}",
                ],
                out,
            )
            results["HF Mixtral (AutoEP)"] = (
                sum(r["tokens_per_s"] for r in recs[1:]) / len(recs[1:]),
                recs[-1]["loss"],
            )
        dense_tps = results["dense (equal active)"][0]
        print(f"\n{precision}: matmul peak {2 * peak / 1e9:.1f} GFLOP/s (2 ranks)")
        print(f"{'':35} {'tokens/s':>10} {'vs dense':>9} {'MFU':>6} {'final loss':>10}")
        for name, (tps, loss) in results.items():
            print(
                f"{name:35} {tps:10,.0f} {tps / dense_tps:8.2f}x {mfu(tps, fpt, 2, peak):6.1%} {loss:10.3f}"
            )
        if args.baseline is not None:
            for name in variants:
                ours, theirs = results[name][0], results[name + " (baseline)"][0]
                print(
                    f"{name}: this checkout / baseline = {ours / theirs:.3f} (tokens/s, mean of {args.repeats})"
                )


if __name__ == "__main__":
    main()
