"""Monitoring (sparsexpert/metrics.py): what a real pretraining and fine-tuning run write to TensorBoard,
read back with TensorBoard's own EventAccumulator, and each figure's formula checked by hand."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, deepspeed_cmd, pretrain, run_cmd, write_ds_config

from sparsexpert import metrics
from sparsexpert.config import ConfigError, from_dict, report_destinations
from sparsexpert.harness import DeviceSums, MicroOut
from sparsexpert.model import ModelConfig, MoEConfig, build_model
from sparsexpert.model.moe import router_stats
from sparsexpert.train.config import TrainConfig

LAYERS, EXPERTS = 2, 4  # TINY_MODEL's MoE layers and experts


def events(tensorboard_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def decoded(image_event) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)).convert("RGB"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, example_data) -> tuple[Path, str]:
    """4 steps, a log line each, the heatmap every 2 intervals."""
    out = tmp_path_factory.mktemp("monitoring") / "run"
    run = pretrain(
        out,
        1,
        "ds_configs/moe_z2.json",
        *TINY_MODEL,
        f"--data.path={example_data}",
        "--train.max_steps=4",
        "--train.log_every=1",
        "--train.heatmap_every=2",
        "--train.eval_every=0",
        "--train.save_every=0",
    )
    return out, run.output


def test_pretraining_logs_memory_throughput_and_per_layer_moe_figures(pretrained):
    out, output = pretrained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    acc = events(out / "tensorboard")
    scalars = set(acc.Tags()["scalars"])
    layers = [f"layer{i}" for i in range(LAYERS)]
    per_layer = (
        "aux_loss_per_layer",
        "z_loss_per_layer",
        "expert_load_max",
        "expert_load_min",
        "router_entropy",
    )
    for tag in ["max_rss_gb", "tflops", "tokens_per_s", *(f"{k}/{n}" for k in per_layer for n in layers)]:
        assert tag in scalars, tag
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4], tag
    assert "mfu" not in scalars  # no peak FLOP/s is known for a CPU
    # the per-expert load is the heatmap and metrics.jsonl, not one scalar tag per expert
    assert not [t for t in scalars if t.startswith("expert_load/")], sorted(scalars)

    config = json.loads((out / "config.json").read_text())
    cfg = from_dict(ModelConfig, config["run"]["model"])
    fpt = metrics.flops_per_token(cfg, build_model(cfg, 0).num_params()["active"], 32)
    assert f"monitoring: {fpt / 1e6:.3g} MFLOP per token" in output
    for r in records:
        assert 0.1 < r["max_rss_gb"] < 64
        assert r["tflops"] == pytest.approx(r["tokens_per_s"] * fpt / 1 / 1e12, rel=1e-9)
        # the per-layer router losses average to the losses the run trains on (summed over layers / L)
        assert sum(r["aux_loss_per_layer"].values()) / LAYERS == pytest.approx(r["aux_loss"], rel=1e-6)
        assert sum(r["z_loss_per_layer"].values()) / LAYERS == pytest.approx(r["z_loss"], rel=1e-6)
        for n in layers:
            load = np.array(r["expert_load"][n])
            assert load.sum() == pytest.approx(1.0)
            assert r["expert_load_max"][n] == pytest.approx(load.max() * EXPERTS)
            assert r["expert_load_min"][n] == pytest.approx(load.min() * EXPERTS)
            assert 0 < r["router_entropy"][n] <= math.log(EXPERTS) + 1e-6
    last = records[-1]
    assert acc.Scalars("aux_loss_per_layer/layer1")[-1].value == pytest.approx(
        last["aux_loss_per_layer"]["layer1"]
    )
    assert "rss " in output and " TFLOP/s | " in output and "tok/s | eta" in output

    # the heatmap: intervals 1 and 3 (every 2) and the last, layers x experts cells of 8 pixels, the
    # colours those of the load metrics.jsonl holds for the same step
    assert acc.Tags()["images"] == ["expert_load_heatmap"]
    images = acc.Images("expert_load_heatmap")
    assert [i.step for i in images] == [1, 3, 4]
    by_step = {r["step"]: r for r in records}
    for image in images:
        assert (image.height, image.width) == (LAYERS * metrics.HEATMAP_CELL, EXPERTS * metrics.HEATMAP_CELL)
        load = np.array([by_step[image.step]["expert_load"][n] for n in layers]) * EXPERTS
        np.testing.assert_array_equal(decoded(image), metrics.heatmap_rgb(load))


def test_evaluation_figures_reach_the_runs_tensorboard(pretrained):
    """launcher/evaluate.py writes eval.json and the same figures as `eval/...` scalars at the checkpoint's
    step, with a progress line for its batches."""
    out, _ = pretrained
    run = run_cmd(deepspeed_cmd(1, "launcher/evaluate.py", "--run", str(out)), out)
    res = json.loads((out / "eval.json").read_text())
    assert "evaluate: perplexity " in run.output and "batches | done in" in run.output
    acc = events(out / "tensorboard")
    for tag, value in (("eval/perplexity", res["perplexity"]), ("eval/valid_lm_loss", res["valid_lm_loss"])):
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == [(4, pytest.approx(value))]


def test_fine_tuning_logs_the_moe_figures_and_dev_metrics(tmp_path, example_data):
    """From scratch on a small classification set (the example dataset's tokenizer)."""
    rows = ["text,label"] + [
        f"{'the river city' if i % 2 else 'a mountain village'} number {i},{'water' if i % 2 else 'rock'}"
        for i in range(32)
    ]
    data = tmp_path / "cls.csv"
    data.write_text("\n".join(rows) + "\n")
    ds = write_ds_config(tmp_path / "ds.json", "moe_z2.json", train_micro_batch_size_per_gpu=8)
    out = tmp_path / "ft"
    args = ["--ds_config", str(ds), "--output_dir", str(out), "--tokenizer", str(example_data)]
    args += ["--task", "classification", "--train", str(data), "--dev", str(data), *TINY_MODEL]
    args += ["--train.max_steps=2", "--train.log_every=1", "--train.eval_every=2"]
    run_cmd(deepspeed_cmd(1, "launcher/finetune.py", *args), out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert sum(r["aux_loss_per_layer"].values()) / LAYERS == pytest.approx(r["aux_loss"], rel=1e-6)
        assert sum(r["z_loss_per_layer"].values()) / LAYERS == pytest.approx(r["z_loss"], rel=1e-6)
    acc = events(out / "tensorboard")
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "z_loss",
        "max_rss_gb",
        "tflops",
        "aux_loss_per_layer/layer1",
        "z_loss_per_layer/layer0",
        "expert_load_max/layer0",
        "expert_load_min/layer1",
        "router_entropy/layer1",
        "dev_metric",
        "dev/classification/accuracy",
    ):
        assert tag in scalars, tag
    assert [i.step for i in acc.Images("expert_load_heatmap")] == [1, 2]


def test_per_layer_router_figures_by_hand():
    """Two layers of 2 tokens x 2 experts, top-1: aux = E * sum_e f_e P_e, z = mean logsumexp^2,
    entropy = mean -sum p log p; the losses the model trains on are their means over the layers."""
    a = torch.tensor([[2.0, 0.0], [1.0, 0.0]])  # both tokens choose expert 0
    b = torch.tensor([[0.0, 3.0], [1.0, 0.0]])  # one token each
    stats = router_stats([a, b], top_k=1)
    expected = []
    for logits, share in ((a, [1.0, 0.0]), (b, [0.5, 0.5])):
        p = [[math.exp(x) / sum(math.exp(y) for y in row) for x in row] for row in logits.tolist()]
        mean_p = [(p[0][e] + p[1][e]) / 2 for e in range(2)]
        aux = 2 * sum(f * q for f, q in zip(share, mean_p))
        z = sum(math.log(sum(math.exp(x) for x in row)) ** 2 for row in logits.tolist()) / 2
        entropy = sum(-sum(q * math.log(q) for q in row) for row in p) / 2
        expected.append([aux, z, entropy])
    torch.testing.assert_close(stats.per_layer, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert not stats.per_layer.requires_grad
    assert stats.aux_loss.item() == pytest.approx((expected[0][0] + expected[1][0]) / 2, rel=1e-6)
    assert stats.z_loss.item() == pytest.approx((expected[0][1] + expected[1][1]) / 2, rel=1e-6)


def test_device_sums_average_the_per_layer_figures():
    """`MicroOut.means`: averaged over the micro-batches that report them, like the scalars, whatever the shape."""
    sums = DeviceSums(torch.device("cpu"))
    per_layer = torch.tensor([[1.0, 2.0, 0.5], [3.0, 4.0, 1.5]])
    sums.add(
        MicroOut(torch.tensor(0.0), {"aux_loss": torch.tensor(2.0)}, None, 4, {"router_layers": per_layer})
    )
    sums.add(
        MicroOut(
            torch.tensor(0.0), {"aux_loss": torch.tensor(4.0)}, None, 4, {"router_layers": 3 * per_layer}
        )
    )
    r = sums.reduce()
    assert r["aux_loss"] == 3.0 and r["tokens"] == 8
    assert r["router_layers"].tolist() == (2 * per_layer).tolist()
    assert sums.reduce() == {"tokens": 0.0}


def test_flops_per_token_and_mfu_by_hand(monkeypatch):
    """A model of vocabulary 100, D=8, 2 layers of 4 experts (F=16) top-2, at 16 tokens a row."""
    cfg = ModelConfig(
        vocab_size=100,
        d_model=8,
        n_layers=2,
        n_heads=2,
        d_ff=16,
        max_seq_len=16,
        moe=MoEConfig(num_experts=4, top_k=2),
    )
    # per layer: wq wk wv wo 4 x 64, two norms 2 x 8, router 8 x 4, two of the four experts 2 x 3 x 16 x 8
    per_layer = 4 * 64 + 2 * 8 + 32 + 2 * 3 * 16 * 8
    active = 100 * 8 + 2 * per_layer + 8 + 100 * 8  # embedding, layers, final norm, LM head
    assert build_model(cfg, 0).num_params()["active"] == active == 3752
    attention = 12 * 2 * 16 * 8  # 12 x layers x seq x D
    assert metrics.flops_per_token(cfg, active, 16) == 6 * (active - 800) + attention == 20784
    assert metrics.flops_per_token(cfg, active, 16, lm_head=False) == 6 * (active - 1600) + attention
    tied = ModelConfig(**{**cfg.__dict__, "tie_embeddings": True})
    assert metrics.flops_per_token(tied, active - 800, 16) == 6 * (active - 800) + attention
    # 1,000 tokens/s over 2 devices of 1 GFLOP/s peak
    assert metrics.mfu(1000.0, 20784.0, 2, 1e9) == pytest.approx(1000 * 20784 / 2 / 1e9)

    assert metrics.peak_flops(torch.device("cpu"), "bf16") == (None, "CPU")
    for name, precision, peak in (
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 80GB HBM3", "fp32", 67e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H200", "fp16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A10", "bf16", 125e12),
        ("NVIDIA RTX A1000", "bf16", None),
        ("NVIDIA L40S", "bf16", 362e12),
        ("NVIDIA L4", "bf16", 121e12),
        ("Tesla T4", "fp16", 65e12),
        ("Tesla V100-SXM2-32GB", "fp32", 15.7e12),
        ("NVIDIA GeForce GTX 1080", "fp32", None),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, n=name: n)
        assert metrics.peak_flops(torch.device("cuda", 0), precision) == (peak, name), name


def test_memory_on_the_cpu_is_the_peak_rss():
    rss = metrics.memory(torch.device("cpu"))["max_rss_gb"]
    status = Path("/proc/self/status").read_text()
    hwm_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    assert rss == pytest.approx(hwm_kib / 2**20, rel=0.05)


def test_heatmap_colours():
    img = metrics.heatmap_rgb(np.array([[1.0, 4.0, 0.25, np.nan], [2.0, 0.0, 8.0, 0.5]]), cell=2)
    assert img.shape == (4, 8, 3) and img.dtype == np.uint8
    cells = img[::2, ::2]
    assert cells[0].tolist() == [[255, 255, 255], [255, 0, 0], [0, 0, 255], [128, 128, 128]]
    # half-way on the log scale: 2x is half red, 1/2x half blue; 0 and 8x saturate
    assert cells[1].tolist() == [[255, 128, 128], [0, 0, 255], [255, 0, 0], [128, 128, 255]]
    assert (img[0:2, 0:2] == 255).all()  # a cell is cell x cell pixels


def test_progress_lines(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    lines: list[str] = []
    p = metrics.Progress("tokenize", 5000, "docs", every=5.0, log=lines.append)
    clock[0] = 103.0
    p.update(1000)  # within 5 s of the start: nothing
    clock[0] = 115.0
    p.update(250)
    clock[0] = 116.0
    p.update(10)  # within 5 s of the last line
    assert lines == ["tokenize 1,250/5,000 docs | 25% | 83/s | eta 45s"]  # 15 s / 1,250 x 3,750 left
    clock[0] = 175.0
    p.close()
    assert lines[-1] == "tokenize 1,260/5,000 docs | done in 1m15s"

    lines.clear()
    q = metrics.Progress("join", unit="docs", every=1.0, log=lines.append)
    clock[0] += 2.0
    q.update(820)
    assert lines == ["join 820 docs | 410/s | 2s"]
    metrics.Progress("quiet", 3, enabled=False, log=lines.append).close()
    assert len(lines) == 1


def test_progress_polls_work_it_cannot_count(tmp_path):
    lines: list[str] = []
    p = metrics.Progress("convert", 3, "files", every=0.05, log=lines.append)
    with p.polling(lambda: len(list(tmp_path.iterdir()))):
        for i in range(3):
            (tmp_path / str(i)).touch()
            time.sleep(0.12)
    assert p.done == 3
    assert any(line.startswith("convert ") and "/3 files | " in line for line in lines), lines


def test_results_reach_tensorboard(tmp_path):
    res = {
        "step": 7,
        "perplexity": 12.5,
        "knowledge_probe": {"unstated": {"text": {"mrr": 0.25}}},
        "run": "x",
    }
    metrics.log_results(tmp_path / "tensorboard", "eval", res, 7)
    acc = events(tmp_path / "tensorboard")
    assert set(acc.Tags()["scalars"]) == {
        "eval/step",
        "eval/perplexity",
        "eval/knowledge_probe/unstated/text/mrr",
    }
    assert [(e.step, e.value) for e in acc.Scalars("eval/knowledge_probe/unstated/text/mrr")] == [(7, 0.25)]


def test_report_to_is_checked_when_loaded(monkeypatch):
    assert TrainConfig().report_to == "tensorboard"
    TrainConfig().validate()
    assert report_destinations(" tensorboard,tensorboard") == ("tensorboard",)
    assert report_destinations("none") == ()
    with pytest.raises(
        ConfigError, match=r"train\.report_to='tensorbord': must name tensorboard and/or wandb"
    ):
        TrainConfig(report_to="tensorbord").validate()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"train\.report_to='tensorboard,wandb'.*pip install wandb"):
        TrainConfig(report_to="tensorboard,wandb").validate()
