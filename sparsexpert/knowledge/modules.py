"""The knowledge components on the model side: entity and relation tables, ERNIE-style fusion,
entity prediction and the TransE triple objective.

Shape letters: B batch, S sequence, D model width, De entity width, M mentions, P mention tokens,
C candidate entities, T triples, N negatives per triple.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsexpert.knowledge.config import KnowledgeConfig


@dataclass
class KnowledgeBatch:
    """One micro-batch's knowledge inputs (built on the CPU by `sparsexpert.data.knowledge`)."""

    entity_ids: torch.Tensor
    """[B, S] entity fed to the fusion at each token (-1: none), after ERNIE's corruption."""
    mention_tokens: torch.Tensor
    """[P] flat token index (b * S + s) of every token of every mention."""
    mention_of_token: torch.Tensor
    """[P] which mention (0..M-1) each of those tokens belongs to."""
    candidates: torch.Tensor
    """[C] entities scored by entity prediction (the batch's own plus sampled negatives; or all)."""
    mention_labels: torch.Tensor
    """[M] position in `candidates` of each mention's true entity."""
    triples: torch.Tensor
    """[T, 3] positive (head, relation, tail) for the triple objective."""
    negatives: torch.Tensor
    """[T, N, 3] the same triples with head or tail replaced by a random entity."""

    @property
    def num_mentions(self) -> int:
        return int(self.mention_labels.numel())


class KnowledgeEmbeddings(nn.Module):
    entity_sq: torch.Tensor
    """[entities] fp32, row-wise path only: each row's Adagrad accumulator (a buffer, so in checkpoints)."""

    def __init__(self, d_model: int, cfg: KnowledgeConfig):
        super().__init__()
        if cfg.num_entities < 1 or cfg.num_relations < 1:
            raise ValueError(
                "model.knowledge.num_entities/num_relations must be resolved (> 0) before building"
            )
        self.cfg = cfg
        self.entities = nn.Embedding(cfg.num_entities, cfg.entity_dim)
        self.relations = nn.Embedding(cfg.num_relations, cfg.entity_dim)
        self.fuse_proj = nn.Linear(cfg.entity_dim, d_model, bias=False)
        self.entity_head = nn.Linear(d_model, cfg.entity_dim, bias=False)
        self.rowwise = cfg.entity_optimizer == "rowwise_adagrad"
        self.looked_up: list[tuple[torch.Tensor, torch.Tensor]] = []
        """Row-wise path: (entity ids [K], their rows' gradients [K, De]) of every lookup since the last
        optimizer step, appended by backward (`_entity_rows`), taken by `sparsexpert.train.rowwise.RowwiseAdagrad.step`."""
        if self.rowwise:
            # Outside DeepSpeed's optimizer (parallel.param_groups takes trainable weights only); the
            # row-wise Adagrad accumulator, one a row, saved with the weights in every checkpoint.
            self.entities.weight.requires_grad_(False)
            self.register_buffer("entity_sq", torch.zeros(cfg.num_entities))

    def _entity_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The entity embeddings of `ids` (any shape). On the row-wise path, while autograd records, the
        rows are a leaf whose gradient backward hands to `looked_up` with the ids: the table itself gets
        no gradient, dense or sparse."""
        if not self.rowwise or not torch.is_grad_enabled():
            return self.entities(ids)
        rows = F.embedding(ids, self.entities.weight).requires_grad_(True)
        flat_ids = ids.reshape(-1)
        rows.register_hook(lambda g: self.looked_up.append((flat_ids, g.reshape(-1, g.shape[-1]))))
        return rows

    def fuse(self, h_BSD: torch.Tensor, entity_ids_BS: torch.Tensor) -> torch.Tensor:
        """h + W e(entity) at tokens that carry an entity; other tokens unchanged."""
        has_BS = entity_ids_BS >= 0
        e_BSE = self._entity_rows(entity_ids_BS.clamp_min(0)) * has_BS.unsqueeze(-1).to(h_BSD.dtype)
        return h_BSD + self.fuse_proj(e_BSE.to(h_BSD.dtype))

    def entity_loss(self, h_BSD: torch.Tensor, kb: KnowledgeBatch) -> torch.Tensor:
        """Cross-entropy of each mention's entity among the candidates, scored by
        <entity_head(mean of the mention's final hidden states), entity embedding>."""
        M = kb.num_mentions
        if M == 0:
            return self._zero(h_BSD)
        h_TD = h_BSD.flatten(0, 1)
        sums_MD = h_TD.new_zeros(M, h_TD.shape[-1]).index_add_(
            0, kb.mention_of_token, h_TD[kb.mention_tokens]
        )
        # tokens per mention (whole numbers, exact in any dtype) by index_add_, not bincount, which on
        # CUDA reads its largest index back to the host
        lens_M = h_TD.new_zeros(M).index_add_(
            0, kb.mention_of_token, h_TD.new_ones(kb.mention_of_token.shape)
        )
        lens_M = lens_M.clamp_min(1)
        q_ME = self.entity_head(sums_MD / lens_M.unsqueeze(-1))
        logits_MC = q_ME.float() @ self._entity_rows(kb.candidates).float().t()
        return F.cross_entropy(logits_MC, kb.mention_labels)

    def _triple_parts(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor):
        e_h = F.normalize(self._entity_rows(h).float(), dim=-1)
        e_t = F.normalize(self._entity_rows(t).float(), dim=-1)
        return e_h, self.relations(r).float(), e_t

    def triple_score(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Plausibility of (h, r, t), higher is better, for ids of any shape: TransE
        -||e_h + w_r - e_t||_1 or DistMult sum(e_h * w_r * e_t), on L2-normalized entity embeddings."""
        e_h, w_r, e_t = self._triple_parts(h, r, t)
        if self.cfg.triple_score == "distmult":
            return (e_h * w_r * e_t).sum(-1)
        return -(e_h + w_r - e_t).abs().sum(-1)

    def triple_loss(self, kb: KnowledgeBatch) -> torch.Tensor:
        """Margin ranking: mean(relu(margin - score(positive) + score(corrupted)))."""
        if kb.triples.numel() == 0:
            return self._zero(kb.triples)
        pos_T = self.triple_score(*kb.triples.unbind(-1))
        neg_TN = self.triple_score(*kb.negatives.unbind(-1))
        return F.relu(self.cfg.triple_margin - pos_T.unsqueeze(1) + neg_TN).mean()

    def _zero(self, like: torch.Tensor) -> torch.Tensor:
        # A zero that still reaches every knowledge parameter: under ZeRO each rank must produce a
        # gradient for the same parameters whether or not its micro-batch had mentions or triples.
        # Through module calls, so ZeRO-3 gathers the weights.
        idx = torch.zeros(1, dtype=torch.long, device=like.device)
        v = self._entity_rows(idx) + self.relations(idx)
        return self.entity_head(self.fuse_proj(v)).float().sum() * 0.0

    def _all_entities(self, device: torch.device) -> torch.Tensor:
        return F.normalize(self.entities(torch.arange(self.cfg.num_entities, device=device)).float(), dim=-1)

    @torch.no_grad()
    def tail_scores(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """[Q, num_entities] triple_score(h, r, every entity)."""
        e_h, w_r, _ = self._triple_parts(h, r, h)
        all_NE = self._all_entities(h.device)
        if self.cfg.triple_score == "distmult":
            return (e_h * w_r) @ all_NE.t()
        return -torch.cdist(e_h + w_r, all_NE, p=1)

    @torch.no_grad()
    def head_scores(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[Q, num_entities] triple_score(every entity, r, t)."""
        _, w_r, e_t = self._triple_parts(t, r, t)
        all_NE = self._all_entities(t.device)
        if self.cfg.triple_score == "distmult":
            return (e_t * w_r) @ all_NE.t()
        return -torch.cdist(e_t - w_r, all_NE, p=1)
