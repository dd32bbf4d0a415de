"""Everything sparsexpert asks of DeepSpeed, in one place.

- `prepare_ds_config` reads a DeepSpeed JSON, checks it against the model and the world size
  (`check_config`), and fills the parts that follow from the model: the AutoEP section that tells
  DeepSpeed where our MoE blocks are, and the scheduler length.
- `initialize` builds the engine with the parameter groups the MoE path needs; with the native MoE
  backend it first puts DeepSpeed-MoE's own layers in place of our blocks (`sparsexpert/native_moe.py`).
- `RankWatch` stops every rank, with a line naming the rank that failed, when one rank fails.
- Workarounds for DeepSpeed 0.19.8 behaviour live here and nowhere else (search "DeepSpeed quirk").
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.nn as nn

from sparsexpert.config import ConfigError
from sparsexpert.model.config import ModelConfig

# Where our MoE blocks live and what their parts are called (see sparsexpert/model/moe.py).
AUTOEP_MODULE_LAYOUT = {
    "moe_layer_pattern": r"layers\.\d+\.mlp",
    "router_pattern": "gate",
    "expert_pattern": "experts",
    "expert_w1": "w1",
    "expert_w2": "w2",
    "expert_w3": "w3",
    "score_func": "softmax",
    "score_apply": "post",
    "route_norm": True,
}
# Keys of the JSON's "expert_parallel" section that sparsexpert derives from the model config.
_DERIVED_AUTOEP_KEYS = set(AUTOEP_MODULE_LAYOUT) | {"top_k", "has_shared_experts", "shared_experts_pattern"}
SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)
LR_SCHEDULERS_WITH_TOTAL_STEPS = ("WarmupDecayLR", "WarmupCosineLR")


def resolve_ep_size(model_cfg: ModelConfig, world_size: int) -> int:
    """model.moe.ep_size, or (when 0) the largest divisor of every MoE layer's expert count that
    divides world_size."""
    m = model_cfg.moe
    if m.num_experts == 0:
        return 1
    if m.ep_size:
        return m.ep_size
    return math.gcd(world_size, *m.layer_experts(len(model_cfg.moe_layer_ids)))


def expert_parallel_size(model_cfg: ModelConfig, ds_config: dict[str, Any], world_size: int) -> int:
    """The ep_size a run uses: AutoEP's from the prepared DeepSpeed config, the native backend's
    from the model config."""
    if model_cfg.moe.backend == "native":
        return resolve_ep_size(model_cfg, world_size)
    return (ds_config.get("expert_parallel") or {}).get("autoep_size", 1)


@dataclass
class BatchTriplet:
    micro: int
    grad_accum: int
    dp: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.grad_accum * self.dp


def batch_triplet(ds: dict[str, Any], world_size: int) -> BatchTriplet:
    """Derive DeepSpeed's train_batch = micro x grad_accum x dp from the keys present, checking them."""
    train = ds.get("train_batch_size")
    micro = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    for key, val in (
        ("train_batch_size", train),
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", gas),
    ):
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
            raise ConfigError(f"ds_config.{key}", val, "must be a positive integer")
    dp = world_size
    if micro is None and train is None:
        raise ConfigError(
            "ds_config.train_micro_batch_size_per_gpu",
            None,
            "set train_micro_batch_size_per_gpu (and optionally gradient_accumulation_steps)",
        )
    if micro is None:
        gas = gas or 1
        if train % (gas * dp):
            raise ConfigError(
                "ds_config.train_batch_size",
                train,
                f"must be divisible by gradient_accumulation_steps x data-parallel size = {gas} x {dp}",
            )
        micro = train // (gas * dp)
    if gas is None:
        if train is None:
            gas = 1
        elif train % (micro * dp):
            raise ConfigError(
                "ds_config.train_batch_size",
                train,
                f"must be divisible by train_micro_batch_size_per_gpu x data-parallel size = {micro} x {dp}",
            )
        else:
            gas = train // (micro * dp)
    triplet = BatchTriplet(micro, gas, dp)
    if train is not None and train != triplet.global_batch:
        raise ConfigError(
            "ds_config.train_batch_size",
            train,
            f"must equal train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size "
            f"= {micro} x {gas} x {dp} = {triplet.global_batch}; fix one of them or drop train_batch_size",
        )
    return triplet


def _expert_sizes_ok_for_grouped_mm(model_cfg: ModelConfig) -> None:
    # torch._grouped_mm needs 16-byte aligned row strides: multiples of 8 elements cover fp32 and bf16.
    for name, size in (
        ("model.d_model", model_cfg.d_model),
        ("model.moe.d_expert", model_cfg.d_expert_resolved),
    ):
        if size % 8:
            raise ConfigError(
                name,
                size,
                "AutoEP's grouped matmul needs expert sizes that are multiples of 8; "
                'round it up, or set "use_grouped_mm": false in the DeepSpeed JSON\'s expert_parallel section',
            )


def check_config(
    model_cfg: ModelConfig,
    ds: dict[str, Any],
    world_size: int,
    tokenizer_vocab: int | None,
    seq_len: int | None = None,
) -> BatchTriplet:
    """Reject bad combinations before deepspeed.initialize, naming the field and the fix."""
    model_cfg.validate()
    triplet = batch_triplet(ds, world_size)

    zero = ds.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(
            "ds_config.zero_optimization.stage", stage, f"must be one of {SUPPORTED_ZERO_STAGES}"
        )
    if "gradient_clipping" not in ds:
        # DeepSpeed quirk: 0.19.8 clips at 1.0 when the key is absent, which nobody expects.
        raise ConfigError(
            "ds_config.gradient_clipping",
            None,
            "set it explicitly (e.g. 1.0, or 0.0 for no clipping); DeepSpeed would silently clip at 1.0",
        )
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(
            "ds_config.fp16.enabled", True, 'fp16 loss scaling is not supported for MoE here; use "bf16"'
        )

    m = model_cfg.moe
    ep = ds.get("expert_parallel", {}) or {}
    if m.num_experts > 0 and m.backend == "native":
        _check_native(model_cfg, ep, world_size, stage)
    elif m.num_experts > 0:
        if not ep.get("enabled", False):
            raise ConfigError(
                "ds_config.expert_parallel.enabled",
                ep.get("enabled"),
                'set "expert_parallel": {"enabled": true} so DeepSpeed AutoEP shards the experts',
            )
        ep_size = resolve_ep_size(model_cfg, world_size)
        json_ep = ep.get("autoep_size")
        if json_ep is not None and m.ep_size and json_ep != m.ep_size:
            raise ConfigError(
                "model.moe.ep_size",
                m.ep_size,
                f"differs from ds_config.expert_parallel.autoep_size={json_ep}; set one of them",
            )
        if json_ep is not None:
            ep_size = json_ep
        if world_size % ep_size:
            raise ConfigError("model.moe.ep_size", ep_size, f"must divide the world size {world_size}")
        if m.num_experts % ep_size:
            raise ConfigError(
                "model.moe.ep_size", ep_size, f"must divide model.moe.num_experts={m.num_experts}"
            )
        clash = sorted(k for k in ep if k in _DERIVED_AUTOEP_KEYS)
        if clash:
            raise ConfigError(
                f"ds_config.expert_parallel.{clash[0]}",
                ep[clash[0]],
                "is derived from the model config by sparsexpert; remove it from the JSON",
            )
        if ep.get("use_grouped_mm", True):
            _expert_sizes_ok_for_grouped_mm(model_cfg)

    if tokenizer_vocab is not None:
        if model_cfg.vocab_size == 0:
            model_cfg.vocab_size = tokenizer_vocab
        elif model_cfg.vocab_size < tokenizer_vocab:
            raise ConfigError(
                "model.vocab_size",
                model_cfg.vocab_size,
                f"is smaller than the tokenizer's vocabulary ({tokenizer_vocab}); "
                "set it to 0 to take the tokenizer's size, or to a larger padded size",
            )
    if seq_len is not None and seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            "model.max_seq_len",
            model_cfg.max_seq_len,
            f"is shorter than the dataset's sequence length {seq_len}; raise it",
        )
    return triplet


def _check_native(model_cfg: ModelConfig, ep: dict[str, Any], world_size: int, stage: int) -> None:
    """The native backend: ZeRO 0-2, an ep_size dividing the world size and every layer's experts."""
    m = model_cfg.moe
    if stage == 3:
        # DeepSpeed quirk: 0.19.8 raises "Native DeepSpeed MoE is not supported with ZeRO Stage 3"
        # only inside deepspeed.initialize, after the model is built.
        raise ConfigError(
            "ds_config.zero_optimization.stage",
            3,
            "DeepSpeed's native MoE layer (model.moe.backend=native) does not support ZeRO-3: its experts "
            "are per-rank modules that ZeRO-3 cannot partition; use ZeRO 0-2 (e.g. ds_configs/moe_z2.json), "
            'or model.moe.backend="autoep", which shards experts under ZeRO-3',
        )
    if ep.get("enabled") is False:
        raise ConfigError(
            "ds_config.expert_parallel.enabled",
            False,
            "the native backend shards the experts itself; remove the section or set it to true",
        )
    autoep_only = sorted(k for k in ep if k != "enabled")
    if autoep_only:
        raise ConfigError(
            f"ds_config.expert_parallel.{autoep_only[0]}",
            ep[autoep_only[0]],
            "configures AutoEP, not the native backend; remove it (the expert-parallel degree is "
            "model.moe.ep_size)",
        )
    ep_size = resolve_ep_size(model_cfg, world_size)
    if world_size % ep_size:
        raise ConfigError("model.moe.ep_size", ep_size, f"must divide the world size {world_size}")
    per_layer = m.layer_experts(len(model_cfg.moe_layer_ids))
    for i, n in enumerate(per_layer):
        if n % ep_size:
            field = (
                f"model.moe.num_experts_per_layer[{i}]"
                if m.num_experts_per_layer
                else "model.moe.num_experts"
            )
            raise ConfigError(
                field,
                n,
                f"must be a multiple of model.moe.ep_size={ep_size} (every rank holds as many experts)",
            )


def prepare_ds_config(
    ds_json: dict[str, Any],
    model_cfg: ModelConfig,
    world_size: int,
    max_steps: int,
    tokenizer_vocab: int | None = None,
    seq_len: int | None = None,
) -> dict[str, Any]:
    """Check `ds_json` and return the dict handed to deepspeed.initialize."""
    triplet = check_config(model_cfg, ds_json, world_size, tokenizer_vocab, seq_len)
    ds = copy.deepcopy(ds_json)
    ds["train_micro_batch_size_per_gpu"] = triplet.micro
    ds["gradient_accumulation_steps"] = triplet.grad_accum
    ds["train_batch_size"] = triplet.global_batch
    ds.setdefault("steps_per_print", 10**9)  # our metrics logger reports; DeepSpeed's own print is noise

    m = model_cfg.moe
    if m.num_experts > 0 and m.backend == "native":
        ds.pop("expert_parallel", None)  # AutoEP would otherwise replace the layers too
    elif m.num_experts > 0:
        ep = ds["expert_parallel"]
        ep.setdefault("autoep_size", resolve_ep_size(model_cfg, world_size))
        ep.update(AUTOEP_MODULE_LAYOUT)
        ep["top_k"] = m.top_k
        if m.num_shared_experts:
            ep["has_shared_experts"] = True
            ep["shared_experts_pattern"] = "shared_experts"
    else:
        ds.pop("expert_parallel", None)

    sched = ds.get("scheduler")
    if sched and sched.get("type") in LR_SCHEDULERS_WITH_TOTAL_STEPS:
        params = sched.setdefault("params", {})
        total = params.get("total_num_steps")
        if total is not None and total != max_steps:
            raise ConfigError(
                "ds_config.scheduler.params.total_num_steps",
                total,
                f"differs from train.max_steps={max_steps}; remove it (sparsexpert fills it in)",
            )
        params["total_num_steps"] = max_steps
        if params.get("warmup_num_steps", 0) > max_steps:
            params["warmup_num_steps"] = max_steps
    return ds


def param_groups(model: nn.Module, weight_decay: float, no_decay: str | None = None) -> list[dict[str, Any]]:
    """Decay matrices, not norms or embedding tables (tokens, entities, relations), nor parameters
    whose name contains `no_decay`. DeepSpeed splits the expert parameters of these groups into
    their own MoE groups after AutoEP has created them, so ZeRO reduces expert gradients over the
    expert-data-parallel group rather than the whole world."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        table = "tok_embeddings" in name or name.startswith(("knowledge.entities", "knowledge.relations"))
        extra = no_decay is not None and no_decay in name
        (plain if p.ndim < 2 or "norm" in name or table or extra else decay).append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": plain, "weight_decay": 0.0},
    ]


def init_distributed(timeout_minutes: float = 10.0) -> None:
    """Start torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU) with a collective timeout."""
    import logging
    import warnings

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)  # our console line says what matters
    warnings.filterwarnings(
        "ignore", message=".*all_gather_into_tensor.*is deprecated", category=FutureWarning
    )
    if "RANK" not in os.environ:  # plain `python launcher/pretrain.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
    release_shm_buffer()


def shm_buffer_path(rank: int | None = None) -> Path:
    """/dev/shm file of DeepSpeed's CPU shared-memory all-reduce for a rank of this job."""
    rank = int(os.environ["RANK"]) if rank is None else rank
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank}"
    return Path("/dev/shm") / name


def release_shm_buffer() -> None:
    """DeepSpeed quirk: on the CPU accelerator every rank creates a 69 MB /dev/shm file for the
    shared-memory all-reduce and nothing ever removes it: a few hundred runs filled the 24 GB
    tmpfs of our machine and the kernel killed the next job. Every rank maps every buffer during
    init_distributed, so once all ranks are past it the names can go (the mappings stay valid)."""
    import torch.distributed as tdist

    path = shm_buffer_path()
    if not path.exists():
        return
    tdist.barrier()
    path.unlink(missing_ok=True)


def own_gradient_clipping(ds_config: dict[str, Any]) -> float | None:
    """DeepSpeed quirk (issue #8469): with ZeRO-0 in fp32, DeepSpeed's clip_grad_norm_ averages the
    per-rank norms over the data-parallel ranks, which is not the global norm once ranks hold
    different experts. For that path we clip ourselves (`clip_grad_norm`) and hand DeepSpeed
    gradient_clipping=0. Returns our max norm (0.0 = measure only), or None when DeepSpeed's
    ZeRO optimizers do it (their norm is the true global one under AutoEP, checked by the tests)."""
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if stage == 0 and not ds_config.get("bf16", {}).get("enabled"):
        return float(ds_config.get("gradient_clipping", 0.0))
    return None


def global_grad_norm(module: nn.Module) -> torch.Tensor:
    """L2 norm of all gradients of the model across ranks, after DeepSpeed's all-reduce: dense
    gradients are the same on every rank; AutoEP expert gradients (marked `allreduce=False` with
    an expert group name) are summed over the expert-parallel group that holds distinct experts."""
    from deepspeed.utils import groups

    grads = [p for p in module.parameters() if p.grad is not None]
    device = grads[0].grad.device if grads else torch.device("cpu")
    dense = torch.zeros((), dtype=torch.float32, device=device)
    experts: dict[str, torch.Tensor] = {}
    for p in grads:
        sq = p.grad.detach().float().pow(2).sum()
        if getattr(p, "allreduce", True) is False and hasattr(p, "group_name"):
            experts[p.group_name] = experts.get(p.group_name, torch.zeros_like(dense)) + sq
        else:
            dense += sq
    for name in sorted(experts):
        dist.all_reduce(experts[name], group=groups._get_expert_parallel_group(name))
        dense += experts[name]
    return dense.sqrt()


def clip_grad_norm(module: nn.Module, max_norm: float) -> float:
    """Scale all gradients so their global norm is at most max_norm (0 = no clipping); returns the norm."""
    norm = global_grad_norm(module)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in module.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
    return norm.item()


def initialize(model: nn.Module, ds_config: dict[str, Any], no_decay: str | None = None):
    """deepspeed.initialize with our parameter groups; returns the engine. With the native MoE backend
    the model's MoE blocks are first replaced by DeepSpeed's native layers (`native_moe.swap_in`);
    DeepSpeed then splits their expert parameters into MoE optimizer groups
    (`split_params_into_different_moe_groups_for_optimizer`), reduced over the expert-data-parallel group."""
    import deepspeed

    cfg: ModelConfig | None = getattr(model, "cfg", None)
    if cfg is not None and cfg.moe.num_experts > 0 and cfg.moe.backend == "native":
        from sparsexpert import native_moe

        ep_size = resolve_ep_size(cfg, dist.get_world_size())
        native_moe.swap_in(model, cfg.moe, ep_size, bool(ds_config.get("use_data_before_expert_parallel_")))
    if own_gradient_clipping(ds_config) is not None:
        ds_config = {**ds_config, "gradient_clipping": 0.0}
    weight_decay = ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, weight_decay, no_decay), config=ds_config
    )
    return engine


def moe_drop_counts(module: nn.Module) -> torch.Tensor | None:
    """[MoE layers, 2] (dropped, routed) token-expert assignments of this rank's last forward with
    the native backend (capacity-limited routing); None for AutoEP, which drops nothing."""
    from sparsexpert import native_moe

    return native_moe.drop_counts(module)


class RankWatch:
    """When one rank fails, stop every rank within seconds, each printing one line that names the
    failed rank(s), with exit status 1 (a context manager around the training loop).

    A rank whose peer died gets an error from its next collective, but a rank waiting in a
    collective with a healthy peer that has given up waits for the collective timeout, and
    DeepSpeed's launcher stops only the ranks of its own node. So, through the rendezvous store
    (the TCPStore in rank 0's process):
    - a rank whose loop raises records its error there and raises the failure count;
    - a daemon thread on every rank reads the count every `poll_s` and joins in, even while the
      main thread waits in a collective;
    - every rank joining marks itself alive; rank 0 waits up to `grace_s` for the marks, names
      the ranks that never marked (their process died or hangs) and those that raised something
      other than a communication error, publishes that verdict, and keeps the store up until
      the others have read it;
    - every rank prints the verdict and leaves with os._exit(1), which nothing in interpreter
      teardown can hang; a timer does the same if the store itself does not answer.
    In a world of one, exceptions propagate as usual.
    """

    PREFIX = "sparsexpert/failure"

    def __init__(self, rank: int, world: int, poll_s: float = 1.0, grace_s: float = 5.0):
        self.rank, self.world, self.poll_s, self.grace_s = rank, world, poll_s, grace_s
        self.step = 0  # the step being computed, for the message (the training loop sets it)
        self._stopped = threading.Event()
        self._reporting = threading.Lock()
        self._store = dist.distributed_c10d._get_default_store() if world > 1 else None
        self._thread = threading.Thread(target=self._poll, name="sparsexpert-rank-watch", daemon=True)

    def __enter__(self) -> RankWatch:
        if self._store is not None:
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stopped.set()
        if self._store is None:
            return
        if isinstance(exc, Exception):
            self.fail(exc)
        self._thread.join(timeout=self.poll_s + 5)  # not in the store when the interpreter goes

    def _key(self, *parts: object) -> str:
        return "/".join((self.PREFIX, *map(str, parts)))

    def _poll(self) -> None:
        while not self._stopped.wait(self.poll_s):
            try:
                failed = self._store.add(self._key("count"), 0)
            except Exception:  # the store went with rank 0: the main thread's next collective fails
                return
            if failed and not self._stopped.is_set():
                self._stop_all(None)

    def fail(self, exc: Exception) -> NoReturn:
        """This rank's loop raised `exc`: tell the other ranks, stop them all."""
        self._stop_all(exc)

    def _stop_all(self, exc: Exception | None) -> NoReturn:
        if not self._reporting.acquire(blocking=False):
            while True:  # the other thread of this process is reporting; it ends the process
                time.sleep(60)
        backstop = threading.Timer(2 * self.grace_s + 10, os._exit, (1,))
        backstop.daemon = True
        backstop.start()
        try:
            if exc is not None:
                self._record(exc)
            verdict = self._verdict()
        except Exception as err:
            verdict = f"rank 0 (which hosts the rendezvous store) is unreachable ({type(err).__name__})"
        print(
            f"sparsexpert: training failed: {verdict}; rank {self.rank} stops at step {self.step} "
            "with exit status 1",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(1)

    def _record(self, exc: Exception) -> None:
        comm = _raised_by_a_collective(exc)
        if not comm:  # the root cause is here: its traceback helps (a peer's death gives no news)
            traceback.print_exception(exc, file=sys.stderr)
        msg = str(exc).strip()
        what = f"{type(exc).__name__}: {msg.splitlines()[0]}" if msg else type(exc).__name__
        self._store.set(self._key("error", self.rank), json.dumps({"comm": comm, "what": what[:300]}))
        self._store.add(self._key("count"), 1)

    def _verdict(self) -> str:
        store, key = self._store, self._key
        store.set(key("alive", self.rank), "1")
        store.add(key("alive_count"), 1)
        if self.rank != 0:
            store.wait([key("verdict")], datetime.timedelta(seconds=self.grace_s + 5))
            verdict = store.get(key("verdict")).decode()
            store.add(key("read"), 1)
            return verdict
        deadline = time.monotonic() + self.grace_s
        while store.add(key("alive_count"), 0) < self.world and time.monotonic() < deadline:
            time.sleep(0.05)
        silent = [r for r in range(self.world) if not store.check([key("alive", r)])]
        errors = {
            r: json.loads(store.get(key("error", r)))
            for r in range(self.world)
            if store.check([key("error", r)])
        }
        verdict = describe_failure(silent, errors)
        store.set(key("verdict"), verdict)
        deadline = time.monotonic() + self.grace_s
        while store.add(key("read"), 0) < self.world - len(silent) - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        return verdict


def _raised_by_a_collective(exc: BaseException) -> bool:
    """NCCL raises DistErrors; gloo plain RuntimeErrors (e.g. "Connection reset by peer"), from
    inside torch.distributed."""
    if isinstance(exc, dist.DistError):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename


def describe_failure(silent: list[int], errors: dict[int, dict[str, Any]]) -> str:
    """Which ranks failed: those that never answered, and those whose own code raised; when every
    error came from communication (a collective timed out), the ranks that saw it."""

    def ranks(rs) -> str:
        rs = sorted(rs)
        return f"rank {rs[0]}" if len(rs) == 1 else "ranks " + ", ".join(map(str, rs))

    parts = []
    if silent:
        parts.append(f"{ranks(silent)} stopped responding (process exited or hangs)")
    parts += [f"rank {r} raised {e['what']}" for r, e in sorted(errors.items()) if not e["comm"]]
    if not parts and errors:
        first = errors[min(errors)]["what"]
        parts.append(f"a collective failed on {ranks(errors)} ({first})")
    return "; ".join(parts) or "a rank failed without telling which"
