"""The sparsexpert language model: a pre-norm transformer whose feed-forward layers are MoE blocks.

Plain PyTorch, no parallelism code: DeepSpeed shards the experts and the optimizer state from
outside (see `sparsexpert/distributed/parallel.py`). Read top to bottom: norm, rotary attention, SwiGLU or
MoE feed-forward, the backbone and its initialization, the language model.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparsexpert.knowledge.modules import KnowledgeBatch, KnowledgeEmbeddings
from sparsexpert.model.config import ModelConfig, RopeScalingConfig
from sparsexpert.model.moe import (
    MoEBlock,
    RouterLogitsRecorder,
    RouterStats,
    SwiGLU,
    expert_init_seed,
    residual_out_std,
    router_stats,
)

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()
        x_f = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)
        return x_f.to(x.dtype) * self.weight


def rope_tables(
    seq_len: int, head_dim: int, theta: float, scaling: RopeScalingConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each [S, head_dim/2] (frequencies stretched as `scaling` says,
    model.rope_scaling)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    r = scaling
    if r is not None and r.type == "llama3":  # as transformers' _compute_llama3_parameters
        wavelen = 2 * math.pi / inv_freq
        low, high = r.original_max_seq_len / r.low_freq_factor, r.original_max_seq_len / r.high_freq_factor
        scaled = torch.where(wavelen > low, inv_freq / r.factor, inv_freq)
        smooth = (r.original_max_seq_len / wavelen - r.low_freq_factor) / (
            r.high_freq_factor - r.low_freq_factor
        )
        blended = (1 - smooth) * scaled / r.factor + smooth * scaled
        inv_freq = torch.where((wavelen >= high) & (wavelen <= low), blended, scaled)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHSd: torch.Tensor, cos_Sh: torch.Tensor, sin_Sh: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of each head by the position's angle (tables [S, h] or,
    for per-row positions, [B, 1, S, h])."""
    x1, x2 = x_BHSd.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos_Sh - x2 * sin_Sh, x1 * sin_Sh + x2 * cos_Sh), dim=-1).flatten(-2)
    return out.to(x_BHSd.dtype)


class LayerCache:
    """Keys and values of the positions a layer has already run ([B, H, T, head_dim] each), so that
    generation runs each new token alone (`Transformer.new_cache`)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values followed by these (which are kept for the next call)."""
        if self.k is not None and self.v is not None:
            k_BHSd, v_BHSd = torch.cat([self.k, k_BHSd], dim=2), torch.cat([self.v, v_BHSd], dim=2)
        self.k, self.v = k_BHSd, v_BHSd
        return k_BHSd, v_BHSd

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


class Attention(nn.Module):
    """Rotary self-attention; with model.n_kv_heads < n_heads, grouped-query: query head h reads key
    and value head h // (n_heads / n_kv_heads)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.causal = cfg.causal
        kv_dim = cfg.kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.attention_bias)
        self.wk = nn.Linear(cfg.d_model, kv_dim, bias=cfg.attention_bias)
        self.wv = nn.Linear(cfg.d_model, kv_dim, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask_BST: torch.Tensor | None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """mask_BST [B, S, T] (True = may attend) replaces the causal mask; T = S, or with a cache the
        cached positions and these. With a cache and no mask, the S new positions follow the cached
        ones causally."""
        B, S, D = x_BSD.shape
        q = self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = (
            w(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2) for w in (self.wk, self.wv)
        )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:  # keeps the n_kv_heads heads
            past = cache.length
            k, v = cache.extend(k, v)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask_BST is not None:  # an explicit visibility mask (True = may attend)
            y_BHSd = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BST.unsqueeze(1))
        elif past == 0 or not self.causal:
            y_BHSd = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        elif S == 1:  # one new position sees every cached one
            y_BHSd = F.scaled_dot_product_attention(q, k, v)
        else:  # new position i sees the cached ones and new ones up to i
            mask_ST = torch.ones(S, past + S, dtype=torch.bool, device=q.device).tril(past)
            y_BHSd = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_ST)
        return self.wo(y_BHSd.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # an MoEBlock or a SwiGLU, until parallel.py swaps an MoEBlock for DeepSpeed's layer
        self.mlp: nn.Module
        if self.is_moe:
            m = cfg.moe
            self.mlp = MoEBlock(
                cfg.d_model,
                cfg.d_expert_resolved,
                cfg.experts_in_layer(layer_idx),
                m.top_k,
                m.num_shared_experts,
                # DeepSpeed's native top-1 gate weighs the expert by its router probability (Switch);
                # its top-k gates, and AutoEP, renormalize the k weights to sum to 1.
                renormalize=not (m.backend == "native" and m.top_k == 1),
                residual=m.use_residual,
                router_fp32=m.router_fp32,
            )
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.ffn_norm(x))


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """[B, S, V]."""
    loss: torch.Tensor | None = None
    """What training minimizes: lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss
    (+ entity_loss_coef * entity_loss + triple_loss_coef * triple_loss with knowledge fusion)."""
    lm_loss: torch.Tensor | None = None
    """Mean cross-entropy over the labelled positions."""
    aux_loss: torch.Tensor | None = None
    """Load-balancing loss averaged over MoE layers (0 for a dense model)."""
    z_loss: torch.Tensor | None = None
    """Router z-loss averaged over MoE layers (0 for a dense model)."""
    expert_counts: torch.Tensor | None = None
    """[num_moe_layers, E] token-expert assignments in this forward pass."""
    router_layers: torch.Tensor | None = None
    """[num_moe_layers, 3] per MoE layer, no gradient: aux loss, z-loss, router entropy (`RouterStats.per_layer`)."""
    entity_loss: torch.Tensor | None = None
    """Entity prediction cross-entropy over the micro-batch's mentions (knowledge fusion)."""
    triple_loss: torch.Tensor | None = None
    """TransE margin loss over the micro-batch's triples (knowledge fusion)."""


class Backbone(nn.Module):
    """Embeddings, blocks, final norm and LM head: what pretraining's `Transformer` and fine-tuning's
    `TaskModel` share (so their parameter names are the same); each adds its own `forward`."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    # DeepSpeed casts buffers only when the JSON sets data_types.buffer_dtype; its default
    # keep_in_fp32_modules="auto" reads this (Hugging Face's) list and keeps these in fp32 even then.
    _keep_in_fp32_modules_strict = ["rope_cos", "rope_sin"]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be resolved (> 0) before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.knowledge = KnowledgeEmbeddings(cfg.d_model, cfg.knowledge) if cfg.knowledge.fusion else None
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._router_recorder = RouterLogitsRecorder()

    def _apply(self, fn, recurse=True):
        """Every cast and move (.half(), .bfloat16(), .to(...), .cuda(), .to_empty()) runs through here:
        the rotary tables follow the device but are rebuilt in fp32, as 16-bit tables would shift every
        position's angle (bf16 keeps 3 significant digits of cos/sin). apply_rope computes in fp32."""
        super()._apply(fn, recurse)
        c = self.cfg
        cos, sin = rope_tables(c.max_seq_len, c.head_dim, c.rope_theta, c.rope_scaling)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        return self

    def blocks(self) -> Iterator[Block]:
        """The blocks of `self.layers` (an nn.ModuleList, which types its items as plain modules)."""
        for layer in self.layers:
            if not isinstance(layer, Block):
                raise TypeError(f"model.layers holds a {type(layer).__name__}, not a Block")
            yield layer

    def moe_blocks(self) -> list[nn.Module]:
        return [block.mlp for block in self.blocks() if block.is_moe]

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        knowledge: KnowledgeBatch | None = None,
        embed_delta: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(final normalized hidden states [B, S, D], token embeddings [B, S, D]). The router logits
        of this pass are recorded for `router_losses`. embed_delta [B, S, D] is added to the token
        embeddings (adversarial training perturbs them). With model.activation_checkpointing, while
        training with gradients, each block keeps only its input and runs again in backward.
        cache (`new_cache`, generation): input_ids continue the positions cached so far."""
        B, S = input_ids.shape
        start = 0 if cache is None else cache[0].length
        if start + S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + S} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        recorder = self._router_recorder
        recorder.attach(self.moe_blocks())
        recorder.reset()

        emb = self.tok_embeddings(input_ids)
        h = emb if embed_delta is None else emb + embed_delta
        if position_ids is None:
            cos, sin = self.rope_cos[start : start + S], self.rope_sin[start : start + S]
        else:
            cos, sin = self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1)
        recompute = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if i == self.cfg.knowledge.fusion_layer and self.knowledge is not None and knowledge is not None:
                h = self.knowledge.fuse(h, knowledge.entity_ids)
            if recompute:
                # Non-reentrant: the forward records autograd as usual, so the router logits recorded
                # inside the block keep their graph and the aux and z losses reach the router (a
                # reentrant checkpoint, deepspeed.checkpointing's too, runs it under no_grad and would
                # drop that gradient silently). The recomputation runs with the RNG state of the forward
                # (same routing under noisy gates), with the recorder paused, and to the block's end
                # (early_stop=False): an expert-parallel layer's all-to-alls must be repeated by every
                # rank, whichever tensors that rank's backward happens to need.
                h = checkpoint(
                    layer,
                    h,
                    cos,
                    sin,
                    attn_mask,
                    use_reentrant=False,
                    early_stop=False,
                    context_fn=lambda: (contextlib.nullcontext(), recorder.paused()),
                )
            else:
                h = layer(h, cos, sin, attn_mask, None if cache is None else cache[i])
        return self.norm(h), emb

    def new_cache(self) -> list[LayerCache]:
        """An empty key-value cache, one per layer, for `hidden_states(..., cache=)` (generation)."""
        return [LayerCache() for _ in self.layers]

    def router_losses(
        self, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(aux_loss, z_loss, expert_counts, per-layer figures) of the last `hidden_states` pass: the
        losses averaged over MoE layers, counts [layers, E], figures [layers, 3] (`RouterStats`)."""
        recorder, moe_blocks = self._router_recorder, self.moe_blocks()
        if not moe_blocks:
            recorder.reset()
            zero = like.new_zeros((), dtype=torch.float32)
            return zero, zero, None, None
        if len(recorder.logits) != len(moe_blocks):
            raise RuntimeError(
                f"recorded {len(recorder.logits)} router outputs for {len(moe_blocks)} MoE layers"
            )
        stats: RouterStats = router_stats(recorder.logits, self.cfg.moe.top_k)
        recorder.reset()
        return stats.aux_loss, stats.z_loss, stats.expert_counts, stats.per_layer

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialize every parameter from a generator seeded by (seed, parameter name), so the
        result depends neither on construction order nor on how the experts are later sharded."""
        std = self.cfg.init_std
        out_std = residual_out_std(std, self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            if ".experts." in name:
                continue
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
            if name.endswith(("residual_coef.bias", "attn.wq.bias", "attn.wk.bias", "attn.wv.bias")):
                p.zero_()
                continue
            is_residual_out = name.endswith(("attn.wo.weight", "mlp.w2.weight", "shared_experts.w2.weight"))
            if name == "knowledge.relations.weight":  # TransE translations, on the scale of unit entities
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
                continue
            p.normal_(0.0, out_std if is_residual_out else std, generator=gen)
        for i, block in enumerate(self.blocks()):
            if block.is_moe:
                if not isinstance(block.mlp, MoEBlock):
                    raise TypeError(
                        f"layer {i}: init_weights initializes the plain model, before its MoE layers are "
                        f"swapped for DeepSpeed's (this one is a {type(block.mlp).__name__})"
                    )
                block.mlp.experts.init_weights(expert_init_seed(seed, i), std, out_std)

    def num_params(self) -> dict[str, int]:
        """Total parameters, those active for one token (top_k of E experts per MoE layer), the
        experts', and the knowledge components' (entity and relation tables, fusion, entity head)."""
        total = sum(p.numel() for p in self.parameters())
        stacked = [p for n, p in self.named_parameters() if ".experts." in n]  # [E, ...] each
        expert = sum(p.numel() for p in stacked)
        active = total - expert + sum(p.numel() * self.cfg.moe.top_k // p.shape[0] for p in stacked)
        know = sum(p.numel() for n, p in self.named_parameters() if n.startswith("knowledge."))
        return {"total": total, "active": active, "experts": expert, "knowledge": know}


class Transformer(Backbone):
    """The language model (causal, or masked with model.causal=false) and its loss."""

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        targets: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        knowledge: KnowledgeBatch | None = None,
        cache: list[LayerCache] | None = None,
    ) -> ModelOutput:
        """input_ids [B, S]. labels [B, S] (IGNORE_INDEX where unlabelled): for a causal model,
        position t is scored on predicting labels[t+1]; for a masked model, on labels[t].
        targets [B, S]: instead of labels, the token each position must predict, unshifted.
        position_ids [B, S] and attn_mask [B, S, S] (True = may attend): K-BERT injected rows.
        knowledge: the entity inputs and objectives' data (knowledge fusion).
        cache (`new_cache`): generation's key-value cache; attn_mask is then [B, S, cached + S]."""
        h, _ = self.hidden_states(
            input_ids, position_ids=position_ids, attn_mask=attn_mask, knowledge=knowledge, cache=cache
        )
        logits = self.output(h)

        out = ModelOutput(logits=logits)
        if targets is not None:
            logits_flat, labels_flat = logits.flatten(0, 1), targets.flatten()
        elif labels is None:  # no loss asked for
            self._router_recorder.reset()
            return out
        elif self.cfg.causal:
            logits_flat, labels_flat = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        else:
            logits_flat, labels_flat = logits.flatten(0, 1), labels.flatten()
        out.lm_loss = F.cross_entropy(logits_flat.float(), labels_flat, ignore_index=IGNORE_INDEX)
        out.aux_loss, out.z_loss, out.expert_counts, out.router_layers = self.router_losses(out.lm_loss)
        m = self.cfg.moe
        out.loss = out.lm_loss + m.aux_loss_coef * out.aux_loss + m.z_loss_coef * out.z_loss
        if self.knowledge is not None and knowledge is not None:
            k = self.cfg.knowledge
            out.entity_loss = self.knowledge.entity_loss(h, knowledge)
            out.triple_loss = self.knowledge.triple_loss(knowledge)
            out.loss = out.loss + k.entity_loss_coef * out.entity_loss + k.triple_loss_coef * out.triple_loss
        return out


def build_model(cfg: ModelConfig, seed: int) -> Transformer:
    cfg.validate()
    model = Transformer(cfg)
    model.init_weights(seed)
    return model
