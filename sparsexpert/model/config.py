"""Model configuration: one dataclass for the transformer, one for its MoE layers."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from sparsexpert.config import ConfigError
from sparsexpert.knowledge.config import KnowledgeConfig


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward layers (Mixtral layout, token-choice routing)."""

    num_experts: int = 8
    """Routed experts per MoE layer. 0 makes every feed-forward layer dense."""
    top_k: int = 2
    """Experts each token is sent to; their softmax weights are renormalized to sum to 1 (except
    with the native backend at top-1, whose weight is the router probability, as in Switch)."""
    moe_every: int = 1
    """Every `moe_every`-th layer is an MoE layer (layers moe_every-1, 2*moe_every-1, ...); the rest are dense."""
    d_expert: int = 0
    """Hidden size of one expert's SwiGLU. 0 means `model.d_ff`."""
    num_shared_experts: int = 0
    """DeepSeek-style shared experts every token passes through, held as one SwiGLU of width
    num_shared_experts * d_expert and added to the routed output."""
    ep_size: int = 0
    """Expert-parallel degree: the experts of a layer are split over this many ranks. It must divide the
    world size and every MoE layer's expert count. 0 picks the largest such divisor."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss (Switch Transformer / Mixtral); it equals 1 under perfect balance."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss, mean(logsumexp(router logits)^2) (ST-MoE)."""
    router_fp32: bool = True
    """Compute the router logits in fp32 from the 16-bit inputs and weights under bf16 and fp16 (ours and
    AutoEP's router; the native gate always does), as Megatron-Core's moe_router_dtype=fp32: 16-bit logits
    swap near-equal experts. Costs a little: 3.5-4% of the MoE step on our 2-core CPU in bf16, where the
    fp32 product runs without the bf16 matrix units (bench/pretrain_throughput.py). false: in the model's
    dtype (softmax and top-k stay fp32). No effect in fp32."""
    backend: str = "autoep"
    """How the experts are sharded across ranks and how tokens are routed to them:
    "autoep": DeepSpeed AutoEP swaps each block for its expert-parallel layer (dropless, ZeRO 0-3).
    "native": DeepSpeed-MoE's own layer (`deepspeed.moe.layer.MoE`, Rajbhandari et al. 2022):
    capacity-limited routing, Residual-MoE, pyramid PR-MoE; ZeRO 0-2. The fields below apply to it only."""
    capacity_factor: float = 1.0
    """native: while training, each expert takes at most max(ceil(tokens / E * capacity_factor * top_k),
    min_capacity) token assignments per rank and micro-batch; the overflow is dropped (the token
    keeps only its residual path). Ignored when drop_tokens is false."""
    eval_capacity_factor: float = 1.0
    """native: capacity_factor in evaluation (engine.eval())."""
    min_capacity: int = 4
    """native: lower bound of an expert's capacity. DeepSpeed's top-1 gate needs at least this many
    tokens per micro-batch."""
    drop_tokens: bool = True
    """native: true drops the assignments beyond capacity; false is dropless (capacity = the largest
    expert load in the expert-parallel group, as AutoEP routes)."""
    use_rts: bool = True
    """native, top-1 only: Random Token Selection, which assignments an over-full expert keeps is drawn
    at random instead of by position (DeepSpeed's default)."""
    noisy_gate_policy: str = "none"
    """native: "none"; "Jitter" (router input multiplied by U(1-0.01, 1+0.01) while training); "RSample"
    (top-1 only: Gumbel noise on the logits chooses the expert while training)."""
    top2_2nd_expert_sampling: bool = False
    """native, top-2 only: choose the second expert with Gumbel noise on the logits (DeepSpeed's default is
    true). Off here: it draws random numbers in every forward, evaluation included, and breaks
    bit-identical resume in our measurements."""
    use_residual: bool = False
    """native: Residual-MoE, a dense SwiGLU of width d_expert beside the experts; the two outputs are
    mixed per token by softmax(Linear(D, 2)) weights."""
    num_experts_per_layer: list[int] = field(default_factory=list)
    """native: pyramid PR-MoE, the experts of each MoE layer in order (e.g. [4, 8] for two MoE layers;
    the paper puts more in the last layers). Empty: num_experts in every MoE layer. ep_size must
    divide each."""

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
        if not isinstance(self.router_fp32, bool):
            raise ConfigError("model.moe.router_fp32", self.router_fp32, "expected true or false")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ConfigError(
                "model.moe.aux_loss_coef/z_loss_coef", (self.aux_loss_coef, self.z_loss_coef), "must be >= 0"
            )
        if self.backend not in MOE_BACKENDS:
            raise ConfigError("model.moe.backend", self.backend, f"must be one of {MOE_BACKENDS}")
        if self.backend == "autoep":
            native_only = [
                f.name
                for f in fields(self)
                if f.name in NATIVE_ONLY_FIELDS and getattr(self, f.name) != getattr(MoEConfig(), f.name)
            ]
            if native_only:
                raise ConfigError(
                    f"model.moe.{native_only[0]}",
                    getattr(self, native_only[0]),
                    'applies to the native backend only; set model.moe.backend="native" or leave it at its default',
                )
            return
        self._validate_native()

    def _validate_native(self) -> None:
        for name in ("capacity_factor", "eval_capacity_factor"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.moe.{name}", getattr(self, name), "must be > 0")
        if self.min_capacity < 0:
            raise ConfigError("model.moe.min_capacity", self.min_capacity, "must be >= 0")
        if self.noisy_gate_policy not in NOISY_GATE_POLICIES:
            raise ConfigError(
                "model.moe.noisy_gate_policy", self.noisy_gate_policy, f"must be one of {NOISY_GATE_POLICIES}"
            )
        if self.noisy_gate_policy == "RSample" and self.top_k != 1:
            raise ConfigError(
                "model.moe.noisy_gate_policy",
                "RSample",
                f'DeepSpeed applies RSample to top-1 routing only (top_k={self.top_k}); use "Jitter" or top_k=1',
            )
        if self.num_shared_experts:
            raise ConfigError(
                "model.moe.num_shared_experts",
                self.num_shared_experts,
                "the native layer has no shared experts; use model.moe.use_residual=true (Residual-MoE: a "
                'dense MLP beside the experts) or model.moe.backend="autoep"',
            )
        for i, n in enumerate(self.num_experts_per_layer):
            if not self.top_k <= n:
                raise ConfigError(
                    f"model.moe.num_experts_per_layer[{i}]", n, f"must be >= model.moe.top_k={self.top_k}"
                )

    def layer_experts(self, n_moe_layers: int) -> list[int]:
        """Experts of each MoE layer, in order."""
        return list(self.num_experts_per_layer) or [self.num_experts] * n_moe_layers


MOE_BACKENDS = ("autoep", "native")
NOISY_GATE_POLICIES = ("none", "Jitter", "RSample")
NATIVE_ONLY_FIELDS = (
    "capacity_factor",
    "eval_capacity_factor",
    "min_capacity",
    "drop_tokens",
    "use_rts",
    "noisy_gate_policy",
    "top2_2nd_expert_sampling",
    "use_residual",
    "num_experts_per_layer",
)


@dataclass
class RopeScalingConfig:
    """Rotary frequencies stretched for contexts longer than pretraining's, as Llama 3.1+ defines it
    (transformers' rope_type "llama3"): wavelengths under original_max_seq_len / high_freq_factor
    stay, those over original_max_seq_len / low_freq_factor are divided by `factor`, those between
    blend smoothly. Imported with a Llama 3.x checkpoint; "none" keeps the plain rotary frequencies."""

    type: str = "none"
    """ "none" or "llama3"."""
    factor: float = 8.0
    """How much the long wavelengths are stretched."""
    low_freq_factor: float = 1.0
    """original_max_seq_len / low_freq_factor: the wavelength above which frequencies are divided by factor."""
    high_freq_factor: float = 4.0
    """original_max_seq_len / high_freq_factor: the wavelength below which frequencies stay."""
    original_max_seq_len: int = 8192
    """The context length the frequencies were first trained for."""

    def validate(self) -> None:
        if self.type not in ("none", "llama3"):
            raise ConfigError("model.rope_scaling.type", self.type, 'expected "none" or "llama3"')
        if self.type == "llama3" and not (0 < self.low_freq_factor < self.high_freq_factor):
            raise ConfigError(
                "model.rope_scaling.high_freq_factor",
                self.high_freq_factor,
                f"must exceed low_freq_factor={self.low_freq_factor} > 0",
            )


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
    n_kv_heads: int = 0
    """Key and value heads (grouped-query attention, as Llama 3, Mistral, Mixtral and Qwen2 have): each
    serves n_heads / n_kv_heads query heads, which shrinks the key-value projections and cache. 0: as many
    as n_heads (multi-head attention)."""
    attention_bias: bool = False
    """Biases on the query, key and value projections (not the output's), as Qwen2 has."""
    d_ff: int = 256
    """Hidden size of the dense SwiGLU feed-forward layers."""
    max_seq_len: int = 256
    """Longest sequence the rotary cache covers."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """Stretched rotary frequencies for long contexts (Llama 3.1+); none by default."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    causal: bool = True
    """True: causal language model (next-token loss). False: bidirectional attention, masked LM loss."""
    init_std: float = 0.02
    """Standard deviation of the normal initialization; residual output projections are scaled by 1/sqrt(2*n_layers)."""
    tie_embeddings: bool = False
    """Share the token embedding and the output projection."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations during backward instead of keeping them from the
    forward pass (torch.utils.checkpoint, non-reentrant): a block then keeps only its input, at the cost
    of one more forward per step (about a third more compute). Applies while training with gradients;
    evaluation and generation never recompute. A runtime setting, not part of the network: a run can
    resume with it switched on or off, and exports do not carry it into the Hugging Face config."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """The MoE layers."""
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    """How the model uses the knowledge graph joined to the text (default: not at all)."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key and value heads: n_kv_heads, or n_heads when that is 0."""
        return self.n_kv_heads or self.n_heads

    @property
    def d_expert_resolved(self) -> int:
        return self.moe.d_expert or self.d_ff

    def experts_in_layer(self, layer_idx: int) -> int:
        """Routed experts of MoE layer `layer_idx` (PR-MoE: its entry in moe.num_experts_per_layer)."""
        return self.moe.layer_experts(len(self.moe_layer_ids))[self.moe_layer_ids.index(layer_idx)]

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
        if self.n_kv_heads < 0 or self.n_heads % self.kv_heads:
            raise ConfigError(
                "model.n_kv_heads", self.n_kv_heads, f"must divide model.n_heads={self.n_heads} (0: n_heads)"
            )
        self.rope_scaling.validate()
        if not isinstance(self.activation_checkpointing, bool):
            raise ConfigError(
                "model.activation_checkpointing", self.activation_checkpointing, "expected true or false"
            )
        self.moe.validate(self.d_ff)
        per_layer = self.moe.num_experts_per_layer
        if per_layer and len(per_layer) != len(self.moe_layer_ids):
            raise ConfigError(
                "model.moe.num_experts_per_layer",
                per_layer,
                f"needs one entry per MoE layer: {len(self.moe_layer_ids)} (layers {self.moe_layer_ids})",
            )
        self.knowledge.validate(self.n_layers)
        if self.knowledge.mode == "inject" and not self.causal:
            raise ConfigError(
                "model.knowledge.mode",
                "inject",
                "K-BERT injection here trains a causal LM (branches predict their next token); "
                "use model.causal=true, or mode=fusion for a masked LM",
            )
