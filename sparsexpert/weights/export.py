"""Weights out of sparsexpert and into it: consolidated safetensors, Hugging Face folders.

- `consolidate`: a checkpoint of any world size and ep_size -> one `model.safetensors` in the plain
  model's layout (each MoE layer's experts stacked in global-id order: row e of
  `layers.L.mlp.experts.w1` is expert e), the model config and the tokenizer beside it.
- `export_hf`: -> a folder `transformers.AutoModelForCausalLM` loads without trust_remote_code:
  `MixtralForCausalLM` for an MoE model, `LlamaForCausalLM` for a dense one, with the tokenizer as
  `tokenizer.json` (SentencePiece converted) so `AutoTokenizer` loads it.
- `load_init`: model config + weights from any of: a sparsexpert checkpoint (tag, run folder), a
  consolidated folder, a Hugging Face Mixtral or Llama folder (a dense one can be upcycled into an MoE).

Folders from elsewhere are read as data only: safetensors and JSON here, a sparsexpert checkpoint
through `deepspeed_formats.load_weights` (every file checked against its COMPLETE.json, read with torch's
weights-only unpickler; see sparsexpert/weights/checkpoint.py).

Two layout differences are converted, not approximated. Rotary embeddings: ours rotate channel
pairs (2i, 2i+1) of a head, Hugging Face's rotate halves (i, i + d/2); the rows of wq and wk are
permuted per head, which leaves q.k unchanged. Experts: ours hold w1 (gate) and w3 (up) apart,
transformers 5 fuses them as `gate_up_proj` = [w1; w3] along the hidden dimension.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsexpert.config import ConfigError, from_dict
from sparsexpert.model.config import ModelConfig, MoEConfig
from sparsexpert.weights import checkpoint, deepspeed_formats

CONSOLIDATED_META = "sparsexpert_model.json"
WEIGHTS = "model.safetensors"


def model_config_of(meta: dict[str, Any]) -> ModelConfig:
    """The model config a checkpoint or consolidated folder was written with."""
    return from_dict(ModelConfig, meta["model"] if "model" in meta else meta["run"]["model"])


def _tokenizer_in(folder: Path) -> Path | None:
    """A checkpoint's or dataset's tokenizer (find_tokenizer), or a Hugging Face model folder itself."""
    from data_prep.tokenizer import find_tokenizer

    found = find_tokenizer(folder)
    if found is None and (folder / "tokenizer.json").is_file():
        return folder
    return found


# ---------------------------------------------------------------------------------------------
# Consolidated safetensors


def consolidate(path: str | Path, out_dir: str | Path) -> Path:
    """Full fp32 weights of a checkpoint (any world size, any ep_size, ZeRO 0-2) in one file."""
    from safetensors.torch import save_file

    tag = checkpoint.resolve_tag(path)
    state, meta = deepspeed_formats.load_weights(tag)
    cfg = model_config_of(meta)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
    tok = _tokenizer_in(tag)
    if tok is not None:
        (shutil.copytree if tok.is_dir() else shutil.copyfile)(tok, out / tok.name)
    info = {
        "format": "sparsexpert-consolidated/1",
        "model": asdict(cfg),
        "source": str(tag),
        "step": meta.get("step"),
        "source_world_size": meta.get("world_size"),
        "source_ep_size": meta.get("ep_size"),
        "experts": "stacked by global expert id: row e of layers.L.mlp.experts.* is expert e",
        "tokenizer": tok.name if tok is not None else None,
    }
    (out / CONSOLIDATED_META).write_text(json.dumps(info, indent=2))
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face export


def _rope_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk (or entries of their biases) from interleaved pairs (2i, 2i+1) to halves
    (i, i + d/2), per head."""
    out_dim = w.shape[0]
    rows = w.reshape(out_dim, -1)
    moved = rows.view(n_heads, out_dim // n_heads // 2, 2, -1).transpose(1, 2).reshape(rows.shape)
    return moved.reshape(w.shape)


def _rope_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim = w.shape[0]
    rows = w.reshape(out_dim, -1)
    moved = rows.view(n_heads, 2, out_dim // n_heads // 2, -1).transpose(1, 2).reshape(rows.shape)
    return moved.reshape(w.shape)


def hf_equivalent(cfg: ModelConfig) -> str:
    """The transformers architecture computing the same function as `cfg`, or a ConfigError."""
    m = cfg.moe
    if not cfg.causal:
        raise ConfigError(
            "model.causal", False, "a bidirectional (masked LM) model has no causal-LM equivalent to export"
        )
    if cfg.attention_bias:
        raise ConfigError(
            "model.attention_bias",
            True,
            "Mixtral and Llama have no biases on the query, key and value projections alone (Qwen2's layout)",
        )
    if m.num_experts == 0:
        return "LlamaForCausalLM"
    if m.moe_every != 1:
        raise ConfigError(
            "model.moe.moe_every",
            m.moe_every,
            "Mixtral has an MoE block in every layer; export needs moe_every=1 (no dense layers between)",
        )
    if m.num_shared_experts:
        raise ConfigError(
            "model.moe.num_shared_experts",
            m.num_shared_experts,
            "Mixtral has no shared experts; export needs num_shared_experts=0",
        )
    if m.backend == "native":
        if m.use_residual:
            raise ConfigError(
                "model.moe.use_residual",
                True,
                "Mixtral has no Residual-MoE dense MLP; export needs use_residual=false",
            )
        if m.num_experts_per_layer and set(m.num_experts_per_layer) != {m.num_experts}:
            raise ConfigError(
                "model.moe.num_experts_per_layer",
                m.num_experts_per_layer,
                "Mixtral has one expert count for every layer; a pyramid (PR-MoE) model has no equivalent",
            )
        if m.top_k == 1:
            raise ConfigError(
                "model.moe.top_k",
                1,
                "the native top-1 gate scales the expert by its router probability, Mixtral's by 1.0; "
                "only native models with top_k >= 2 export",
            )
    return "MixtralForCausalLM"


def hf_config(cfg: ModelConfig, tok: Any | None) -> Any:
    """The transformers config of `cfg` (Mixtral or Llama)."""
    from transformers import LlamaConfig, MixtralConfig

    common: dict[str, Any] = dict(  # keyword arguments of mixed types, shared by both configs
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=_hf_rope(cfg),
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        attention_dropout=0.0,
        bos_token_id=tok.bos_id if tok is not None and tok.bos_id is not None and tok.bos_id >= 0 else None,
        eos_token_id=tok.eos_id if tok is not None else None,
        pad_token_id=tok.pad_id if tok is not None else None,
    )
    if hf_equivalent(cfg) == "LlamaForCausalLM":
        return LlamaConfig(intermediate_size=cfg.d_ff, attention_bias=False, mlp_bias=False, **common)
    return MixtralConfig(
        intermediate_size=cfg.d_expert_resolved,
        num_local_experts=cfg.moe.num_experts,
        num_experts_per_tok=cfg.moe.top_k,
        router_aux_loss_coef=cfg.moe.aux_loss_coef,
        router_jitter_noise=0.0,
        sliding_window=None,
        **common,
    )


def _hf_rope(cfg: ModelConfig) -> dict[str, Any]:
    r = cfg.rope_scaling
    if r.type == "none":
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "rope_type": "llama3",
        "rope_theta": cfg.rope_theta,
        "factor": r.factor,
        "low_freq_factor": r.low_freq_factor,
        "high_freq_factor": r.high_freq_factor,
        "original_max_position_embeddings": r.original_max_seq_len,
    }


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names and layouts -> transformers' Mixtral/Llama ones."""
    H, KV = cfg.n_heads, cfg.kv_heads
    out = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(cfg.n_layers):
        s, d = f"layers.{i}.", f"model.layers.{i}."
        out[d + "input_layernorm.weight"] = state[s + "attn_norm.weight"]
        out[d + "post_attention_layernorm.weight"] = state[s + "ffn_norm.weight"]
        out[d + "self_attn.q_proj.weight"] = _rope_to_hf(state[s + "attn.wq.weight"], H)
        out[d + "self_attn.k_proj.weight"] = _rope_to_hf(state[s + "attn.wk.weight"], KV)
        out[d + "self_attn.v_proj.weight"] = state[s + "attn.wv.weight"]
        out[d + "self_attn.o_proj.weight"] = state[s + "attn.wo.weight"]
        if cfg.is_moe_layer(i):
            out[d + "mlp.gate.weight"] = state[s + "mlp.gate.weight"]
            w1, w3 = state[s + "mlp.experts.w1"], state[s + "mlp.experts.w3"]  # [E, F, D]
            out[d + "mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)  # [E, 2F, D]
            out[d + "mlp.experts.down_proj"] = state[s + "mlp.experts.w2"]  # [E, D, F]
        else:
            out[d + "mlp.gate_proj.weight"] = state[s + "mlp.w1.weight"]
            out[d + "mlp.up_proj.weight"] = state[s + "mlp.w3.weight"]
            out[d + "mlp.down_proj.weight"] = state[s + "mlp.w2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def export_tokenizer(tokenizer_path: Path, out_dir: Path) -> None:
    """Write `tokenizer.json` + `tokenizer_config.json` that AutoTokenizer loads. A SentencePiece
    model is converted (BPE or unigram, its special and user-defined pieces kept at their ids);
    encodings equal SentencePiece's except that a text starting with a space gets one "▁" less
    (the Llama convention of the Metaspace pre-tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE, Model, Unigram
    from transformers import PreTrainedTokenizerFast

    if tokenizer_path.is_dir():  # already a Hugging Face tokenizer folder
        for f in tokenizer_path.iterdir():
            if f.is_file():
                shutil.copyfile(f, out_dir / f.name)
        return
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer_path.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces:
        raise ValueError(
            f"{tokenizer_path}: SentencePiece normalization {norm.name!r} (remove_extra_whitespaces="
            f"{norm.remove_extra_whitespaces}) has no exact tokenizer.json equivalent here; train the "
            "tokenizer with data_prep (identity normalization) or give a Hugging Face tokenizer folder"
        )
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if spec.model_type == 2:  # BPE: merges from the vocabulary, ordered by piece score
        from transformers.convert_slow_tokenizer import SentencePieceExtractor

        # transformers annotates extract() as returning a (vocab, merges) tuple; it returns a dict
        kw: dict[str, Any] = SentencePieceExtractor(str(tokenizer_path)).extract(None)  # type: ignore[assignment]
        model: Model = BPE(
            kw["vocab"],
            kw["merges"],
            unk_token=spec.unk_piece,
            fuse_unk=True,
            byte_fallback=spec.byte_fallback,
        )
    elif spec.model_type == 1:
        model = Unigram(pieces, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    else:
        raise ValueError(
            f"{tokenizer_path}: SentencePiece model type {spec.model_type} is not BPE or unigram"
        )
    tok = Tokenizer(model)
    prepend = "first" if norm.add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))
    # control pieces (<s>, </s>, <pad>) are special; user-defined ones (<mask>) are plain added tokens
    tok.add_tokens(
        [AddedToken(p.piece, normalized=False, special=p.type == 3) for p in proto.pieces if p.type in (3, 4)]
    )
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    special = {
        "bos_token": sp.bos_id(),
        "eos_token": sp.eos_id(),
        "unk_token": sp.unk_id(),
        "pad_token": sp.pad_id(),
    }
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, **{k: sp.id_to_piece(i) for k, i in special.items() if i >= 0}
    )
    fast.save_pretrained(str(out_dir))


def export_hf(path: str | Path, out_dir: str | Path, log=print) -> Path:
    """A checkpoint (or consolidated folder) -> a Hugging Face model folder with its tokenizer. A
    fine-tuning checkpoint's language model goes to out_dir as before, and each task whose head
    transformers computes the same way to out_dir/<task> (`save_task_hf`); the others are named with
    the reason."""
    init = load_init(path)
    tasks = list(init.meta.get("tasks") or []) if init.meta.get("kind") == "finetune" else []
    state = {k: v for k, v in init.state.items() if not k.startswith(TASK_ONLY)}
    if tasks:
        log(
            f"export: {path} is a fine-tuning checkpoint: its language model -> {out_dir}; its task heads "
            f"({', '.join(t['name'] for t in tasks)}) as task models beside it, where transformers has one"
        )
    out = save_hf(init.cfg, state, init.tokenizer, out_dir, log)
    written = 0
    for task in tasks:
        try:
            save_task_hf(
                init.cfg,
                init.state,
                init.tokenizer,
                task,
                init.meta.get("run", {}),
                Path(out_dir) / task["name"],
                log,
            )
            written += 1
        except ConfigError as e:
            log(f"export: task {task['name']!r} ({task['kind']}) is not exported: {e}")
    if tasks and not written:
        log("export: no task model written: transformers has no head that computes any of these tasks' heads")
    return out


TASK_ONLY = ("heads.", "task_embeddings.")
"""Parameters a fine-tuning checkpoint holds beyond the language model: the task heads, and task-aware
routing's task embedding."""


def save_task_hf(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    tok_path: Path | None,
    task: dict[str, Any],
    run: dict[str, Any],
    out_dir: Path,
    log=print,
) -> Path:
    """One fine-tuned task as a transformers model AutoModelForTokenClassification loads without
    trust_remote_code: Mixtral/LlamaForTokenClassification computes our NER head exactly (the last
    hidden state, then a linear layer with bias, causal attention), with id2label/label2id and a
    tokenizer that starts every text with the token fine-tuning put first. Refused (ConfigError, with
    the reason) where transformers computes something else: sequence classification (ours averages the
    hidden states over the text, transformers' *ForSequenceClassification reads the last token),
    relation classification (the entity markers' states), a bidirectional fine-tune (transformers'
    Mixtral and Llama attend causally), task-aware routing (its task embedding has no place there)."""
    import transformers

    from data_prep.tokenizer import load_tokenizer, text_start_id

    name, kind, labels = task["name"], task["kind"], list(task["labels"])
    if kind == "classification":
        raise ConfigError(
            "task.kind",
            kind,
            "our head averages the hidden states over the text; transformers' *ForSequenceClassification "
            "reads the last token's, so no transformers class computes it",
        )
    if kind == "relation":
        raise ConfigError(
            "task.kind",
            kind,
            "our head reads the states at the [E1] and [E2] markers; transformers has no such head",
        )
    if run.get("bidirectional"):
        raise ConfigError(
            "bidirectional",
            True,
            "fine-tuned with bidirectional attention; transformers' Mixtral and Llama attend causally",
        )
    if run.get("task_aware_routing"):
        raise ConfigError(
            "task_aware_routing",
            True,
            "its task embedding is added to the inputs; transformers has no place for it",
        )
    arch = hf_equivalent(cfg).replace("ForCausalLM", "ForTokenClassification")
    tok = load_tokenizer(tok_path) if tok_path is not None else None
    hf_cfg = hf_config(cfg, tok)
    hf_cfg.num_labels = len(labels)
    hf_cfg.id2label = dict(enumerate(labels))
    hf_cfg.label2id = {lab: i for i, lab in enumerate(labels)}
    with torch.device("meta"):
        model = getattr(transformers, arch)(hf_cfg)
    lm = {k: v for k, v in state.items() if not k.startswith((*TASK_ONLY, "knowledge."))}
    hf_state = {k: v for k, v in to_hf_state(lm, cfg).items() if k != "lm_head.weight"}
    hf_state["score.weight"] = state[f"heads.{name}.weight"]
    hf_state["score.bias"] = state[f"heads.{name}.bias"]
    missing, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"export to {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    if tok_path is not None and tok is not None:
        export_tokenizer(Path(tok_path), out_dir)
        _prepend_token(out_dir, text_start_id(tok))  # as fine-tuning did before every text
    log(f"export: task {name!r} as {arch} ({len(labels)} labels) -> {out_dir}")
    return out_dir


def _prepend_token(folder: Path, token_id: int) -> None:
    """tokenizer.json's post-processor puts `token_id` before every text (add_special_tokens=True)."""
    from tokenizers import Tokenizer, processors

    path = folder / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    piece = tok.id_to_token(token_id)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{piece} $A", pair=f"{piece} $A $B", special_tokens=[(piece, token_id)]
    )
    tok.save(str(path))


def save_hf(
    cfg: ModelConfig, state: dict[str, torch.Tensor], tok_path: Path | None, out_dir: str | Path, log=print
) -> Path:
    """Our config and weights -> a Hugging Face model folder (Mixtral or Llama layout)."""
    import transformers

    from data_prep.tokenizer import load_tokenizer

    arch = hf_equivalent(cfg)
    dropped = [k for k in state if k.startswith("knowledge.")]
    if dropped:
        # Without entity inputs the model is the plain LM (the fusion adds nothing at other tokens).
        log(
            f"export: model.knowledge.mode={cfg.knowledge.mode}: the text LM is exported; "
            f"{len(dropped)} knowledge tensors (entity/relation tables) have no Hugging Face equivalent "
            "and are left out"
        )
    state = {k: v for k, v in state.items() if not k.startswith("knowledge.")}
    tok = load_tokenizer(tok_path) if tok_path is not None else None
    hf_cfg = hf_config(cfg, tok)
    with torch.device("meta"):
        model = getattr(transformers, arch)(hf_cfg)
    missing, unexpected = model.load_state_dict(to_hf_state(state, cfg), strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"export to {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_embeddings:
        model.tie_weights()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    if tok_path is not None:
        export_tokenizer(Path(tok_path), out)
    log(f"export: {arch} ({sum(v.numel() for v in state.values()) / 1e6:.2f}M parameters) -> {out}")
    return out


# ---------------------------------------------------------------------------------------------
# Import


def _hf_model_config(hf: dict[str, Any], where: Path) -> ModelConfig:
    """Our config for a Hugging Face Mixtral or Llama config; anything we cannot match is refused."""
    kind = hf.get("model_type")
    if kind not in ("mixtral", "llama", "mistral", "qwen2"):
        raise ValueError(
            f"{where}/config.json: model_type {kind!r}; sparsexpert imports mixtral (MoE) and llama, "
            "mistral, qwen2 (dense)"
            + (
                "; qwen3's per-head RMSNorm of queries and keys (q_norm, k_norm) has no equivalent here"
                if kind == "qwen3"
                else ""
            )
        )

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{where}/config.json: {what}; sparsexpert's model has no equivalent")

    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    need(heads % kv_heads == 0, f"num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}")
    # Llama's attention_bias puts a bias on the output projection too; Qwen2's is on q, k, v only
    need(kind == "qwen2" or not hf.get("attention_bias"), "a bias on the attention output projection")
    need(not hf.get("mlp_bias"), "biases in the MLP")
    need(hf.get("hidden_act", "silu") == "silu", f"activation {hf.get('hidden_act')}")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    need(head_dim * heads == hf["hidden_size"], "head_dim * heads != hidden_size")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    need(rope_type in ("default", "llama3"), f"rope scaling of type {rope_type!r} (llama3 is supported)")
    scaling: dict[str, Any] = {"type": "none"}
    if rope_type == "llama3":
        scaling = {
            "type": "llama3",
            "factor": float(rope["factor"]),
            "low_freq_factor": float(rope["low_freq_factor"]),
            "high_freq_factor": float(rope["high_freq_factor"]),
            "original_max_seq_len": int(rope["original_max_position_embeddings"]),
        }
    windowed = hf.get("use_sliding_window", kind != "qwen2") and hf.get("sliding_window")
    need(not windowed or hf["sliding_window"] >= hf["max_position_embeddings"], "sliding-window attention")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    moe = {"num_experts": 0}
    if kind == "mixtral":
        moe = {"num_experts": hf["num_local_experts"], "top_k": hf["num_experts_per_tok"], "moe_every": 1}
    return from_dict(
        ModelConfig,
        {
            "vocab_size": hf["vocab_size"],
            "d_model": hf["hidden_size"],
            "n_layers": hf["num_hidden_layers"],
            "n_heads": heads,
            "n_kv_heads": kv_heads if kv_heads != heads else 0,
            "attention_bias": kind == "qwen2",
            "rope_scaling": scaling,
            "d_ff": hf["intermediate_size"],
            "max_seq_len": hf["max_position_embeddings"],
            "rope_theta": float(theta),
            "norm_eps": hf["rms_norm_eps"],
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "moe": moe,
        },
    )


def from_hf_state(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' Mixtral/Llama names and layouts -> ours (the inverse of to_hf_state). Also reads
    the per-expert layout older Mixtral files use (block_sparse_moe.experts.e.w1/w2/w3)."""
    H, KV = cfg.n_heads, cfg.kv_heads
    g = hf_state.__getitem__
    out = {"tok_embeddings.weight": g("model.embed_tokens.weight"), "norm.weight": g("model.norm.weight")}
    out["output.weight"] = g("model.embed_tokens.weight") if cfg.tie_embeddings else g("lm_head.weight")
    for i in range(cfg.n_layers):
        s, d = f"layers.{i}.", f"model.layers.{i}."
        out[s + "attn_norm.weight"] = g(d + "input_layernorm.weight")
        out[s + "ffn_norm.weight"] = g(d + "post_attention_layernorm.weight")
        out[s + "attn.wq.weight"] = _rope_from_hf(g(d + "self_attn.q_proj.weight"), H)
        out[s + "attn.wk.weight"] = _rope_from_hf(g(d + "self_attn.k_proj.weight"), KV)
        out[s + "attn.wv.weight"] = g(d + "self_attn.v_proj.weight")
        if cfg.attention_bias:  # Qwen2
            out[s + "attn.wq.bias"] = _rope_from_hf(g(d + "self_attn.q_proj.bias"), H)
            out[s + "attn.wk.bias"] = _rope_from_hf(g(d + "self_attn.k_proj.bias"), KV)
            out[s + "attn.wv.bias"] = g(d + "self_attn.v_proj.bias")
        out[s + "attn.wo.weight"] = g(d + "self_attn.o_proj.weight")
        if cfg.is_moe_layer(i):
            if d + "mlp.experts.gate_up_proj" in hf_state:
                w1, w3 = g(d + "mlp.experts.gate_up_proj").chunk(2, dim=1)
                w2 = g(d + "mlp.experts.down_proj")
                gate = g(d + "mlp.gate.weight")
            else:
                p, E = d + "block_sparse_moe.", cfg.moe.num_experts
                w1, w2, w3 = (
                    torch.stack([g(f"{p}experts.{e}.{w}.weight") for e in range(E)])
                    for w in ("w1", "w2", "w3")
                )
                gate = g(p + "gate.weight")
            out[s + "mlp.gate.weight"] = gate
            out[s + "mlp.experts.w1"], out[s + "mlp.experts.w3"], out[s + "mlp.experts.w2"] = w1, w3, w2
        else:
            out[s + "mlp.w1.weight"] = g(d + "mlp.gate_proj.weight")
            out[s + "mlp.w3.weight"] = g(d + "mlp.up_proj.weight")
            out[s + "mlp.w2.weight"] = g(d + "mlp.down_proj.weight")
    return {k: v.float().contiguous() for k, v in out.items()}


def load_hf(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our config and fp32 weights from a local Hugging Face Mixtral or Llama folder (safetensors)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text())
    cfg = _hf_model_config(hf, folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{folder}: no *.safetensors weights (save the model with safe_serialization)"
        )
    hf_state: dict[str, torch.Tensor] = {}
    for f in files:
        hf_state.update(load_file(str(f)))
    return cfg, from_hf_state(hf_state, cfg)


def upcycle(state: dict[str, torch.Tensor], dense: ModelConfig, target: ModelConfig, seed: int) -> dict:
    """A dense model's weights for the MoE model `target` (same backbone): expert e of layer l is a
    copy of layer l's dense FFN, routers drawn small (std init_std / 10) so routing starts near
    uniform. Top-k weights sum to 1, so the upcycled model computes the dense model's function."""
    if dense.moe.num_experts:
        raise ConfigError("upcycle_experts", target.moe.num_experts, "the model is already an MoE model")
    out = {k: v for k, v in state.items() if ".mlp." not in k}
    gen = torch.Generator().manual_seed(seed)
    for layer in range(dense.n_layers):
        p = f"layers.{layer}.mlp"
        if not target.is_moe_layer(layer):
            for w in ("w1", "w2", "w3"):
                out[f"{p}.{w}.weight"] = state[f"{p}.{w}.weight"]
            continue
        E = target.experts_in_layer(layer)
        for w in ("w1", "w2", "w3"):
            out[f"{p}.experts.{w}"] = state[f"{p}.{w}.weight"].unsqueeze(0).repeat(E, 1, 1).clone()
        out[f"{p}.gate.weight"] = torch.randn(E, dense.d_model, generator=gen) * target.init_std / 10
    return out


def upcycled(
    dense: ModelConfig, state: dict[str, torch.Tensor], moe: MoEConfig, num_experts: int, seed: int
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """`dense` as an MoE model of num_experts experts per MoE layer (top_k, moe_every and the other
    MoE fields from `moe`; each expert as wide as the dense FFN), with `upcycle`'s weights."""
    target = from_dict(ModelConfig, asdict(dense))
    target.moe = from_dict(MoEConfig, {**asdict(moe), "num_experts": num_experts, "d_expert": 0})
    return target, upcycle(state, dense, target, seed)


@dataclass
class Initial:
    """What a run can start from."""

    cfg: ModelConfig
    state: dict[str, torch.Tensor]
    """fp32 weights in the plain model's layout."""
    tokenizer: Path | None
    """The tokenizer beside the weights (a SentencePiece file or a folder with tokenizer.json)."""
    source: str
    """Where the weights came from, for the log."""
    meta: dict[str, Any] = field(default_factory=dict)
    """The checkpoint's sparsexpert.json (empty for a consolidated or Hugging Face folder)."""


def load_init(path: str | Path) -> Initial:
    """Model config, fp32 weights and tokenizer from a sparsexpert checkpoint (a tag or run folder,
    any world size and ep_size: checked, then read as data), a consolidated folder, or a Hugging Face
    Mixtral/Llama folder (safetensors). A damaged or unsafe checkpoint raises checkpoint.CheckpointError
    naming the file."""
    p = Path(path)
    if (p / CONSOLIDATED_META).is_file():
        from safetensors.torch import load_file

        info = json.loads((p / CONSOLIDATED_META).read_text())
        src = f"consolidated {p} (step {info.get('step')})"
        return Initial(model_config_of(info), load_file(str(p / WEIGHTS)), _tokenizer_in(p), src)
    if (p / "config.json").is_file() and "model_type" in json.loads((p / "config.json").read_text()):
        cfg, state = load_hf(p)
        return Initial(cfg, state, _tokenizer_in(p), f"Hugging Face folder {p}")
    tag = checkpoint.resolve_tag(p)
    state, meta = deepspeed_formats.load_weights(tag)
    src = f"{tag} (step {meta.get('step')})"
    return Initial(model_config_of(meta), state, _tokenizer_in(tag), src, meta)


# Fields that describe the network's shape: a run starting from `train.init` takes them from there.
_ARCH_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "attention_bias",
    "rope_scaling",
    "d_ff",
    "max_seq_len",
    "rope_theta",
    "norm_eps",
    "causal",
    "tie_embeddings",
)
_ARCH_MOE_FIELDS = (
    "num_experts",
    "top_k",
    "moe_every",
    "d_expert",
    "num_shared_experts",
    "num_experts_per_layer",
)


def model_for_init(
    given: ModelConfig, init: Initial, upcycle_experts: int, seed: int
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and weights of a run that starts from `init` (`train.init`): the network's
    shape comes from the init, and a shape field the run sets otherwise is an error rather than
    silently dropped; how the run trains it (model.moe.ep_size, backend and routing, router loss
    coefficients, model.knowledge) comes from `given`. upcycle_experts > 0 turns a dense init into an
    MoE of that many experts (top_k, moe_every from `given`)."""
    default = ModelConfig()
    for name in _ARCH_FIELDS:
        mine, theirs = getattr(given, name), getattr(init.cfg, name)
        if mine != getattr(default, name) and mine != theirs and not (name == "vocab_size" and mine == 0):
            raise ConfigError(
                f"model.{name}",
                mine,
                f"the shape comes from train.init ({theirs!r} there); remove the override",
            )
    if not upcycle_experts:
        for name in _ARCH_MOE_FIELDS:
            mine, theirs = getattr(given.moe, name), getattr(init.cfg.moe, name)
            if mine != getattr(default.moe, name) and mine != theirs:
                raise ConfigError(
                    f"model.moe.{name}",
                    mine,
                    f"the shape comes from train.init ({theirs!r} there); remove the override, or upcycle a "
                    "dense init with train.upcycle_experts",
                )
    cfg = from_dict(ModelConfig, asdict(init.cfg))
    state = init.state
    if upcycle_experts:
        cfg, state = upcycled(cfg, state, given.moe, upcycle_experts, seed)
    else:
        arch = {k: getattr(cfg.moe, k) for k in _ARCH_MOE_FIELDS}
        cfg.moe = from_dict(type(given.moe), {**asdict(given.moe), **arch})
    cfg.knowledge = from_dict(type(given.knowledge), asdict(given.knowledge))
    cfg.init_std = given.init_std
    cfg.activation_checkpointing = given.activation_checkpointing
    cfg.validate()
    return cfg, state


def vocabulary(tokenizer_path: Path) -> list[str]:
    """Every token's string, by id, of a SentencePiece model or a Hugging Face tokenizer folder."""
    from data_prep.tokenizer import SentencePieceTokenizer, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    if isinstance(tok, SentencePieceTokenizer):
        return [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    tokens = [tok.tok.id_to_token(i) for i in range(tok.vocab_size)]
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise ValueError(f"{tokenizer_path}: tokenizer.json has no token for id(s) {missing[:5]}")
    return [t for t in tokens if t is not None]


def check_same_vocabulary(init: Initial, data_tokenizer: Path, data_dir: Path) -> None:
    """The dataset must be tokenized with the init's vocabulary, id for id (a SentencePiece model and its
    tokenizer.json export count as the same)."""
    if init.tokenizer is None:
        raise FileNotFoundError(
            f"{init.source}: no tokenizer beside the weights, so nothing says the dataset {data_dir} uses "
            "the same vocabulary; put the tokenizer there"
        )
    theirs, ours = vocabulary(init.tokenizer), vocabulary(data_tokenizer)
    if theirs != ours:
        diff = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        raise ValueError(
            f"{data_dir}: tokenized with another vocabulary than train.init {init.source} ({len(ours)} vs "
            f"{len(theirs)} tokens, first difference at id {diff}); prepare the data with "
            f"`python -m data_prep run ... --tokenizer {init.tokenizer}`"
        )
