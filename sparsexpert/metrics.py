"""Monitoring, in one module: the figures a run logs and the one interface that logs them.

`MetricsLogger.log(metrics, step)`: on rank 0 only, one JSON line per call in
`<output_dir>/metrics.jsonl` (strict JSON: a non-finite value is null and named under "nonfinite"),
TensorBoard (numbers as scalars, nested dicts as "key/sub" tags, a 2-D array as a heatmap image;
lists stay in metrics.jsonl only), optionally Weights & Biases, and one concise console line.
Other ranks get a logger that does nothing.

The figures of a log interval beyond the losses (`Monitor.figures`): throughput (tokens/s, TFLOP/s
per device from `flops_per_token`, MFU against `peak_flops`), memory (`memory`), and per MoE layer
(`moe_figures`) the aux loss, z-loss, router entropy, largest and smallest expert load, the share
dropped (native backend) and, every `heatmap_every` intervals, the layer x expert load heatmap. They
are computed on the host from what `Harness.interval` brought there in its one copy.

`Progress`: the progress line (count, share, ETA) of long work outside the training loops; and
`log_results`, figures of a finished evaluation or ablation into a run's TensorBoard.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from sparsexpert.model.config import ModelConfig

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
        wandb: bool = False,
    ):
        """wandb: also log to Weights & Biases (train.report_to; the package must be installed)."""
        self.enabled, self.max_steps = enabled, max_steps
        self.writer: SummaryWriter | None = None
        self._jsonl: TextIO | None = None
        self._wandb: Any = None
        self._out, self._tensorboard = Path(output_dir), tensorboard
        if not enabled or not write_files:
            return
        self._out.mkdir(parents=True, exist_ok=True)
        self._open()
        if wandb:
            import wandb as wandb_module

            self._wandb = wandb_module.init(
                project="sparsexpert", name=self._out.name, dir=str(self._out), resume="allow"
            )

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
        """One record: numbers, dicts of numbers (per layer, per task), lists (metrics.jsonl only) and
        2-D numpy arrays (heatmap images: TensorBoard and W&B only)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in metrics.items() if not isinstance(v, np.ndarray)}}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self._tb(self.writer, key, value, step)
            self.writer.flush()
        if self._wandb is not None:
            self._wandb.log(self._wandb_record(metrics), step=step)
        print(self.console_line(record), file=sys.stdout, flush=True)

    def _tb(self, writer: SummaryWriter, key: str, value: Any, step: int) -> None:
        if isinstance(value, np.ndarray):
            writer.add_image(key, heatmap_rgb(value), step, dataformats="HWC")
        elif isinstance(value, dict):
            for k, v in value.items():
                self._tb(writer, f"{key}/{k}", v, step)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            writer.add_scalar(key, value, step)

    @staticmethod
    def _wandb_record(metrics: dict[str, Any]) -> dict[str, Any]:
        import wandb

        flat: dict[str, Any] = {}

        def add(key: str, value: Any) -> None:
            if isinstance(value, np.ndarray):
                flat[key] = wandb.Image(heatmap_rgb(value))
            elif isinstance(value, dict):
                for k, v in value.items():
                    add(f"{key}/{k}", v)
            elif isinstance(value, (int, float)) and math.isfinite(value):
                flat[key] = value

        for key, value in metrics.items():
            add(key, value)
        return flat

    def console_line(self, r: dict[str, Any]) -> str:
        parts = [f"step {r['step']}/{self.max_steps}"]
        for key, label, fmt in CONSOLE_KEYS:
            if r.get(key) is not None:
                parts.append(f"{label} {fmt.format(r[key])}")
        if "max_memory_gb" in r:
            parts.append(f"mem {r['max_memory_gb']:.1f}/{r.get('max_reserved_gb', 0.0):.1f} GiB")
        elif "max_rss_gb" in r:
            parts.append(f"rss {r['max_rss_gb']:.2f} GiB")
        if "tflops" in r:
            parts.append(f"{r['tflops']:.3g} TFLOP/s")
        if "mfu" in r:
            parts.append(f"mfu {r['mfu']:.1%}")
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
        if self._wandb is not None:
            self._wandb.finish()


# ---------------------------------------------------------------- throughput and memory

PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    # (in the device name, dense 16-bit tensor-core TFLOP/s (bf16, or fp16 where there is no bf16),
    #  fp32 TFLOP/s without TF32, torch's default): vendor figures for the SXM parts, first match wins
    ("B200", 2250.0, 80.0),
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("H800", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
    ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
)


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device in `precision` ("fp32", "bf16", "fp16"), the device's name) from
    `PEAK_TFLOPS`; None where the device is not in the table (a CPU, an unlisted GPU): MFU is then
    not logged."""
    if device.type != "cuda":
        return None, "CPU"
    import torch

    name = torch.cuda.get_device_name(device)
    for part, half, single in PEAK_TFLOPS:
        if re.search(rf"\b{part}\b", name):  # a whole word: "A10" is not "A100", nor "L4" "L40S"
            return (single if precision == "fp32" else half) * 1e12, name
    return None, name


def flops_per_token(cfg: ModelConfig, active_params: int, seq_len: int, lm_head: bool = True) -> float:
    """Training FLOPs (forward and backward) per token, as PaLM (appendix B) and torchtitan count them:
    6 x the active parameters that multiply, plus 12 x layers x seq_len x d_model for the attention
    scores and their weighted sum. Lookup tables do not multiply: the token embedding (unless tied to
    the LM head, which does), knowledge fusion's entity and relation tables. lm_head=False: the LM
    head is not computed (fine-tuning's task heads replace it)."""
    embed = cfg.vocab_size * cfg.d_model
    matmul = active_params - embed * (1 if cfg.tie_embeddings else 2) + (embed if lm_head else 0)
    k = cfg.knowledge
    if k.fusion:
        matmul -= (k.num_entities + k.num_relations) * k.entity_dim
    return 6.0 * matmul + 12.0 * cfg.n_layers * seq_len * cfg.d_model


def mfu(tokens_per_s: float, flops_per_token: float, devices: int, peak: float) -> float:
    """Model FLOPs utilization: the model FLOP/s achieved per device over the device's peak."""
    return tokens_per_s * flops_per_token / devices / peak


def memory(device: torch.device) -> dict[str, float]:
    """This process's peak memory, GiB: on CUDA what the allocator handed out and what it reserved
    (torch.cuda.max_memory_allocated / max_memory_reserved of `device`), elsewhere the peak resident
    set size (getrusage). No synchronization with the device."""
    if device.type == "cuda":
        import torch

        return {
            "max_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "max_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"max_rss_gb": peak * (1 if sys.platform == "darwin" else 1024) / 2**30}


# ---------------------------------------------------------------- MoE figures


def load_matrix(counts: torch.Tensor, layer_experts: list[int]) -> np.ndarray:
    """[MoE layers, max E] expert load from an interval's summed assignments: each expert's share of
    its layer's token-expert assignments times the layer's E (1.0 = perfectly balanced); NaN past a
    layer's last expert (pyramid PR-MoE)."""
    c = counts.double().cpu().numpy()  # a host tensor already (Harness.interval)
    load = c / np.maximum(c.sum(axis=1, keepdims=True), 1) * np.asarray(layer_experts)[:, None]
    for j, E in enumerate(layer_experts):
        load[j, E:] = np.nan
    return load


def moe_figures(r: dict[str, Any], moe_layer_ids: list[int], layer_experts: list[int]) -> dict[str, Any]:
    """Per MoE layer ("layer<i>", i the block index), from an interval's reduced figures (host):
    `expert_counts` [layers, E] summed assignments -> expert_load (each expert's share, in
    metrics.jsonl), expert_load_max / expert_load_min (largest / smallest share x E, 1.0 = balanced);
    `router_layers` [layers, 3] means -> aux_loss_per_layer, z_loss_per_layer, router_entropy (nats);
    `dropped` [layers, 2] (native backend: dropped, routed assignments) -> dropped_frac."""
    out: dict[str, Any] = {}
    names = [f"layer{i}" for i in moe_layer_ids]
    if "expert_counts" in r:
        load = load_matrix(r["expert_counts"], layer_experts)
        rows = [load[j, :E] for j, E in enumerate(layer_experts)]
        out["expert_load"] = {n: (row / len(row)).tolist() for n, row in zip(names, rows)}
        out["expert_load_max"] = {n: float(row.max()) for n, row in zip(names, rows)}
        out["expert_load_min"] = {n: float(row.min()) for n, row in zip(names, rows)}
    if "router_layers" in r:
        per = r["router_layers"].tolist()  # a host tensor: no device sync
        for col, key in enumerate(("aux_loss_per_layer", "z_loss_per_layer", "router_entropy")):
            out[key] = {n: per[j][col] for j, n in enumerate(names)}
    if "dropped" in r:
        drops = r["dropped"].tolist()
        out["dropped_frac"] = {
            n: drops[j][0] / drops[j][1] if drops[j][1] else 0.0 for j, n in enumerate(names)
        }
    return out


HEATMAP_CELL = 8
"""Pixels per side of one (layer, expert) cell of the load heatmap."""


def heatmap_rgb(load: np.ndarray, cell: int = HEATMAP_CELL) -> np.ndarray:
    """[layers x cell, experts x cell, 3] uint8 image of a [layers, E] load matrix (1.0 = balanced),
    a row per MoE layer: white at 1.0, towards red for overloaded experts (full red at 4x and above),
    towards blue for underloaded ones (full blue at 1/4 and below, and for an expert without tokens);
    grey where a layer has no such expert (NaN)."""
    v = np.asarray(load, dtype=np.float64)
    missing = np.isnan(v)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.clip(np.log2(np.where(missing, 1.0, v)) / 2.0, -1.0, 1.0)  # -1 at 1/4x, +1 at 4x
    white = np.ones(v.shape + (3,))
    red, blue = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])
    a = np.abs(t)[..., None]
    rgb = np.where((t > 0)[..., None], white * (1 - a) + red * a, white * (1 - a) + blue * a)
    rgb[missing] = 0.5
    img = np.round(rgb * 255).astype(np.uint8)
    return np.repeat(np.repeat(img, cell, axis=0), cell, axis=1)


class Monitor:
    """The figures of each log interval beyond the losses, for one run (pretraining or fine-tuning)."""

    def __init__(
        self,
        device: torch.device,
        world: int,
        model_cfg: ModelConfig,
        active_params: int,
        seq_len: int,
        precision: str,
        heatmap_every: int = 10,
        lm_head: bool = True,
    ):
        """seq_len: of the rows trained on (fine-tuning: the padded length). heatmap_every: the load
        heatmap every this many log intervals (and at the first and the last); 0 never."""
        self.device, self.world, self.heatmap_every = device, world, heatmap_every
        self.moe_layer_ids = model_cfg.moe_layer_ids
        self.layer_experts = model_cfg.moe.layer_experts(len(self.moe_layer_ids))
        self.flops_per_token = flops_per_token(model_cfg, active_params, seq_len, lm_head)
        self.peak, self.device_name = peak_flops(device, precision)
        self.precision = precision
        self._intervals = 0

    def describe(self) -> str:
        """One line for the run's header: the FLOP count and the peak MFU is measured against."""
        peak = (
            f"MFU against {self.peak / 1e12:g} TFLOP/s ({self.device_name}, {self.precision})"
            if self.peak
            else f"no peak FLOP/s known for {self.device_name}: TFLOP/s logged, MFU not"
        )
        return (
            f"monitoring: {self.flops_per_token / 1e6:.3g} MFLOP per token (6 x active + attention); {peak}"
        )

    def figures(self, r: dict[str, Any], seconds: float, final: bool = False) -> dict[str, Any]:
        """From an interval's reduced figures `r` (`Harness.interval`) and its wall time: tokens_per_s,
        tflops (per device), mfu (where the peak is known), memory, and the MoE figures."""
        tokens_per_s = r["tokens"] / max(seconds, 1e-9)
        out: dict[str, Any] = {
            "tokens_per_s": tokens_per_s,
            "tflops": tokens_per_s * self.flops_per_token / self.world / 1e12,
        }
        if self.peak:
            out["mfu"] = mfu(tokens_per_s, self.flops_per_token, self.world, self.peak)
        out.update(memory(self.device))
        out.update(moe_figures(r, self.moe_layer_ids, self.layer_experts))
        if "expert_counts" in r and self.heatmap_every:
            if self._intervals % self.heatmap_every == 0 or final:
                out["expert_load_heatmap"] = load_matrix(r["expert_counts"], self.layer_experts)
        self._intervals += 1
        return out


# ---------------------------------------------------------------- other work


class Progress:
    """The progress of long work, printed at most every `every` seconds and once at the end:

        tokenize 1,234/5,000 docs | 25% | 410/s | eta 9s  (total known)
        tokenize 1,234 docs | 410/s | 3s                  (total unknown)

    log: where the line goes (default: stderr); enabled=False prints nothing (ranks other than 0)."""

    def __init__(
        self,
        what: str,
        total: int | None = None,
        unit: str = "",
        every: float = 5.0,
        log: Callable[[str], None] | None = None,
        enabled: bool = True,
    ):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        stderr = sys.stderr  # this one, even while a library's output is redirected
        self.log = log or (lambda line: print(line, file=stderr, flush=True))
        self.enabled = enabled
        self.done = 0
        self.t0 = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._print(now)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.t0
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            share = self.done / self.total
            eta = elapsed / self.done * (self.total - self.done) if self.done else float("inf")
            eta_text = format_duration(eta) if math.isfinite(eta) else "?"
            rate = self.done / max(elapsed, 1e-9)
            return f"{self.what} {self.done:,}/{self.total:,}{unit} | {share:.0%} | {rate:,.0f}/s | eta {eta_text}"
        rate = self.done / max(elapsed, 1e-9)
        return f"{self.what} {self.done:,}{unit} | {rate:,.0f}/s | {format_duration(elapsed)}"

    def _print(self, now: float) -> None:
        if self.enabled:
            self.log(self.line(now))

    @contextlib.contextmanager
    def polling(self, count: Callable[[], int]) -> Iterator[Progress]:
        """For work this process cannot count as it goes (one library call, e.g. DeepSpeed's converter):
        while the block runs, a thread reads the count from `count()` (say, the files written so far)
        and prints the line every `every` seconds."""
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(self.every):
                with contextlib.suppress(OSError):
                    self.done = count()
                self._print(time.monotonic())

        thread = threading.Thread(target=poll, name="sparsexpert-progress", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            with contextlib.suppress(OSError):
                self.done = count()

    def close(self) -> None:
        """The final line: the count and the time taken."""
        if self.enabled:
            total = f"/{self.total:,}" if self.total else ""
            unit = f" {self.unit}" if self.unit else ""
            self.log(
                f"{self.what} {self.done:,}{total}{unit} | done in {format_duration(time.monotonic() - self.t0)}"
            )


def flat_numbers(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested result (eval.json, an ablation row) as {"a/b/c": value}."""
    out: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flat_numbers(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def log_results(tensorboard_dir: str | Path, prefix: str, results: dict[str, Any], step: int) -> None:
    """A finished evaluation's or ablation's figures into TensorBoard beside a run's curves, as
    "<prefix>/<path>" scalars at `step` (the evaluated checkpoint's). Rank 0 only."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tensorboard_dir)) as writer:
        for name, value in flat_numbers(results, prefix).items():
            writer.add_scalar(name, value, step)
