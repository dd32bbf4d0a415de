"""The knowledge side of data loading: the dataset's KG, per-row mentions and triples, and the
micro-batch inputs the knowledge modes need (fusion tensors, or K-BERT injected rows).

Every random choice (ERNIE's corruption, sampled negatives, which triples are injected) comes
from a generator seeded by (data seed, global batch, micro-batch index in the global batch), so a
micro-batch is the same whichever rank reads it: a 2-process run equals a 1-process run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsexpert.data.shards import ShardLoader
from sparsexpert.knowledge.config import KnowledgeConfig
from sparsexpert.knowledge.modules import KnowledgeBatch
from sparsexpert.model.transformer import IGNORE_INDEX


def _read_tsv(path: Path, min_cols: int) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; the dataset was not prepared with a KG (python -m data_prep --kg ...)"
        )
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        cols = line.split("\t")
        if len(cols) < min_cols:
            raise ValueError(f"{path}:{n}: expected {min_cols} tab-separated columns; re-run data_prep")
        rows.append(cols)
    return rows


@dataclass
class DatasetKG:
    """The KG data_prep wrote beside the shards: entity and relation vocabularies, every triple."""

    entities: list[str]
    """Entity id of each entity index."""
    surfaces: list[str]
    """Surface name of each entity (its first alias)."""
    relations: list[str]
    triples: np.ndarray
    """[num triple indices, 3] (head, relation, tail) entity/relation indices; -1 rows: index unused."""

    @classmethod
    def load(cls, data_dir: str | Path) -> DatasetKG:
        d = Path(data_dir)
        ent_rows = _read_tsv(d / "entities.tsv", 2)
        entities = [r[1] for r in ent_rows]
        surfaces = [r[2] if len(r) > 2 else r[1].replace("_", " ") for r in ent_rows]
        relations = [r[1] for r in _read_tsv(d / "relations.tsv", 2)]
        e_index = {e: i for i, e in enumerate(entities)}
        r_index = {r: i for i, r in enumerate(relations)}
        rows = _read_tsv(d / "triples.tsv", 4)
        table = np.full((max((int(r[0]) for r in rows), default=-1) + 1, 3), -1, dtype=np.int64)
        for r in rows:
            table[int(r[0])] = (e_index[r[1]], r_index[r[2]], e_index[r[3]])
        return cls(entities, surfaces, relations, table)

    @property
    def known(self) -> np.ndarray:
        """[n, 3] the triples that exist."""
        return self.triples[self.triples[:, 0] >= 0]


class RowKnowledge:
    """Mentions and attached triples of the rows of one split ({split}_spans.npy, {split}_triples.npy)."""

    def __init__(self, data_dir: str | Path, split: str):
        d = Path(data_dir)
        self.spans = np.load(d / f"{split}_spans.npy", mmap_mode="r")  # row, start, end, entity
        self.row_triples = np.load(d / f"{split}_triples.npy", mmap_mode="r")  # row, triple index

    @staticmethod
    def _select(table: np.ndarray, row: int) -> np.ndarray:
        lo, hi = np.searchsorted(table[:, 0], [row, row + 1])
        return np.asarray(table[lo:hi])

    def mentions(self, row: int) -> np.ndarray:
        """[k, 3] start, end (exclusive), entity of the row's mentions, in order."""
        return self._select(self.spans, row)[:, 1:]

    def triples(self, row: int) -> np.ndarray:
        return self._select(self.row_triples, row)[:, 1]


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
        for s, e, ent in rk.mentions(int(row)):
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
        idx = np.unique(np.concatenate([rk.triples(int(r)) for r in rows]))
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


class KnowledgeLoader:
    """One rank's micro-batches as the keyword arguments of `Transformer.forward`."""

    def __init__(
        self,
        loader: ShardLoader,
        data_dir: str | Path,
        split: str,
        cfg: KnowledgeConfig,
        causal: bool,
        mask_id: int | None,
        vocab_size: int,
        tokenizer_path: str | Path | None = None,
    ):
        self.loader, self.cfg, self.causal, self.mask_id = loader, cfg, causal, mask_id
        self.vocab_size = vocab_size
        self.seed = loader.plan.seed
        self.kg = self.rows = self.injector = None
        if cfg.mode != "none":
            self.kg = DatasetKG.load(data_dir)
            self.rows = RowKnowledge(data_dir, split)
        if cfg.mode == "inject":
            from data_prep.tokenizer import load_tokenizer

            self.injector = Injector(self.kg, load_tokenizer(tokenizer_path), cfg)
        if not causal and mask_id is None:
            raise ValueError("a masked LM (model.causal=false) needs a tokenizer with a <mask> token")

    def batch(self, global_batch: int, micro_step: int) -> dict[str, Any]:
        plan = self.loader.plan
        rows = plan.rows(global_batch, micro_step)
        x = self.loader.dataset[rows]
        j = micro_step * plan.dp + plan.rank  # the micro-batch's index in the global batch
        rng = np.random.default_rng([self.seed, global_batch, j, 7])
        if self.cfg.mode == "none":
            return self._lm(x, rng)
        if self.cfg.mode == "fusion":
            kb = fusion_batch(self.kg, self.rows, rows, x.shape[1], self.cfg, rng)
            return {**self._lm(x, rng), "knowledge": kb}
        parts = [
            self.injector.inject_row(x[b].numpy(), self.rows.mentions(int(r)), rng)
            for b, r in enumerate(rows)
        ]
        return {k: torch.from_numpy(np.stack([p[k] for p in parts])) for k in parts[0]}

    def _lm(self, x: torch.Tensor, rng: np.random.Generator) -> dict[str, Any]:
        if self.causal:
            return {"input_ids": x, "labels": x}
        # BERT masking: 15% of tokens are predicted; 80% of them shown as <mask>, 10% random, 10% kept.
        u = torch.from_numpy(rng.random(x.shape))
        chosen = u < 0.15
        labels = torch.where(chosen, x, torch.full_like(x, IGNORE_INDEX))
        inp = x.clone()
        inp[u < 0.12] = self.mask_id
        rand = (u >= 0.12) & (u < 0.135)
        inp[rand] = torch.from_numpy(rng.integers(self.vocab_size, size=int(rand.sum())))
        return {"input_ids": inp, "labels": labels}
