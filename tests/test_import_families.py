"""Importing the dense and MoE checkpoints users start from today: grouped-query attention, Llama 3's
rope scaling, Mistral, Qwen2 (biases on q/k/v), Mixtral with GQA. Each family: a small random model
saved locally by transformers (no download) imports into our model with the logits transformers
computes, within 1e-5, and a dense one upcycled into experts computes the same function. What stays
unsupported is refused naming the field. Our GQA and rope-scaled models export to transformers exactly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

from sparsexpert.model import ModelConfig, build_model
from sparsexpert.model.config import MoEConfig
from sparsexpert.model.transformer import Transformer
from sparsexpert.weights.export import load_init, save_hf, upcycle

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 100.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # short, so that the tiny model's wavelengths fall in all three bands (kept, blended, stretched)
    "original_max_position_embeddings": 32,
}


def _save(kind: str, folder) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if kind == "llama3":
        cfg = transformers.LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**COMMON, sliding_window=None)
        model = transformers.MistralForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**{**COMMON, "tie_word_embeddings": True}, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # transformers starts biases at zero: make them count
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_(0, 0.5)
    else:
        cfg = transformers.MixtralConfig(
            **COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None
        )
        model = transformers.MixtralForCausalLM(cfg)
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama3", "mistral", "qwen2", "mixtral"])
def test_a_family_imports_with_transformers_logits(tmp_path, kind):
    hf = _save(kind, tmp_path)
    init = load_init(tmp_path)
    cfg = init.cfg
    assert cfg.n_heads == 8 and cfg.kv_heads == 2
    assert cfg.rope_scaling.type == ("llama3" if kind == "llama3" else "none")
    assert cfg.attention_bias == (kind == "qwen2")
    ours = Transformer(cfg)
    ours.load_state_dict(init.state)
    ours.eval()
    x = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits
        torch.testing.assert_close(ours(x).logits, want, atol=1e-5, rtol=1e-5)
        # and through the key-value cache, which keeps the 2 key-value heads
        cache = ours.new_cache()
        parts = [ours(x[:, :40], cache=cache).logits, ours(x[:, 40:], cache=cache).logits]
        assert cache[0].k.shape[1] == 2
        torch.testing.assert_close(torch.cat(parts, 1), want, atol=1e-5, rtol=1e-5)
    if cfg.moe.num_experts == 0:  # upcycled into 4 experts top-2: the same function
        target = dataclasses.replace(cfg, moe=MoEConfig(num_experts=4, top_k=2))
        moe = Transformer(target)
        moe.load_state_dict(upcycle(init.state, cfg, target, seed=0))
        with torch.no_grad():
            torch.testing.assert_close(moe.eval()(x).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, says",
    [
        ({"model_type": "qwen3"}, "q_norm, k_norm"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
            "rope scaling of type 'yarn'",
        ),
        ({"attention_bias": True}, "a bias on the attention output projection"),
        ({"sliding_window": 16}, "sliding-window attention"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide"),
    ],
)
def test_what_has_no_equivalent_is_refused_naming_it(tmp_path, change, says):
    _save("mistral", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=says):
        load_init(tmp_path)


def test_our_gqa_rope_scaled_moe_exports_exactly(tmp_path):
    cfg = ModelConfig(
        vocab_size=100, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=96, max_seq_len=48
    )
    cfg.rope_scaling.type, cfg.rope_scaling.original_max_seq_len = "llama3", 16
    cfg.moe.num_experts = 4
    model = build_model(cfg, seed=2).eval()
    save_hf(cfg, model.state_dict(), None, tmp_path, log=lambda *_: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.num_key_value_heads == 4
    x = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    again = load_init(tmp_path)  # and back
    assert again.cfg.n_kv_heads == 4 and again.cfg.rope_scaling == cfg.rope_scaling
