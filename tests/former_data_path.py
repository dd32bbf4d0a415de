"""The data path as it was before the vectorization: the per-row code, kept verbatim as the reference
that the vectorized code in sparsexpert/data/shards.py and sparsexpert/data/knowledge.py must equal
draw for draw (the same arrays, the same random draws in the same order). tests/test_data.py and
tests/test_knowledge.py check ours against it; bench/data_loading.py times ours against it.

Copied from `git show HEAD:sparsexpert/data/shards.py` and `git show HEAD:sparsexpert/data/knowledge.py`
(commit ea92709), adapted only where needed to stand alone:
  gather         PackedDataset.__getitem__, a function of the dataset
  select         RowKnowledge._select; fusion_batch calls it where it called rk.mentions(row) and
                 rk.triples(row), which are now the vectorized RowKnowledge's
  _cat           as it was
  fusion_batch   as it was
  Injector       its constructor, verbalize, branch and inject_row, as they were
"""

from __future__ import annotations

import numpy as np
import torch

from sparsexpert.data.knowledge import DatasetKG, RowKnowledge
from sparsexpert.data.shards import PackedDataset
from sparsexpert.knowledge.config import KnowledgeConfig
from sparsexpert.knowledge.modules import KnowledgeBatch
from sparsexpert.model.transformer import IGNORE_INDEX


def gather(ds: PackedDataset, indices: np.ndarray) -> torch.Tensor:
    indices = np.asarray(indices)
    shard_ids = np.searchsorted(ds.offsets, indices, side="right") - 1
    rows = np.stack([ds.shards[s][i - ds.offsets[s]] for s, i in zip(shard_ids, indices)])
    return torch.from_numpy(rows.astype(np.int64))


def select(table: np.ndarray, row: int) -> np.ndarray:
    lo, hi = np.searchsorted(table[:, 0], [row, row + 1])
    return np.asarray(table[lo:hi])


def _cat(xs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(xs).astype(np.int64)) if xs else torch.zeros(0, dtype=torch.long)


def fusion_batch(
    kg: DatasetKG,
    rk: RowKnowledge,
    rows: np.ndarray,
    seq_len: int,
    cfg: KnowledgeConfig,
    rng: np.random.Generator,
) -> KnowledgeBatch:
    n_ent = len(kg.entities)
    entity_ids = np.full((len(rows), seq_len), -1, dtype=np.int64)
    tokens, owner, truth = [], [], []
    for b, row in enumerate(rows):
        for s, e, ent in select(rk.spans, int(row))[:, 1:]:
            u = rng.random()
            shown = (
                rng.integers(n_ent)
                if u < cfg.replace_prob
                else -1
                if u < cfg.replace_prob + cfg.drop_prob
                else ent
            )
            entity_ids[b, s:e] = shown
            tokens.append(np.arange(b * seq_len + s, b * seq_len + e))
            owner.append(np.full(e - s, len(truth)))
            truth.append(ent)
    truth_M = np.asarray(truth, dtype=np.int64)
    if cfg.entity_negatives == 0:
        candidates, labels = np.arange(n_ent), truth_M
    else:
        candidates = np.unique(np.concatenate([truth_M, rng.integers(n_ent, size=cfg.entity_negatives)]))
        labels = np.searchsorted(candidates, truth_M)

    if cfg.triple_source == "attached":
        idx = np.unique(np.concatenate([select(rk.row_triples, int(r))[:, 1] for r in rows]))
        if len(idx) > cfg.triple_batch:
            idx = np.sort(rng.choice(idx, cfg.triple_batch, replace=False))
        pos = kg.triples[idx]
    else:
        known = kg.known
        pos = (
            known[rng.integers(len(known), size=cfg.triple_batch)]
            if len(known)
            else np.zeros((0, 3), np.int64)
        )
    pos = pos[pos[:, 0] >= 0]
    neg = np.repeat(pos[:, None, :], cfg.triple_negatives, axis=1)
    corrupt_head = rng.random(neg.shape[:2]) < 0.5
    neg[..., 0] = np.where(corrupt_head, rng.integers(n_ent, size=neg.shape[:2]), neg[..., 0])
    neg[..., 2] = np.where(~corrupt_head, rng.integers(n_ent, size=neg.shape[:2]), neg[..., 2])

    return KnowledgeBatch(
        entity_ids=torch.from_numpy(entity_ids),
        mention_tokens=_cat(tokens),
        mention_of_token=_cat(owner),
        candidates=torch.from_numpy(candidates.astype(np.int64)),
        mention_labels=torch.from_numpy(labels.astype(np.int64)),
        triples=torch.from_numpy(pos.astype(np.int64)),
        negatives=torch.from_numpy(neg.astype(np.int64)),
    )


class Injector:
    """K-BERT: verbalized triples of a mentioned entity inserted after the mention.

    A row of S tokens becomes S tokens again (the text that no longer fits is cut). Original
    tokens keep their positions and see only earlier original tokens; the tokens of a branch (one
    triple, " relation words tail name") take positions end, end+1, ... after their anchor mention
    and see only that mention and the earlier tokens of their own branch."""

    def __init__(self, kg: DatasetKG, tokenizer, cfg: KnowledgeConfig):
        self.kg, self.tok, self.cfg = kg, tokenizer, cfg
        heads: dict[int, list[int]] = {}
        for i in np.flatnonzero(kg.triples[:, 0] >= 0):
            heads.setdefault(int(kg.triples[i, 0]), []).append(int(i))
        self.by_head = {h: np.asarray(v) for h, v in heads.items()}  # entity -> the triples it heads
        self._branch_ids: dict[int, np.ndarray] = {}

    def verbalize(self, triple: int) -> str:
        h, r, t = self.kg.triples[triple]
        return f"{self.kg.relations[r].replace('_', ' ')} {self.kg.surfaces[t]}"

    def branch(self, triple: int) -> np.ndarray:
        if triple not in self._branch_ids:
            self._branch_ids[triple] = self.tok.encode([self.verbalize(triple)])[0]
        return self._branch_ids[triple]

    def inject_row(
        self, x: np.ndarray, mentions: np.ndarray, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        S = len(x)
        ids, pos, group = [], [], []  # group -1: original text; g >= 0: branch g
        anchors: list[tuple[int, int]] = []  # out index range [lo, hi) of branch g's mention
        orig_out = np.full(S, -1)
        ends: dict[int, list[tuple[int, int]]] = {}
        for s, e, ent in mentions:
            if (
                self.cfg.inject_per_mention
                and rng.random() < self.cfg.inject_prob
                and int(ent) in self.by_head
            ):
                cand = self.by_head[int(ent)]
                k = min(self.cfg.inject_per_mention, len(cand))
                for t in np.sort(rng.choice(cand, k, replace=False)):
                    ends.setdefault(int(e) - 1, []).append((int(s), int(t)))
        for i in range(S):
            if len(ids) >= S:
                break
            orig_out[i] = len(ids)
            ids.append(x[i])
            pos.append(i)
            group.append(-1)
            for s, t in ends.get(i, []):
                g = len(anchors)
                anchors.append((orig_out[s], orig_out[i] + 1))
                for k, tok in enumerate(self.branch(t)):
                    ids.append(tok)
                    pos.append(i + 1 + k)
                    group.append(g)
        ids, pos, group = np.asarray(ids[:S]), np.asarray(pos[:S]), np.asarray(group[:S])
        # Targets: an original token predicts the next original token, a branch token the next
        # token of its branch; the last of a branch and the last kept text token predict nothing.
        targets = np.full(S, IGNORE_INDEX, dtype=np.int64)
        kept = orig_out[orig_out >= 0]
        targets[kept[:-1]] = x[1 : len(kept)]
        for g in range(len(anchors)):
            members = np.flatnonzero(group == g)
            targets[members[:-1]] = ids[members[1:]]
        # Visibility: causal in output order, restricted by group.
        q, k = np.arange(S)[:, None], np.arange(S)[None, :]
        orig = group < 0
        lo = np.array([a[0] for a in anchors] + [0])[group]
        hi = np.array([a[1] for a in anchors] + [0])[group]
        sees_anchor = ~orig[:, None] & orig[None, :] & (k >= lo[:, None]) & (k < hi[:, None])
        same_group = (group[:, None] == group[None, :]) & ~orig[:, None]
        mask = (k <= q) & ((orig[:, None] & orig[None, :]) | sees_anchor | same_group)
        return {"input_ids": ids, "targets": targets, "position_ids": pos, "attn_mask": mask}
