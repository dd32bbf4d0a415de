"""The model against hand computations: routing, router losses, initialization, attention masks;
activation checkpointing against the same model without it, in-process and under DeepSpeed."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL, deepspeed_cmd, pretrain, run_cmd, write_ds_config

from sparsexpert.knowledge.config import KnowledgeConfig
from sparsexpert.knowledge.modules import KnowledgeBatch
from sparsexpert.model import IGNORE_INDEX, ModelConfig, MoEConfig, build_model
from sparsexpert.model.moe import MoEBlock, router_stats


def tiny(**moe) -> ModelConfig:
    return ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        max_seq_len=32,
        moe=MoEConfig(**{"num_experts": 4, "top_k": 2, **moe}),
    )


def reference_moe(block: MoEBlock, x_TD: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert, straight from the definition."""
    out = []
    for x in x_TD:
        p = torch.softmax(block.gate(x), -1)
        w, idx = p.topk(block.top_k)
        w = w / w.sum()
        y = torch.zeros_like(x)
        for wk, e in zip(w, idx):
            ex = block.experts
            y = y + wk * (ex.w2[e] @ (F.silu(ex.w1[e] @ x) * (ex.w3[e] @ x)))
        if block.shared_experts is not None:
            y = y + block.shared_experts(x)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("top_k,shared", [(1, 0), (2, 0), (2, 1), (3, 2)])
def test_moe_block_matches_per_token_reference(top_k, shared):
    torch.manual_seed(0)
    block = MoEBlock(d_model=16, d_expert=24, num_experts=4, top_k=top_k, num_shared_experts=shared)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 7, 16)
    got = block(x)
    torch.testing.assert_close(
        got.reshape(-1, 16), reference_moe(block, x.reshape(-1, 16)), rtol=1e-5, atol=1e-5
    )


def test_moe_block_gradients_match_reference():
    torch.manual_seed(1)
    block = MoEBlock(16, 24, 4, 2, 1)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(9, 16)
    block(x[None]).pow(2).sum().backward()
    got = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    reference_moe(block, x).pow(2).sum().backward()
    for n, p in block.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_router_losses_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0]])
    stats = router_stats([logits], top_k=1)
    p = torch.softmax(logits, -1)
    share = torch.tensor([1, 1, 1, 0]) / 3.0  # top-1 picks experts 0, 1, 2
    assert stats.expert_counts.tolist() == [[1, 1, 1, 0]]
    torch.testing.assert_close(stats.aux_loss, 4 * (share * p.mean(0)).sum())
    torch.testing.assert_close(stats.z_loss, torch.logsumexp(logits, -1).pow(2).mean())


def test_aux_loss_is_one_under_perfect_balance():
    # Uniform router probabilities and an even split of assignments give exactly 1.
    logits = torch.zeros(8, 4)
    logits[torch.arange(8), torch.arange(8) % 4] = 1e-6  # break ties evenly
    assert abs(router_stats([logits], top_k=1).aux_loss.item() - 1.0) < 1e-5


def test_forward_returns_loss_terms_and_counts():
    cfg = tiny(aux_loss_coef=0.1, z_loss_coef=0.01)
    model = build_model(cfg, seed=0)
    x = torch.randint(0, 97, (3, 16))
    out = model(x, x)
    assert out.expert_counts.shape == (2, 4)
    assert out.expert_counts.sum().item() == 2 * 3 * 16 * 2  # layers x tokens x top_k
    ref_lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ref_lm)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.1 * out.aux_loss + 0.01 * out.z_loss)
    out.loss.backward()
    gate = model.layers[0].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_router_losses_reach_the_router():
    """The aux and z losses alone must produce a router gradient (they come from hooked logits)."""
    model = build_model(tiny(aux_loss_coef=1.0, z_loss_coef=1.0), seed=0)
    x = torch.randint(0, 97, (2, 8))
    out = model(x, x)
    (out.aux_loss + out.z_loss).backward()
    assert model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    assert model.layers[1].mlp.experts.w1.grad is None or model.layers[1].mlp.experts.w1.grad.abs().sum() == 0


def test_dense_model_and_moe_every():
    dense = build_model(tiny(num_experts=0), seed=0)
    assert not any(layer.is_moe for layer in dense.layers)
    out = dense(torch.randint(0, 97, (1, 8)), torch.randint(0, 97, (1, 8)))
    assert out.aux_loss.item() == 0 and out.expert_counts is None
    cfg = tiny(moe_every=2)
    cfg.n_layers = 4
    assert cfg.moe_layer_ids == [1, 3]


def test_init_is_deterministic_and_per_expert():
    a, b = build_model(tiny(), seed=5), build_model(tiny(), seed=5)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    # Expert e of a layer depends only on (seed, layer, e): an 8-expert layer's first 4 experts are
    # those of a 4-expert layer, so sharding experts over ranks cannot change them.
    big = build_model(tiny(num_experts=8), seed=5)
    torch.testing.assert_close(big.layers[0].mlp.experts.w1[:4], a.layers[0].mlp.experts.w1, rtol=0, atol=0)
    ex = a.layers[0].mlp.experts.w1
    assert not torch.equal(ex[0], ex[1])
    c = build_model(tiny(), seed=6)
    assert not torch.equal(c.layers[0].mlp.experts.w1, ex)


def test_causal_and_masked_attention():
    x = torch.randint(0, 97, (1, 12))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 97
    causal = build_model(tiny(), seed=0)
    la, lb = causal(x).logits, causal(y).logits
    torch.testing.assert_close(la[:, :-1], lb[:, :-1])  # the future does not leak back
    cfg = tiny()
    cfg.causal = False
    masked = build_model(cfg, seed=0)
    assert not torch.allclose(masked(x).logits[:, 0], masked(y).logits[:, 0])
    labels = torch.full_like(x, IGNORE_INDEX)
    labels[0, 3] = x[0, 3]
    out = masked(x, labels)
    torch.testing.assert_close(out.lm_loss, F.cross_entropy(out.logits[0, 3:4], x[0, 3:4]))


def test_param_counts():
    model = build_model(tiny(), seed=0)
    counts = model.num_params()
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["active"] == counts["total"] - expert // 2  # top-2 of 4 experts


# ---------------------------------------------------------------------------------------------
# Activation checkpointing: the same losses and gradients, with each block recomputed in backward


def _fusion_batch(B: int, S: int) -> KnowledgeBatch:
    """Mentions at tokens 2-3 (entity 1) and 6 (entity 4) of every row, two triples with negatives."""
    ent = torch.full((B, S), -1)
    ent[:, 2:4], ent[:, 6] = 1, 4
    tokens = torch.tensor([b * S + s for b in range(B) for s in (2, 3, 6)])
    mention_of = torch.tensor([2 * b + m for b in range(B) for m in (0, 0, 1)])
    return KnowledgeBatch(
        entity_ids=ent,
        mention_tokens=tokens,
        mention_of_token=mention_of,
        candidates=torch.tensor([1, 4, 0, 5]),
        mention_labels=torch.tensor([0, 1] * B),
        triples=torch.tensor([[1, 0, 4], [4, 1, 2]]),
        negatives=torch.tensor([[[1, 0, 3], [5, 0, 4]], [[4, 1, 0], [3, 1, 2]]]),
    )


def _losses_and_grads(cfg: ModelConfig, x, knowledge, objective: str):
    model = build_model(cfg, seed=0).train()
    out = model(x, x, knowledge=knowledge)
    loss = out.loss if objective == "loss" else out.aux_loss + out.z_loss
    loss.backward()
    terms = {
        k: getattr(out, k) for k in ("loss", "lm_loss", "aux_loss", "z_loss", "entity_loss", "triple_loss")
    }
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return model, {k: v for k, v in terms.items() if v is not None}, grads


@pytest.mark.parametrize(
    "kind,objective",
    [("dense", "loss"), ("moe", "loss"), ("moe", "router"), ("fusion", "loss"), ("masked", "loss")],
)
def test_activation_checkpointing_gives_the_same_losses_and_gradients(kind, objective):
    """Dense and MoE (shared experts), causal, with knowledge fusion entering at layer 1, a masked LM;
    objective "router": the aux and z losses alone, whose gradient reaches the router only through the
    logits recorded inside the checkpointed blocks."""
    cfg = tiny(num_experts=0 if kind == "dense" else 4, num_shared_experts=0 if kind == "dense" else 1)
    cfg.n_layers, cfg.moe.aux_loss_coef, cfg.moe.z_loss_coef = 3, 0.5, 0.1
    cfg.causal = kind != "masked"
    knowledge = None
    if kind == "fusion":
        cfg.knowledge = KnowledgeConfig(mode="fusion", num_entities=6, num_relations=2, entity_dim=8)
        knowledge = _fusion_batch(3, 16)
    x = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    _, terms, grads = _losses_and_grads(cfg, x, knowledge, objective)
    ckpt_cfg = copy.deepcopy(cfg)
    ckpt_cfg.activation_checkpointing = True
    model, ckpt_terms, ckpt_grads = _losses_and_grads(ckpt_cfg, x, knowledge, objective)

    assert model._router_recorder.logits == []  # the recomputation recorded nothing
    assert terms.keys() == ckpt_terms.keys() and grads.keys() == ckpt_grads.keys()
    if kind == "fusion":
        assert {"entity_loss", "triple_loss", "knowledge.entities.weight"} <= terms.keys() | grads.keys()
    if objective == "router":
        assert grads["layers.1.mlp.gate.weight"].abs().sum() > 0
    for k in terms:
        torch.testing.assert_close(ckpt_terms[k], terms[k], rtol=1e-6, atol=0, msg=k)
    for n in grads:
        torch.testing.assert_close(ckpt_grads[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_activation_checkpointing_recomputes_only_while_training_with_gradients():
    cfg = tiny()
    cfg.activation_checkpointing = True
    model = build_model(cfg, seed=0)
    calls = []
    model.layers[0].register_forward_hook(lambda *_: calls.append(1))  # at the end: no early stop
    x = torch.randint(0, 97, (2, 8))
    model.train()
    model(x, x).loss.backward()
    assert len(calls) == 2  # forward, and again in backward
    calls.clear()
    with torch.no_grad():
        model(x, x)
    model.eval()
    model(x, x).loss.backward()
    assert len(calls) == 2  # once each: no grad, then eval mode


def test_activation_checkpointing_recomputes_again_for_a_second_backward():
    """Adversarial fine-tuning's pattern: the gradient w.r.t. the embeddings (graph kept), a perturbed
    forward, then one backward through both graphs; the first graph's blocks are recomputed twice."""
    results = []
    for on in (False, True):
        cfg = tiny()
        cfg.n_layers, cfg.activation_checkpointing = 3, on
        model = build_model(cfg, seed=0).train()
        x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
        h, emb = model.hidden_states(x)
        loss = model.output(h).logsumexp(-1).mean() + sum(model.router_losses(h)[:2])
        (g,) = torch.autograd.grad(loss, emb, retain_graph=True)
        h2, _ = model.hidden_states(x, embed_delta=1e-2 * g / g.norm())
        (loss + model.output(h2).logsumexp(-1).mean() + sum(model.router_losses(h2)[:2])).backward()
        results.append((g, {n: p.grad for n, p in model.named_parameters()}))
    (g, grads), (ckpt_g, ckpt_grads) = results
    torch.testing.assert_close(ckpt_g, g, rtol=1e-5, atol=1e-7)
    for n in grads:
        torch.testing.assert_close(ckpt_grads[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_activation_checkpointing_under_deepspeed_matches(tmp_path, example_data):
    """2 processes, ep_size=2, ZeRO-2, AutoEP (its all-to-alls repeat in backward on every rank), knowledge
    fusion: the logged losses and gradient norm equal those of the same run without checkpointing."""
    ds = write_ds_config(tmp_path / "ds.json", gradient_clipping=1.0, train_micro_batch_size_per_gpu=4)
    common = [
        *TINY_MODEL,
        "--model.moe.ep_size=2",
        "--model.knowledge.mode=fusion",
        "--model.knowledge.entity_dim=16",
        f"--data.path={example_data}",
        "--train.max_steps=4",
        "--train.log_every=1",
        "--train.save_every=0",
    ]
    ref = pretrain(tmp_path / "plain", 2, ds, *common)
    run = pretrain(tmp_path / "ckpt", 2, ds, *common, "--model.activation_checkpointing=true")
    assert [r["step"] for r in run.metrics()] == [r["step"] for r in ref.metrics()] == [1, 2, 3, 4]
    for a, b in zip(run.metrics(), ref.metrics()):
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "entity_loss", "triple_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key, a[key], b[key])


def test_activation_checkpointing_with_the_native_backend(tmp_path):
    """DeepSpeed's native layer draws random numbers while routing (Random Token Selection, Jitter) and
    counts dropped assignments in a hook: the recomputation routes alike (same RNG state), so losses,
    gradients and drop counters equal those without checkpointing."""
    out = tmp_path / "native.jsonl"
    run_cmd(deepspeed_cmd(1, "tests/scripts/checkpointing_native.py", str(out)), tmp_path, timeout=300)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        plain, ckpt = r["plain"], r["checkpointed"]
        assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-6)
        assert ckpt["aux_z"] == pytest.approx(plain["aux_z"], rel=1e-6)
        assert r["same_grad_names"] and r["grad_diff"] < 1e-6
        assert ckpt["drops_forward"] == ckpt["drops_after_backward"] == plain["drops_forward"]
    assert any(dropped > 0 for dropped, _ in rows[0]["plain"]["drops_forward"])  # capacity really binds
