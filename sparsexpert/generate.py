"""Text generation for a quick look at a model: greedy, or sampling with temperature and top-k.

No key-value cache: each new token runs the whole (cropped) context again, which is plenty for
the models one inspects by eye. The context is cropped to the model's max_seq_len. The model runs on
the device it is given (`--device`; by default the accelerator when there is one), its inputs and the
sampling generator with it; each new token comes to the host once (to stop at end-of-sequence).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sparsexpert.distributed import device as _device
from sparsexpert.harness import load_state
from sparsexpert.model.transformer import Transformer
from sparsexpert.weights.export import load_init

if TYPE_CHECKING:
    from data_prep.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer


def load_model(
    path: str, device: str | torch.device | None = None
) -> tuple[Transformer, SentencePieceTokenizer | HuggingFaceTokenizer | None]:
    """Our model in eval mode on `device` (default: the accelerator when there is one) and its
    tokenizer, from a checkpoint, consolidated or Hugging Face folder."""
    from data_prep.tokenizer import load_tokenizer

    init = load_init(path)
    cfg, state, tok_path = init.cfg, init.state, init.tokenizer
    if not cfg.causal:
        raise ValueError(f"{path}: a bidirectional (masked LM) model does not generate text left to right")
    model = Transformer(cfg)
    load_state(model, state, str(path))
    model = _device.guard(model.to(_device.resolve(device)).eval(), "generation model")
    return model, (load_tokenizer(tok_path) if tok_path is not None else None)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    eos_id: int | None = None,
    seed: int = 0,
) -> list[int]:
    """New token ids after `prompt_ids` (stopping after eos_id). temperature 0 = greedy."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = _device.to_device(torch.tensor([prompt_ids], dtype=torch.long), device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits_V = model(_device.to_device(ids[:, -model.cfg.max_seq_len :], device)).logits[0, -1].float()
        if temperature <= 0:
            nxt_11 = logits_V.argmax().view(1, 1)
        else:
            logits_V = logits_V / temperature
            if top_k:
                kth = torch.topk(logits_V, min(top_k, logits_V.numel())).values[-1]
                logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
            nxt_11 = torch.multinomial(torch.softmax(logits_V, -1), 1, generator=gen).view(1, 1)
        ids = torch.cat([ids, nxt_11], dim=1)
        nxt = int(nxt_11.item())  # the one host synchronization per token: stop at end-of-sequence
        new.append(nxt)
        if nxt == eos_id:
            break
    return new
