"""The native MoE backend (DeepSpeed-MoE's own layer): its checks, and real multi-process runs
(gloo on CPU) against single-process references, AutoEP and the plain model."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_MODEL,
    deepspeed_cmd,
    pretrain,
    run_cmd,
    write_ds_config,
)

from sparsexpert.config import ConfigError
from sparsexpert.distributed.parallel import check_config, prepare_ds_config, resolve_ep_size
from sparsexpert.model import ModelConfig, MoEConfig, build_model
from sparsexpert.train.config import RunConfig
from sparsexpert.train.trainer import _check_resume_compatible
from sparsexpert.weights.deepspeed_formats import load_weights
from sparsexpert.weights.export import hf_equivalent

STEPS = 4
LOSS_KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm")
SGD = {"type": "SGD", "params": {"lr": 0.5}}
NATIVE = ["--model.moe.backend=native", "--model.moe.capacity_factor=1.0", "--model.moe.min_capacity=2"]


def ds(**kw):
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "expert_parallel": {"enabled": True},
        **kw,
    }


def native(**moe) -> ModelConfig:
    return ModelConfig(
        d_model=64, n_heads=4, d_ff=128, moe=MoEConfig(**{"num_experts": 4, "backend": "native", **moe})
    )


@pytest.mark.parametrize(
    "mcfg,dsc,match",
    [
        (native(), ds(zero_optimization={"stage": 3}), "stage=3: DeepSpeed's native MoE layer .* ZeRO 0-2"),
        (native(ep_size=4, num_experts_per_layer=[4, 4, 4, 6]), ds(), r"layer\[3\]=6: must be a multiple of"),
        (native(ep_size=4, num_experts=6), ds(), "num_experts=6: must be a multiple of model.moe.ep_size=4"),
        (
            native(),
            ds(expert_parallel={"enabled": True, "autoep_size": 2}),
            "autoep_size=2: configures AutoEP",
        ),
        (native(num_shared_experts=1), ds(), "num_shared_experts=1: .*use_residual"),
        (native(noisy_gate_policy="RSample"), ds(), "applies RSample to top-1 routing only"),
        (native(noisy_gate_policy="gumbel"), ds(), "noisy_gate_policy='gumbel': must be one of"),
        (native(num_experts_per_layer=[4, 8]), ds(), "needs one entry per MoE layer: 4"),
        (native(backend="autoep", capacity_factor=2.0), ds(), "capacity_factor=2.0: applies to the native"),
        (native(backend="tutel"), ds(), "backend='tutel': must be one of"),
    ],
)
def test_native_config_is_checked_before_initialize(mcfg, dsc, match):
    with pytest.raises(ConfigError, match=match):
        check_config(mcfg, dsc, 4, None)


def test_native_config_prepared_for_deepspeed():
    cfg = native(num_experts_per_layer=[2, 2, 4, 8])
    out = prepare_ds_config(ds(), cfg, 2, max_steps=10)
    assert "expert_parallel" not in out  # AutoEP must not replace the native layers
    assert resolve_ep_size(cfg, 4) == 2 and resolve_ep_size(cfg, 8) == 2
    assert [cfg.experts_in_layer(i) for i in range(4)] == [2, 2, 4, 8]
    with pytest.raises(ConfigError, match="top_k=1: the native top-1 gate"):
        hf_equivalent(native(top_k=1))
    with pytest.raises(ConfigError, match="use_residual=True: Mixtral has no Residual-MoE"):
        hf_equivalent(native(use_residual=True))
    with pytest.raises(ConfigError, match="pyramid"):
        hf_equivalent(cfg)
    assert hf_equivalent(native()) == "MixtralForCausalLM"


def test_native_elastic_resume_is_refused():
    cfg = RunConfig(model=native(ep_size=2))
    meta = {
        "run": json.loads(json.dumps(asdict(cfg))),
        "world_size": 2,
        "ep_size": 2,
        "global_batch": 8,
        "ds_config": {"zero_optimization": {"stage": 2}},
    }
    assert not _check_resume_compatible(meta, cfg, 2, 2, 8, 2, Path("t"))
    cfg.model.moe.ep_size = 1
    with pytest.raises(
        ConfigError, match="resharding a native-MoE checkpoint .* resume at the same world size"
    ):
        _check_resume_compatible(meta, cfg, 2, 1, 8, 2, Path("t"))


def test_plain_model_computes_the_native_top1_function():
    """Native top-1 weighs the expert by its router probability; a Residual-MoE block mixes in its
    dense MLP; the plain model (what runs after export or consolidation) does the same."""
    cfg = native(top_k=1, use_residual=True)
    cfg.vocab_size, cfg.n_layers = 50, 2
    block = build_model(cfg, 0).layers[0].mlp
    assert not block.renormalize and block.residual_mlp is not None
    x = torch.randn(1, 5, 64)
    probs = block.gate(x[0]).softmax(-1)
    e = probs.argmax(-1)
    w1, w3, w2 = (block.experts.w1[e], block.experts.w3[e], block.experts.w2[e])
    h = torch.nn.functional.silu(torch.einsum("tfd,td->tf", w1, x[0])) * torch.einsum("tfd,td->tf", w3, x[0])
    moe = torch.einsum("tdf,tf->td", w2, h) * probs.max(-1).values[:, None]
    coef = block.residual_coef(x[0]).softmax(-1)
    want = moe * coef[:, :1] + block.residual_mlp(x[0]) * coef[:, 1:]
    torch.testing.assert_close(block(x)[0], want, atol=1e-6, rtol=1e-5)


def test_native_layer_against_plain_model_autoep_and_hand_counted_drops(tmp_path):
    """Same weights, same batch, 2 ranks with ep_size=2: see tests/scripts/native_equivalence.py."""
    out = tmp_path / "eq.jsonl"
    run_cmd(deepspeed_cmd(2, "tests/scripts/native_equivalence.py", str(out)), tmp_path, timeout=300)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for r in rows:
        # dropless: native == AutoEP == plain (routing is the same function at top-2)
        for got in (r["losses"]["native"], r["losses"]["autoep"]):
            assert got == pytest.approx(r["losses"]["plain"], rel=1e-6)
        assert r["logits_diff"] < 1e-5 and r["counts_equal"]
        # native top-3, and native top-1 with Residual-MoE and a pyramid of experts == plain
        assert r["losses"]["native_top3"] == pytest.approx(r["losses"]["plain_top3"], rel=1e-6)
        assert r["losses"]["native_top1_pr_residual"] == pytest.approx(
            r["losses"]["plain_top1_pr_residual"], rel=1e-6
        )
        assert r["native_layer"] == "NativeMoE" and r["local_experts"] == 2
        assert r["experts_by_global_id"] and r["experts_distinct"]
        moe_groups = [g for g in r["param_groups"] if g["moe"]]
        assert moe_groups and all(g["experts"] == g["params"] for g in moe_groups)
        assert sum(g["experts"] for g in moe_groups) == 2 * 2 * 3  # 2 layers x 2 local experts x (w1, w2, w3)
        assert all(g["experts"] == 0 for g in r["param_groups"] if not g["moe"])
        # capacity: some experts over it, some under (so the count depends on the routing)
        reported, by_hand, loads = r["drops"]["reported"], r["drops"]["by_hand"], r["drops"]["loads"]
        assert reported == by_hand and all(d > 0 for d, _ in reported), r["drops"]
        assert any(min(n_E) < capacity for n_E, capacity in loads), r["drops"]


# A pyramid (2 then 4 experts) of Residual-MoE layers with capacity-limited top-1 routing (by position:
# random token selection would draw different numbers on one process than on two).
PYRAMID = [
    "--model.moe.top_k=1",
    "--model.moe.use_residual=true",
    "--model.moe.num_experts_per_layer=[2,4]",
    "--model.moe.use_rts=false",
]


def _native_run(tmp, nproc, ds_json, *extra, example_data, save_every=0, resume=False):
    return pretrain(
        tmp,
        nproc,
        ds_json,
        *TINY_MODEL,
        *NATIVE,
        f"--data.path={example_data}",
        f"--train.max_steps={STEPS}",
        "--train.log_every=1",
        f"--train.save_every={save_every}",
        "--train.keep_checkpoints=0",
        *extra,
        *(["--resume"] if resume else []),
    )


def _assert_matches(run, reference, keys=LOSS_KEYS):
    got, want = run.metrics(), reference.metrics()
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key, a[key], b[key])
        assert a["dropped_frac"] == pytest.approx(b["dropped_frac"], abs=1e-9)
        assert all(0 < f < 0.5 for f in a["dropped_frac"].values()), a["dropped_frac"]


@pytest.fixture(scope="module")
def native_references(tmp_path_factory, example_data):
    """One process, gradient accumulation 2 (the global batch two ranks see in one step), ZeRO-0,
    capacity 1.0: top-2 with SGD and a clip that is always active; the pyramid with Adam, unclipped."""
    tmp = tmp_path_factory.mktemp("native_ref")
    refs = {}
    for name, extra, opt, clip in (("sgd_clip", [], SGD, 0.3), ("pyramid", PYRAMID, None, 0.0)):
        more = {"optimizer": opt, "zero_allow_untested_optimizer": True} if opt else {}
        ds_json = write_ds_config(
            tmp / f"{name}.json",
            "moe_z0.json",
            gradient_clipping=clip,
            gradient_accumulation_steps=2,
            train_micro_batch_size_per_gpu=4,
            **more,
        )
        refs[name] = _native_run(tmp / name, 1, ds_json, *extra, example_data=example_data)
    return refs


def test_native_expert_parallel_clips_with_the_global_norm(tmp_path, example_data, native_references):
    """ep_size=2 on 2 ranks at ZeRO-0 equals one process, capacity-limited routing and its drops
    included, with SGD (not invariant to a uniform gradient scale) and a clip active at every step:
    DeepSpeed averages per-rank norms there (issue #8469); sparsexpert clips with the global norm,
    and the runs agree only if it covers every rank's experts exactly once."""
    ds_json = write_ds_config(
        tmp_path / "ds.json",
        "moe_z0.json",
        gradient_clipping=0.3,
        train_micro_batch_size_per_gpu=4,
        optimizer=SGD,
        zero_allow_untested_optimizer=True,
    )
    run = _native_run(tmp_path / "ep2", 2, ds_json, "--model.moe.ep_size=2", example_data=example_data)
    assert "world 2, ep 2, ZeRO-0" in run.output and "native DeepSpeed-MoE, capacity 1" in run.output
    _assert_matches(run, native_references["sgd_clip"])
    assert all(r["grad_norm"] > 0.3 for r in run.metrics())  # the clip is active at every step


def test_pr_moe_and_residual_moe_match_single_process_and_resume_bit_identically(
    tmp_path, example_data, native_references
):
    """The pyramid of Residual-MoE layers, 2 ranks with ep_size=2 at ZeRO-2, unclipped: equals one
    process; resumed from its step-2 checkpoint, the losses equal the uninterrupted run's exactly;
    the checkpoints read back as the single process's full weights, experts by global id."""
    ds_json = write_ds_config(
        tmp_path / "ds.json", "moe_z2.json", gradient_clipping=0.0, train_micro_batch_size_per_gpu=4
    )
    args = [*PYRAMID, "--model.moe.ep_size=2"]
    full = _native_run(tmp_path / "full", 2, ds_json, *args, example_data=example_data, save_every=2)
    assert "2 MoE layers x [2, 4] experts top-1" in full.output and "Residual-MoE" in full.output
    reference = native_references["pyramid"]
    _assert_matches(full, reference, keys=("loss", "lm_loss", "aux_loss", "z_loss"))

    # A run interrupted after step 2: the uninterrupted run's output as it was then.
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(full.output_dir / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002")
    (out / "checkpoints" / "latest").write_text("step_00000002")
    resumed = _native_run(out, 2, ds_json, *args, example_data=example_data, save_every=2, resume=True)
    assert " at step 2" in resumed.output.split("resumed from ")[1].split("\n")[0]
    got = {r["step"]: r for r in resumed.metrics()}
    assert sorted(got) == [3, 4]
    for want in full.metrics()[2:]:
        for key in (*LOSS_KEYS, "dropped_frac", "expert_load"):
            assert got[want["step"]][key] == want[key], (want["step"], key)

    one, _ = load_weights(reference.output_dir)
    two, meta = load_weights(full.output_dir)
    resumed_weights, _ = load_weights(out)
    assert meta["ep_size"] == 2 and one.keys() == two.keys()
    assert two["layers.1.mlp.experts.w1"].shape[0] == 4 and "layers.0.mlp.residual_coef.bias" in two
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4, msg=key)
        assert torch.equal(resumed_weights[key], two[key]), key
