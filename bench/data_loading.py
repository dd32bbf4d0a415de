"""Data loading per micro-batch: the former per-row code against the vectorized one, in one run.

    python bench/data_loading.py                     # micro-batches 8 and 32, rows of 128 and 512 tokens
    python bench/data_loading.py --micro 16 --seq-len 256 --reps 50

The built-in example world is prepared (data_prep, with its KG) once per seq_len into a temporary
folder, with --rows-per-shard rows a shard so that a micro-batch reads from several shards. For each
(seq_len, micro-batch) it times, on the same micro-batches, with the same random generators:
  gather   the rows from the memmapped shards (former: a Python loop over rows, np.stack, a tensor;
           ours: PackedDataset.rows, one fancy index per shard)
  inject   K-BERT injection of those rows, mentions looked up, tensors out (former: Injector.inject_row
           per row with its Python loop over tokens and its own S x S mask; ours: Injector.inject);
           every triple's branch tokens are encoded beforehand, once a run in both
  fusion   the ERNIE fusion batch (former and ours: fusion_batch)
and prints the median milliseconds per micro-batch over --reps micro-batches (after --warmup) and
the ratio former / ours. Every result is checked equal to the former one before it is timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The former per-row code (before vectorization) lives beside the tests that check ours against it.
sys.path.append(str(REPO / "tests"))

import former_data_path  # noqa: E402

from data_prep.pipeline import PrepConfig, prepare_example  # noqa: E402
from data_prep.tokenizer import load_tokenizer  # noqa: E402
from sparsexpert.data.knowledge import DatasetKG, Injector, RowKnowledge, fusion_batch  # noqa: E402
from sparsexpert.data.shards import BatchPlan, PackedDataset  # noqa: E402
from sparsexpert.knowledge.config import KnowledgeConfig  # noqa: E402


def median_ms(fn, batches: list[int], warmup: int) -> float:
    for g in batches[:warmup]:
        fn(g)
    times = []
    for g in batches[warmup:]:
        t0 = time.perf_counter()
        fn(g)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cases(data: PackedDataset, data_dir: Path, micro: int) -> dict[str, tuple]:
    """name -> (former, ours, equal): former(g) and ours(g) build micro-batch g of one rank."""
    kg, rk = DatasetKG.load(data_dir), RowKnowledge(data_dir, "train")
    tok = load_tokenizer(data_dir / "tokenizer.model")
    inject_cfg, fusion_cfg = KnowledgeConfig(mode="inject"), KnowledgeConfig(mode="fusion")
    former_inj, inj = former_data_path.Injector(kg, tok, inject_cfg), Injector(kg, tok, inject_cfg)
    for t in np.flatnonzero(kg.triples[:, 0] >= 0).tolist():  # each triple is encoded once a run
        former_inj.branch(t), inj.branch(t)
    plan = BatchPlan(len(data), micro, 1, 1, 0, seed=0)

    def rng(g: int) -> np.random.Generator:
        return np.random.default_rng([0, g, 0, 7])  # as KnowledgeLoader seeds micro-batch 0 of batch g

    def former_inject(g: int) -> dict[str, torch.Tensor]:
        rows, r = plan.rows(g, 0), rng(g)
        x = former_data_path.gather(data, rows)
        parts = [
            former_inj.inject_row(x[b].cpu().numpy(), former_data_path.select(rk.spans, int(row))[:, 1:], r)
            for b, row in enumerate(rows)
        ]
        return {k: torch.from_numpy(np.stack([p[k] for p in parts])) for k in parts[0]}

    def ours_inject(g: int) -> dict[str, torch.Tensor]:
        rows = plan.rows(g, 0)
        out = inj.inject(data.rows(rows), *rk.batch_mentions(rows), rng(g))
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    seq_len = data.seq_len
    return {
        "gather": (
            lambda g: former_data_path.gather(data, plan.rows(g, 0)),
            lambda g: torch.from_numpy(data.rows(plan.rows(g, 0))),
            torch.equal,
        ),
        "inject": (former_inject, ours_inject, same),
        "fusion": (
            lambda g: former_data_path.fusion_batch(kg, rk, plan.rows(g, 0), seq_len, fusion_cfg, rng(g)),
            lambda g: fusion_batch(kg, rk, plan.rows(g, 0), seq_len, fusion_cfg, rng(g)),
            lambda a, b: same(vars(a), vars(b)),
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro", type=int, nargs="+", default=[8, 32], help="micro-batch sizes")
    p.add_argument("--seq-len", type=int, nargs="+", default=[128, 512])
    p.add_argument("--reps", type=int, default=20, help="micro-batches timed")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows-per-shard", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp(prefix="bench-data-loading-"))
    batches = list(range(args.warmup + args.reps))
    print(f"{'':8} {'seq_len':>7} {'micro':>5} {'former ms':>10} {'ours ms':>9} {'former/ours':>12}")
    for seq_len in args.seq_len:
        data_dir = work / f"example_{seq_len}"
        cfg = PrepConfig(seq_len=seq_len, rows_per_shard=args.rows_per_shard)
        prepare_example(data_dir, cfg, log=lambda *_: None)
        data = PackedDataset(data_dir, "train")
        for micro in args.micro:
            for name, (former, ours, equal) in cases(data, data_dir, micro).items():
                assert all(equal(former(g), ours(g)) for g in batches[:3]), f"{name}: results differ"
                t_former = median_ms(former, batches, args.warmup)
                t_ours = median_ms(ours, batches, args.warmup)
                print(
                    f"{name:8} {seq_len:7} {micro:5} {t_former:10.3f} {t_ours:9.3f} {t_former / t_ours:11.1f}x"
                )
        print(f"  (seq_len {seq_len}: {len(data)} train rows in {len(data.shards)} shards)")
    print(f"medians over {args.reps} micro-batches after {args.warmup}; one thread")


if __name__ == "__main__":
    main()
