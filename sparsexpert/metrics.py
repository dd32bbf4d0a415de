"""One metrics interface: `MetricsLogger.log(metrics, step)`.

Behind it, on rank 0 only: TensorBoard scalars (lists become one scalar per index plus a
histogram), one JSON line per call in `<output_dir>/metrics.jsonl`, and one concise console line.
Other ranks get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

CONSOLE_KEYS = [
    ("loss", "loss", "{:.4f}"),
    ("lm_loss", "lm", "{:.4f}"),
    ("aux_loss", "aux", "{:.3f}"),
    ("z_loss", "z", "{:.3f}"),
    ("entity_loss", "entity", "{:.3f}"),
    ("triple_loss", "triple", "{:.3f}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("lr", "lr", "{:.2e}"),
    ("valid_lm_loss", "valid lm", "{:.4f}"),
    ("dev_metric", "dev", "{:.4f}"),
    ("adv_loss", "adv", "{:.4f}"),
    ("distill_kl", "kl", "{:.4f}"),
    ("loss_scale", "scale", "{:g}"),
    ("skipped_steps", "skipped", "{:.0f}"),
    ("max_memory_gb", "mem", "{:.1f} GB"),
]


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class MetricsLogger:
    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        max_steps: int,
        tensorboard: bool = True,
        write_files: bool = True,
    ):
        self.enabled, self.max_steps = enabled, max_steps
        self.writer = None
        self._jsonl = None
        if not enabled or not write_files:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(out / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self._tb(key, value, step)
            self.writer.flush()
        print(self.console_line(record), file=sys.stdout, flush=True)

    def _tb(self, key: str, value: Any, step: int) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                self._tb(f"{key}/{k}", v, step)
        elif isinstance(value, (list, tuple)):
            import torch

            for i, v in enumerate(value):
                self.writer.add_scalar(f"{key}/{i}", v, step)
            if value:
                self.writer.add_histogram(key, torch.tensor(value, dtype=torch.float32), step)
        elif isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            self.writer.add_scalar(key, value, step)

    def console_line(self, r: dict[str, Any]) -> str:
        parts = [f"step {r['step']}/{self.max_steps}"]
        for key, label, fmt in CONSOLE_KEYS:
            if r.get(key) is not None:
                parts.append(f"{label} {fmt.format(r[key])}")
        if "tokens_per_s" in r:
            parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
        if "eta_s" in r:
            parts.append(f"eta {format_duration(r['eta_s'])}")
        return " | ".join(parts)

    def text(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
