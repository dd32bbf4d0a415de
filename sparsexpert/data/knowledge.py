"""The knowledge side of data loading: the dataset's KG, per-row mentions and triples, and the
micro-batch inputs the knowledge modes need (fusion tensors, or K-BERT injected rows).

Every random choice (ERNIE's corruption, sampled negatives, which triples are injected) comes
from a generator seeded by (data seed, global batch, micro-batch index in the global batch), so a
micro-batch is the same whichever rank reads it: a 2-process run equals a 1-process run.

A micro-batch is built with numpy over all its rows at once; the only Python loops left run over
mentions, where a random draw depends on the one before (tests/test_knowledge.py holds the former
per-row code as the reference the output must equal, draw for draw).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.arrays import sorted_unique
from sparsexpert.data.format import table_name
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


def _ranges(length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For consecutive ranges of the given lengths: the range of each element, and its offset in it."""
    owner = np.repeat(np.arange(len(length)), length)
    return owner, np.arange(len(owner)) - np.repeat(np.cumsum(length) - length, length)


def _in_intervals(lo: np.ndarray, length: np.ndarray) -> np.ndarray:
    """[B, S, S] bool, [b, q, k]: lo[b, q] <= k < lo[b, q] + length[b, q] (lo in [0, S], length >= 0);
    one subtraction and one unsigned comparison per element, in 16 bits where S allows."""
    S = lo.shape[-1]
    signed, unsigned = (np.int16, np.uint16) if S < 2**15 else (np.int32, np.uint32)
    offset = np.arange(S, dtype=signed) - lo.astype(signed)[..., None]
    return offset.view(unsigned) < length.astype(unsigned)[..., None]


def _entity_columns(path: Path) -> tuple[list[str], list[str]]:
    """entities.tsv's entity ids and surface names (a row without one: the id, underscores as spaces)."""
    rows = _read_tsv(path, 2)
    return [r[1] for r in rows], [r[2] if len(r) > 2 else r[1].replace("_", " ") for r in rows]


class DatasetKG:
    """The KG data_prep wrote beside the shards: entity and relation vocabularies, every triple.

    The triples come memory-mapped from kg_triples.npy (every rank reads the same pages; a KG of
    millions of triples is never Python objects), or, in a dataset written before that file existed,
    parsed from triples.tsv. The entity names and surfaces (entities.tsv) are read on first use: the
    fusion objectives need only their number."""

    def __init__(
        self,
        entities: list[str] | None,
        surfaces: list[str] | None,
        relations: list[str],
        triples: np.ndarray,
        data_dir: str | Path | None = None,
        n_entities: int | None = None,
    ):
        """entities and surfaces given, or None: read from data_dir/entities.tsv on first use."""
        self._entities, self._surfaces = entities, surfaces
        self.relations = relations
        self.triples = triples
        """[num triple indices, 3] (head, relation, tail) entity/relation indices; -1 rows: index unused."""
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.n_entities = len(entities) if entities is not None else int(n_entities or 0)

    @classmethod
    def load(cls, data_dir: str | Path) -> DatasetKG:
        d = Path(data_dir)
        ent_file = d / "entities.tsv"
        relations = [r[1] for r in _read_tsv(d / "relations.tsv", 2)]
        if (d / "kg_triples.npy").is_file() and ent_file.is_file():
            with open(ent_file, "rb") as f:
                n_entities = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))
            triples = np.load(d / "kg_triples.npy", mmap_mode="r", allow_pickle=False)
            return cls(None, None, relations, triples, d, n_entities)
        entities, surfaces = _entity_columns(ent_file)
        e_index = {e: i for i, e in enumerate(entities)}
        r_index = {r: i for i, r in enumerate(relations)}
        trows = _read_tsv(d / "triples.tsv", 4)
        table = np.full((max((int(r[0]) for r in trows), default=-1) + 1, 3), -1, dtype=np.int64)
        for r in trows:
            table[int(r[0])] = (e_index[r[1]], r_index[r[2]], e_index[r[3]])
        return cls(entities, surfaces, relations, table, d)

    def _read_entities(self) -> None:
        assert self.data_dir is not None
        self._entities, self._surfaces = _entity_columns(self.data_dir / "entities.tsv")

    @property
    def entities(self) -> list[str]:
        """Entity id of each entity index."""
        if self._entities is None:
            self._read_entities()
        assert self._entities is not None
        return self._entities

    @property
    def surfaces(self) -> list[str]:
        """Surface name of each entity (its first alias)."""
        if self._surfaces is None:
            self._read_entities()
        assert self._surfaces is not None
        return self._surfaces

    @functools.cached_property
    def known(self) -> np.ndarray:
        """[n, 3] the triples that exist (computed once: a copy per micro-batch would cost the whole KG)."""
        valid = np.asarray(self.triples[:, 0]) >= 0
        return self.triples if valid.all() else np.asarray(self.triples)[valid]

    @functools.cached_property
    def by_head(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(heads, start, order): the distinct head entities, ascending; the triples headed by heads[k]
        are order[start[k] : start[k + 1]], in increasing triple index."""
        head = np.asarray(self.triples[:, 0])
        valid = np.flatnonzero(head >= 0)
        order = valid[np.argsort(head[valid], kind="stable")]
        heads, start = np.unique(head[order], return_index=True)
        return heads, np.append(start, len(order)), order


class RowKnowledge:
    """Mentions and attached triples of the rows of one split ({split}_spans.npy, {split}_triples.npy)."""

    def __init__(self, data_dir: str | Path, split: str):
        d = Path(data_dir)
        self.spans = np.load(d / table_name(split, "spans"), mmap_mode="r")  # row, start, end, entity
        self.row_triples = np.load(d / table_name(split, "triples"), mmap_mode="r")  # row, triple index

    @staticmethod
    def _select(table: np.ndarray, rows: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The entries of `rows` (table sorted by row), row after row in the order given, each row's in
        file order; and the position in `rows` of each entry's row."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        lo = np.searchsorted(table[:, 0], rows, side="left")
        n = np.searchsorted(table[:, 0], rows, side="right") - lo
        owner, k = _ranges(n)
        return np.asarray(table[lo[owner] + k]), owner

    def mentions(self, row: int) -> np.ndarray:
        """[k, 3] start, end (exclusive), entity of the row's mentions, in order."""
        return self._select(self.spans, [row])[0][:, 1:]

    def triples(self, row: int) -> np.ndarray:
        return self._select(self.row_triples, [row])[0][:, 1]

    def batch_mentions(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[M, 3] the mentions of all `rows` (row after row, as `mentions` gives each), and [M] the
        position in `rows` of each mention's row."""
        spans, owner = self._select(self.spans, rows)
        return spans[:, 1:], owner

    def batch_triples(self, rows: np.ndarray) -> np.ndarray:
        """The triples attached to `rows`, row after row (repeats kept)."""
        return self._select(self.row_triples, rows)[0][:, 1]


def fusion_batch(
    kg: DatasetKG,
    rk: RowKnowledge,
    rows: np.ndarray,
    seq_len: int,
    cfg: KnowledgeConfig,
    rng: np.random.Generator,
) -> KnowledgeBatch:
    n_ent = kg.n_entities
    B, S = len(rows), seq_len
    mentions, owner_M = rk.batch_mentions(rows)
    start_M, end_M, truth_M = mentions.T
    # One rng.random() per mention, in order, and a random entity right after each replaced one:
    # the draws interleave, so this loop stays; the rest is vectorized.
    u_M = np.empty(len(truth_M))
    replaced = []
    for m in range(len(u_M)):
        u_M[m] = u = rng.random()
        if u < cfg.replace_prob:
            replaced.append(rng.integers(n_ent))
    shown_M = np.where(u_M < cfg.replace_prob + cfg.drop_prob, -1, truth_M)
    shown_M[u_M < cfg.replace_prob] = np.asarray(replaced, dtype=np.int64)
    # Every token of every mention (P of them, as in KnowledgeBatch), mention after mention, as
    # an index into [B * S].
    owner_P, k_P = _ranges(end_M - start_M)
    tokens_P = owner_M[owner_P] * S + start_M[owner_P] + k_P
    entity_ids = np.full((B, S), -1, dtype=np.int64)
    entity_ids.reshape(-1)[tokens_P] = shown_M[owner_P]  # a later mention overwrites an earlier one

    if cfg.entity_negatives == 0:
        candidates, labels = np.arange(n_ent), truth_M
    else:
        candidates = sorted_unique(np.concatenate([truth_M, rng.integers(n_ent, size=cfg.entity_negatives)]))
        labels = np.searchsorted(candidates, truth_M)

    if cfg.triple_source == "attached":
        idx = sorted_unique(rk.batch_triples(rows))
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
        mention_tokens=torch.from_numpy(tokens_P),
        mention_of_token=torch.from_numpy(owner_P),
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
    and see only that mention and the earlier tokens of their own branch.

    Shape letters: B rows, S tokens a row, M mentions, J branches, I branch tokens."""

    def __init__(self, kg: DatasetKG, tokenizer, cfg: KnowledgeConfig):
        self.kg, self.tok, self.cfg = kg, tokenizer, cfg
        self._heads, self._start, self._order = kg.by_head  # entity -> the triples it heads, as arrays
        self._branch_ids: dict[int, np.ndarray] = {}

    def verbalize(self, triple: int) -> str:
        h, r, t = self.kg.triples[triple]
        return f"{self.kg.relations[r].replace('_', ' ')} {self.kg.surfaces[t]}"

    def branch(self, triple: int) -> np.ndarray:
        if triple not in self._branch_ids:
            self._branch_ids[triple] = self.tok.encode([self.verbalize(triple)])[0]
        return self._branch_ids[triple]

    def _choose(self, entity_M: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The mention and the triple of each branch (J of them), mention after mention, each
        mention's triples in increasing order."""
        per = self.cfg.inject_per_mention
        mention, chosen = [], []
        if per:
            # One rng.random() per mention, in order, and a rng.choice right after each that gets an
            # injection: the draws interleave, so this loop stays.
            if len(self._heads):
                k_M = np.minimum(np.searchsorted(self._heads, entity_M), len(self._heads) - 1)
                heads = (self._heads[k_M] == entity_M).tolist()
            else:
                k_M, heads = np.zeros(len(entity_M), np.int64), [False] * len(entity_M)
            for m, k in enumerate(k_M.tolist()):
                if rng.random() < self.cfg.inject_prob and heads[m]:
                    cand = self._order[self._start[k] : self._start[k + 1]]
                    mention.append(m)
                    chosen.append(rng.choice(cand, min(per, len(cand)), replace=False))
        mention_J = np.repeat(np.asarray(mention, dtype=np.int64), [len(c) for c in chosen])
        triple_J = np.concatenate([np.zeros(0, np.int64), *chosen]).astype(np.int64)
        order = np.lexsort((triple_J, mention_J))
        return mention_J[order], triple_J[order]

    def inject(
        self, x: np.ndarray, mentions: np.ndarray, mention_row: np.ndarray, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """The injected rows of a micro-batch. x: [B, S] token ids; mentions: [M, 3] start, end
        (exclusive), entity, row after row; mention_row: [M] the row of x of each mention.
        Returns input_ids, targets, position_ids [B, S] (int64) and attn_mask [B, S, S] (bool)."""
        x = np.asarray(x, dtype=np.int64)
        mentions = np.asarray(mentions, dtype=np.int64).reshape(-1, 3)
        mention_row = np.asarray(mention_row, dtype=np.int64)
        B, S = x.shape
        mention_J, triple_J = self._choose(mentions[:, 2], rng)
        # The layout before the cut at S: every text token, each followed by the branches of the
        # mentions it ends (in draw order). Branches in layout order:
        b_J, anchor_J, end_J = mention_row[mention_J], mentions[mention_J, 0], mentions[mention_J, 1] - 1
        key_J = b_J * S + end_J
        order = np.argsort(key_J, kind="stable")
        b_J, anchor_J, end_J, key_J = b_J[order], anchor_J[order], end_J[order], key_J[order]
        tokens = [self.branch(t) for t in triple_J[order].tolist()]
        len_J = np.array([len(t) for t in tokens], dtype=np.int64)
        inserted_BS = np.zeros((B, S), dtype=np.int64)
        np.add.at(inserted_BS, (b_J, end_J), len_J)
        text_out_BS = np.arange(S) + np.cumsum(inserted_BS, axis=1) - inserted_BS  # where text token i goes
        before_J = np.cumsum(len_J) - len_J
        same_place = before_J - before_J[np.searchsorted(key_J, key_J)]  # earlier branches after that token
        start_J = text_out_BS[b_J, end_J] + 1 + same_place

        ids = np.empty((B, S), dtype=np.int64)
        pos = np.empty((B, S), dtype=np.int64)
        targets = np.full((B, S), IGNORE_INDEX, dtype=np.int64)
        # Text tokens: those laid out before S, a prefix of the row. Each predicts the next one.
        kept_BS = text_out_BS < S
        b_text, i_text = np.nonzero(kept_BS)
        out_text = text_out_BS[b_text, i_text]
        ids[b_text, out_text], pos[b_text, out_text] = x[b_text, i_text], i_text
        has_next = np.zeros((B, S), dtype=bool)
        has_next[:, :-1] = kept_BS[:, 1:]
        b_next, i_next = np.nonzero(has_next)
        targets[b_next, text_out_BS[b_next, i_next]] = x[b_next, i_next + 1]
        # Branch tokens (I of them before the cut): branch j's k-th token at start_J + k, position
        # end + 1 + k; each predicts the next token of its branch.
        j_I, k_I = _ranges(len_J)
        tok_I = np.concatenate([np.zeros(0, np.int64), *tokens]).astype(np.int64)
        out_I = start_J[j_I] + k_I
        has_next_I = (k_I < len_J[j_I] - 1) & (out_I + 1 < S)
        keep = out_I < S
        j_I, k_I, tok_I, out_I, has_next_I = j_I[keep], k_I[keep], tok_I[keep], out_I[keep], has_next_I[keep]
        b_I = b_J[j_I]
        ids[b_I, out_I], pos[b_I, out_I] = tok_I, end_J[j_I] + 1 + k_I
        targets[b_I[has_next_I], out_I[has_next_I]] = tok_I[np.flatnonzero(has_next_I) + 1]

        # Visibility, causal in output order: query q sees the keys of its own branch up to itself
        # (none for a text token) and the text tokens of an interval: all text up to itself for a text
        # token, its anchor mention for a branch token.
        own_lo = np.zeros((B, S), dtype=np.int64)
        own_len = np.zeros((B, S), dtype=np.int64)
        text_lo = np.zeros((B, S), dtype=np.int64)
        text_len = np.broadcast_to(np.arange(1, S + 1), (B, S)).copy()
        text = np.ones((B, S), dtype=bool)
        text[b_I, out_I] = False
        own_lo[b_I, out_I] = start_J[j_I]
        own_len[b_I, out_I] = out_I + 1 - start_J[j_I]
        text_lo[b_I, out_I] = text_out_BS[b_I, anchor_J[j_I]]
        text_len[b_I, out_I] = text_out_BS[b_I, end_J[j_I]] + 1 - text_lo[b_I, out_I]
        mask = _in_intervals(own_lo, own_len)
        mask |= _in_intervals(text_lo, text_len) & text[:, None, :]
        return {"input_ids": ids, "targets": targets, "position_ids": pos, "attn_mask": mask}

    def inject_row(
        self, x: np.ndarray, mentions: np.ndarray, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """One row: x [S], mentions [k, 3]; `inject` with B = 1, without the batch dimension."""
        out = self.inject(np.asarray(x)[None], mentions, np.zeros(len(mentions), dtype=np.int64), rng)
        return {k: v[0] for k, v in out.items()}


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
        self.kg: DatasetKG | None = None
        self.rows: RowKnowledge | None = None
        self.injector: Injector | None = None
        if cfg.mode != "none":
            self.kg = DatasetKG.load(data_dir)
            self.rows = RowKnowledge(data_dir, split)
            if cfg.mode == "inject":
                from data_prep.tokenizer import load_tokenizer

                if tokenizer_path is None:
                    raise ValueError("knowledge.mode=inject needs the dataset's tokenizer (tokenizer_path)")
                self.injector = Injector(self.kg, load_tokenizer(tokenizer_path), cfg)
        if not causal and mask_id is None:
            raise ValueError("a masked LM (model.causal=false) needs a tokenizer with a <mask> token")

    def batch(self, global_batch: int, micro_step: int) -> dict[str, Any]:
        plan = self.loader.plan
        rows = plan.rows(global_batch, micro_step)
        x = self.loader.dataset.rows(rows)
        j = micro_step * plan.dp + plan.rank  # the micro-batch's index in the global batch
        rng = np.random.default_rng([self.seed, global_batch, j, 7])
        if self.cfg.mode == "none":
            return self._lm(torch.from_numpy(x), rng)
        if self.kg is None or self.rows is None:
            raise RuntimeError(
                f"knowledge.mode={self.cfg.mode}, but the loader has not read the dataset's KG"
            )
        if self.cfg.mode == "fusion":
            kb = fusion_batch(self.kg, self.rows, rows, x.shape[1], self.cfg, rng)
            return {**self._lm(torch.from_numpy(x), rng), "knowledge": kb}
        if self.injector is None:
            raise RuntimeError(f"knowledge.mode={self.cfg.mode}: the loader has no injector")
        out = self.injector.inject(x, *self.rows.batch_mentions(rows), rng)
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def _lm(self, x: torch.Tensor, rng: np.random.Generator) -> dict[str, Any]:
        if self.causal:
            return {"input_ids": x, "labels": x}
        # BERT masking: 15% of tokens are predicted; 80% of them shown as <mask>, 10% random, 10% kept.
        u = torch.from_numpy(rng.random(x.shape))
        chosen = u < 0.15
        labels = torch.where(chosen, x, torch.full_like(x, IGNORE_INDEX))
        inp = x.clone()
        if self.mask_id is None:  # __init__ refuses a masked LM without one
            raise RuntimeError("a masked LM batch needs the tokenizer's <mask> id")
        inp[u < 0.12] = self.mask_id
        rand = (u >= 0.12) & (u < 0.135)
        inp[rand] = torch.from_numpy(rng.integers(self.vocab_size, size=int(rand.sum())))
        return {"input_ids": inp, "labels": labels}
