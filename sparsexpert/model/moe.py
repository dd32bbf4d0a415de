"""Mixture-of-Experts feed-forward block in the Mixtral layout, and its router losses.

Shape letters: B batch, S sequence, T = B*S tokens, D model width, F expert hidden width,
E experts, K experts per token (top-k), N = T*K token-expert assignments.

The block is plain PyTorch. Its parameter layout is the one DeepSpeed AutoEP consumes
(`gate`: Linear D->E; `experts.w1`/`w3`: [E, F, D] gate/up; `experts.w2`: [E, D, F] down), so at
`deepspeed.initialize` AutoEP swaps it for an expert-parallel layer computing the same function.
The router losses are therefore not computed inside `forward` but from the router logits that
`RouterLogitsRecorder` captures, which keeps working after the swap.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    """Dense feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RouterLinear(nn.Linear):
    """A Linear that computes in fp32 whatever the dtype of its weight: the router's logits.

    Under fp16 or bf16 DeepSpeed casts every parameter to 16 bits, and a 16-bit matmul returns rounded
    logits (bf16 keeps 8 significant bits, fp16 11): near-equal experts swap places, the top-k choice
    with them, and the router losses see the rounding. Here the product is taken in fp32 from the
    16-bit input and weight. The weight stays in the model's dtype: DeepSpeed's fp16/bf16 optimizers
    keep the fp32 master copy and hold one flat 16-bit buffer per parameter group. The state dict is a
    Linear's; in fp32 it computes exactly what nn.Linear computes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class Experts(nn.Module):
    """E SwiGLU experts held as stacked weights."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))  # gate  [E, F, D]
        self.w3 = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))  # up    [E, F, D]
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))  # down  [E, D, F]

    def init_weights(self, seed: int, std: float, out_std: float) -> None:
        """Initialize expert e from a generator seeded by (seed, e): the same whatever the ep_size."""
        with torch.no_grad():
            for e in range(self.num_experts):
                gen = torch.Generator().manual_seed(seed * 1_000_003 + e)
                self.w1[e].normal_(0.0, std, generator=gen)
                self.w3[e].normal_(0.0, std, generator=gen)
                self.w2[e].normal_(0.0, out_std, generator=gen)

    def forward(self, x_ND: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        """x_ND holds the routed rows sorted by expert, counts_E[e] of them for expert e."""
        # Unbind once: indexing w[e] per expert would make each slice's backward allocate a full
        # [E, F, D] zero gradient (cost quadratic in E).
        w1, w3, w2 = self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)
        outs = []
        for e, x_nD in enumerate(torch.split(x_ND, counts_E)):
            if x_nD.shape[0] == 0:
                continue
            h_nF = F.silu(x_nD @ w1[e].t()) * (x_nD @ w3[e].t())
            outs.append(h_nF @ w2[e].t())
        if not outs:
            return x_ND.new_zeros(x_ND.shape)
        return torch.cat(outs, dim=0)


class MoEBlock(nn.Module):
    """Token-choice top-k MoE: softmax router, top-k weights renormalized to sum to 1 (or, with
    renormalize=False, the router probabilities themselves), dropless experts.

    residual=True makes it a Residual-MoE block (DeepSpeed-MoE): a dense SwiGLU beside the experts,
    the two outputs mixed per token by softmax(residual_coef(x)).
    """

    def __init__(
        self,
        d_model: int,
        d_expert: int,
        num_experts: int,
        top_k: int,
        num_shared_experts: int = 0,
        renormalize: bool = True,
        residual: bool = False,
        router_fp32: bool = True,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = (RouterLinear if router_fp32 else nn.Linear)(d_model, num_experts, bias=False)
        self.experts = Experts(num_experts, d_model, d_expert)
        self.shared_experts = SwiGLU(d_model, d_expert * num_shared_experts) if num_shared_experts else None
        self.residual_mlp = SwiGLU(d_model, d_expert) if residual else None
        self.residual_coef = nn.Linear(d_model, 2) if residual else None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)

        logits_TE = self.gate(x_TD)
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        weights_TK, experts_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.renormalize:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)

        # Dispatch: sort the T*K assignments by expert so each expert sees a contiguous slice.
        order_N = torch.argsort(experts_TK.reshape(-1), stable=True)
        token_N = order_N // self.top_k
        # The split sizes go to the host: one synchronization per layer (counted with scatter_add_: a
        # CUDA bincount would add one). Training never runs this block (DeepSpeed's AutoEP or native
        # layer replaces it); generation, a distillation teacher and the tests do.
        experts_N = experts_TK.reshape(-1)
        zeros_E = torch.zeros(self.num_experts, dtype=torch.long, device=experts_N.device)
        counts_E = zeros_E.scatter_add_(0, experts_N, torch.ones_like(experts_N)).tolist()
        # index_select, not x_TD[token_N]: its backward is an index_add, several times faster on CPU
        # than the accumulating index_put that advanced indexing uses.
        y_ND = self.experts(x_TD.index_select(0, token_N), counts_E)

        # Combine: put the outputs back in (token, k) order and take the weighted sum over k.
        # (A gather and a sum save less for backward than scaling in sorted order and index_add_.)
        inverse_N = torch.empty_like(order_N)
        inverse_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
        y_TKD = y_ND.index_select(0, inverse_N).view(-1, self.top_k, D)
        out_TD = (y_TKD * weights_TK.unsqueeze(-1).to(y_TKD.dtype)).sum(dim=1)

        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        if self.residual_mlp is not None and self.residual_coef is not None:  # both, or neither
            coef_T2 = torch.softmax(self.residual_coef(x_TD), dim=-1)
            out_TD = out_TD * coef_T2[:, 0:1] + self.residual_mlp(x_TD) * coef_T2[:, 1:]
        return out_TD.reshape(B, S, D)


def expert_init_seed(seed: int, layer_idx: int) -> int:
    """Seed of a layer's experts; expert e of that layer draws from (this seed, e)."""
    return zlib.crc32(f"{seed}/layers.{layer_idx}/experts".encode())


@dataclass
class RouterStats:
    """Router losses and load of one forward pass: the losses averaged over the MoE layers, and per layer."""

    aux_loss: torch.Tensor
    """Load-balancing loss: E * sum_e f_e * P_e, with f_e the share of assignments to expert e and
    P_e its mean router probability. 1.0 under perfect balance."""
    z_loss: torch.Tensor
    """Router z-loss: mean over tokens of logsumexp(logits)^2."""
    expert_counts: torch.Tensor
    """[num_moe_layers, max E] assignments per expert (no gradient); a layer with fewer experts
    (pyramid PR-MoE) has zeros after its last one."""
    per_layer: torch.Tensor
    """[num_moe_layers, 3] per layer (no gradient): aux loss, z-loss, router entropy (mean over tokens of
    the entropy of the router's distribution, in nats: ln E when uniform, 0 when one-hot)."""


def router_stats(logits_per_layer: list[torch.Tensor], top_k: int) -> RouterStats:
    aux, z, entropy, counts = [], [], [], []
    for logits_TE in logits_per_layer:
        logits_TE = logits_TE.float()
        T, E = logits_TE.shape
        probs_TE = torch.softmax(logits_TE, dim=-1)
        with torch.no_grad():
            entropy.append(-(probs_TE * torch.log_softmax(logits_TE, dim=-1)).sum(dim=-1).mean())
        experts_TK = torch.topk(probs_TE, top_k, dim=-1).indices.reshape(-1)
        # scatter_add_, not bincount: on CUDA bincount reads the largest index back to the host.
        counts_E = torch.zeros(E, dtype=torch.long, device=logits_TE.device)
        counts_E.scatter_add_(0, experts_TK, torch.ones_like(experts_TK))
        share_E = counts_E.to(probs_TE.dtype) / (T * top_k)
        aux.append(E * torch.sum(share_E * probs_TE.mean(dim=0)))
        z.append(torch.logsumexp(logits_TE, dim=-1).square().mean())
        counts.append(counts_E)
    E_max = max(c.numel() for c in counts)
    counts = [F.pad(c, (0, E_max - c.numel())) for c in counts]
    aux_L, z_L = torch.stack(aux), torch.stack(z)
    per_layer = torch.stack([aux_L.detach(), z_L.detach(), torch.stack(entropy)], dim=1)
    return RouterStats(aux_L.mean(), z_L.mean(), torch.stack(counts).detach(), per_layer)


class RouterLogitsRecorder:
    """Records the router logits of each MoE layer during a forward pass.

    The router is the module called `gate` inside the MoE block: ours is the Linear `mlp.gate`,
    AutoEP's replacement keeps it as the Linear `mlp.router.gate`; DeepSpeed's native layer has
    `mlp.deepspeed_moe.gate`, a gate module that computes its logits from its Linear `wg` inside
    (in fp32), so for it they are computed again from its input, when `logits` is read. Hooks are
    (re)attached whenever the modules change, so the losses survive the swaps DeepSpeed and
    sparsexpert make at initialization.

    Activation checkpointing runs each block's forward again during backward: inside `paused()`
    nothing is recorded, so no layer counts twice. The hooks therefore must not compute anything that
    autograd saves (the recomputation would save fewer tensors than the forward, which torch's
    checkpoint refuses): the native logits are computed in `logits`, outside the blocks.
    """

    def __init__(self) -> None:
        self._hooked: list[nn.Module] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._paused = 0
        self._recorded: list[torch.Tensor | tuple[nn.Linear, torch.Tensor]] = []

    @property
    def logits(self) -> list[torch.Tensor]:
        """[T, E] router logits of each MoE layer of the last forward pass, in order."""
        logits = [
            r if isinstance(r, torch.Tensor) else F.linear(r[1].float(), r[0].weight.float())
            for r in self._recorded
        ]
        self._recorded = list(logits)  # computed once
        return logits

    def paused(self) -> _Paused:
        """A context manager that may be entered again and again: torch's checkpoint reuses the one
        it was given for every recomputation of the block (a second backward through the same graph
        recomputes again, e.g. adversarial fine-tuning's gradient w.r.t. the embeddings)."""
        return _Paused(self)

    @staticmethod
    def find_gate(moe_block: nn.Module) -> nn.Module:
        gates = [m for name, m in moe_block.named_modules() if name.rsplit(".", 1)[-1] == "gate"]
        if len(gates) != 1 or not isinstance(getattr(gates[0], "wg", gates[0]), nn.Linear):
            raise RuntimeError(
                f"expected exactly one router named 'gate' in {type(moe_block).__name__}: a Linear, "
                "or a module holding its Linear as `wg`"
            )
        return gates[0]

    def attach(self, moe_blocks: list[nn.Module]) -> None:
        gates = [self.find_gate(b) for b in moe_blocks]
        if len(gates) == len(self._hooked) and all(a is b for a, b in zip(gates, self._hooked)):
            return
        for h in self._handles:
            h.remove()
        self._hooked = gates
        self._handles = [g.register_forward_hook(self._record) for g in gates]

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self._paused:
            return
        if isinstance(module, nn.Linear):
            self._recorded.append(output)
        else:  # the native gate: logits = x_TD @ wg^T in fp32, as it computes them (before any noise)
            wg = module.wg
            if not isinstance(wg, nn.Linear):
                raise TypeError(
                    f"the router {type(module).__name__} holds a {type(wg).__name__} as wg, not a Linear"
                )
            self._recorded.append((wg, inputs[0]))

    def reset(self) -> None:
        self._recorded = []


class _Paused:
    def __init__(self, recorder: RouterLogitsRecorder):
        self.recorder = recorder

    def __enter__(self) -> None:
        self.recorder._paused += 1

    def __exit__(self, *exc: object) -> None:
        self.recorder._paused -= 1


def residual_out_std(init_std: float, n_layers: int) -> float:
    return init_std / math.sqrt(2 * n_layers)
