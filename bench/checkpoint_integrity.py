"""What checkpoint integrity costs: checksums and fsync at save, verification at load, beside the save
and load themselves, on a real DeepSpeed checkpoint (one process, ZeRO-2, fp32, Adam state present).

    python bench/checkpoint_integrity.py                          # ~420 MB of checkpoint, CPU
    python bench/checkpoint_integrity.py --d_model 512 --layers 8 # larger

Printed, as medians over --reps saves:
  save   DeepSpeed's save_checkpoint alone (the checkpoint as DeepSpeed writes it, no fsync), that
         followed by an fsync of every file (what durability alone costs), and checkpoint.save (that, plus RNG states, metadata, each file fsynced and checksummed, the folders
         fsynced, COMPLETE.json and `latest`); the difference is what integrity costs a save. Beside
         them: hashing the tag's files alone right after the save (in the page cache, as at save
         time) with xxh3-128 (ours), sha256 and blake2b.
  load   engine.load_checkpoint from a cold page cache (the tag's pages evicted with
         posix_fadvise DONTNEED, only this benchmark's files), against `verify` from a cold cache
         followed by the load (which then reads from the cache): a resume's cost with and without the
         check. fsync needs the disk under --out, so point it at the disk checkpoints go to.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

from sparsexpert.distributed import parallel  # noqa: E402
from sparsexpert.model import ModelConfig, MoEConfig, build_model  # noqa: E402
from sparsexpert.weights import checkpoint  # noqa: E402


def evict(folder: Path) -> None:
    """Drop a folder's files from the page cache (written back first), so the next read hits the disk."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def fsync_all(folder: Path) -> float:
    """Seconds to fsync every file and folder of `folder` (what a durable save adds to DeepSpeed's)."""
    t = time.perf_counter()
    for f in [*folder.rglob("*"), folder]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t


def hash_all(folder: Path, make) -> float:
    t = time.perf_counter()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h = make()
            with open(f, "rb") as fh:
                while chunk := fh.read(8 << 20):
                    h.update(chunk)
            h.hexdigest()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d_model", type=int, default=320)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d_ff", type=int, default=640)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for the checkpoints (default: a temporary one)")
    args = ap.parse_args()

    import json

    import xxhash

    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=8,
        d_ff=args.d_ff,
        max_seq_len=64,
        moe=MoEConfig(num_experts=args.experts, top_k=2),
    )
    parallel.init_distributed()
    ds_json = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "moe_z2.json").read_text())
    ds_json["train_micro_batch_size_per_gpu"] = 2
    ds_json["gradient_accumulation_steps"] = 1
    ds = parallel.prepare_ds_config(ds_json, cfg, 1, 10, args.vocab, 64)
    engine = parallel.initialize(build_model(cfg, seed=0), ds)
    ids = torch.randint(0, args.vocab, (2, 64))
    out = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    engine.step()  # Adam's moments exist now

    base = Path(args.out or tempfile.mkdtemp(prefix="ckpt_bench_"))
    ds_times, synced_times, our_times, sizes = [], [], [], 0
    hash_times: dict[str, list[float]] = {"xxh3_128": [], "sha256": [], "blake2b": []}
    for rep in range(args.reps):
        root_a, root_b = base / f"ds{rep}", base / f"ours{rep}"
        t = time.perf_counter()
        engine.save_checkpoint(str(root_a), tag="step_00000001", save_latest=False)
        ds_times.append(time.perf_counter() - t)
        synced_times.append(ds_times[-1] + fsync_all(root_a / "step_00000001"))
        t = time.perf_counter()
        tag = checkpoint.save(engine, root_b, 1, {"step": 1}, None)
        our_times.append(time.perf_counter() - t)
        sizes = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file())
        for name, make in (
            ("xxh3_128", xxhash.xxh3_128),
            ("sha256", hashlib.sha256),
            ("blake2b", hashlib.blake2b),
        ):
            hash_times[name].append(hash_all(tag, make))

    tag = base / "ours0" / "step_00000001"
    cold_load, verify_then_load, verify_cold = [], [], []
    for _ in range(args.reps):
        evict(tag)
        t = time.perf_counter()
        engine.load_checkpoint(str(tag.parent), tag=tag.name)
        cold_load.append(time.perf_counter() - t)
        evict(tag)
        t = time.perf_counter()
        check = checkpoint.verify(tag)
        verify_cold.append(time.perf_counter() - t)
        assert check.ok, check.problems
        engine.load_checkpoint(str(tag.parent), tag=tag.name)
        verify_then_load.append(time.perf_counter() - t)

    med = statistics.median
    mb = sizes / 2**20
    print(
        f"checkpoint: {mb:,.0f} MiB in {len(list(tag.rglob('*')))} files, {cfg.n_layers} layers x {args.experts} experts, ZeRO-2 fp32, under {base}"
    )
    print(f"save (medians of {args.reps})")
    print(f"  DeepSpeed save_checkpoint alone      {med(ds_times):7.3f} s")
    print(f"  ... and each file fsynced            {med(synced_times):7.3f} s")
    print(
        f"  checkpoint.save (fsync + checksums)  {med(our_times):7.3f} s   overhead "
        f"{med(our_times) - med(ds_times):+.3f} s ({med(our_times) / med(ds_times):.2f}x) over DeepSpeed alone, "
        f"{med(our_times) - med(synced_times):+.3f} s over DeepSpeed + fsync"
    )
    for name, times in hash_times.items():
        print(
            f"  hash only, page cache, {name:9s}  {med(times):7.3f} s   {mb / med(times) / 1024:5.2f} GiB/s"
        )
    print("load")
    print(f"  engine.load_checkpoint, cold cache   {med(cold_load):7.3f} s")
    print(f"  verify alone, cold cache             {med(verify_cold):7.3f} s")
    print(
        f"  verify + load, cold cache            {med(verify_then_load):7.3f} s   overhead {med(verify_then_load) - med(cold_load):+.3f} s ({med(verify_then_load) / med(cold_load):.2f}x)"
    )
    if args.out is None:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
