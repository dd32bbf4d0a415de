"""Knowledge components against hand computations and plain-model references."""

import former_data_path as former
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsexpert.config import ConfigError
from sparsexpert.data.knowledge import DatasetKG, Injector, RowKnowledge, fusion_batch
from sparsexpert.evaluate import Scorer, filtered_targets, random_baseline, rank_of, ranking_metrics
from sparsexpert.knowledge.config import KnowledgeConfig
from sparsexpert.knowledge.modules import KnowledgeBatch
from sparsexpert.model import IGNORE_INDEX, ModelConfig, MoEConfig, build_model

IGN = IGNORE_INDEX


def tiny(mode: str = "none", n_layers: int = 2, **know) -> torch.nn.Module:
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=n_layers,
        n_heads=2,
        d_ff=64,
        max_seq_len=32,
        moe=MoEConfig(num_experts=4, top_k=2),
        knowledge=KnowledgeConfig(mode=mode, num_entities=6, num_relations=2, entity_dim=8, **know),
    )
    return build_model(cfg, seed=3).eval()


class WordTokenizer:
    """A stand-in tokenizer for hand-checkable injections: one id per word."""

    vocab = {"r": 40, "x": 41, "alpha": 42, "beta": 43, "gamma": 44, "other": 45}

    def encode(self, texts):
        return [np.array([self.vocab[w] for w in t.split()], dtype=np.int64) for t in texts]


def toy_kg() -> DatasetKG:
    triples = np.array([[0, 0, 1], [0, 0, 2], [2, 1, 0]], dtype=np.int64)
    return DatasetKG(["e0", "e1", "e2"], ["alpha", "beta", "gamma"], ["r_x", "other"], triples)


def test_injection_layout_by_hand():
    cfg = KnowledgeConfig(mode="inject", inject_per_mention=1)
    inj = Injector(toy_kg(), WordTokenizer(), cfg)
    x = np.arange(10, 18)
    out = inj.inject_row(x, np.array([[2, 4, 0]]), np.random.default_rng(0))
    tail = out["input_ids"][6]
    assert tail in (43, 44)  # one of e0's two triples: "r x beta" or "r x gamma"
    # text 10 11 12 13 | branch r x <tail> | text 14, cut at 8 tokens
    assert out["input_ids"].tolist() == [10, 11, 12, 13, 40, 41, tail, 14]
    assert out["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 6, 4]
    assert out["targets"].tolist() == [11, 12, 13, 14, 41, tail, IGN, IGN]
    m = out["attn_mask"]
    assert m[4].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]  # the branch sees its anchor (tokens 2-3) and itself
    assert m[6].tolist() == [0, 0, 1, 1, 1, 1, 1, 0]
    assert m[7].tolist() == [1, 1, 1, 1, 0, 0, 0, 1]  # the text never sees the branch
    assert not m[3, 4:].any()


def test_injected_rows_keep_the_text_and_teach_the_fact():
    """Text positions compute exactly what the plain model computes on the text alone. A branch
    attends only to its anchor mention and itself: in a one-layer model (where the anchor's keys
    do not yet carry its context) it computes what the model computes on (anchor, branch) alone."""
    model, one_layer = tiny(), tiny(n_layers=1)
    cfg = KnowledgeConfig(mode="inject", inject_per_mention=2)
    inj = Injector(toy_kg(), WordTokenizer(), cfg)
    x = np.random.default_rng(1).integers(5, 39, size=24)
    out = inj.inject_row(x, np.array([[3, 5, 0], [12, 13, 2]]), np.random.default_rng(0))
    batch = {k: torch.from_numpy(v)[None] for k, v in out.items()}
    with torch.no_grad():
        logits = model(
            batch["input_ids"], position_ids=batch["position_ids"], attn_mask=batch["attn_mask"]
        ).logits[0]
        is_text = np.array([out["attn_mask"][i, 0] for i in range(24)])  # text tokens all see token 0
        n_text = int(is_text.sum())
        plain = model(torch.from_numpy(x[:n_text])[None]).logits[0]
        torch.testing.assert_close(logits[torch.from_numpy(is_text)], plain, atol=1e-5, rtol=1e-4)
        # the first branch: anchor x[3:5] then its tokens at positions 5, 6, 7
        b = np.flatnonzero(~is_text)[:3]
        got = one_layer(
            batch["input_ids"], position_ids=batch["position_ids"], attn_mask=batch["attn_mask"]
        ).logits[0]
        seq = torch.from_numpy(np.r_[x[3:5], out["input_ids"][b]])[None]
        ref = one_layer(seq, position_ids=torch.arange(3, 8)[None]).logits[0, 2:]
        torch.testing.assert_close(got[torch.from_numpy(b)], ref, atol=1e-5, rtol=1e-4)
    assert (out["targets"][b[:-1]] == out["input_ids"][b[1:]]).all() and out["targets"][b[-1]] == IGN


def _kb(entity_ids, **kw):
    z = torch.zeros(0, dtype=torch.long)
    fields = dict(
        mention_tokens=z,
        mention_of_token=z,
        candidates=z,
        mention_labels=z,
        triples=z.view(0, 3),
        negatives=z.view(0, 0, 3),
    )
    fields.update(kw)
    return KnowledgeBatch(entity_ids=entity_ids, **fields)


def test_fusion_changes_only_entity_tokens_and_what_follows():
    model = tiny("fusion", fusion_layer=1)
    x = torch.randint(5, 60, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(x).logits
        none = model(x, knowledge=_kb(torch.full((1, 12), -1))).logits
        ent = torch.full((1, 12), -1)
        ent[0, 6:8] = 4
        fused = model(x, knowledge=_kb(ent)).logits
    torch.testing.assert_close(none, plain, atol=0, rtol=0)
    torch.testing.assert_close(
        fused[:, :6], plain[:, :6], atol=0, rtol=0
    )  # causal: earlier tokens unaffected
    assert (fused[:, 6] - plain[:, 6]).abs().max() > 1e-4


def test_entity_and_triple_losses_by_hand():
    model = tiny("fusion", triple_margin=0.5)
    know = model.knowledge
    h = torch.randn(2, 5, 32)
    kb = _kb(
        torch.full((2, 5), -1),
        mention_tokens=torch.tensor([1, 2, 8]),
        mention_of_token=torch.tensor([0, 0, 1]),
        candidates=torch.tensor([0, 3, 5]),
        mention_labels=torch.tensor([1, 2]),
        triples=torch.tensor([[0, 1, 3]]),
        negatives=torch.tensor([[[0, 1, 4], [2, 1, 3]]]),
    )
    with torch.no_grad():
        pooled = torch.stack([h[0, 1:3].mean(0), h[1, 3]])
        q = pooled @ know.entity_head.weight.t()
        logits = q @ know.entities.weight[[0, 3, 5]].t()
        expected = F.cross_entropy(logits, torch.tensor([1, 2]))
        assert know.entity_loss(h, kb).item() == pytest.approx(expected.item(), rel=1e-5)

        E = F.normalize(know.entities.weight, dim=-1)
        R = know.relations.weight

        def d(a, r, b):
            return (E[a] + R[r] - E[b]).abs().sum().item()

        pos = d(0, 1, 3)
        want = np.mean([max(0.0, 0.5 + pos - d(0, 1, 4)), max(0.0, 0.5 + pos - d(2, 1, 3))])
        assert know.triple_loss(kb).item() == pytest.approx(want, rel=1e-5)
        tails = know.tail_scores(torch.tensor([0]), torch.tensor([1]))
        heads = know.head_scores(torch.tensor([1]), torch.tensor([3]))
        assert tails[0, 3].item() == pytest.approx(-pos, rel=1e-5) and heads[0, 0].item() == pytest.approx(
            -pos, rel=1e-5
        )
        assert heads[0, 2].item() == pytest.approx(-d(2, 1, 3), rel=1e-5)

        know.cfg.triple_score = "distmult"

        def s(a, r, b):
            return (E[a] * R[r] * E[b]).sum().item()

        want = np.mean([max(0.0, 0.5 - s(0, 1, 3) + s(0, 1, 4)), max(0.0, 0.5 - s(0, 1, 3) + s(2, 1, 3))])
        assert know.triple_loss(kb).item() == pytest.approx(want, rel=1e-5)
        assert know.tail_scores(torch.tensor([0]), torch.tensor([1]))[0, 3].item() == pytest.approx(
            s(0, 1, 3), rel=1e-5
        )
        assert know.head_scores(torch.tensor([1]), torch.tensor([3]))[0, 2].item() == pytest.approx(
            s(2, 1, 3), rel=1e-5
        )


def test_fusion_batch_corrupts_as_configured(tmp_path):
    n_rows, S = 400, 16
    spans = np.array([[r, s, s + 2, (r + s) % 6] for r in range(n_rows) for s in (1, 6, 11)], dtype=np.int64)
    np.save(tmp_path / "train_spans.npy", spans)
    np.save(tmp_path / "train_triples.npy", np.array([[r, r % 3] for r in range(n_rows)], dtype=np.int64))
    kg = DatasetKG(
        [f"e{i}" for i in range(6)],
        [f"e{i}" for i in range(6)],
        ["r0", "r1"],
        np.array([[0, 0, 1], [1, 1, 2], [2, 0, 3]]),
    )
    rk = RowKnowledge(tmp_path, "train")
    cfg = KnowledgeConfig(
        mode="fusion", num_entities=6, replace_prob=0.1, drop_prob=0.2, entity_negatives=3, triple_negatives=5
    )
    rows = np.arange(n_rows)
    kb = fusion_batch(kg, rk, rows, S, cfg, np.random.default_rng(0))
    truth = spans[:, 3]
    assert kb.num_mentions == len(spans)
    assert (kb.candidates[kb.mention_labels].numpy() == truth).all()  # labels are the true entities
    shown = kb.entity_ids.numpy()[spans[:, 0], spans[:, 1]]
    dropped = (shown == -1).mean()
    changed = ((shown != truth) & (shown != -1)).mean()
    assert dropped == pytest.approx(0.2, abs=0.03)
    assert changed == pytest.approx(0.1 * 5 / 6, abs=0.03)  # a random entity is the true one 1 time in 6
    # both tokens of a mention show the same entity; tokens outside mentions show none
    assert (kb.entity_ids.numpy()[spans[:, 0], spans[:, 1] + 1] == shown).all()
    assert (kb.entity_ids.numpy()[:, 0] == -1).all()
    assert sorted(map(tuple, kb.triples.tolist())) == [(0, 0, 1), (1, 1, 2), (2, 0, 3)]
    neg, pos = kb.negatives.numpy(), kb.triples.numpy()[:, None, :]
    assert neg.shape == (3, 5, 3) and (neg[..., 1] == pos[..., 1]).all()
    assert ((neg[..., 0] == pos[..., 0]) | (neg[..., 2] == pos[..., 2])).all()  # one end corrupted
    again = fusion_batch(kg, rk, rows, S, cfg, np.random.default_rng(0))
    assert torch.equal(again.entity_ids, kb.entity_ids) and torch.equal(again.negatives, kb.negatives)
    full = fusion_batch(
        kg, rk, rows[:2], S, KnowledgeConfig(mode="fusion", entity_negatives=0), np.random.default_rng(0)
    )
    assert full.candidates.tolist() == list(range(6))


def test_ranking_by_hand():
    scores = np.array([0.9, 0.5, 0.7, 0.1, 0.5])
    assert rank_of(scores, 1) == 3.5  # two better, one tie: (3 + 4) / 2
    assert rank_of(scores, 1, exclude=np.array([0])) == 2.5  # another true answer is filtered out
    m = ranking_metrics([1, 2, 4, 20])
    assert m["mrr"] == pytest.approx((1 + 0.5 + 0.25 + 0.05) / 4)
    assert (m["hits@1"], m["hits@3"], m["hits@10"]) == (0.25, 0.5, 0.75)


def test_scorer_sums_log_probabilities():
    model = tiny()
    seqs = [np.array([5, 6, 7, 8]), np.array([9, 10, 11]), np.array([12, 13])]
    got = Scorer(model, eos_id=2, batch_size=2).logprobs(seqs, [2, 1, 1])
    for s, start, g in zip(seqs, [2, 1, 1], got):
        with torch.no_grad():
            logp = F.log_softmax(model(torch.from_numpy(s)[None]).logits[0], -1)
        want = sum(logp[t - 1, s[t]].item() for t in range(start, len(s)))
        assert g == pytest.approx(want, rel=1e-5)


def test_knowledge_config_errors():
    with pytest.raises(ConfigError, match="model.knowledge.mode"):
        KnowledgeConfig(mode="ernie").validate(4)
    with pytest.raises(ConfigError, match="fusion_layer"):
        KnowledgeConfig(mode="fusion", fusion_layer=4).validate(4)
    with pytest.raises(ConfigError, match="replace_prob"):
        KnowledgeConfig(replace_prob=0.6, drop_prob=0.6).validate(4)


def test_link_prediction_filters_other_true_answers():
    known = {("a", "r", "b"), ("a", "r", "c"), ("d", "r", "c"), ("a", "s", "d")}
    ents = ["a", "b", "c", "d"]
    truth, exclude = filtered_targets([("a", "r", "b"), ("d", "r", "c")], known, ents, tails=True)
    assert truth == [1, 2] and exclude[0].tolist() == [2] and exclude[1].tolist() == []
    truth, exclude = filtered_targets([("a", "r", "c")], known, ents, tails=False)
    assert truth == [0] and exclude[0].tolist() == [3]  # (d, r, c) is true too
    # a candidate scored above the answer but known true does not count against it
    assert rank_of(np.array([0.0, 0.5, 0.9, 0.1]), truth[0] + 1, exclude=np.array([2])) == 1.0


def test_masked_lm_batches_mask_like_bert(example_data):
    from sparsexpert.data.knowledge import KnowledgeLoader
    from sparsexpert.data.shards import BatchPlan, PackedDataset, ShardLoader

    data = PackedDataset(example_data, "train")
    plan = BatchPlan(len(data), 64, 1, 1, 0, seed=0)
    loader = KnowledgeLoader(ShardLoader(data, plan), example_data, "train", KnowledgeConfig(), False, 4, 512)
    b = loader.batch(0, 0)
    x = data[plan.rows(0, 0)]
    chosen = b["labels"] != IGN
    assert chosen.float().mean().item() == pytest.approx(0.15, abs=0.02)
    assert torch.equal(b["labels"][chosen], x[chosen])  # targets are the original tokens
    assert (b["input_ids"][chosen] == 4).float().mean().item() == pytest.approx(0.8, abs=0.05)
    assert torch.equal(b["input_ids"][~chosen], x[~chosen])  # unchosen tokens are shown as they are
    with pytest.raises(ConfigError, match="causal"):
        ModelConfig(causal=False, knowledge=KnowledgeConfig(mode="inject")).validate()


def test_injection_mode_is_a_plain_language_model():
    """K-BERT injection adds no parameters: its weights are exactly a text-only model's."""
    plain, inject = tiny(), tiny("inject")
    assert {n: p.shape for n, p in plain.state_dict().items()} == {
        n: p.shape for n, p in inject.state_dict().items()
    }
    assert all(torch.equal(plain.state_dict()[n], p) for n, p in inject.state_dict().items())


def test_random_baseline_by_hand():
    m = random_baseline([1, 4])
    assert m["mrr"] == pytest.approx((1.0 + (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4) / 2)
    assert (m["hits@1"], m["hits@3"], m["hits@10"]) == (pytest.approx((1 + 0.25) / 2), (1 + 0.75) / 2, 1.0)


# The references are the per-row implementations from before the data path was vectorized
# (former_data_path): the new code must give the same arrays and make the same random draws, in order.


def _assert_same_injection(inj: Injector, x: np.ndarray, mentions: list[np.ndarray], seed: int) -> dict:
    """inject (the whole micro-batch) against the reference row by row: equal arrays, the same draws."""
    rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    row_M = np.repeat(np.arange(len(mentions)), [len(m) for m in mentions])
    got = inj.inject(x, np.concatenate(mentions).reshape(-1, 3), row_M, rng)
    former_inj = former.Injector(inj.kg, inj.tok, inj.cfg)
    parts = [former_inj.inject_row(x[b], m, ref_rng) for b, m in enumerate(mentions)]
    for key in ("input_ids", "targets", "position_ids", "attn_mask"):
        want = np.stack([p[key] for p in parts])
        assert got[key].dtype == want.dtype and np.array_equal(got[key], want), key
    assert rng.bit_generator.state == ref_rng.bit_generator.state  # as many draws
    return got


def test_vectorized_injection_matches_the_reference_by_hand():
    """Mentions at the start and the end of the row, branches past S, a row without mentions, an
    entity heading no triple, nested mentions (one anchor spans another's branches), shared ends."""
    S = 12
    x = np.arange(10, 10 + 4 * S).reshape(4, S)
    rows = [
        np.array([[0, 1, 0], [4, 6, 2], [9, 12, 0]]),  # the last mention ends the row
        np.array(
            [[2, 7, 0], [3, 4, 2], [5, 7, 0], [8, 9, 1]]
        ),  # nested; two ending at token 6; e1 heads none
        np.zeros((0, 3), dtype=np.int64),  # no mentions
        np.array([[7, 10, 0], [10, 11, 2]]),  # branches overflow S
    ]
    for per, prob in [(1, 1.0), (2, 1.0), (3, 1.0), (2, 0.5), (2, 0.0), (0, 1.0)]:
        inj = Injector(
            toy_kg(),
            WordTokenizer(),
            KnowledgeConfig(mode="inject", inject_per_mention=per, inject_prob=prob),
        )
        former_inj = former.Injector(inj.kg, inj.tok, inj.cfg)
        for seed in range(4):
            got = _assert_same_injection(inj, x, rows, seed)
            for b, m in enumerate(rows):  # inject_row is inject on one row
                one = inj.inject_row(x[b], m, np.random.default_rng(seed))
                ref = former_inj.inject_row(x[b], m, np.random.default_rng(seed))
                assert all(np.array_equal(one[k], ref[k]) for k in ref)
        if prob == 0.0 or per == 0:
            assert np.array_equal(got["input_ids"], x)  # nothing injected


def test_vectorized_injection_matches_the_reference_on_the_example_world(example_data):
    from data_prep.tokenizer import load_tokenizer
    from sparsexpert.data.knowledge import KnowledgeLoader
    from sparsexpert.data.shards import BatchPlan, PackedDataset, ShardLoader

    data = PackedDataset(example_data, "train")
    kg, rk = DatasetKG.load(example_data), RowKnowledge(example_data, "train")
    tok = load_tokenizer(example_data / "tokenizer.model")
    plan = BatchPlan(len(data), 16, 1, 1, 0, seed=5)
    for per, prob in [(2, 1.0), (1, 0.7), (4, 1.0), (2, 0.0)]:
        inj = Injector(kg, tok, KnowledgeConfig(mode="inject", inject_per_mention=per, inject_prob=prob))
        for g in range(3):
            rows = plan.rows(g, 0)
            mentions = [former.select(rk.spans, int(r))[:, 1:] for r in rows]
            got = _assert_same_injection(inj, data.rows(rows), mentions, seed=g)
        assert (got["position_ids"] != np.arange(data.seq_len)).any() == (prob > 0)
    # The loader end to end: its micro-batch equals the reference's, rows gathered one at a time.
    cfg = KnowledgeConfig(mode="inject")
    loader = KnowledgeLoader(
        ShardLoader(data, plan), example_data, "train", cfg, True, None, 512, example_data / "tokenizer.model"
    )
    former_inj = former.Injector(kg, tok, cfg)
    for g, m in [(0, 0), (7, 0)]:
        batch = loader.batch(g, m)
        rows, rng = plan.rows(g, m), np.random.default_rng([plan.seed, g, m, 7])
        x = np.stack([np.asarray(data.shards[0][r], dtype=np.int64) for r in rows])
        parts = [
            former_inj.inject_row(x[b], former.select(rk.spans, int(r))[:, 1:], rng)
            for b, r in enumerate(rows)
        ]
        for key in parts[0]:
            assert torch.equal(batch[key], torch.from_numpy(np.stack([p[key] for p in parts]))), key


def _assert_same_fusion(kg, rk, rows, S, cfg, seed) -> KnowledgeBatch:
    rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    got, want = fusion_batch(kg, rk, rows, S, cfg, rng), former.fusion_batch(kg, rk, rows, S, cfg, ref_rng)
    for name in KnowledgeBatch.__dataclass_fields__:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert rng.bit_generator.state == ref_rng.bit_generator.state
    return got


def test_vectorized_fusion_batch_matches_the_reference(example_data, tmp_path):
    kg, rk = DatasetKG.load(example_data), RowKnowledge(example_data, "train")
    S = 32
    rows = np.random.default_rng(0).permutation(len(np.unique(rk.spans[:, 0])))[:24]
    rows = np.concatenate([rows, rows[:3]])  # repeated rows too
    cfgs = [
        KnowledgeConfig(mode="fusion"),
        KnowledgeConfig(mode="fusion", entity_negatives=0, replace_prob=0.5, drop_prob=0.3),
        KnowledgeConfig(mode="fusion", triple_batch=5),  # fewer than attached: a random choice
        KnowledgeConfig(mode="fusion", triple_source="kg", replace_prob=1.0, drop_prob=0.0),
        KnowledgeConfig(mode="fusion", replace_prob=0.0, drop_prob=1.0),
    ]
    for seed, cfg in enumerate(cfgs):
        _assert_same_fusion(kg, rk, rows, S, cfg, seed)
    # By hand: a row without mentions or triples, overlapping mentions, a mention ending the row.
    np.save(tmp_path / "t_spans.npy", np.array([[0, 1, 3, 2], [0, 2, 4, 5], [2, 14, 16, 1], [3, 0, 16, 4]]))
    np.save(tmp_path / "t_triples.npy", np.array([[0, 1], [2, 0], [2, 2], [3, 1]]))
    small = DatasetKG(
        [f"e{i}" for i in range(6)],
        [f"e{i}" for i in range(6)],
        ["r0", "r1"],
        np.array([[0, 0, 1], [1, 1, 2], [2, 0, 3]]),
    )
    rk = RowKnowledge(tmp_path, "t")
    for seed, cfg in enumerate(cfgs):
        _assert_same_fusion(small, rk, np.array([3, 1, 0, 2, 1]), 16, cfg, seed)
        empty = _assert_same_fusion(small, rk, np.array([1, 4]), 16, cfg, seed)
        assert empty.num_mentions == 0 and (empty.entity_ids == -1).all()


def test_entity_table_memory_per_rank_by_hand():
    """The run header's memory of the knowledge tables on one rank: parameters, gradients and Adam's
    states, each divided over the data-parallel ranks from the ZeRO stage that partitions it."""
    from sparsexpert.train.trainer import table_bytes_per_rank

    n = 1_000_000
    assert table_bytes_per_rank(n, 0, "fp32", 4) == n * (4 + 4 + 8)
    assert table_bytes_per_rank(n, 2, "fp32", 2) == n * 4 + n * 4 // 2 + n * 8 // 2
    assert table_bytes_per_rank(n, 1, "bf16", 4) == n * 2 + n * 2 + n * 12 // 4
    assert table_bytes_per_rank(n, 3, "fp16", 8) == (n * 2 + n * 2 + n * 12) // 8


def test_relation_constrained_candidates_by_hand():
    """Link prediction on a large KG ranks the answer among the entities seen with the query's relation,
    the other true answers filtered out, at most max_candidates of them (sampled, seeded)."""
    from sparsexpert.evaluate import candidate_sets

    known = {("a", "r", "b"), ("a", "r", "c"), ("d", "r", "e"), ("x", "s", "y"), ("c", "r", "d")}
    got = candidate_sets([("a", "r", "b")], known, tails=True, max_candidates=0)
    assert got == [["b", "d", "e"]]  # tails of r: b, c, d, e; c is another answer of (a, r, ?)
    got = candidate_sets([("d", "r", "e")], known, tails=False, max_candidates=0)
    assert got == [["d", "a", "c"]]  # heads of r: a, c, d; no other head of (?, r, e)
    many = {("h", "r", f"t{i:03d}") for i in range(200)} | {("q", "r", "answer")}
    one = candidate_sets([("q", "r", "answer")], many, tails=True, max_candidates=10)
    assert one[0][0] == "answer" and len(one[0]) == 10 and len(set(one[0])) == 10
    assert one == candidate_sets([("q", "r", "answer")], many, tails=True, max_candidates=10)  # seeded
