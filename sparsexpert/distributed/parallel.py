"""Everything sparsexpert asks of DeepSpeed, in one place.

- `prepare_ds_config` reads a DeepSpeed JSON, checks it against the model and the world size
  (`check_config`), and fills the parts that follow from the model: the AutoEP section that tells
  DeepSpeed where our MoE blocks are, and the scheduler length.
- `initialize` builds the engine with the parameter groups the MoE path needs; with the native MoE
  backend it first puts DeepSpeed-MoE's own layers in place of our blocks (`sparsexpert/distributed/native_moe.py`).
- Precision: `check_precision` refuses what the accelerator lacks (bf16 before Ampere, fp16 without
  kernels), `routers_in_fp32` keeps AutoEP's routers in fp32, `precision_state` reports skipped steps and fp16's loss scale.
- `init_distributed` starts torch.distributed on this rank's device (collectives: `sparsexpert/distributed/comm.py`).
- Workarounds for DeepSpeed 0.19.8 behaviour live here and nowhere else (search "DeepSpeed quirk").
"""

from __future__ import annotations

import copy
import datetime
import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from sparsexpert.config import ConfigError
from sparsexpert.distributed import comm
from sparsexpert.distributed import device as _device
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
    if micro is None:
        if train is None:
            raise ConfigError(
                "ds_config.train_micro_batch_size_per_gpu",
                None,
                "set train_micro_batch_size_per_gpu (and optionally gradient_accumulation_steps)",
            )
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


# DeepSpeed 0.19.8's top-level config sections: what DeepSpeedConfig and the engine read during
# deepspeed.initialize and a training step (recorded by reading the config through a dict that notes
# every key asked for; tests/test_config.py repeats that and checks the list), and the sections only
# optional features read (activation checkpointing, async I/O, the flops profiler, autotuning).
# DeepSpeed ignores any other key silently: "zero_optimisation" trained at ZeRO-0.
DEEPSPEED_SECTIONS = frozenset(
    {
        "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint", "comet",
        "comms_logger", "communication_data_type", "compile", "compression_training", "csv_monitor",
        "curriculum_learning", "data_efficiency", "data_types", "dataloader_drop_last", "datastates_ckpt",
        "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel",
        "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
        "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "log_level",
        "managed_gradient_accumulation", "memory_breakdown", "nebula", "optimizer", "pipeline",
        "prescale_gradients", "progressive_layer_drop", "quantize_training", "scheduler",
        "seq_parallel_communication_data_type", "sequence_parallel_size", "sparse_attention",
        "sparse_gradients", "steps_per_print", "tensor_parallel", "tensorboard", "timers", "torch_autocast",
        "train_batch_size", "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism",
        "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization",
        "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization",
    }
)  # fmt: skip


def _did_you_mean(key: str, known: Any) -> str:
    near = difflib.get_close_matches(key, sorted(known), n=1)
    return f"did you mean {near[0]!r}?" if near else "see DeepSpeed's configuration documentation"


def check_sections(ds: dict[str, Any]) -> None:
    """Every key of the DeepSpeed JSON is one DeepSpeed reads: unknown top-level sections (which
    DeepSpeed would ignore) and unknown keys of zero_optimization, fp16 and bf16 (which it refuses only
    inside deepspeed.initialize, in pydantic's words) are errors naming the key, with the nearest one."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for key in ds:
        if key not in DEEPSPEED_SECTIONS:
            raise ConfigError(
                f"ds_config.{key}",
                ds[key],
                f"not a DeepSpeed setting (it would be ignored); {_did_you_mean(key, DEEPSPEED_SECTIONS)}",
            )
    for section, model in (
        ("zero_optimization", DeepSpeedZeroConfig),
        ("fp16", DeepSpeedFP16Config),
        ("bf16", DeepSpeedBF16Config),
        ("bfloat16", DeepSpeedBF16Config),
    ):
        value = ds.get(section)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"ds_config.{section}", value, "expected a mapping (a JSON object)")
        known = set()
        for name, f in model.model_fields.items():
            known |= {name, *(a for a in (f.alias, f.validation_alias) if isinstance(a, str))}
        for key in value:
            if key not in known:
                raise ConfigError(
                    f"ds_config.{section}.{key}",
                    value[key],
                    f"not a DeepSpeed setting; {_did_you_mean(key, known)}",
                )
    for section in ("optimizer", "scheduler"):
        value = ds.get(section)
        if isinstance(value, dict):
            for key in value:
                if key not in ("type", "params"):
                    raise ConfigError(
                        f"ds_config.{section}.{key}", value[key], 'a section holds "type" and "params"'
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
    check_sections(ds)
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
    _check_precision_config(model_cfg, ds, stage)

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
    accelerator: str = "cpu",
) -> dict[str, Any]:
    """Check `ds_json` and return the dict handed to deepspeed.initialize. accelerator: the device type
    the run computes on ("cuda" turns on AutoEP's asynchronous split plan unless the JSON says otherwise)."""
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
        if accelerator == "cuda" and ep["autoep_size"] > 1:
            # AutoEP copies its all-to-all split sizes to the host in every MoE layer's forward; on CUDA
            # it can start that copy asynchronously on a side stream (CUDA tensors only).
            ep.setdefault("async_split_plan", True)
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
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
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


def init_distributed(timeout_minutes: float = 10.0) -> torch.device:
    """Start torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU) with a collective timeout;
    returns this rank's device. On GPUs each rank is pinned to cuda:LOCAL_RANK first: NCCL's first
    collective (a barrier before the engine exists) would otherwise put every rank on GPU 0."""
    import logging
    import warnings

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.utils.logger.setLevel(logging.WARNING)  # our console line says what matters
    warnings.filterwarnings(
        "ignore", message=".*all_gather_into_tensor.*is deprecated", category=FutureWarning
    )
    if "RANK" not in os.environ:  # plain `python launcher/pretrain.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    device = _device.accelerator_device(int(os.environ["LOCAL_RANK"]))
    if device.type != "cpu":
        get_accelerator().set_device(device.index)
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
    release_shm_buffer()
    return device


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
    path = shm_buffer_path()
    if not path.exists():
        return
    comm.barrier()
    path.unlink(missing_ok=True)


def own_gradient_clipping(ds_config: dict[str, Any]) -> float | None:
    """DeepSpeed quirk (issue #8469): with ZeRO-0 in fp32, DeepSpeed's clip_grad_norm_ averages the
    per-rank norms over the data-parallel ranks, which is not the global norm once ranks hold
    different experts. For that path we clip ourselves (`clip_grad_norm`) and hand DeepSpeed
    gradient_clipping=0. Returns our max norm (0.0 = measure only), or None when DeepSpeed's
    ZeRO optimizers do it (their norm is the true global one under AutoEP, checked by the tests), and
    in fp16, whose gradients carry the loss scale until DeepSpeed's optimizer unscales them inside step
    (and clips them there: ZeRO 1-3, or FP16_UnfusedOptimizer for a dense model at ZeRO-0)."""
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if stage == 0 and precision_of(ds_config) == "fp32":
        return float(ds_config.get("gradient_clipping", 0.0))
    return None


def global_grad_norm(module: nn.Module) -> torch.Tensor:
    """L2 norm of all gradients of the model across ranks, after DeepSpeed's all-reduce: dense
    gradients are the same on every rank; AutoEP expert gradients (marked `allreduce=False` with
    an expert group name) are summed over the expert-parallel group that holds distinct experts."""
    from deepspeed.utils import groups

    grads = [(p, p.grad) for p in module.parameters() if p.grad is not None]
    device = next(module.parameters()).device
    dense = torch.zeros((), dtype=torch.float32, device=device)
    experts: dict[str, torch.Tensor] = {}
    for p, grad in grads:
        sq = grad.detach().float().pow(2).sum()
        if getattr(p, "allreduce", True) is False and hasattr(p, "group_name"):
            experts[p.group_name] = experts.get(p.group_name, torch.zeros_like(dense)) + sq
        else:
            dense += sq
    for name in sorted(experts):
        part = _device.to_device(experts[name], device)  # computed from the gradients, on their device
        dense += comm.all_reduce(part, group=groups._get_expert_parallel_group(name))
    return dense.sqrt()


def clip_grad_norm(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale all gradients so their global norm is at most max_norm (0 = no clipping); returns the
    norm as a device tensor (no host synchronization: the scale is computed on the device)."""
    norm = global_grad_norm(module)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in module.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
    return norm


def skip_step_if_not_finite(engine, grad_norm: torch.Tensor) -> None:
    """DeepSpeed quirk: its ZeRO 1-3 optimizers, its bf16 and fp16 ones all skip a step whose gradient
    norm is not finite (zeroed gradients, no optimizer or schedule step, `engine.skipped_steps` + 1);
    ZeRO-0 in fp32 steps DeepSpeed's plain torch optimizer whatever the gradients hold. On that path
    (where we clip: `own_gradient_clipping`) do the same before engine.step(): a non-finite norm drops
    every gradient (torch's optimizers leave a parameter without one alone) and sets the `overflow`
    flag that engine.step() reads to count the skip and hold the schedule. Reads the norm on the host:
    that path's one synchronization per step."""
    bad = not bool(torch.isfinite(grad_norm))
    engine.optimizer.overflow = bad
    if bad:
        for p in engine.module.parameters():
            p.grad = None


def initialize(model: nn.Module, ds_config: dict[str, Any], no_decay: str | None = None):
    """deepspeed.initialize with our parameter groups; returns the engine. With the native MoE backend
    the model's MoE blocks are first replaced by DeepSpeed's native layers (`native_moe.swap_in`);
    DeepSpeed then splits their expert parameters into MoE optimizer groups
    (`split_params_into_different_moe_groups_for_optimizer`), reduced over the expert-data-parallel group.
    Afterwards the routers AutoEP put in place compute in fp32 (`routers_in_fp32`, unless
    model.moe.router_fp32 is false). The precision is
    checked against this rank's device first, whichever path gets here (`check_precision_supported`)."""
    import deepspeed

    check_precision_supported(ds_config, _device.accelerator_device())
    cfg: ModelConfig | None = getattr(model, "cfg", None)
    if cfg is not None and cfg.moe.num_experts > 0 and cfg.moe.backend == "native":
        from sparsexpert.distributed import native_moe

        ep_size = resolve_ep_size(cfg, comm.world_size())
        data_first = bool(ds_config.get("use_data_before_expert_parallelism"))  # DeepSpeed's key
        native_moe.swap_in(model, cfg.moe, ep_size, data_first)
    if own_gradient_clipping(ds_config) is not None:
        ds_config = {**ds_config, "gradient_clipping": 0.0}
    weight_decay = ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, weight_decay, no_decay), config=ds_config
    )
    if cfg is None or cfg.moe.router_fp32:
        routers_in_fp32(engine.module)
    return engine


def gathered(params: list[nn.Parameter]):
    """A context in which `params` are whole on every rank (DeepSpeed's GatheredParameters: under ZeRO-3
    each rank holds a shard; otherwise it does nothing), for a method that is not a forward."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    return GatheredParameters(params)


def deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def environment() -> dict[str, Any]:
    """What besides the configuration decides a run's numbers, for its config.json: the same command and
    seed give the same figures only with the same versions, accelerator and CPU thread count (the
    thread count sets how floating-point sums are split, so another gives other numbers)."""
    import platform

    from deepspeed.accelerator import get_accelerator

    return {
        "torch": torch.__version__,
        "deepspeed": deepspeed_version(),
        "accelerator": get_accelerator().device_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def moe_drop_counts(module: nn.Module) -> torch.Tensor | None:
    """[MoE layers, 2] (dropped, routed) token-expert assignments of this rank's last forward with
    the native backend (capacity-limited routing); None for AutoEP, which drops nothing."""
    from sparsexpert.distributed import native_moe

    return native_moe.drop_counts(module)


# ---------------------------------------------------------------------------------------------
# Precision: fp32, bf16, or fp16 with DeepSpeed's dynamic loss scaling


def precision_of(ds_config: dict[str, Any]) -> str:
    """What a DeepSpeed config trains in: "fp16", "bf16" or "fp32"."""
    if (ds_config.get("fp16") or {}).get("enabled"):
        return "fp16"
    if (ds_config.get("bf16") or ds_config.get("bfloat16") or {}).get("enabled"):
        return "bf16"
    return "fp32"


def _check_precision_config(model_cfg: ModelConfig, ds: dict[str, Any], stage: int) -> None:
    """What check_config refuses of fp16/bf16 whatever the accelerator."""
    fp16 = bool((ds.get("fp16") or {}).get("enabled"))
    bf16 = bool((ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled"))
    if fp16 and bf16:
        raise ConfigError(
            "ds_config.fp16.enabled", True, "ds_config.bf16.enabled is true as well; enable one"
        )
    if fp16 and stage == 0 and model_cfg.moe.num_experts > 0:
        # DeepSpeed quirk: at ZeRO-0 fp16 runs in FP16_UnfusedOptimizer (any optimizer but a compiled
        # FusedAdam), whose norm for clipping and for get_global_grad_norm() drops the expert gradients
        # (split_params_grads_into_shared_and_expert_params, the experts' half discarded). Our own
        # clipping cannot step in: the gradients carry the loss scale until DeepSpeed's step unscales
        # them. Refused whichever optimizer, rather than depend on which of its two fp16 paths DeepSpeed takes.
        raise ConfigError(
            "ds_config.fp16.enabled",
            True,
            "fp16 with MoE layers needs ZeRO 1-3 (DeepSpeed's ZeRO-0 fp16 optimizer leaves the experts out of "
            "the gradient norm it clips by): use ds_configs/moe_z2_fp16.json, or bf16/fp32 at ZeRO-0",
        )
    k = model_cfg.knowledge
    if k.fusion and k.entity_optimizer == "rowwise_adagrad" and (fp16 or stage == 3):
        # the row-wise path reads its gradients as backward leaves them: under fp16 they carry DeepSpeed's
        # loss scale; under ZeRO-3 the table would be partitioned, and the path keeps it whole
        raise ConfigError(
            "model.knowledge.entity_optimizer",
            k.entity_optimizer,
            f"runs at ZeRO 0-2 in fp32 or bf16 (this config: ZeRO-{stage}{', fp16' if fp16 else ''}): the table "
            "stays whole and fp32 on every rank; use ds_configs/moe_z2.json or ds_configs/moe_z2_bf16.json, or "
            "model.knowledge.entity_optimizer=adam",
        )


@dataclass(frozen=True)
class AcceleratorInfo:
    """What the precision check needs to know of a rank's accelerator."""

    name: str
    """DeepSpeed's accelerator: "cuda", "cpu", ..."""
    device: str
    """The device, e.g. "Tesla V100-SXM2-32GB", for the message."""
    bf16: bool
    """Native bf16 arithmetic (CUDA: compute capability 8.0 or newer; emulation does not count)."""
    fp16: bool
    """DeepSpeed trains fp16 there (CUDA: compute capability 7.0 or newer; CPU: oneDNN fp16 kernels)."""
    capability: tuple[int, int] | None = None
    """CUDA compute capability."""


def check_precision(ds: dict[str, Any], acc: AcceleratorInfo) -> None:
    """Refuse a precision this accelerator lacks, before deepspeed.initialize, naming the field, the device
    and the fix. A pure function of its inputs (see `accelerator_info` for where they come from)."""
    precision = precision_of(ds)
    cap = f" (compute capability {acc.capability[0]}.{acc.capability[1]})" if acc.capability else ""
    if precision == "bf16" and not acc.bf16:
        # DeepSpeed quirk: its CUDA accelerator asks torch.cuda.is_bf16_supported(), which counts emulated
        # bf16 as supported, so on a V100 or T4 it would train bf16 without a word.
        raise ConfigError(
            "ds_config.bf16.enabled",
            True,
            f"{acc.device}{cap} has no bf16 arithmetic (a GPU needs compute capability 8.0 or newer: A100, "
            "H100, L4, RTX 30xx and later); use ds_configs/moe_z2_fp16.json (fp16 with dynamic loss scaling) "
            "or fp32 (ds_configs/moe_z2.json)",
        )
    if precision == "fp16" and not acc.fp16:
        why = (
            "DeepSpeed's CPU accelerator trains fp16 only where oneDNN has fp16 kernels (AVX512-FP16 or AMX-FP16)"
            if acc.name == "cpu"
            else "DeepSpeed trains fp16 on compute capability 7.0 or newer"
        )
        fix = "bf16 (ds_configs/moe_z2_bf16.json) or fp32" if acc.bf16 else "fp32"
        raise ConfigError(
            "ds_config.fp16.enabled",
            True,
            f"{acc.device}{cap} lacks fp16 ({why}); use {fix} (ds_configs/moe_z2.json)",
        )


def accelerator_info(device: torch.device) -> AcceleratorInfo:
    """This process's accelerator as `check_precision` needs it (on CUDA, after the device is set)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return AcceleratorInfo(
            name="cuda",
            device=torch.cuda.get_device_name(device),
            bf16=bool(torch.version.hip) or major >= 8,
            fp16=bool(acc.is_fp16_supported()),
            capability=(major, minor),
        )
    if device.type == "cpu":
        model = next(
            (line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
            "this CPU",
        )
        return AcceleratorInfo("cpu", model, bf16=acc.is_bf16_supported(), fp16=bool(acc.is_fp16_supported()))
    return AcceleratorInfo(device.type, str(device), acc.is_bf16_supported(), bool(acc.is_fp16_supported()))


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def check_precision_supported(ds: dict[str, Any], device: torch.device) -> None:
    """The harness's check before deepspeed.initialize: the config's precision against this rank's device."""
    check_precision(ds, accelerator_info(device))


def routers_in_fp32(module: nn.Module) -> int:
    """Make every MoE router Linear of `module` compute in fp32 (`RouterLinear`); returns how many it changed.

    Our blocks' gates already are RouterLinear; AutoEP's replacement builds its own nn.Linear gate
    (`TokenChoiceTopKRouter.gate`: softmax and top-k in fp32, the matmul in the module's 16-bit dtype), and
    the native gate computes in fp32 itself. The class of the existing module is changed in place rather
    than the module replaced: the Parameter, every hook on it (our logits recorder, ZeRO-3's gathering),
    its name and the optimizer's references all stay as they are.
    """
    from sparsexpert.model.moe import RouterLinear, RouterLogitsRecorder

    moe_blocks = getattr(module, "moe_blocks", None)  # our models' method (any module that has one)
    blocks = moe_blocks() if moe_blocks is not None else []
    changed = 0
    for block in blocks:
        gate = RouterLogitsRecorder.find_gate(block)
        if type(gate) is nn.Linear:
            gate.__class__ = RouterLinear
            changed += 1
    return changed


def precision_state(engine) -> dict[str, float | int]:
    """For the metrics, once per log interval: the optimizer steps DeepSpeed skipped so far (gradients
    not finite; in fp16 also overflow), kept in checkpoints so counted across resumes, and under fp16 the
    current loss scale. Host numbers DeepSpeed already holds: no synchronization."""
    state: dict[str, float | int] = {"skipped_steps": int(engine.skipped_steps)}
    if engine.fp16_enabled():
        # Every DeepSpeed fp16 optimizer (ZeRO 1-2, ZeRO-3, FP16_Optimizer, FP16_UnfusedOptimizer) has loss_scale.
        state["loss_scale"] = float(engine.optimizer.loss_scale)
    return state
