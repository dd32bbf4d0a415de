"""Text generation for a quick look at a model: greedy, or sampling with temperature and top-k, for
one prompt or a batch of them.

With the key-value cache (the default), the prompts run once and then each new token alone, attending to
the cached keys and values of every layer; it gives the tokens the recompute does (each new token runs the
whole context again: `use_cache=False`), which tests/test_generate.py checks, at a fraction of the time
(bench/generation.py). A batch of prompts of different lengths is padded on the left, with the padding
masked out and each row's rotary positions counted from its own first token. The context is the model's
max_seq_len at most: when the prompt and the new tokens do not fit in it, generation recomputes a window of
the last max_seq_len tokens for each new token (rotary positions are absolute, so a cache cannot slide).
The model runs on the device it is given (`--device`; by default the accelerator when there is one), its
inputs and the sampling generator with it; each new token comes to the host once (to stop at
end-of-sequence). A fine-tuning checkpoint generates with its language model; its task heads are named
and left out.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from sparsexpert.distributed import device as _device
from sparsexpert.harness import load_state
from sparsexpert.model.transformer import Transformer
from sparsexpert.weights.export import TASK_ONLY, load_init

if TYPE_CHECKING:
    from data_prep.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer


def load_model(
    path: str, device: str | torch.device | None = None, log=print
) -> tuple[Transformer, SentencePieceTokenizer | HuggingFaceTokenizer | None]:
    """Our model in eval mode on `device` (default: the accelerator when there is one) and its
    tokenizer, from a checkpoint (a pretraining or fine-tuning run, a tag, best/), a consolidated or a
    Hugging Face folder. A fine-tuning checkpoint's task heads are left out, and said so."""
    from data_prep.tokenizer import load_tokenizer

    init = load_init(path)
    cfg, state, tok_path = init.cfg, init.state, init.tokenizer
    if not cfg.causal:
        raise ValueError(f"{path}: a bidirectional (masked LM) model does not generate text left to right")
    heads = sorted({k.split(".")[1] for k in state if k.startswith("heads.")})
    if heads:
        log(
            f"generate: {path} is a fine-tuning checkpoint: generating with its language model, without its task heads ({', '.join(heads)})"
        )
    model = Transformer(cfg)
    load_state(model, state, str(path), skip=TASK_ONLY)
    model = _device.guard(model.to(_device.resolve(device)).eval(), "generation model")
    return model, (load_tokenizer(tok_path) if tok_path is not None else None)


def _next_tokens(
    logits_BV: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator
) -> torch.Tensor:
    """[B, 1]: the argmax (temperature 0), or a draw from the tempered distribution over the top_k."""
    if temperature <= 0:
        return logits_BV.argmax(-1, keepdim=True)
    logits_BV = logits_BV / temperature
    if top_k:
        kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    return torch.multinomial(torch.softmax(logits_BV, -1), 1, generator=gen)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    eos_id: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> list[int]:
    """New token ids after `prompt_ids` (stopping after eos_id). temperature 0 = greedy."""
    return generate_batch(model, [prompt_ids], max_new_tokens, temperature, top_k, eos_id, seed, use_cache)[0]


@torch.no_grad()
def generate_batch(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    eos_id: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> list[list[int]]:
    """New token ids after each prompt (each row stopping after eos_id). temperature 0 = greedy."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("a prompt is empty: give at least one token")
    longest = max(len(p) for p in prompts)
    if not use_cache or longest + max_new_tokens > model.cfg.max_seq_len:
        return [_recompute(model, p, max_new_tokens, temperature, top_k, eos_id, seed) for p in prompts]
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    B = len(prompts)
    # left padding: every row's last prompt token sits in the last column
    ids_BL = torch.zeros(B, longest, dtype=torch.long)
    real_BL = torch.zeros(B, longest, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids_BL[b, longest - len(p) :] = torch.tensor(p)
        real_BL[b, longest - len(p) :] = True
    ids_BL, real_BL = _device.to_device(ids_BL, device), _device.to_device(real_BL, device)
    pos_BL = (real_BL.long().cumsum(1) - 1).clamp(min=0)
    causal_LL = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
    # a padding position sees itself only (its output is never used; a row of no keys would be NaN)
    mask_BLL = (causal_LL & real_BL[:, None, :]) | torch.eye(longest, dtype=torch.bool, device=device)
    cache = model.new_cache()
    place = functools.partial(_device.to_device, device=device)  # every model input, as in training
    out = model(ids_BL, position_ids=place(pos_BL), attn_mask=place(mask_BLL), cache=cache)
    logits_BV = out.logits[:, -1].float()
    pos_B1 = pos_BL[:, -1:]
    new_BN = torch.empty(B, 0, dtype=torch.long, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt_B1 = _next_tokens(logits_BV, temperature, top_k, gen)
        new_BN = torch.cat([new_BN, nxt_B1], dim=1)
        if eos_id is not None:
            done_B |= nxt_B1[:, 0] == eos_id
            if bool(done_B.all()):  # the one host synchronization per token: stop at end-of-sequence
                break
        if step + 1 == max_new_tokens:
            break
        real_BL = torch.cat([real_BL, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        pos_B1 = pos_B1 + 1
        out = model(
            place(nxt_B1), position_ids=place(pos_B1), attn_mask=place(real_BL[:, None, :]), cache=cache
        )
        logits_BV = out.logits[:, -1].float()
    rows = new_BN.tolist()
    if eos_id is not None:  # each row up to and including its first end-of-sequence
        rows = [r[: r.index(eos_id) + 1] if eos_id in r else r for r in rows]
    return rows


def _recompute(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    eos_id: int | None,
    seed: int,
) -> list[int]:
    """Without a cache: each new token runs the last max_seq_len tokens of the context again."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = _device.to_device(torch.tensor([prompt_ids], dtype=torch.long), device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits_1V = model(_device.to_device(ids[:, -model.cfg.max_seq_len :], device)).logits[:, -1].float()
        nxt_11 = _next_tokens(logits_1V, temperature, top_k, gen)
        ids = torch.cat([ids, nxt_11], dim=1)
        nxt = int(nxt_11.item())  # the one host synchronization per token: stop at end-of-sequence
        new.append(nxt)
        if nxt == eos_id:
            break
    return new
