"""The entity table's row-wise Adagrad path (model.knowledge.entity_optimizer=rowwise_adagrad): the same
update as row-wise Adagrad computed densely by hand from autograd's gradient of the whole table; the
table outside DeepSpeed's optimizer, fp32 under bf16, resumed bit for bit; what it refuses.
(2 processes against 1: tests/test_distributed.py::test_knowledge_modes_under_expert_parallelism_match_single_process.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, TINY_MODEL, pretrain, write_ds_config

from sparsexpert.config import ConfigError
from sparsexpert.distributed import parallel
from sparsexpert.knowledge.config import KnowledgeConfig
from sparsexpert.knowledge.modules import KnowledgeBatch
from sparsexpert.model import ModelConfig, MoEConfig, build_model
from sparsexpert.train.rowwise import RowwiseAdagrad, lookups_per_step
from sparsexpert.weights import checkpoint
from sparsexpert.weights.deepspeed_formats import load_weights

E, B, S = 7, 2, 8


def _model(**know) -> torch.nn.Module:
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        max_seq_len=S,
        moe=MoEConfig(num_experts=4, top_k=2),
        knowledge=KnowledgeConfig(
            mode="fusion", num_entities=E, num_relations=2, entity_dim=4, entity_negatives=2, **know
        ),
    )
    return build_model(cfg, seed=5).train()


def _batch(g: torch.Generator) -> tuple[torch.Tensor, KnowledgeBatch]:
    """Random mentions and triples over the 7 entities: every row is looked up several times, by the
    fusion, the candidates and the triples, and row 6 never."""
    x = torch.randint(0, 64, (B, S), generator=g)
    ent = torch.full((B, S), -1)
    ent[:, 1:3] = torch.randint(0, 6, (B, 1), generator=g)
    ent[:, 5] = torch.randint(0, 6, (B,), generator=g)
    tokens = torch.tensor([b * S + s for b in range(B) for s in (1, 2, 5)])
    mention_of = torch.tensor([2 * b + m for b in range(B) for m in (0, 0, 1)])
    truth = torch.stack([ent[:, 1], ent[:, 5]], 1).reshape(-1)
    candidates = torch.unique(torch.cat([truth, torch.randint(0, 6, (2,), generator=g)]))
    triples = torch.stack([torch.randint(0, 6, (3,), generator=g), torch.tensor([0, 1, 0]), truth[:3]], 1)
    negatives = triples.unsqueeze(1).repeat(1, 2, 1)
    negatives[:, :, 2] = torch.randint(0, 6, (3, 2), generator=g)
    kb = KnowledgeBatch(
        ent, tokens, mention_of, candidates, torch.searchsorted(candidates, truth), triples, negatives
    )
    return x, kb


def test_rowwise_adagrad_equals_dense_rowwise_adagrad_by_hand():
    """Two optimizer steps of two micro-batches each: the row-wise path (lookups gathered, summed per row,
    padding to its fixed size) against autograd's dense gradient of the whole table with row-wise
    Adagrad applied to every row by hand. The rest of the model gets the same gradients on both paths."""
    lr, eps = 0.1, 1e-8
    dense = _model()
    rowwise = _model(entity_optimizer="rowwise_adagrad", entity_lr=lr, entity_eps=eps)
    w_dense = dense.knowledge.entities.weight
    torch.testing.assert_close(rowwise.knowledge.entities.weight, w_dense, rtol=0, atol=0)
    assert not rowwise.knowledge.entities.weight.requires_grad  # outside DeepSpeed's optimizer
    assert all(
        p is not rowwise.knowledge.entities.weight
        for g in parallel.param_groups(rowwise, 0.1)
        for p in g["params"]
    )
    opt = RowwiseAdagrad(rowwise.knowledge, cap=lookups_per_step(rowwise.cfg.knowledge, B, S, 2))
    sq = torch.zeros(E)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        for _ in range(2):
            x, kb = _batch(g)
            (dense(x, x, knowledge=kb).loss / 2).backward()
            (rowwise(x, x, knowledge=kb).loss / 2).backward()
        assert rowwise.knowledge.looked_up and rowwise.knowledge.entities.weight.grad is None
        for name, p in rowwise.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, dict(dense.named_parameters())[name].grad, msg=name)
        with torch.no_grad():  # by hand: s_r += mean(g_r^2); w_r -= lr g_r / (sqrt(s_r) + eps)
            grad = w_dense.grad
            sq += grad.pow(2).mean(1)
            w_dense -= lr * grad / (sq.sqrt() + eps).unsqueeze(1)
        opt.step(applied=True)
        dense.zero_grad(set_to_none=True)
        rowwise.zero_grad(set_to_none=True)
        assert rowwise.knowledge.looked_up == []
        torch.testing.assert_close(rowwise.knowledge.entity_sq, sq, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(rowwise.knowledge.entities.weight, w_dense, rtol=1e-6, atol=1e-7)
    assert (sq[:6] > 0).all() and sq[6] == 0  # every row looked up moved; the one never looked up did not

    # a step DeepSpeed skipped is skipped here too, and its lookups are dropped
    before = rowwise.knowledge.entities.weight.clone()
    x, kb = _batch(g)
    rowwise(x, x, knowledge=kb).loss.backward()
    opt.step(applied=False)
    assert rowwise.knowledge.looked_up == []
    assert torch.equal(rowwise.knowledge.entities.weight, before)


def test_no_lookup_recorded_without_gradients():
    model = _model(entity_optimizer="rowwise_adagrad")
    x, kb = _batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x, x, knowledge=kb)
    model.eval()
    model(x, x, knowledge=kb)  # a forward without backward hands nothing over either
    assert model.knowledge.looked_up == []


def test_rowwise_config_errors(example_data):
    model = ModelConfig(knowledge=KnowledgeConfig(mode="fusion", entity_optimizer="rowwise_adagrad"))
    for ds, match in (("moe_z3.json", "ZeRO-3"), ("moe_z2_fp16.json", "fp16")):
        ds_json = json.loads((REPO / "ds_configs" / ds).read_text())
        with pytest.raises(ConfigError, match=match):
            parallel.prepare_ds_config(ds_json, model, 1, 10, 512, 32, "cpu")
    with pytest.raises(ConfigError, match="entity_negatives"):
        KnowledgeConfig(mode="fusion", entity_optimizer="rowwise_adagrad", entity_negatives=0).validate(2)
    with pytest.raises(ConfigError, match="entity_optimizer"):
        KnowledgeConfig(mode="fusion", entity_optimizer="sgd").validate(2)
    with pytest.raises(ConfigError, match="entity_lr"):
        KnowledgeConfig(mode="fusion", entity_optimizer="rowwise_adagrad", entity_lr=0).validate(2)


def test_rowwise_table_stays_fp32_under_bf16_and_resumes_bit_for_bit(tmp_path, example_data):
    """bf16 at ZeRO-2, one process: 4 steps straight, and a run that dies at step 3 (after its step-2
    checkpoint) then --resume to 4, give the same weights bit for bit, the row-wise table and its accumulators included; the table and accumulators are
    fp32 in the checkpoint (the other weights bf16), trained (moved from the first checkpoint), and the
    run header states the table's memory on this path."""
    ds = write_ds_config(tmp_path / "ds.json", "moe_z2_bf16.json")
    common = [
        *TINY_MODEL,
        f"--data.path={example_data}",
        "--model.knowledge.mode=fusion",
        "--model.knowledge.entity_dim=16",
        "--model.knowledge.entity_optimizer=rowwise_adagrad",
        "--train.eval_every=0",
        "--train.save_every=2",
        "--train.keep_checkpoints=0",
    ]
    straight = pretrain(tmp_path / "straight", 1, ds, *common, "--train.max_steps=4")
    assert "with row-wise Adagrad" in straight.output
    died = pretrain(
        tmp_path / "split",
        1,
        ds,
        *common,
        "--train.max_steps=4",
        check=False,
        env={"SPARSEXPERT_FAIL_AT": "0:3"},
    )
    assert died.returncode != 0 and not (tmp_path / "split" / "checkpoints" / "step_00000004").exists()
    resumed = pretrain(tmp_path / "split", 1, ds, *common, "--train.max_steps=4", "--resume")
    assert "resumed from" in resumed.output and "at step 2" in resumed.output

    end, _ = load_weights(tmp_path / "straight" / "checkpoints" / "step_00000004")
    first, _ = load_weights(tmp_path / "straight" / "checkpoints" / "step_00000002")
    again, _ = load_weights(tmp_path / "split" / "checkpoints" / "step_00000004")
    assert end.keys() == again.keys() and {"knowledge.entities.weight", "knowledge.entity_sq"} <= end.keys()
    for key in end:
        assert torch.equal(end[key], again[key]), key
    assert not torch.equal(end["knowledge.entities.weight"], first["knowledge.entities.weight"])
    assert (end["knowledge.entity_sq"] > first["knowledge.entity_sq"]).any()

    module = checkpoint.load_file(
        tmp_path / "straight" / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    )["module"]
    assert module["knowledge.entities.weight"].dtype == torch.float32
    assert module["knowledge.entity_sq"].dtype == torch.float32
    assert module["knowledge.relations.weight"].dtype == torch.bfloat16
