"""Precision: fp16 with DeepSpeed's dynamic loss scaling (the shipped config, overflow steps skipped and
counted, a real launch on the CPU accelerator), the refusals before deepspeed.initialize, and what stays
fp32 in a 16-bit model (router logits, rotary tables)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import deepspeed_cmd, run_cmd

from sparsexpert.config import ConfigError
from sparsexpert.distributed.parallel import (
    AcceleratorInfo,
    accelerator_info,
    check_config,
    check_precision,
    check_precision_supported,
    own_gradient_clipping,
    precision_of,
    prepare_ds_config,
    routers_in_fp32,
)
from sparsexpert.model import ModelConfig, MoEConfig, build_model
from sparsexpert.model.moe import RouterLinear, RouterLogitsRecorder
from sparsexpert.model.transformer import rope_tables

REPO = Path(__file__).resolve().parents[1]
FP16_JSON = REPO / "ds_configs" / "moe_z2_fp16.json"


def model(**moe) -> ModelConfig:
    return ModelConfig(d_model=64, n_heads=4, d_ff=128, moe=MoEConfig(**{"num_experts": 4, **moe}))


def test_shipped_fp16_config_uses_dynamic_loss_scaling_and_passes_the_checks():
    ds = json.loads(FP16_JSON.read_text())
    fp16 = ds["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # 0 = dynamic
    assert {"initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"} <= fp16.keys()
    assert ds["zero_optimization"]["stage"] == 2 and precision_of(ds) == "fp16"
    for world in (1, 2):
        prepare_ds_config(ds, model(), world, max_steps=10, tokenizer_vocab=256)
    check_config(model(backend="native"), ds, 2, None)


V100 = AcceleratorInfo("cuda", "Tesla V100-SXM2-32GB", bf16=False, fp16=True, capability=(7, 0))
T4 = AcceleratorInfo("cuda", "Tesla T4", bf16=False, fp16=True, capability=(7, 5))
P100 = AcceleratorInfo("cuda", "Tesla P100-PCIE-16GB", bf16=False, fp16=False, capability=(6, 0))
A100 = AcceleratorInfo("cuda", "NVIDIA A100-SXM4-80GB", bf16=True, fp16=True, capability=(8, 0))
OLD_CPU = AcceleratorInfo("cpu", "Intel(R) Xeon(R) Gold 6148", bf16=True, fp16=False)
BF16 = {"bf16": {"enabled": True}}
FP16 = {"fp16": {"enabled": True, "loss_scale": 0}}


@pytest.mark.parametrize(
    "ds,acc,match",
    [
        (
            BF16,
            V100,
            r"ds_config.bf16.enabled=True: Tesla V100-SXM2-32GB \(compute capability 7.0\) has no bf16 .*"
            r"use ds_configs/moe_z2_fp16.json .* or fp32",
        ),
        (BF16, T4, r"ds_config.bf16.enabled=True: Tesla T4 \(compute capability 7.5\) has no bf16"),
        (
            FP16,
            P100,
            r"ds_config.fp16.enabled=True: Tesla P100-PCIE-16GB \(compute capability 6.0\) lacks fp16 .*"
            r"use fp32 \(ds_configs/moe_z2.json\)",
        ),
        (
            FP16,
            OLD_CPU,
            r"ds_config.fp16.enabled=True: Intel\(R\) Xeon\(R\) Gold 6148 lacks fp16 \(DeepSpeed's CPU "
            r"accelerator .*AVX512-FP16.*\); use bf16 \(ds_configs/moe_z2_bf16.json\) or fp32",
        ),
    ],
)
def test_precision_the_accelerator_lacks_is_refused(ds, acc, match):
    with pytest.raises(ConfigError, match=match):
        check_precision(ds, acc)


@pytest.mark.parametrize(
    "ds,acc",
    [(FP16, V100), (FP16, T4), (BF16, A100), (FP16, A100), (BF16, OLD_CPU), ({}, P100), ({}, OLD_CPU)],
)
def test_precision_the_accelerator_has_passes(ds, acc):
    check_precision(ds, acc)


def test_this_machines_accelerator():
    acc = accelerator_info(torch.device("cpu"))
    assert acc.name == "cpu" and acc.bf16 and acc.capability is None
    assert acc.fp16 == torch.ops.mkldnn._is_mkldnn_fp16_supported()  # what DeepSpeed's CPU accelerator asks
    check_precision_supported(BF16, torch.device("cpu"))


def test_fp16_at_zero0_is_refused_only_with_experts():
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, "zero_optimization": {"stage": 0}}
    check_config(ModelConfig(d_model=64, moe=MoEConfig(num_experts=0)), {**ds, **FP16}, 2, None)
    with pytest.raises(ConfigError, match="ds_config.fp16.enabled=True: fp16 with MoE layers needs ZeRO 1-3"):
        check_config(model(), {**ds, **FP16, "expert_parallel": {"enabled": True}}, 2, None)


def test_own_gradient_clipping_leaves_fp16_and_bf16_to_deepspeed():
    z0 = {"gradient_clipping": 0.5, "zero_optimization": {"stage": 0}}
    assert own_gradient_clipping(z0) == 0.5
    assert own_gradient_clipping({**z0, **FP16}) is None  # the gradients still carry the loss scale
    assert own_gradient_clipping({**z0, **BF16}) is None


def test_router_logits_are_fp32_in_a_half_model():
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16)
    fp32 = build_model(cfg, seed=0)
    half = build_model(cfg, seed=0).half()
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        half.hidden_states(x)
        logits = half._router_recorder.logits
        assert [t.dtype for t in logits] == [torch.float32, torch.float32]
        gate = half.layers[0].mlp.gate
        assert gate.weight.dtype == torch.float16
        x_TD = torch.randn(5, 32).half()
        expected = x_TD.float() @ gate.weight.float().t()  # products of the 16-bit values, summed in fp32
        torch.testing.assert_close(gate(x_TD), expected, rtol=1e-6, atol=1e-6)
        out = half(x, x)
    assert out.aux_loss.dtype == out.z_loss.dtype == torch.float32 and torch.isfinite(out.loss)
    ref = fp32(x, x)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-2)
    # In fp32 RouterLinear is nn.Linear.
    lin = nn.Linear(32, 4, bias=False)
    router = RouterLinear(32, 4, bias=False)
    router.weight = lin.weight
    x_TD = torch.randn(7, 32)
    assert torch.equal(router(x_TD), lin(x_TD))


class _AutoEPLike(nn.Module):
    """The shape of AutoEP's replacement: its router's gate is a plain Linear at `router.gate`."""

    def __init__(self):
        super().__init__()
        self.router = nn.Module()
        self.router.gate = nn.Linear(32, 4, bias=False)


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_AutoEPLike(), _AutoEPLike()])

    def moe_blocks(self):
        return list(self.blocks)


def test_routers_in_fp32_changes_autoeps_gate_in_place():
    holder = _Holder().half()
    gate = holder.blocks[0].router.gate
    weight = gate.weight
    recorder = RouterLogitsRecorder()
    recorder.attach(holder.moe_blocks())
    assert gate(torch.randn(3, 32).half()).dtype == torch.float16
    recorder.reset()
    assert routers_in_fp32(holder) == 2 and routers_in_fp32(holder) == 0
    assert holder.blocks[0].router.gate is gate and isinstance(gate, RouterLinear) and gate.weight is weight
    assert list(gate.state_dict()) == ["weight"]
    assert gate(torch.randn(3, 32).half()).dtype == torch.float32
    assert [t.dtype for t in recorder.logits] == [torch.float32]  # the recorder's hook is still there


def test_rope_tables_stay_fp32_in_a_16_bit_model():
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=64)
    cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
    x = torch.randint(0, 97, (2, 64))
    model = build_model(cfg, seed=0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x).logits
        for cast, dtype in ((nn.Module.half, torch.float16), (nn.Module.bfloat16, torch.bfloat16)):
            model = cast(model)
            assert model.tok_embeddings.weight.dtype == dtype
            assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32
            assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
        # Back in fp32 with the fp32 weights: the same logits as before the round trip (16-bit rotary
        # tables would have changed them; they are not in the state dict).
        model = model.to(torch.float32)
        model.load_state_dict(weights)
        assert torch.equal(model(x).logits, ref)
    # DeepSpeed casts buffers only with data_types.buffer_dtype set, and keeps these out of it even then.
    from deepspeed.runtime.keep_in_fp32 import buffers_to_keep_in_fp32, keep_in_fp32_pattern

    kept = buffers_to_keep_in_fp32(model, keep_in_fp32_pattern(model, "auto", torch.float16))
    assert len(kept) == 2 and kept[0] is model.rope_cos and kept[1] is model.rope_sin


def test_fp16_trains_on_the_cpu_accelerator_and_skips_overflow_steps(tmp_path):
    """2 ranks, ep_size=2, ZeRO-2, AutoEP, fp16 from a loss scale of 2^40 (hysteresis 1): the first steps
    overflow; DeepSpeed skips them on both ranks (weights untouched) and halves the scale each time,
    precision_state counts them; then training proceeds. The fp16 engine's routers compute in fp32."""
    if not torch.ops.mkldnn._is_mkldnn_fp16_supported():  # this CPU has no fp16 kernels: refused up front
        with pytest.raises(ConfigError, match="ds_config.fp16.enabled=True: .* lacks fp16"):
            check_precision_supported(FP16, torch.device("cpu"))
        return
    out = tmp_path / "fp16.jsonl"
    run_cmd(deepspeed_cmd(2, "tests/scripts/fp16_overflow.py", str(out)), tmp_path, timeout=300)
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert r["param_dtype"] == "torch.float16" and r["rope_dtype"] == "torch.float32"
        assert r["gate_classes"] == ["RouterLinear", "RouterLinear"] and r["recorder_hooks_the_gates"]
        assert r["recorded_logits_dtypes"] == ["torch.float32", "torch.float32"]
    steps = rows[0]["steps"]
    for key in ("changed", "loss_scale", "skipped_steps"):  # every rank skips the same steps
        assert [s[key] for s in steps] == [s[key] for s in rows[1]["steps"]], key
    assert not steps[0]["changed"] and steps[0]["loss_scale"] == 2.0**39 and steps[0]["skipped_steps"] == 1
    scale, skipped = 2.0**40, 0
    for s in steps:
        if not s["changed"]:  # overflow: step skipped, scale halved
            scale, skipped = scale / 2, skipped + 1
        assert (s["loss_scale"], s["skipped_steps"]) == (scale, skipped), s
    trained = [s["loss"] for s in steps if s["changed"]]
    assert skipped >= 2 and len(trained) >= 5
    assert len({s["loss"] for s in steps[:skipped]}) == 1  # nothing moved while the steps were skipped
    assert trained[-1] < trained[0] - 0.5


def test_router_fp32_can_be_switched_off():
    """model.moe.router_fp32=false keeps the routers in the model's dtype (softmax and top-k still fp32)."""
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=16)
    cfg.moe.num_experts, cfg.moe.router_fp32 = 4, False
    model = build_model(cfg, seed=0).half()
    gate = model.layers[0].mlp.gate
    assert type(gate) is nn.Linear and gate(torch.randn(3, 32).half()).dtype == torch.float16
    cfg.moe.router_fp32 = "yes"
    with pytest.raises(ConfigError, match="model.moe.router_fp32"):
        cfg.validate()
