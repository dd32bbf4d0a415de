"""Real multi-process training (DeepSpeed launcher, gloo on CPU) against single-process references."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, deepspeed_cmd, kill_when, pretrain, run_cmd, write_ds_config

from sparsexpert.weights.deepspeed_formats import load_weights

STEPS = 4
LOSS_KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm")


def _assert_same_losses(run, reference, rtol=1e-5):
    got, ref = run.metrics(), reference.metrics()
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(got, ref):
        for key in LOSS_KEYS:
            assert a[key] == pytest.approx(b[key], rel=rtol), (a["step"], key, a[key], b[key])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, example_data):
    """One process, gradient accumulation 2: the same global batch two ranks see in one step."""
    tmp = tmp_path_factory.mktemp("ref")
    ds = write_ds_config(
        tmp / "ds.json",
        "moe_z0.json",
        gradient_clipping=0.0,
        gradient_accumulation_steps=2,
        train_micro_batch_size_per_gpu=4,
    )
    return pretrain(
        tmp / "out",
        1,
        ds,
        *TINY_MODEL,
        "--model.moe.num_shared_experts=1",
        f"--data.path={example_data}",
        f"--train.max_steps={STEPS}",
        "--train.log_every=1",
        "--train.save_every=0",
    )


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("ep", [2, 1])
def test_expert_parallel_and_zero_stages_match_single_process(
    tmp_path, example_data, reference_run, stage, ep
):
    ds = write_ds_config(
        tmp_path / "ds.json", f"moe_z{stage}.json", gradient_clipping=0.0, train_micro_batch_size_per_gpu=4
    )
    run = pretrain(
        tmp_path / "out",
        2,
        ds,
        *TINY_MODEL,
        "--model.moe.num_shared_experts=1",
        f"--model.moe.ep_size={ep}",
        f"--data.path={example_data}",
        f"--train.max_steps={STEPS}",
        "--train.log_every=1",
        "--train.save_every=0",
    )
    assert f"world 2, ep {ep}, ZeRO-{stage}" in run.output
    _assert_same_losses(run, reference_run)
    for record in run.metrics():  # router losses are computed and logged under expert parallelism
        assert record["aux_loss"] > 0.5 and record["z_loss"] > 0
        assert len(record["expert_load"]["layer0"]) == 4
        assert sum(record["expert_load"]["layer1"]) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def sgd_clipped_reference(tmp_path_factory, example_data):
    tmp = tmp_path_factory.mktemp("sgd")
    ds = write_ds_config(
        tmp / "ds.json",
        "moe_z0.json",
        gradient_clipping=0.3,
        gradient_accumulation_steps=2,
        train_micro_batch_size_per_gpu=4,
        optimizer=SGD,
        zero_allow_untested_optimizer=True,
    )
    return pretrain(
        tmp / "out",
        1,
        ds,
        *TINY_MODEL,
        f"--data.path={example_data}",
        f"--train.max_steps={STEPS}",
        "--train.log_every=1",
        "--train.save_every=0",
    )


SGD = {"type": "SGD", "params": {"lr": 0.5}}


@pytest.mark.parametrize("stage", [0, 2])
def test_gradient_clipping_uses_the_global_norm_under_expert_parallelism(
    tmp_path, example_data, sgd_clipped_reference, stage
):
    """With SGD (unlike Adam, not invariant to a uniform gradient scale) and a clip that is always
    active, ep_size=2 matches one process only if the clipping norm covers every rank's experts
    exactly once (DeepSpeed's own ZeRO-0 clipping averages per-rank norms instead: issue #8469)."""
    ds = write_ds_config(
        tmp_path / "ds.json",
        f"moe_z{stage}.json",
        gradient_clipping=0.3,
        train_micro_batch_size_per_gpu=4,
        optimizer=SGD,
        zero_allow_untested_optimizer=True,
    )
    run = pretrain(
        tmp_path / "out",
        2,
        ds,
        *TINY_MODEL,
        "--model.moe.ep_size=2",
        f"--data.path={example_data}",
        f"--train.max_steps={STEPS}",
        "--train.log_every=1",
        "--train.save_every=0",
    )
    assert all(r["grad_norm"] > 0.3 for r in run.metrics())  # the clip is active at every step
    _assert_same_losses(run, sgd_clipped_reference)


def test_top1_expert_parallel_matches_single_process(tmp_path, example_data):
    common = [
        *TINY_MODEL,
        "--model.moe.top_k=1",
        f"--data.path={example_data}",
        f"--train.max_steps={STEPS}",
        "--train.log_every=1",
        "--train.save_every=0",
    ]
    ds1 = write_ds_config(
        tmp_path / "ds1.json",
        gradient_clipping=0.0,
        gradient_accumulation_steps=2,
        train_micro_batch_size_per_gpu=4,
    )
    ds2 = write_ds_config(tmp_path / "ds2.json", gradient_clipping=0.0, train_micro_batch_size_per_gpu=4)
    ref = pretrain(tmp_path / "one", 1, ds1, *common)
    run = pretrain(tmp_path / "two", 2, ds2, *common, "--model.moe.ep_size=2")
    _assert_same_losses(run, ref)


def test_autoep_layer_computes_our_block(tmp_path):
    """Same weights, same batch: AutoEP's replacement (ep_size=2) gives our logits, router losses,
    expert counts and router gradient on every rank."""
    out = tmp_path / "eq.jsonl"
    run_cmd(deepspeed_cmd(2, "tests/scripts/autoep_equivalence.py", str(out)), tmp_path, timeout=300)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for r in rows:
        assert r["replaced"] == "AutoEPMoELayer" and r["local_experts"] == 2
        # Expert parameters sit in their own MoE optimizer groups (reduced over the expert-data-parallel
        # group), and nowhere else.
        moe_groups = [g for g in r["param_groups"] if g["moe"]]
        assert moe_groups and all(g["experts"] == g["params"] for g in moe_groups)
        assert sum(g["experts"] for g in moe_groups) == 2 * 3  # 2 MoE layers x (w1, w2, w3)
        assert all(g["experts"] == 0 for g in r["param_groups"] if not g["moe"])
        assert r["logits_diff"] < 1e-5 and r["counts_equal"] and r["gate_grad_diff"] < 1e-6
        for got, ref in r["losses"]:
            assert got == pytest.approx(ref, rel=1e-6)


def _read_steps(path: Path) -> list[int]:
    try:
        return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_resume_after_kill_is_bit_identical(tmp_path, example_data):
    """Train, kill -9 mid-run, resume from the latest complete checkpoint: the losses after the
    resume point equal an uninterrupted run's exactly. A half-written newer tag is ignored."""
    steps = 150
    ds = write_ds_config(tmp_path / "ds.json", gradient_clipping=1.0, train_micro_batch_size_per_gpu=4)
    args = [
        *TINY_MODEL,
        f"--data.path={example_data}",
        f"--train.max_steps={steps}",
        "--train.log_every=1",
        "--train.save_every=10",
        "--train.keep_checkpoints=0",
        "--model.moe.ep_size=2",
    ]
    full = pretrain(tmp_path / "full", 2, ds, *args)

    out = tmp_path / "killed"
    kill_when(
        deepspeed_cmd(2, "launcher/pretrain.py", "--ds_config", str(ds), "--output_dir", str(out), *args),
        lambda: (
            (out / "checkpoints" / "latest").is_file()
            and max(_read_steps(out / "metrics.jsonl"), default=0) >= 15
        ),
    )
    killed_at = max(_read_steps(out / "metrics.jsonl"))
    assert killed_at < steps, "the run finished before it could be killed; the test proves nothing"

    partial = out / "checkpoints" / "step_00009990"  # a save interrupted mid-write
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    (out / "checkpoints" / "latest").write_text("step_00009990")

    resumed = pretrain(out, 2, ds, *args, "--resume")
    resumed_from = int(resumed.output.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert 10 <= resumed_from <= killed_at and resumed_from % 10 == 0
    assert "step_00009990" not in resumed.output.split("resumed from ")[1].split("\n")[0]
    full_losses = full.losses()
    after = [r for r in resumed.metrics() if r["step"] > killed_at]
    assert after and after[-1]["step"] == steps
    resumed_losses = {}
    for r in resumed.metrics():  # the resumed session's records come last in the appended file
        resumed_losses[r["step"]] = r["loss"]
    for step in range(resumed_from + 1, steps + 1):
        assert resumed_losses[step] == full_losses[step], step


KNOWLEDGE_KEYS = ("entity_loss", "triple_loss")


@pytest.mark.parametrize("mode", ["fusion", "fusion-rowwise", "inject"])
def test_knowledge_modes_under_expert_parallelism_match_single_process(tmp_path, example_data, mode):
    """Entity fusion (tables, corrupted alignments, sampled entity softmax, TransE negatives), the same
    with the entity table on row-wise Adagrad (rows gathered over the ranks), and K-BERT injection:
    2 processes with ep=2 at ZeRO-2 equal 1 process with gradient accumulation 2."""
    rowwise = mode == "fusion-rowwise"
    mode = mode.removesuffix("-rowwise")
    common = [
        *TINY_MODEL,
        *(["--model.knowledge.entity_optimizer=rowwise_adagrad"] if rowwise else []),
        f"--model.knowledge.mode={mode}",
        "--model.knowledge.entity_dim=16",
        f"--data.path={example_data}",
        f"--train.max_steps={STEPS}",
        "--train.log_every=1",
        "--train.save_every=0",
    ]
    ref_ds = write_ds_config(
        tmp_path / "ref.json",
        "moe_z2.json",
        gradient_clipping=1.0,
        gradient_accumulation_steps=2,
        train_micro_batch_size_per_gpu=4,
    )
    ds = write_ds_config(
        tmp_path / "ds.json", "moe_z2.json", gradient_clipping=1.0, train_micro_batch_size_per_gpu=4
    )
    ref = pretrain(tmp_path / "ref", 1, ref_ds, *common)
    # row-wise: the 2-process run also saves at step 2, continued below on 1 process (an elastic resume)
    run = pretrain(
        tmp_path / "ep2",
        2,
        ds,
        *common,
        "--model.moe.ep_size=2",
        *(["--train.save_every=2"] if rowwise else []),
    )
    _assert_same_losses(run, ref)
    if mode == "fusion":
        for a, b in zip(run.metrics(), ref.metrics()):
            for key in KNOWLEDGE_KEYS:
                assert a[key] > 0 and a[key] == pytest.approx(b[key], rel=1e-5), (key, a[key], b[key])
    else:  # injection only changes the inputs: the loss is the LM loss (plus router terms)
        assert all("entity_loss" not in r for r in run.metrics())
    # The final checkpoints read back as full weights (experts by global id), whatever the ep_size:
    # what fine-tuning and evaluation start from.
    one, _ = load_weights(tmp_path / "ref")
    two, meta = load_weights(tmp_path / "ep2")
    assert meta["ep_size"] == 2 and one.keys() == two.keys()
    assert one["layers.0.mlp.experts.w1"].shape[0] == 4
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4, msg=key)
    if rowwise:  # the table was trained on that path, in both runs
        assert (one["knowledge.entity_sq"] > 0).sum() > 10
        # elastic: the table and its accumulators (outside DeepSpeed's optimizer, so not in its universal
        # form) come back from the 2-process step-2 checkpoint on 1 process, which ends where ref ends
        link = tmp_path / "link"
        shutil.copytree(
            tmp_path / "ep2" / "checkpoints" / "step_00000002", link / "checkpoints" / "step_00000002"
        )
        (link / "checkpoints" / "latest").write_text("step_00000002")
        resumed = pretrain(link, 1, ref_ds, *common, "--resume")
        assert "elastic resume: world 2 -> 1" in resumed.output
        again, _ = load_weights(link)
        for key in one:
            torch.testing.assert_close(again[key], one[key], atol=1e-5, rtol=1e-4, msg=key)
