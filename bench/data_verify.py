"""What checking a dataset at load costs: PackedDataset(verify=True) hashes every shard (sha256
against manifest.json) and finds its largest token id, once per shard file (then cached in
.verified.json by size and mtime).

    python bench/data_verify.py                 # 1 GiB of uint16 tokens, as 1 shard and as 16 shards
    python bench/data_verify.py --gib 4 --dir /scratch/tmp

Rows: the layout, the first open (every shard read and hashed; the files are in the page cache
since they were just written, so a cold disk adds its read time), the next open (cache hit), and
an open with verify=False (sizes and file names only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsexpert.data.format import FORMAT, MANIFEST
from sparsexpert.data.shards import VERIFIED, PackedDataset  # noqa: E402

SEQ_LEN, VOCAB = 2048, 32000


def write_dataset(root: Path, tokens: np.ndarray, n_shards: int) -> None:
    root.mkdir(parents=True)
    shards = []
    for i, part in enumerate(np.array_split(tokens.reshape(-1, SEQ_LEN), n_shards)):
        name = f"train_{i:05d}.bin"
        data = part.tobytes()
        (root / name).write_bytes(data)
        shards.append({"file": name, "num_sequences": len(part), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {
        "format": FORMAT,
        "seq_len": SEQ_LEN,
        "dtype": "uint16",
        "tokenizer": {"vocab_size": VOCAB},
        "splits": {"train": {"shards": shards}},
    }
    (root / MANIFEST).write_text(json.dumps(manifest))


def timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="dataset size")
    p.add_argument("--dir", default=None, help="where to write it (default: the system temp folder)")
    args = p.parse_args()
    n_tokens = int(args.gib * 2**30) // 2 // SEQ_LEN * SEQ_LEN
    tokens = np.random.default_rng(0).integers(0, VOCAB, n_tokens, dtype=np.uint16)
    t_hash = timed(hashlib.sha256, tokens.data)
    t_max = timed(tokens.max)
    print(
        f"{n_tokens * 2 / 2**30:.2f} GiB of uint16 tokens in memory: sha256 {t_hash:.2f} s, max {t_max:.2f} s"
    )
    print(f"{'layout':<22}{'first open':>12}{'next open':>12}{'verify=False':>14}")
    base = Path(tempfile.mkdtemp(prefix="data_verify.", dir=args.dir))
    try:
        for n_shards in (1, 16):
            root = base / f"s{n_shards}"
            write_dataset(root, tokens, n_shards)
            first = timed(PackedDataset, root, "train")
            assert (root / VERIFIED).is_file()
            again = timed(PackedDataset, root, "train")
            plain = timed(PackedDataset, root, "train", verify=False)
            label = (
                f"{n_shards} shard{'s' if n_shards > 1 else ''} of {n_tokens * 2 / n_shards / 2**20:,.0f} MiB"
            )
            print(f"{label:<22}{first:>11.2f}s{again:>11.3f}s{plain:>13.3f}s")
            shutil.rmtree(root)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
