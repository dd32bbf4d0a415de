"""The native MoE backend: DeepSpeed-MoE's own layer (`deepspeed.moe.layer.MoE`) in place of our blocks.

`model.moe.backend = "native"` keeps the model plain (`sparsexpert/model/moe.py`): before
`deepspeed.initialize`, `swap_in` replaces each `MoEBlock` by a `NativeMoE`, DeepSpeed's layer
holding this rank's experts, copied from the block by global id (expert g of a layer lives on
expert-parallel rank g // local experts, as DeepSpeed numbers them), so initialization does not
depend on ep_size. DeepSpeed would deep-copy one expert module into every slot, all equal.

What the native layer adds over AutoEP: capacity-limited routing (capacity_factor, min_capacity,
drop_tokens, Random Token Selection, noisy gating), Residual-MoE, a different expert count per layer
(pyramid PR-MoE). What it computes, dropless, equals our block for top_k >= 2 (the k weights
renormalized); at top-1 the expert output is scaled by its router probability, which the plain
block reproduces with renormalize=False. Our router losses (`RouterLogitsRecorder`) replace the
layer's own l_aux, so both backends optimize the same objective.

Names (one MoE layer at `layers.L.mlp`; g a global expert id; DeepSpeed writes each expert to its
own file `layer_<i>_expert_<g>_mp_rank_00_model_states.pt`, i counting the MoE layers):

    plain model                       native layer
    layers.L.mlp.gate.weight          layers.L.mlp.deepspeed_moe.gate.wg.weight
    layers.L.mlp.experts.w1[g]        layers.L.mlp.deepspeed_moe.experts.deepspeed_experts.<g>.w1.weight  (w2, w3 alike)
    layers.L.mlp.residual_mlp.*       layers.L.mlp.mlp.*
    layers.L.mlp.residual_coef.*      layers.L.mlp.coefficient.*
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups

from sparsexpert.model.config import MoEConfig
from sparsexpert.model.moe import MoEBlock, SwiGLU

_EXPERT_KEY = re.compile(r"^(.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(w[123])\.weight$")
_RENAMES = (
    (".deepspeed_moe.gate.wg.weight", ".gate.weight"),
    (".mlp.mlp.", ".mlp.residual_mlp."),
    (".mlp.coefficient.", ".mlp.residual_coef."),
)


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"  # DeepSpeed's name, shared with AutoEP's groups of the same size


class NativeMoE(MoE):
    """DeepSpeed's MoE layer with our block's interface: forward(x_BSD) -> y_BSD.

    After each forward, `dropped` and `routed` hold this rank's token-expert assignments dropped
    for lack of capacity and all of them (device tensors, no synchronization)."""

    def __init__(self, block: MoEBlock, moe: MoEConfig, ep_size: int, ep_rank: int):
        D, F = block.gate.in_features, block.experts.w1.shape[1]
        super().__init__(
            hidden_size=D,
            expert=SwiGLU(D, F),
            num_experts=block.num_experts,
            ep_size=ep_size,
            k=moe.top_k,
            capacity_factor=moe.capacity_factor,
            eval_capacity_factor=moe.eval_capacity_factor,
            min_capacity=moe.min_capacity,
            use_residual=moe.use_residual,
            noisy_gate_policy=None if moe.noisy_gate_policy == "none" else moe.noisy_gate_policy,
            drop_tokens=moe.drop_tokens,
            use_rts=moe.use_rts,
            top2_2nd_expert_sampling=moe.top2_2nd_expert_sampling,
        )
        self.dropped: torch.Tensor | None = None
        self.routed: torch.Tensor | None = None
        self.deepspeed_moe.gate.register_forward_hook(self._count_drops)
        self._copy_from(block, ep_rank)

    @torch.no_grad()
    def _copy_from(self, block: MoEBlock, ep_rank: int) -> None:
        def copy(dst: torch.Tensor, src: torch.Tensor, row: int | None = None) -> None:
            dst.copy_(src if row is None else src[row])
            dst.requires_grad_(src.requires_grad)

        copy(self.deepspeed_moe.gate.wg.weight, block.gate.weight)
        for i, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
            g = ep_rank * self.num_local_experts + i  # DeepSpeed's global id of local expert i
            for w in ("w1", "w2", "w3"):
                copy(getattr(expert, w).weight, getattr(block.experts, w), g)
        if self.use_residual:
            if block.residual_mlp is None or block.residual_coef is None:
                raise ValueError(
                    "model.moe.use_residual is set, but the MoE block has no residual MLP to copy"
                )
            for w in ("w1", "w2", "w3"):
                copy(getattr(self.mlp, w).weight, getattr(block.residual_mlp, w).weight)
            copy(self.coefficient.weight, block.residual_coef.weight)
            copy(self.coefficient.bias, block.residual_coef.bias)

    def _count_drops(self, gate: nn.Module, inputs: tuple, output: tuple) -> None:
        # The gate's sparse routes: (l_aux, capacity, E, expert of each route [K, T] (-1: dropped), ...).
        experts_KT = output[3]
        self.dropped = (experts_KT < 0).sum()
        self.routed = torch.full_like(self.dropped, experts_KT.numel())  # on the same device, no sync

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        out, _l_aux, _counts = super().forward(x_BSD)
        return out


def swap_in(model: nn.Module, moe: MoEConfig, ep_size: int, data_before_expert: bool = False) -> int:
    """Replace every MoEBlock of `model` by a NativeMoE holding this rank's experts; returns how many.
    Creates DeepSpeed's expert-parallel groups for ep_size (the engine reuses them) to know this
    rank's place in its group."""
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size, use_data_before_expert_parallel_=data_before_expert)
    ep_rank = groups._get_expert_parallel_rank(name)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, MoEBlock)]
    for n, block in targets:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NativeMoE(block, moe, ep_size, ep_rank))
    return len(targets)


def native_layers(module: nn.Module) -> list[NativeMoE]:
    return [m for m in module.modules() if isinstance(m, NativeMoE)]


def drop_counts(module: nn.Module) -> torch.Tensor | None:
    """[native MoE layers, 2]: (dropped, routed) token-expert assignments of the last forward on this
    rank, on the device they were counted on (no host synchronization); None when the model has no
    native layers."""
    layers = native_layers(module)
    if not layers:
        return None
    counts = []
    for m in layers:
        if m.dropped is None or m.routed is None:
            raise RuntimeError("drop_counts reads the last forward's counts: run a forward first")
        counts.append(torch.stack([m.dropped, m.routed]))
    return torch.stack(counts)


def plain_name(key: str) -> str:
    """The plain model's name of a non-expert parameter of a model with native layers."""
    for native, plain in _RENAMES:
        key = key.replace(native, plain)
    return key


def expert_key(key: str) -> tuple[str, int]:
    """(plain stacked name, global expert id) of a native expert parameter's key."""
    m = _EXPERT_KEY.match(key)
    if m is None:
        raise ValueError(f"{key}: not a native expert parameter (…deepspeed_experts.<id>.w1.weight)")
    return f"{m.group(1)}.experts.{m.group(3)}", int(m.group(2))


def describe(moe: MoEConfig, layer_experts: list[int]) -> str:
    """One phrase for the run's header line."""
    if moe.drop_tokens:
        routing = (
            f"capacity {moe.capacity_factor:g} (eval {moe.eval_capacity_factor:g}, min {moe.min_capacity})"
        )
        if moe.top_k == 1:
            routing += ", random token selection" if moe.use_rts else ""
    else:
        routing = "dropless"
    parts = [f"native DeepSpeed-MoE, {routing}"]
    if moe.noisy_gate_policy != "none":
        parts.append(f"{moe.noisy_gate_policy} gate noise")
    if moe.top2_2nd_expert_sampling and moe.top_k == 2:
        parts.append("2nd expert sampled")
    if moe.use_residual:
        parts.append("Residual-MoE")
    if len(set(layer_experts)) > 1:
        parts.append(f"PR-MoE experts per layer {layer_experts}")
    return ", ".join(parts)
