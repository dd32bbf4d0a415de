"""The backbone with one head per task (token, sequence or relation classification).

`TaskModel` is the pretraining `Transformer`'s `Backbone` plus heads, so its parameter names are the
pretraining ones (AutoEP shards the same experts; a pretraining checkpoint loads as is).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsexpert.model.config import ModelConfig
from sparsexpert.model.transformer import IGNORE_INDEX, Backbone


@dataclass
class TaskSpec:
    name: str
    kind: str
    labels: list[str]


@dataclass
class TaskOutput:
    logits: torch.Tensor
    """[B, S, L] (ner) or [B, L]."""
    loss: torch.Tensor | None = None
    """task loss + router losses (what is minimized before adversarial and distillation terms)."""
    task_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    """[B, S, D] the token embeddings of this pass (adversarial training differentiates w.r.t. them)."""
    expert_counts: torch.Tensor | None = None
    """[num_moe_layers, E] token-expert assignments in this pass (None for a dense model)."""
    router_layers: torch.Tensor | None = None
    """[num_moe_layers, 3] per MoE layer, no gradient: aux loss, z-loss, router entropy (None for a dense model)."""


class TaskModel(Backbone):
    def __init__(self, cfg: ModelConfig, tasks: list[TaskSpec], task_aware_routing: bool = False):
        super().__init__(cfg)
        self.tasks = tasks
        D = cfg.d_model
        self.heads = nn.ModuleDict(
            {t.name: nn.Linear(2 * D if t.kind == "relation" else D, len(t.labels)) for t in tasks}
        )
        self.task_embeddings = nn.Embedding(len(tasks), D) if task_aware_routing else None

    def init_heads(self, seed: int) -> None:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            for name, head in self.heads.items():
                if not isinstance(head, nn.Linear):
                    raise TypeError(f"task head {name!r} is a {type(head).__name__}, not an nn.Linear")
                head.weight.normal_(0.0, self.cfg.init_std, generator=gen)
                head.bias.zero_()
            if self.task_embeddings is not None:
                self.task_embeddings.weight.normal_(0.0, self.cfg.init_std, generator=gen)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        task: int,
        lengths: torch.Tensor,
        labels: torch.Tensor | None = None,
        markers: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        embed_delta: torch.Tensor | None = None,
    ) -> TaskOutput:
        spec = self.tasks[task]
        delta = embed_delta
        if self.task_embeddings is not None:
            t = self.task_embeddings(torch.full_like(input_ids, task))
            delta = t if delta is None else delta + t
        h, emb = self.hidden_states(input_ids, attn_mask=attn_mask, embed_delta=delta)
        head = self.heads[spec.name]
        if spec.kind == "ner":
            logits = head(h)
        elif spec.kind == "classification":
            real = (torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]).to(h.dtype)
            logits = head((h * real.unsqueeze(-1)).sum(1) / lengths[:, None].to(h.dtype))
        else:
            if markers is None:
                raise ValueError(
                    f"task {spec.name!r} (relation) needs markers [B, 2]: the two entities' positions"
                )
            rows = torch.arange(h.shape[0], device=h.device)
            logits = head(torch.cat([h[rows, markers[:, 0]], h[rows, markers[:, 1]]], dim=-1))
        aux, z, counts, per_layer = self.router_losses(logits)
        out = TaskOutput(
            logits=logits, aux_loss=aux, z_loss=z, embeds=emb, expert_counts=counts, router_layers=per_layer
        )
        if labels is None:
            return out
        out.task_loss = F.cross_entropy(
            logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX
        )
        m = self.cfg.moe
        out.loss = out.task_loss + m.aux_loss_coef * aux + m.z_loss_coef * z
        return out
