"""One metrics interface: `MetricsLogger.log(metrics, step)`.

Behind it, on rank 0 only: TensorBoard scalars (lists become one scalar per index plus a
histogram), one JSON line per call in `<output_dir>/metrics.jsonl` (strict JSON: a non-finite value
is null and named under "nonfinite"), and one concise console line.
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
    ("max_memory_gb", "mem", "{:.1f} GB"),
]


def strict_json(record: dict[str, Any]) -> dict[str, Any]:
    """The record with every non-finite number (NaN, inf) as null and their names listed under
    "nonfinite" (dotted for nested ones, "expert_load.layer0[3]"), so that metrics.jsonl stays JSON that
    strict readers accept (json.dumps would write NaN and Infinity tokens)."""
    bad: list[str] = []

    def clean(value: Any, name: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(name)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{name}.{k}" if name else k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{name}[{i}]") for i, v in enumerate(value)]
        return value

    out = clean(record, "")
    if bad:
        out["nonfinite"] = bad
    return out


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
        self._out, self._tensorboard = Path(output_dir), tensorboard
        if not enabled or not write_files:
            return
        self._out.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self, purge_step: int | None = None) -> None:
        self._jsonl = open(self._out / "metrics.jsonl", "a", buffering=1)
        if self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self._out / "tensorboard"), purge_step=purge_step)

    def resume_from(self, step: int) -> None:
        """A run continues after `step` (its checkpoint): the records of later steps, written before the
        run stopped and about to be computed again, leave metrics.jsonl (rewritten atomically) and
        TensorBoard (purged from step + 1), so that every step appears once."""
        if self._jsonl is None:
            return
        self._jsonl.close()
        if self.writer is not None:
            self.writer.close()
        path = self._out / "metrics.jsonl"
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        self._open(purge_step=step + 1)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
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
                self._tb(f"{key}/{i}", v, step)
            if value and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
                self.writer.add_histogram(key, torch.tensor(value, dtype=torch.float32), step)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            self.writer.add_scalar(key, value, step)

    def console_line(self, r: dict[str, Any]) -> str:
        parts = [f"step {r['step']}/{self.max_steps}"]
        for key, label, fmt in CONSOLE_KEYS:
            if r.get(key) is not None:
                parts.append(f"{label} {fmt.format(r[key])}")
        if "tokens_per_s" in r:
            parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
        if r.get("skipped_steps"):
            parts.append(f"skipped {r['skipped_steps']}")
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
