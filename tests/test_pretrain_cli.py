"""The launcher as a user runs it: the README command, every shipped DeepSpeed config, bad input."""

import json
from pathlib import Path

import pytest
from conftest import REPO, TINY_MODEL, pretrain

from sparsexpert.weights import checkpoint


def test_readme_command_trains_the_builtin_example(tmp_path):
    """`deepspeed launcher/pretrain.py --ds_config ds_configs/moe_z2.json`, with fewer steps."""
    out = tmp_path / "run"
    run = pretrain(
        out,
        1,
        "ds_configs/moe_z2.json",
        "--train.max_steps=60",
        "--train.log_every=10",
        "--train.save_every=30",
        "--train.eval_every=30",
        timeout=400,
    )
    assert "preparing the built-in example knowledge world" in run.output
    assert "step 60/60 | loss" in run.output and "tok/s | eta" in run.output
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["documents_in"] == manifest["documents_written"] + sum(
        manifest["documents_rejected"].values()
    )
    assert manifest["documents_written"] > 2900

    records = run.metrics()
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    first, last = records[0], records[-1]
    assert last["lm_loss"] < first["lm_loss"] - 1.5, (first["lm_loss"], last["lm_loss"])
    for key in (
        "loss",
        "lm_loss",
        "aux_loss",
        "z_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "eta_s",
        "expert_load",
        "expert_load_max",
    ):
        assert key in last, key
    assert "valid_lm_loss" in records[2] and "valid_lm_loss" in last
    assert set(last["expert_load"]) == {"layer0", "layer1", "layer2", "layer3"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "lm_loss",
        "aux_loss",
        "z_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "expert_load_max/layer3",
        "expert_load_min/layer0",
        "aux_loss_per_layer/layer2",
        "router_entropy/layer1",
        "max_rss_gb",
        "tflops",
        "valid_lm_loss",
    ):
        assert tag in tags, tag
    assert not [t for t in tags if t.startswith("expert_load/")]  # the heatmap instead of a tag per expert
    # 8 experts x 4 MoE layers, at the first interval, every 10th and the last
    assert [(i.step, i.height, i.width) for i in events.Images("expert_load_heatmap")] == [
        (10, 32, 64),
        (60, 32, 64),
    ]
    assert [e.step for e in events.Scalars("lm_loss")] == [10, 20, 30, 40, 50, 60]
    assert events.Scalars("lm_loss")[-1].value == pytest.approx(last["lm_loss"])

    tag_dir = checkpoint.find_latest(out / "checkpoints")
    assert tag_dir.name == "step_00000060" and checkpoint.is_complete(tag_dir)
    meta = json.loads((tag_dir / "sparsexpert.json").read_text())
    assert meta["step"] == 60 and meta["data_position"] == {"global_batches_consumed": 60}
    assert (
        meta["run"]["model"]["moe"]["num_experts"] == 8
        and meta["ds_config"]["zero_optimization"]["stage"] == 2
    )
    assert (tag_dir / "tokenizer.model").read_bytes() == (out / "data" / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("ds_config", sorted(p.name for p in (REPO / "ds_configs").glob("*.json")))
def test_every_shipped_ds_config_trains(tmp_path, example_data, ds_config):
    """Each shipped config trains 3 steps; fp16 where this CPU has oneDNN's fp16 kernels (AVX512-FP16 or
    AMX-FP16; machines of the same kind differ), else it is refused before training with the fix named, as
    tests/test_precision.py checks of the precision check itself."""
    import torch

    fp16 = json.loads((REPO / "ds_configs" / ds_config).read_text()).get("fp16", {}).get("enabled", False)
    refused = fp16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported()
    run = pretrain(
        tmp_path / "out",
        1,
        f"ds_configs/{ds_config}",
        *TINY_MODEL,
        f"--data.path={example_data}",
        "--train.max_steps=3",
        "--train.log_every=1",
        "--train.save_every=0",
        timeout=400,
        check=not refused,
    )
    if refused:
        assert run.returncode != 0
        assert "ds_config.fp16.enabled=True:" in run.output and "lacks fp16" in run.output
        assert "use bf16 (ds_configs/moe_z2_bf16.json) or fp32" in run.output or "use fp32" in run.output
        return
    losses = run.losses("lm_loss")
    assert len(losses) == 3 and all(v == v and v < 10 for v in losses.values())
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["ds_config"]
    if "bf16" in ds_config:
        assert cfg["bf16"]["enabled"] and "bf16" in run.output
    assert checkpoint.find_latest(tmp_path / "out" / "checkpoints") is not None


def test_bad_config_fails_before_training_with_our_message(tmp_path, example_data):
    run = pretrain(
        tmp_path / "out",
        2,
        "ds_configs/moe_z2.json",
        *TINY_MODEL,
        "--model.moe.num_experts=3",
        "--model.moe.top_k=1",
        "--model.moe.ep_size=2",
        f"--data.path={example_data}",
        check=False,
    )
    assert run.returncode != 0
    assert "model.moe.ep_size=2: must divide model.moe.num_experts=3" in run.output
    run = pretrain(tmp_path / "out2", 1, "ds_configs/moe_z2.json", "--train.max_stepz=3", check=False)
    assert run.returncode != 0 and "did you mean --train.max_steps?" in run.output
    run = pretrain(
        tmp_path / "out3",
        1,
        "ds_configs/moe_z2.json",
        f"--data.path={Path(tmp_path) / 'nothing'}",
        check=False,
    )
    assert run.returncode != 0 and "nothing/manifest.json: no manifest" in run.output
