"""Text generation for a quick look at a model: greedy, or sampling with temperature and top-k.

No key-value cache: each new token runs the whole (cropped) context again, which is plenty for
the models one inspects by eye. The context is cropped to the model's max_seq_len.
"""

from __future__ import annotations

import torch

from sparsexpert.export import load_init
from sparsexpert.model.transformer import Transformer


def load_model(path: str) -> tuple[Transformer, object | None]:
    """Our model in eval mode and its tokenizer, from a checkpoint, consolidated or Hugging Face folder."""
    from data_prep.tokenizer import load_tokenizer

    init = load_init(path)
    cfg, state, tok_path = init.cfg, init.state, init.tokenizer
    if not cfg.causal:
        raise ValueError(f"{path}: a bidirectional (masked LM) model does not generate text left to right")
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval(), (load_tokenizer(tok_path) if tok_path is not None else None)


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
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits_V = model(ids[:, -model.cfg.max_seq_len :]).logits[0, -1].float()
        if temperature <= 0:
            nxt = int(logits_V.argmax())
        else:
            logits_V = logits_V / temperature
            if top_k:
                kth = torch.topk(logits_V, min(top_k, logits_V.numel())).values[-1]
                logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits_V, -1), 1, generator=gen))
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        if nxt == eos_id:
            break
    return new
