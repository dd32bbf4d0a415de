"""Generation: the key-value cache gives the tokens the recompute gives, one prompt or a batch of
prompts of different lengths; the cached model's logits equal the full forward's; a fine-tuning
checkpoint generates with its language model."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import finetune_briefly, run_cmd

from sparsexpert.distributed import device as _device
from sparsexpert.generate import generate, generate_batch, load_model
from sparsexpert.model import ModelConfig, build_model


def _model(guard: bool = True, **moe) -> torch.nn.Module:
    """A small random MoE (or dense) LM; guarded: every input must have gone through to_device, as
    generation's must (the suite runs in device check mode)."""
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=3, n_heads=4, d_ff=96, max_seq_len=48)
    cfg.moe.num_experts, cfg.moe.top_k = moe.get("num_experts", 4), moe.get("top_k", 2)
    model = build_model(cfg, seed=5).eval()
    return _device.guard(model, "test model") if guard else model


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 97, (n,), generator=g).tolist() for n in (1, 7, 12, 4)]


def test_cached_logits_equal_the_full_forward():
    """Prefill 10 positions, then 3 one at a time and 4 at once: every position's logits equal
    those of one forward over the whole sequence."""
    model = _model(guard=False)
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        parts = [model(ids[:, :10], cache=cache).logits]
        parts += [model(ids[:, t : t + 1], cache=cache).logits for t in (10, 11, 12)]
        parts.append(model(ids[:, 13:], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=48"):
        model(ids[:, :1].expand(2, 32), cache=cache)  # 17 cached + 32 > 48


@pytest.mark.parametrize("moe", [{}, {"num_experts": 0}], ids=["moe", "dense"])
def test_cache_gives_the_recompute_tokens(moe):
    model = _model(**moe)
    for prompt in _prompts():
        cached = generate(model, prompt, 20, eos_id=None)
        assert cached == generate(model, prompt, 20, eos_id=None, use_cache=False)
        assert len(cached) == 20
    # sampled: the same draws from the same generator
    prompt = _prompts()[2]
    assert generate(model, prompt, 12, temperature=0.9, top_k=10, seed=3) == generate(
        model, prompt, 12, temperature=0.9, top_k=10, seed=3, use_cache=False
    )


def test_a_batch_of_prompts_gives_each_prompt_alone():
    """Left padding is masked and every row counts its rotary positions from its own first token;
    a row stops at end-of-sequence while the others go on."""
    model = _model()
    prompts = _prompts()
    alone = [generate(model, p, 15) for p in prompts]
    assert generate_batch(model, prompts, 15) == alone
    eos = alone[1][3]  # a token row 1 produces: that row ends there
    rows = generate_batch(model, prompts, 15, eos_id=eos)
    assert rows == [generate(model, p, 15, eos_id=eos) for p in prompts]
    assert rows[1][-1] == eos and len(rows[1]) <= 4


def test_past_the_window_generation_recomputes_the_last_max_seq_len_tokens():
    model = _model()
    prompt = _prompts()[2]  # 12 tokens + 40 new > max_seq_len 48
    assert generate(model, prompt, 40) == generate(model, prompt, 40, use_cache=False)


def test_a_fine_tuning_checkpoint_generates_with_its_language_model(tmp_path, tiny_pretrained, example_data):
    """`launcher/generate.py --model <fine-tuning run>/best`: the task heads are named and left out."""
    import json

    rows = [{"text": "Ulven is the capital of Renkamiia.", "label": "capital"}] * 4
    rows += [{"text": "Renyan lies in Renkamiia.", "label": "located"}] * 4
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ft = tmp_path / "ft"
    finetune_briefly(ft, tiny_pretrained, "classification", data, data)
    said = []
    model, tok = load_model(str(ft / "best"), "cpu", log=said.append)
    assert tok is not None and "without its task heads (classification)" in said[0]
    out = run_cmd(
        [sys.executable, "launcher/generate.py", "--model", str(ft / "best"), "--prompt", "Ulven is"], ft
    )
    assert "Ulven is" in out.output
