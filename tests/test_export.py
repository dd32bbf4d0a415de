"""Weights out and in: consolidation of an expert-parallel checkpoint, Hugging Face export checked
against transformers itself (logits, greedy generation, tokenizer), import and upcycling."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_MODEL, deepspeed_cmd, launch_env, pretrain, run_cmd, write_ds_config

from data_prep.example_world import write_world
from data_prep.tokenizer import load_tokenizer
from sparsexpert.config import ConfigError
from sparsexpert.finetune.data import load_tokenizer_for
from sparsexpert.generate import generate
from sparsexpert.model import ModelConfig, build_model
from sparsexpert.model.config import MoEConfig
from sparsexpert.model.transformer import Transformer
from sparsexpert.weights import checkpoint
from sparsexpert.weights.checkpoint import resolve_tag
from sparsexpert.weights.deepspeed_formats import load_weights
from sparsexpert.weights.export import (
    check_same_vocabulary,
    hf_equivalent,
    load_init,
    model_for_init,
    save_hf,
    upcycle,
)

transformers = pytest.importorskip("transformers")


def _cli(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _model(init) -> Transformer:
    model = Transformer(init.cfg)
    model.load_state_dict(init.state)
    return model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory, example_data):
    """Two ranks, experts split over both (ep_size=2), ZeRO-2: each rank's checkpoint files hold
    only its own experts."""
    tmp = tmp_path_factory.mktemp("export")
    ds = write_ds_config(tmp / "ds.json", "moe_z2.json", train_micro_batch_size_per_gpu=4)
    pretrain(
        tmp / "run",
        2,
        ds,
        *TINY_MODEL,
        "--model.moe.ep_size=2",
        f"--data.path={example_data}",
        "--train.max_steps=30",
        "--train.log_every=10",
        "--train.save_every=0",
        "--train.eval_every=0",
    )
    return tmp / "run"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    paths = write_world(tmp_path_factory.mktemp("world"))
    return paths["corpus"].read_text().splitlines()[:300]


def test_consolidate_keys_experts_by_global_id(run, tmp_path):
    _cli("launcher/export.py", "--checkpoint", str(run), "--output", str(tmp_path / "c"))
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "c" / "model.safetensors"))
    want, meta = load_weights(run)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # Row e of the stacked experts is the expert DeepSpeed saved under global id e, whichever rank held it.
    files = sorted(resolve_tag(run).glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    assert len(files) == 2 * 4  # 2 MoE layers x 4 experts, each in its own file
    for f in files:
        for key, value in checkpoint.load_file(f).items():
            stem, e = key.rsplit(".", 1)  # layers.L.mlp.experts.w1.<global expert id>
            assert torch.equal(got[stem][int(e)], value.float()), key
    info = json.loads((tmp_path / "c" / "sparsexpert_model.json").read_text())
    assert info["model"] == meta["run"]["model"] and info["source_ep_size"] == 2
    assert (tmp_path / "c" / "tokenizer.model").is_file()
    # The consolidated folder is itself a starting point, equal to the checkpoint.
    init = load_init(tmp_path / "c")
    assert init.cfg.moe.num_experts == 4 and all(torch.equal(init.state[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def hf_export(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "hf"
    _cli("launcher/export.py", "--checkpoint", str(run), "--output", str(out), "--hf")
    return out


def test_hf_export_matches_ours_in_transformers(run, hf_export, corpus):
    out = hf_export
    ours = _model(load_init(run))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    sp = load_tokenizer(resolve_tag(run) / "tokenizer.model")

    # The tokenizer: AutoTokenizer encodes and decodes the corpus as SentencePiece does.
    for text in corpus:
        ids = [int(i) for i in sp.encode([text])[0]]
        assert hf_tok.encode(text, add_special_tokens=False) == ids, text
        assert hf_tok.decode(ids) == sp.decode(ids)
    assert hf_tok.eos_token_id == sp.eos_id
    # ... and fine-tuning's --init reads the folder's tokenizer.json the same way.
    ft_tok = load_tokenizer_for(out)
    assert [ft_tok.encode([t])[0].tolist() for t in corpus[:50]] == [
        sp.encode([t])[0].tolist() for t in corpus[:50]
    ]

    # Logits on real text, dropless top-2 routing: within 1e-4.
    rows = [[int(i) for i in sp.encode([t])[0]][:48] for t in corpus[:8]]
    n = min(len(r) for r in rows)
    x = torch.tensor([r[:n] for r in rows])
    with torch.no_grad():
        diff = (ours(x).logits - hf(x).logits).abs().max().item()
    assert diff < 1e-4, diff

    # Greedy generation: the same tokens from transformers' generate and ours.
    prompt = [sp.eos_id, *rows[0][:6]]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None)
    got = generate(ours, prompt, 24)
    assert want[0, len(prompt) :].tolist() == got

    # Import: the export read back into our model is the checkpoint, weight for weight.
    back = load_init(out)
    assert back.cfg.moe.num_experts == 4 and back.cfg.moe.top_k == 2
    for k, v in load_init(run).state.items():
        assert torch.equal(back.state[k], v), k

    # launcher/generate.py from the export prints what `generate` computed.
    text = _cli("launcher/generate.py", "--model", str(out), "--prompt", corpus[0].split(" ", 1)[0])
    first = corpus[0].split(" ", 1)[0]
    cont = generate(ours, [sp.eos_id, *[int(i) for i in sp.encode([first])[0]]], 32, eos_id=sp.eos_id)
    expect = sp.decode([i for i in [*sp.encode([first])[0], *cont] if i != sp.eos_id])
    assert text.strip().splitlines()[-1] == expect.strip()


def test_finetune_starts_from_a_hugging_face_folder(hf_export, tmp_path, corpus):
    """--init takes a Hugging Face folder: its weights, config and tokenizer.json."""
    data = tmp_path / "cls.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t, "label": str(i % 2)}) + "\n" for i, t in enumerate(corpus[:40]))
    )
    ds = write_ds_config(tmp_path / "ds.json", "moe_z2.json", train_micro_batch_size_per_gpu=4)
    cmd = deepspeed_cmd(
        1,
        "launcher/finetune.py",
        "--ds_config",
        str(ds),
        "--output_dir",
        str(tmp_path / "ft"),
        "--init",
        str(hf_export),
        "--task",
        "classification",
        "--train",
        str(data),
        "--dev",
        str(data),
        "--train.max_steps=2",
        "--train.eval_every=2",
    )
    run = run_cmd(cmd, tmp_path / "ft")
    assert f"initializing from Hugging Face folder {hf_export}" in run.output
    res = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert res["steps"] == 2 and "accuracy" in res["results"]["classification"]


def test_pretraining_continues_from_a_hugging_face_folder(hf_export, example_data, tmp_path):
    """train.init: the shape and the weights come from the folder. With learning rate 0 the weights
    the run saves after a step are the folder's, bit for bit, so they reached the engine unchanged."""
    ds = write_ds_config(
        tmp_path / "lr0.json",
        "moe_z2.json",
        train_micro_batch_size_per_gpu=4,
        optimizer={"type": "AdamW", "params": {"lr": 0.0, "torch_adam": True}},
    )
    cfg = json.loads(ds.read_text())
    cfg.pop("scheduler")
    ds.write_text(json.dumps(cfg))
    run = pretrain(
        tmp_path / "out",
        1,
        ds,
        f"--train.init={hf_export}",
        f"--data.path={example_data}",
        "--train.max_steps=1",
        "--train.eval_every=0",
    )
    assert f"initializing from Hugging Face folder {hf_export}" in run.output
    saved, meta = load_weights(tmp_path / "out")
    want = load_init(hf_export)
    assert meta["run"]["model"]["d_model"] == want.cfg.d_model == 64  # TINY_MODEL's, not the default 128
    assert saved.keys() == want.state.keys()
    for k, v in want.state.items():
        assert torch.equal(saved[k], v), k


def test_init_refuses_a_shape_override_and_another_vocabulary(hf_export, tmp_path):
    from data_prep.pipeline import PrepConfig, prepare_example

    init = load_init(hf_export)
    given = ModelConfig(d_model=256)
    with pytest.raises(ConfigError) as e:
        model_for_init(given, init, 0, seed=0)
    assert e.value.field == "model.d_model" and "comes from train.init" in str(e.value)
    cfg, state = model_for_init(ModelConfig(moe=MoEConfig(ep_size=2, aux_loss_coef=0.1)), init, 0, seed=0)
    assert (cfg.d_model, cfg.moe.num_experts, cfg.moe.ep_size, cfg.moe.aux_loss_coef) == (64, 4, 2, 0.1)
    other = tmp_path / "other"
    prepare_example(other, PrepConfig(vocab_size=300, seq_len=32), log=lambda *_: None)
    with pytest.raises(ValueError, match="another vocabulary than train.init"):
        check_same_vocabulary(init, other / "tokenizer.model", other)


def test_llama_import_upcycles_to_the_same_function(tmp_path):
    """A dense Llama folder, imported and upcycled into 4 experts top-2, computes what
    transformers' LlamaForCausalLM computes on that folder."""
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, d_ff=96, max_seq_len=32)
    cfg.moe.num_experts = 0
    save_hf(cfg, build_model(cfg, seed=3).state_dict(), None, tmp_path, log=lambda *_: None)
    llama = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(llama).__name__ == "LlamaForCausalLM"
    init = load_init(tmp_path)
    target = dataclasses.replace(init.cfg, moe=MoEConfig(num_experts=4, top_k=2))
    moe = Transformer(target)
    moe.load_state_dict(upcycle(init.state, init.cfg, target, seed=0))
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(x).logits, llama(x).logits, atol=1e-5, rtol=1e-5)
    assert moe.layers[0].mlp.gate.weight.abs().max() < 0.02


@pytest.mark.parametrize(
    "change, field",
    [
        ({"moe_every": 2}, "model.moe.moe_every"),
        ({"num_shared_experts": 1}, "model.moe.num_shared_experts"),
        ({"causal": False}, "model.causal"),
    ],
)
def test_export_refuses_what_mixtral_cannot_express(change, field):
    cfg = ModelConfig(vocab_size=100)
    for k, v in change.items():
        setattr(cfg.moe if hasattr(cfg.moe, k) else cfg, k, v)
    with pytest.raises(ConfigError) as e:
        hf_equivalent(cfg)
    assert e.value.field == field
