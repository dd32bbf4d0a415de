"""Count the host synchronizations of the training loops, per optimizer step (run by tests/test_harness.py).

On a GPU, reading a device tensor on the host (`.item()`, `.tolist()`, `float()`, `int()`, `bool()`,
`.cpu()`, `.numpy()`, `nonzero`, indexing with a boolean mask) waits for the device to finish
everything queued before it. On the CPU nothing waits, but the same calls mark where a GPU would.
This script counts them on the loop's thread, inside each `Harness.step` and each `Harness.interval`,
attributed to the first caller outside torch (sparsexpert, DeepSpeed, other), then runs an entry
point in this process and writes one JSON line per window:

    {"window": "step", "step": 3, "ours": 0, "deepspeed": 2, "other": 0, "where": {"deepspeed/...:123 item": 2}}

    python tests/scripts/count_host_syncs.py OUT.jsonl launcher/pretrain.py --ds_config ... --train.max_steps=6
    deepspeed --num_gpus 2 tests/scripts/count_host_syncs.py OUT.jsonl launcher/pretrain.py ...   (OUT.rank<r>.jsonl)
"""

from __future__ import annotations

import collections
import json
import os
import runpy
import sys
import threading
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from sparsexpert.distributed import comm  # noqa: E402
from sparsexpert.harness import Harness  # noqa: E402

TORCH_DIR = str(Path(torch.__file__).parent)
SYNCING_METHODS = (
    "item",
    "tolist",
    "__float__",
    "__int__",
    "__bool__",
    "__index__",
    "cpu",
    "numpy",
    "nonzero",
    "bincount",
    "repeat_interleave",
)
SYNCING_FUNCTIONS = ("nonzero", "unique", "masked_select", "bincount", "repeat_interleave")


class Counter:
    def __init__(self) -> None:
        self.window: str | None = None
        self.calls: collections.Counter = collections.Counter()
        self.main = threading.get_ident()

    def record(self, kind: str) -> None:
        if self.window is None or threading.get_ident() != self.main:
            return
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
            frame = frame.f_back
        path = frame.f_code.co_filename if frame is not None else "?"
        owner = (
            "ours"
            if f"{os.sep}sparsexpert{os.sep}" in path
            else "deepspeed"
            if "deepspeed" in path
            else "other"
        )
        short = path.split("site-packages/")[-1].replace(str(REPO) + os.sep, "")
        self.calls[(owner, f"{short}:{frame.f_lineno if frame else 0} {kind}")] += 1


COUNTER = Counter()


def _wrap_method(name: str) -> None:
    original = getattr(torch.Tensor, name)

    def wrapper(self, *args, **kwargs):
        COUNTER.record(name)
        return original(self, *args, **kwargs)

    setattr(torch.Tensor, name, wrapper)


def _wrap_getitem() -> None:
    original = torch.Tensor.__getitem__

    def wrapper(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
            COUNTER.record("boolean mask index")
        return original(self, index)

    torch.Tensor.__getitem__ = wrapper


def _wrap_function(name: str) -> None:
    original = getattr(torch, name)

    def wrapper(*args, **kwargs):
        COUNTER.record(f"torch.{name}")
        return original(*args, **kwargs)

    setattr(torch, name, wrapper)


def main() -> None:
    out, script, *args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # set by `deepspeed`
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        out = str(Path(out).with_suffix(f".rank{rank}.jsonl"))
    for name in SYNCING_METHODS:
        _wrap_method(name)
    _wrap_getitem()
    for name in SYNCING_FUNCTIONS:
        _wrap_function(name)
    records = []

    def windowed(window: str, method):
        def run(self, *a, **kw):
            COUNTER.window, COUNTER.calls = window, collections.Counter()
            try:
                return method(self, *a, **kw)
            finally:
                by = collections.Counter()
                for (owner, _), n in COUNTER.calls.items():
                    by[owner] += n
                step = a[0] if window == "step" else None
                records.append(
                    {
                        "window": window,
                        "step": step,
                        **{k: by.get(k, 0) for k in ("ours", "deepspeed", "other")},
                        "where": {f"{o}: {w}": n for (o, w), n in sorted(COUNTER.calls.items())},
                    }
                )
                COUNTER.window = None

        return run

    comm.finish = lambda: None  # the launchers end with it; this script still has its counts to write
    Harness.step = windowed("step", Harness.step)
    Harness.interval = windowed("interval", Harness.interval)
    sys.argv = [script, *args]
    runpy.run_path(str(REPO / script), run_name="__main__")
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
