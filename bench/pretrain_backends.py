"""The two MoE backends in a short pretraining run: AutoEP (dropless) against DeepSpeed-MoE's native
layer (dropless, and capacity-limited), 2 ranks, ep_size=2, ZeRO-2, the same model, data and steps.

    python bench/pretrain_backends.py                    # prepares the example data into /tmp
    python bench/pretrain_backends.py --steps 100 --capacities 1.0 1.25 2.0

Each configuration is a real `deepspeed --num_gpus 2` launch, one after the other. Printed per
backend: tokens/s (mean over the logged intervals after the first, start-up excluded) and its ratio
to AutoEP, the training loss (LM loss, averaged over the last logged interval) after the same
number of steps, and the share of token-expert assignments the native layer dropped, averaged over
layers and over the run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.pretrain_throughput import launch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--d_expert", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--capacities", type=float, nargs="+", default=[1.0, 1.25])
    args = p.parse_args()

    from data_prep.pipeline import PrepConfig, prepare_example

    work = Path(tempfile.mkdtemp(prefix="sparsexpert-backends-"))
    data = work / "data"
    prepare_example(data, PrepConfig(vocab_size=1024, seq_len=128), log=lambda *_: None)
    common = [
        f"--data.path={data}",
        f"--train.max_steps={args.steps}",
        "--train.log_every=10",
        "--train.save_every=0",
        "--train.eval_every=0",
        "--train.tensorboard=false",
        f"--model.d_model={args.d_model}",
        f"--model.n_layers={args.n_layers}",
        "--model.n_heads=4",
        "--model.max_seq_len=128",
        f"--model.d_ff={args.d_expert}",
        f"--model.moe.num_experts={args.experts}",
        f"--model.moe.top_k={args.top_k}",
        "--model.moe.ep_size=2",
    ]
    native = ["--model.moe.backend=native"]
    variants = {
        "autoep (dropless)": [],
        "native dropless": [*native, "--model.moe.drop_tokens=false"],
        **{
            f"native capacity {c:g}": [
                *native,
                f"--model.moe.capacity_factor={c}",
                "--model.moe.use_rts=false",
            ]
            for c in args.capacities
        },
    }
    print(
        f"model: D={args.d_model} L={args.n_layers} E={args.experts} top-{args.top_k} F={args.d_expert}; "
        f"2 ranks, ep_size=2, ZeRO-2, fp32; {args.steps} steps of the same data"
    )
    print(f"{'':22} {'tokens/s':>10} {'vs autoep':>9} {'final lm loss':>13} {'dropped':>8}")
    base = None
    for name, extra in variants.items():
        out = work / name.replace(" ", "_").replace("(", "").replace(")", "")
        ds = REPO / "ds_configs" / "moe_z2.json"
        recs = [
            r
            for r in launch(
                "launcher/pretrain.py",
                ["--ds_config", str(ds), "--output_dir", str(out), *common, *extra],
                out,
            )
            if "tokens_per_s" in r
        ]
        tps = sum(r["tokens_per_s"] for r in recs[1:]) / len(recs[1:])
        base = base or tps
        fracs = [
            sum(r["dropped_frac"].values()) / len(r["dropped_frac"]) for r in recs if "dropped_frac" in r
        ]
        dropped = f"{sum(fracs) / len(fracs):.1%}" if fracs else "-"
        print(
            f"{name:22} {tps:10,.0f} {tps / base:8.2f}x {recs[-1]['lm_loss']:13.4f} {dropped:>8}", flush=True
        )


if __name__ == "__main__":
    main()
