"""The run harness that pretraining, fine-tuning and evaluation share, in the order a run needs it.

    h = Harness(output_dir, ...)           distributed start (collective timeout, this rank's device), metrics
    h.deepspeed_config(ds_json, model_cfg) the DeepSpeed JSON checked against the model, world and accelerator
    load_state(model, state, source)       weights into a model, with one key filter
    h.build_engine(model, ds_config)       deepspeed.initialize; the model guarded (device check mode)
    h.resume(tag_dir, ...)                 a checkpoint into the engine (any world size / ep_size at ZeRO 1-3)
    with h.watch():                        every rank stops within seconds, naming the rank that failed
        batches = h.prefetch(make, start, end, grad_accum)   the coming micro-batches, built and copied meanwhile
        h.tick(step)                       where the loop is (failure message, fault injection)
        h.step(step, batches, grad_accum, forward)   one optimizer step: forward, backward, clipping, engine.step
        h.interval()                       once per log interval: the sums over ranks (the one host sync)
        h.save(...)                        a self-describing checkpoint

The device path: batches are built on the host (a background thread, `Prefetcher`), pinned and
copied to the engine's device with `device.to_device`; the loss terms, expert counts and token counts
of a step stay device tensors, summed on the device (`DeviceSums`), and meet the host once per log
interval in one all-reduce and one copy. Host synchronizations left inside a step (counted by
tests/test_harness.py) are DeepSpeed's own: AutoEP's all-to-all split sizes (copied asynchronously on
CUDA, `async_split_plan`), its check that the gradient norm is finite, ZeRO's norm; and, with
distillation, the teacher's: a plain model, whose MoE blocks read their split sizes on the host.
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from sparsexpert.config import ConfigError, LoopConfig, report_destinations
from sparsexpert.distributed import comm, parallel
from sparsexpert.distributed import device as _device
from sparsexpert.metrics import MetricsLogger
from sparsexpert.model.config import ModelConfig
from sparsexpert.weights import checkpoint, deepspeed_formats


def load_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    skip: tuple[str, ...] = (),
    fresh: tuple[str, ...] = (),
    if_same_shape: tuple[str, ...] = (),
    assign: bool = False,
) -> None:
    """Load `state` into `model` (every weight loader of sparsexpert goes through here); assign: the
    parameters become the state's tensors (memory-mapped ones stay shared) instead of copies.

    Keys under a `skip` prefix are not loaded; keys under an `if_same_shape` prefix load only where the
    model has the same tensor shape (else that part starts fresh); parameters of the model under a
    `fresh` prefix keep their initialization where `state` has nothing for them. Anything else that
    the model lacks or the state lacks is an error naming the keys and `source`."""
    own = model.state_dict()
    kept = {
        k: v
        for k, v in state.items()
        if not (skip and k.startswith(skip))
        and not (if_same_shape and k.startswith(if_same_shape) and (k not in own or own[k].shape != v.shape))
    }
    missing, unexpected = model.load_state_dict(kept, strict=False, assign=assign)
    missing = [k for k in missing if not k.startswith(fresh + if_same_shape)]
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


@dataclass
class MicroOut:
    """What one micro-batch's forward gives the harness."""

    loss: torch.Tensor
    """What backward runs on."""
    scalars: dict[str, torch.Tensor]
    """0-d device tensors to log; each is averaged over the micro-batches of the interval that report it."""
    arrays: dict[str, torch.Tensor] | None = None
    """Device tensors summed over the interval (expert counts [MoE layers, E], native drops [layers, 2])."""
    tokens: int = 0
    """Tokens of the micro-batch, known on the host (tokens/s)."""
    means: dict[str, torch.Tensor] | None = None
    """Device tensors averaged over the interval's micro-batches, like `scalars` but of any shape
    (per-layer router figures [MoE layers, 3])."""


class DeviceSums:
    """Sums over a log interval that stay on the device: `add` is asynchronous; `reduce` sums them over
    the ranks in one all-reduce and brings them to the host in one copy. Every rank must add the same
    names in an interval (the loops' schedules are functions of the step, the same on every rank)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._averaged: set[str] = set()
        self.tokens = 0

    def add(self, out: MicroOut) -> None:
        for name, value in out.scalars.items():
            self._add(name, value.detach().float().reshape(()))
        for name, value in (out.arrays or {}).items():
            self._add(name, value.detach().float())
        for name, value in (out.means or {}).items():
            self._add(name, value.detach().float())
            self._averaged.add(name)
        self.tokens += out.tokens

    def _add(self, name: str, value: torch.Tensor) -> None:
        if name in self._sums:
            self._sums[name] += value
        else:
            self._sums[name] = value.clone()
        self._counts[name] = self._counts.get(name, 0) + 1

    def reduce(self, extra: dict[str, torch.Tensor | float | None] | None = None) -> dict[str, Any]:
        """Means of the scalars and sums of the arrays over every rank's micro-batches, plus `extra`
        (device scalars the same on every rank, e.g. the gradient norm: fetched, not reduced).
        Collective. The one host synchronization of a log interval."""
        names = sorted(self._sums)
        parts = [self._sums[n].flatten() for n in names]
        counts = torch.tensor([self._counts[n] for n in names] + [self.tokens], dtype=torch.float32)
        parts.append(_device.to_device(counts, self.device))
        flat = _device.to_device(torch.cat(parts) if parts else torch.zeros(1), self.device)
        n_reduced = flat.numel()
        extras = {k: v for k, v in (extra or {}).items() if v is not None}
        tail = [torch.as_tensor(v, dtype=torch.float32).reshape(1).to(self.device) for v in extras.values()]
        buf = _device.to_device(torch.cat([flat, *tail]), self.device)
        comm.all_reduce(_device.to_device(buf[:n_reduced], self.device))  # in place, a view of buf
        host = buf.tolist()  # the interval's one device-to-host copy
        out: dict[str, Any] = {}
        i = 0
        count_of = dict(zip(names, host[n_reduced - len(names) - 1 : n_reduced - 1]))
        for n in names:
            size = self._sums[n].numel()
            vals = host[i : i + size]
            i += size
            if self._sums[n].dim() == 0:
                out[n] = vals[0] / max(count_of[n], 1)
            else:
                out[n] = torch.tensor(vals).view(self._sums[n].shape)  # host copy, summed
                if n in self._averaged:
                    out[n] /= max(count_of[n], 1)
        out["tokens"] = host[n_reduced - 1]
        out.update(zip(extras, host[n_reduced:]))
        self._sums, self._counts, self._averaged, self.tokens = {}, {}, set(), 0
        return out


class Prefetcher:
    """The micro-batches of the coming steps, built by a background thread and copied to the device
    while the current step computes (pinned host memory, non_blocking copies on a side CUDA stream).

    `make(step, m)` must be a function of (step, m) alone, as data order, masking and knowledge sampling
    are (keyed by step and micro-batch): prefetching then changes timing only. The loop gets exactly
    the batches it would have built itself, in the same order, from any resume step."""

    def __init__(
        self,
        make: Callable[[int, int], Any],
        start_step: int,
        end_step: int,
        grad_accum: int,
        device: torch.device,
        depth_steps: int = 2,
    ):
        self.device, self.grad_accum = device, grad_accum
        self._make = make
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth_steps * grad_accum, 1))
        self._stop = threading.Event()
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._thread = threading.Thread(
            target=self._run, args=(start_step, end_step), name="sparsexpert-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, start: int, end: int) -> None:
        if self._cuda:
            torch.cuda.set_device(self.device)
        for step in range(start, end):
            for m in range(self.grad_accum):
                if self._stop.is_set():
                    return
                # (step, micro-batch, batch on the device, its copy's event, or the exception raised)
                item: tuple[int, int, Any, torch.cuda.Event | None, BaseException | None]
                try:
                    batch = self._make(step, m)
                    event = None
                    if self._cuda:
                        batch = _device.pin(batch)
                        with torch.cuda.stream(self._stream):
                            batch = _device.to_device(batch, self.device)
                            event = torch.cuda.Event()
                            event.record(self._stream)
                    else:
                        batch = _device.to_device(batch, self.device)
                    item = (step, m, batch, event, None)
                except BaseException as exc:  # handed to the loop, which raises it
                    item = (step, m, None, None, exc)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if item[4] is not None:
                    return

    def get(self, step: int, m: int) -> Any:
        """Micro-batch m of `step`, on the device. Steps must be asked for in order."""
        got_step, got_m, batch, event, exc = self._queue.get()
        if exc is not None:
            raise exc
        if (got_step, got_m) != (step, m):
            raise RuntimeError(
                f"prefetcher out of order: asked for step {step} micro {m}, had {got_step}/{got_m}"
            )
        if event is not None:  # the copy ran on the side stream: order it before this stream's use
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            _device._map(batch, lambda t: t.record_stream(current))
        return batch

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=10)


def claim_output_dir(output_dir: Path, run_files: tuple[str, ...], claim: str, rank: int) -> None:
    """Never write over a run by accident: if `output_dir` holds any of `run_files` (what a run of this
    kind writes), a new run ("new") is refused, naming them; "resume" continues it; "overwrite" starts
    over, deleting those files only (rank 0; nothing else in the folder is touched)."""
    found = [name for name in run_files if (output_dir / name).exists()]
    if not found or claim == "resume":
        return
    if claim == "overwrite":
        if rank == 0:
            for name in found:
                path = output_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            print(f"--overwrite: removed the former run's {', '.join(found)} from {output_dir}", flush=True)
        return
    raise RunStopped(
        f"{output_dir} holds a run ({', '.join(found)}): continue it with --resume, start it over with "
        f"--overwrite (deletes {', '.join(found)}), or choose another --output_dir"
    )


class RunStopped(RuntimeError):
    """The run cannot go on (its loss or gradients stopped being finite, ...): the message says why,
    what was kept and what to do; the launcher exits with status 1."""


@contextlib.contextmanager
def exit_on_stop() -> Iterator[None]:
    """Around a launcher's run: a stop the run explains in its message (a failed rank, values no longer
    finite, an output folder holding a run, no usable checkpoint, no space, a configuration error) is
    printed as one line, without a traceback, and the process exits with status 1."""
    try:
        yield
    except (RunStopped, checkpoint.CheckpointError, checkpoint.NoSpaceError, ConfigError) as stop:
        print(f"sparsexpert: {stop}", file=sys.stderr, flush=True)
        sys.exit(1)


class NonFiniteSteps:
    """Counts the steps in a row whose update was not applied because the loss or gradient norm was not
    finite. fp16 overflow steps do not count: skipping them is how dynamic loss scaling searches its
    scale (DeepSpeed stops the run itself when the scale reaches its minimum)."""

    def __init__(self, limit: int, fp16: bool):
        self.limit, self.fp16 = limit, fp16
        self.in_a_row = 0
        self.first = 0  # the first step of the current streak

    def update(self, step: int, applied: bool) -> bool:
        """After `step`: whether the run must stop (`limit` non-finite steps in a row)."""
        if applied or self.fp16:
            self.in_a_row = 0
            return False
        if self.in_a_row == 0:
            self.first = step
        self.in_a_row += 1
        return self.in_a_row >= self.limit

    @property
    def healthy(self) -> bool:
        """Whether the last step was applied: the weights are those of finite steps only."""
        return self.in_a_row == 0


class Harness:
    """One run's distributed context, engine and loop machinery (see the module docstring)."""

    @classmethod
    def for_loop(
        cls,
        output_dir: str | Path,
        loop: LoopConfig,
        max_steps: int,
        resume: bool,
        overwrite: bool,
        run_files: tuple[str, ...],
    ) -> Harness:
        """The harness of a training loop (pretraining, fine-tuning) from its `train` section: where the
        figures go (train.tensorboard, train.report_to), the collective timeout, and what the run does
        with an output folder that holds a run (--resume continues it, --overwrite starts over)."""
        if resume and overwrite:
            raise ConfigError("--overwrite", True, "and --resume exclude each other: continue, or start over")
        report_to = report_destinations(loop.report_to)
        return cls(
            output_dir,
            max_steps,
            loop.tensorboard and "tensorboard" in report_to,
            loop.collective_timeout_minutes,
            "resume" if resume else "overwrite" if overwrite else "new",
            run_files,
            wandb="wandb" in report_to,
        )

    def __init__(
        self,
        output_dir: str | Path,
        max_steps: int,
        tensorboard: bool = True,
        collective_timeout_minutes: float = 10.0,
        claim: str = "new",
        run_files: tuple[str, ...] = (),
        wandb: bool = False,
    ):
        """claim: what this run does with `output_dir` (see `claim_output_dir`): "new", "resume",
        "overwrite", or "read" (evaluation: writes nothing but its report). wandb: the metrics also go
        to Weights & Biases (train.report_to)."""
        self.device = parallel.init_distributed(collective_timeout_minutes)
        self.rank, self.world = comm.rank(), comm.world_size()
        self.output_dir = Path(output_dir)
        if claim != "read":
            claim_output_dir(self.output_dir, run_files, claim, self.rank)
            comm.barrier()
        self.metrics = MetricsLogger(
            self.output_dir, self.rank == 0, max_steps, tensorboard, write_files=claim != "read", wandb=wandb
        )
        self.log = self.metrics.text
        self.engine: Any = None
        self.own_clip: float | None = None
        self.sums = DeviceSums(self.device)
        self._grad_norm: torch.Tensor | None = None
        self._watch: comm.RankWatch | None = None

    # ------------------------------------------------------------------ setup
    def deepspeed_config(
        self,
        ds_json: dict[str, Any],
        model_cfg: ModelConfig,
        max_steps: int,
        vocab_size: int | None = None,
        seq_len: int | None = None,
    ) -> tuple[dict[str, Any], parallel.BatchTriplet]:
        """The config handed to deepspeed.initialize and the batch triplet, checked before anything is
        built (including the precision against this accelerator)."""
        ds = parallel.prepare_ds_config(
            ds_json, model_cfg, self.world, max_steps, vocab_size, seq_len, accelerator=self.device.type
        )
        parallel.check_precision_supported(ds, self.device)
        return ds, parallel.batch_triplet(ds, self.world)

    def build_engine(
        self, model: nn.Module, ds_config: dict[str, Any], no_decay: str | None = None, training: bool = True
    ):
        """deepspeed.initialize (it moves the model to this rank's device); in check mode the engine's
        module refuses inputs that did not pass through `device.to_device`. training=False builds an
        engine without optimizer or schedule (evaluation)."""
        if not training:
            # No optimizer or schedule. ZeRO 1-2 partition only optimizer state, which DeepSpeed will not
            # build without an optimizer: stage 0 holds the same weights. ZeRO-3 stays (it shards them).
            ds_config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
            zero = ds_config.get("zero_optimization", {}) or {}
            if zero.get("stage", 0) in (1, 2):
                ds_config["zero_optimization"] = {**zero, "stage": 0}
        self.engine = parallel.initialize(model, ds_config, no_decay)
        self.own_clip = parallel.own_gradient_clipping(ds_config) if training else None
        _device.guard(self.engine.module, "model")
        return self.engine

    def to_device(self, obj: Any) -> Any:
        return _device.to_device(obj, self.device)

    # ------------------------------------------------------------------ the loop
    def watch(self, what: str = "training") -> comm.RankWatch:
        """Around a loop: when one rank fails, every rank stops within seconds with exit status 1 and a
        line naming the failed rank (`comm.RankWatch`; `what` names the loop in that line)."""
        self._watch = comm.RankWatch(self.rank, self.world, what=what)
        return self._watch

    def tick(self, step: int) -> None:
        """The loop is at `step` (an optimizer step, or an evaluation batch), for the failure message.
        (The failure tests inject their faults here: tests/faults/sitecustomize.py.)"""
        if self._watch is not None:
            self._watch.step = step

    def prefetch(
        self, make: Callable[[int, int], Any], start_step: int, end_step: int, grad_accum: int
    ) -> Prefetcher:
        return Prefetcher(make, start_step, end_step, grad_accum, self.device)

    def step(
        self,
        step: int,
        batches: Prefetcher,
        grad_accum: int,
        forward: Callable[[Any], MicroOut],
        after: Callable[[bool], None] | None = None,
    ) -> bool:
        """One optimizer step: each micro-batch's forward and backward, our clipping before the last
        engine.step (DeepSpeed steps the optimizer at the accumulation boundary), the loss terms summed
        on the device; then `after(applied)`, an optimizer of weights outside DeepSpeed's (the entity
        table's row-wise Adagrad). Returns whether the update was applied: DeepSpeed skips a step whose
        gradient norm is not finite (and, in fp16, one that overflowed), as we do on the ZeRO-0 fp32
        path, which reads the norm on the host for it; otherwise no host synchronization of ours."""
        engine = self.engine
        skipped = engine.skipped_steps
        for m in range(grad_accum):
            out = forward(batches.get(step, m))
            engine.backward(out.loss)
            if self.own_clip is not None and m == grad_accum - 1:
                self._grad_norm = parallel.clip_grad_norm(engine.module, self.own_clip)
                parallel.skip_step_if_not_finite(engine, self._grad_norm)
            engine.step()
            self.sums.add(out)
        applied = engine.skipped_steps == skipped
        if after is not None:
            after(applied)
        return applied

    def interval(self) -> dict[str, Any]:
        """The interval's figures on every rank (collective): scalar and `means` averages, array sums,
        tokens, the gradient norm of the last step, the learning rate, precision state (fp16 loss
        scale, skipped steps). `metrics.Monitor.figures` derives throughput, memory and the per-layer
        MoE figures from them."""
        engine = self.engine
        gnorm = self._grad_norm if self.own_clip is not None else engine.get_global_grad_norm()
        out = self.sums.reduce({"grad_norm": gnorm})
        out["lr"] = float(engine.get_lr()[0])
        out.update(parallel.precision_state(engine))
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(
        self,
        ckpt_root: Path,
        step: int,
        meta: dict[str, Any],
        tokenizer: Path | None,
        keep: int,
        healthy: bool = True,
    ) -> Path:
        """A checkpoint tag (collective); healthy=False writes it marked unhealthy, leaving `latest` and
        rotation alone (checkpoint.save)."""
        return checkpoint.save(self.engine, ckpt_root, step, meta, tokenizer, keep=keep, healthy=healthy)

    def resume(self, tag_dir: Path, elastic: bool, seed: int, ep_size: int) -> dict[str, Any]:
        """Load `tag_dir` into the engine: as written, or resharded when `elastic` (the engine must have
        been built with `deepspeed_formats.universal_loading`). Returns the checkpoint's metadata."""
        if not elastic:
            return deepspeed_formats.load(self.engine, tag_dir)
        meta, owned = deepspeed_formats.load_elastic(self.engine, tag_dir, seed)
        self.log(
            f"elastic resume: world {meta['world_size']} -> {self.world}, ep {meta['ep_size']} -> "
            f"{ep_size}, resharded through DeepSpeed's universal "
            f"checkpoint; checked the weights, the optimizer step {meta['step']} and the experts by global id: "
            + deepspeed_formats.describe_experts(owned)
        )
        return meta
