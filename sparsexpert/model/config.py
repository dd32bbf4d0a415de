"""Model configuration: one dataclass for the transformer, one for its MoE layers."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsexpert.config import ConfigError
from sparsexpert.knowledge.config import KnowledgeConfig


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward layers (Mixtral layout, dropless token-choice routing)."""

    num_experts: int = 8
    """Routed experts per MoE layer. 0 makes every feed-forward layer dense."""
    top_k: int = 2
    """Experts each token is sent to; their softmax weights are renormalized to sum to 1."""
    moe_every: int = 1
    """Every `moe_every`-th layer is an MoE layer (layers moe_every-1, 2*moe_every-1, ...); the rest are dense."""
    d_expert: int = 0
    """Hidden size of one expert's SwiGLU. 0 means `model.d_ff`."""
    num_shared_experts: int = 0
    """DeepSeek-style shared experts every token passes through, held as one SwiGLU of width
    num_shared_experts * d_expert and added to the routed output."""
    ep_size: int = 0
    """Expert-parallel degree: the experts of a layer are split over this many ranks. 0 picks the
    largest divisor of num_experts that divides the world size."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss (Switch Transformer / Mixtral); it equals 1 under perfect balance."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss, mean(logsumexp(router logits)^2) (ST-MoE)."""
    backend: str = "autoep"
    """How experts are sharded across ranks: "autoep" (DeepSpeed AutoEP, dropless, ZeRO 0-3)."""

    def validate(self, d_ff: int) -> None:
        if self.num_experts < 0:
            raise ConfigError("model.moe.num_experts", self.num_experts, "must be >= 0 (0 = dense model)")
        if self.num_experts > 0:
            if not 1 <= self.top_k <= self.num_experts:
                raise ConfigError(
                    "model.moe.top_k",
                    self.top_k,
                    f"must be between 1 and model.moe.num_experts={self.num_experts}",
                )
            if self.moe_every < 1:
                raise ConfigError(
                    "model.moe.moe_every", self.moe_every, "must be >= 1 (1 = every layer is MoE)"
                )
        if self.d_expert < 0:
            raise ConfigError(
                "model.moe.d_expert", self.d_expert, f"must be > 0, or 0 to use model.d_ff={d_ff}"
            )
        if self.num_shared_experts < 0:
            raise ConfigError("model.moe.num_shared_experts", self.num_shared_experts, "must be >= 0")
        if self.ep_size < 0:
            raise ConfigError("model.moe.ep_size", self.ep_size, "must be >= 1, or 0 for automatic")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ConfigError(
                "model.moe.aux_loss_coef/z_loss_coef", (self.aux_loss_coef, self.z_loss_coef), "must be >= 0"
            )
        if self.backend != "autoep":
            raise ConfigError("model.moe.backend", self.backend, 'use "autoep" (the only backend so far)')


@dataclass
class ModelConfig:
    """A pre-norm decoder (or encoder) transformer: RMSNorm, rotary positions, SwiGLU, MoE blocks."""

    vocab_size: int = 0
    """Embedding rows. 0 takes the tokenizer's vocabulary size from the dataset; a larger value pads."""
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads; d_model must divide by it."""
    d_ff: int = 256
    """Hidden size of the dense SwiGLU feed-forward layers."""
    max_seq_len: int = 256
    """Longest sequence the rotary cache covers."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    causal: bool = True
    """True: causal language model (next-token loss). False: bidirectional attention, masked LM loss."""
    init_std: float = 0.02
    """Standard deviation of the normal initialization; residual output projections are scaled by 1/sqrt(2*n_layers)."""
    tie_embeddings: bool = False
    """Share the token embedding and the output projection."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """The MoE layers."""
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    """How the model uses the knowledge graph joined to the text (default: not at all)."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_expert_resolved(self) -> int:
        return self.moe.d_expert or self.d_ff

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe.num_experts > 0 and layer_idx % self.moe.moe_every == self.moe.moe_every - 1

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}", getattr(self, name), "must be >= 1")
        if self.vocab_size < 0:
            raise ConfigError(
                "model.vocab_size", self.vocab_size, "must be > 0, or 0 to take it from the tokenizer"
            )
        if self.d_model % self.n_heads:
            raise ConfigError("model.n_heads", self.n_heads, f"must divide model.d_model={self.d_model}")
        if self.head_dim % 2:
            raise ConfigError(
                "model.n_heads", self.n_heads, "d_model / n_heads must be even for rotary embeddings"
            )
        self.moe.validate(self.d_ff)
        self.knowledge.validate(self.n_layers)
        if self.knowledge.mode == "inject" and not self.causal:
            raise ConfigError(
                "model.knowledge.mode",
                "inject",
                "K-BERT injection here trains a causal LM (branches predict their next token); "
                "use model.causal=true, or mode=fusion for a masked LM",
            )
