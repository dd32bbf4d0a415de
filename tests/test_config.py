"""Config loading and the pre-initialize checks: each bad combination raises our message."""

import json
from pathlib import Path

import pytest

from sparsexpert.cli import apply_overrides
from sparsexpert.config import ConfigError, from_dict
from sparsexpert.distributed.parallel import batch_triplet, check_config, prepare_ds_config, resolve_ep_size
from sparsexpert.model import ModelConfig, MoEConfig
from sparsexpert.train.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


def ds(**kw):
    base = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "expert_parallel": {"enabled": True},
    }
    base.update(kw)
    return base


def model(**moe) -> ModelConfig:
    return ModelConfig(d_model=64, n_heads=4, d_ff=128, moe=MoEConfig(**{"num_experts": 4, **moe}))


def test_overrides_and_unknown_fields():
    cfg = apply_overrides(
        RunConfig(), ["--model.moe.num_experts=16", "--train.max_steps=7", "--data.path=/x"]
    )
    assert cfg.model.moe.num_experts == 16 and cfg.train.max_steps == 7 and cfg.data.path == "/x"
    with pytest.raises(ConfigError, match="model.moe.num_expert.*did you mean --model.moe.num_experts"):
        apply_overrides(RunConfig(), ["--model.moe.num_expert=3"])
    with pytest.raises(
        ConfigError, match="train.max_steps.*expected an integer|train.max_steps.*expected int"
    ):
        apply_overrides(RunConfig(), ["--train.max_steps=abc"])
    with pytest.raises(ConfigError, match="model.d_modle.*did you mean 'd_model'"):
        from_dict(RunConfig, {"model": {"d_modle": 3}})
    cfg = from_dict(RunConfig, {"model": {"moe": {"aux_loss_coef": 1}}})
    assert cfg.model.moe.aux_loss_coef == 1.0 and isinstance(cfg.model.moe.aux_loss_coef, float)


@pytest.mark.parametrize(
    "dsc,world,match",
    [
        (ds(train_batch_size=10), 2, "train_batch_size=10: must equal .* 4 x 1 x 2 = 8"),
        (
            ds(train_micro_batch_size_per_gpu=None, train_batch_size=9, gradient_accumulation_steps=2),
            2,
            "train_batch_size=9: must be divisible by gradient_accumulation_steps x data-parallel size = 2 x 2",
        ),
        (
            ds(train_micro_batch_size_per_gpu=0),
            1,
            "train_micro_batch_size_per_gpu=0: must be a positive integer",
        ),
    ],
)
def test_batch_triplet_errors(dsc, world, match):
    dsc = {k: v for k, v in dsc.items() if v is not None}
    with pytest.raises(ConfigError, match=match):
        batch_triplet(dsc, world)


def test_batch_triplet_derivations():
    t = batch_triplet({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4)
    assert (t.micro, t.grad_accum, t.dp, t.global_batch) == (4, 2, 4, 32)
    t = batch_triplet({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 2}, 4)
    assert t.grad_accum == 4


@pytest.mark.parametrize(
    "mcfg,dsc,world,vocab,match",
    [
        (model(ep_size=2), ds(), 3, None, r"model.moe.ep_size=2: must divide the world size 3"),
        (
            model(num_experts=6, ep_size=4),
            ds(),
            4,
            None,
            r"model.moe.ep_size=4: must divide model.moe.num_experts=6",
        ),
        (
            model(ep_size=1),
            ds(expert_parallel={"enabled": True, "autoep_size": 2}),
            2,
            None,
            r"model.moe.ep_size=1: differs from ds_config.expert_parallel.autoep_size=2",
        ),
        (model(d_expert=100), ds(), 1, None, r"model.moe.d_expert=100: .*multiples of 8.*use_grouped_mm"),
        (ModelConfig(d_model=36, n_heads=2, d_ff=128), ds(), 1, None, r"model.d_model=36: .*multiples of 8"),
        (
            ModelConfig(vocab_size=100, d_model=64, n_heads=4),
            ds(),
            1,
            512,
            r"model.vocab_size=100: is smaller than the tokenizer's vocabulary \(512\)",
        ),
        (
            model(),
            {k: v for k, v in ds().items() if k != "gradient_clipping"},
            1,
            None,
            r"ds_config.gradient_clipping=None: set it explicitly",
        ),
        (
            model(),
            ds(expert_parallel={"enabled": False}),
            1,
            None,
            r"ds_config.expert_parallel.enabled=False",
        ),
        (
            model(),
            ds(expert_parallel={"enabled": True, "top_k": 1}),
            1,
            None,
            r"ds_config.expert_parallel.top_k=1: is derived from the model config",
        ),
        (model(), ds(zero_optimization={"stage": 4}), 1, None, r"zero_optimization.stage=4: must be one of"),
        (model(top_k=5), ds(), 1, None, r"model.moe.top_k=5: must be between 1 and model.moe.num_experts=4"),
        (ModelConfig(d_model=64, n_heads=5), ds(), 1, None, r"model.n_heads=5: must divide model.d_model=64"),
        (
            model(),
            ds(fp16={"enabled": True}, zero_optimization={"stage": 0}),
            1,
            None,
            r"ds_config.fp16.enabled=True: fp16 with MoE layers needs ZeRO 1-3",
        ),
        (
            model(),
            ds(fp16={"enabled": True}, bf16={"enabled": True}),
            1,
            None,
            r"ds_config.fp16.enabled=True: ds_config.bf16.enabled is true as well",
        ),
    ],
)
def test_check_config_rejects(mcfg, dsc, world, vocab, match):
    with pytest.raises(ConfigError, match=match):
        check_config(mcfg, dsc, world, vocab)


def test_grouped_mm_off_allows_odd_sizes():
    check_config(model(d_expert=100), ds(expert_parallel={"enabled": True, "use_grouped_mm": False}), 1, None)


def test_sequence_longer_than_model():
    with pytest.raises(
        ConfigError, match="model.max_seq_len=256: is shorter than the dataset's sequence length 512"
    ):
        check_config(model(), ds(), 1, None, seq_len=512)


def test_prepare_fills_autoep_section_and_schedule():
    m = model(num_shared_experts=1)
    cfg = json.loads((REPO / "ds_configs" / "moe_z2.json").read_text())
    out = prepare_ds_config(cfg, m, world_size=2, max_steps=50, tokenizer_vocab=300)
    ep = out["expert_parallel"]
    assert ep["autoep_size"] == 2 and ep["top_k"] == 2 and ep["expert_w3"] == "w3"
    assert ep["has_shared_experts"] and ep["shared_experts_pattern"] == "shared_experts"
    assert out["scheduler"]["params"]["total_num_steps"] == 50
    assert out["train_batch_size"] == cfg["train_micro_batch_size_per_gpu"] * 2
    assert m.vocab_size == 300
    assert "total_num_steps" not in cfg["scheduler"]["params"]  # the file's dict is not modified
    cfg["scheduler"]["params"]["total_num_steps"] = 10
    with pytest.raises(ConfigError, match="total_num_steps=10: differs from train.max_steps=50"):
        prepare_ds_config(cfg, model(), 2, 50)


def test_auto_ep_size():
    assert resolve_ep_size(model(), 2) == 2
    assert resolve_ep_size(model(num_experts=6), 4) == 2
    assert resolve_ep_size(model(ep_size=1), 2) == 1
    assert resolve_ep_size(ModelConfig(moe=MoEConfig(num_experts=0)), 8) == 1


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_ds_config_is_valid_json_and_passes_checks(path):
    cfg = json.loads(path.read_text())
    for world in (1, 2):
        prepare_ds_config(cfg, model(), world, max_steps=10, tokenizer_vocab=256)


def test_activation_checkpointing_is_a_checked_bool():
    cfg = apply_overrides(RunConfig(), ["--model.activation_checkpointing=true"])
    assert cfg.model.activation_checkpointing is True
    with pytest.raises(ConfigError, match="model.activation_checkpointing='yes': expected true or false"):
        from_dict(RunConfig, {"model": {"activation_checkpointing": "yes"}})
    with pytest.raises(ConfigError, match="model.activation_checkpointing=1: expected true or false"):
        ModelConfig(activation_checkpointing=1).validate()
    check_config(ModelConfig(d_model=64, activation_checkpointing=True), ds(), 1, None)


def test_deepspeed_sections_are_those_deepspeed_reads():
    """DeepSpeed ignores keys it does not know, so a misspelled section trains without it
    ("zero_optimisation": ZeRO-0). check_sections refuses anything outside DEEPSPEED_SECTIONS; that list
    must hold every key DeepSpeedConfig reads (recorded here through a dict that notes each key asked for)."""
    import os

    from deepspeed.runtime.config import DeepSpeedConfig

    from sparsexpert.distributed.parallel import DEEPSPEED_SECTIONS, check_sections

    class Recording(dict):
        seen: set = set()

        def get(self, key, default=None):
            self.seen.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            self.seen.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            self.seen.add(key)
            return super().__contains__(key)

    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    os.environ.update(RANK="0", WORLD_SIZE="1")
    try:
        DeepSpeedConfig(Recording(json.loads((REPO / "ds_configs" / "moe_z2.json").read_text())))
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert len(Recording.seen) > 40 and Recording.seen <= DEEPSPEED_SECTIONS, (
        Recording.seen - DEEPSPEED_SECTIONS
    )
    for bad, match in (
        (
            {"zero_optimisation": {"stage": 2}},
            r"ds_config.zero_optimisation=.*did you mean 'zero_optimization'",
        ),
        ({"zero_optimization": {"stgae": 2}}, r"ds_config.zero_optimization.stgae=2: .*did you mean 'stage'"),
        ({"bf16": {"enable": True}}, r"ds_config.bf16.enable=True: .*did you mean 'enabled'"),
        ({"optimizer": {"type": "AdamW", "param": {}}}, r'ds_config.optimizer.param=.*"type" and "params"'),
    ):
        with pytest.raises(ConfigError, match=match):
            check_sections(bad)
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        check_sections(json.loads(path.read_text()))
