"""The one command-line language of every entry point (sparsexpert/cli.py): --help lists every config
field, both override forms mean the same, names are checked with a did-you-mean, DeepSpeed settings
are overridden with --ds.*, and --print_config prints what the run then records in config.json."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO, TINY_MODEL, deepspeed_cmd, pretrain, run_cmd, write_ds_config

from data_prep.__main__ import main as data_prep_main
from data_prep.pipeline import PrepConfig
from data_prep.relations import RelationsConfig
from sparsexpert import cli
from sparsexpert.finetune.config import FinetuneConfig
from sparsexpert.train.config import RunConfig


def launcher(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", REPO / "launcher" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stdout + stderr) of an entry point's main called in this process."""
    try:
        code = main(argv) or 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out + out.err


DS = str(REPO / "ds_configs" / "moe_z2.json")


@pytest.mark.parametrize(
    "entry, argv, cls",
    [
        ("pretrain", ["--help"], RunConfig),
        ("finetune", ["--help"], FinetuneConfig),
        ("ablate", ["--help"], RunConfig),
        ("compare", ["--help"], FinetuneConfig),
        ("data_prep", ["run", "--help"], PrepConfig),
        ("data_prep", ["example", "--help"], PrepConfig),
        ("data_prep", ["relations", "--help"], RelationsConfig),
    ],
)
def test_help_lists_every_field_with_type_default_and_docstring(entry, argv, cls, capsys):
    main = data_prep_main if entry == "data_prep" else launcher(entry).main
    code, text = run_main(main, argv, capsys)
    assert code == 0
    fields = cli.iter_fields(cls)
    assert len(fields) >= (60 if cls is RunConfig else 10)
    flat = " ".join(text.split())  # help wraps the docstrings
    for f in fields:
        assert f"--{f.name} " in text, f.name
        doc = " ".join(f.doc.split())
        assert doc and doc[:60] in flat, (f.name, doc)
    if entry in ("pretrain", "finetune", "ablate", "compare"):
        assert "--ds.optimizer.params.lr" in text and "--ds.zero_optimization.stage" in text


def test_field_docstrings_are_read_from_the_source():
    docs = cli.field_docs(RunConfig)
    assert docs["train"] == "The training loop."
    train = {f.name: f for f in cli.iter_fields(RunConfig)}["train.max_steps"]
    assert (train.type, train.default, train.doc) == (int, 200, "Optimizer steps to train for.")


def parsed(entry: str, *argv: str) -> tuple:
    module = launcher(entry)
    args, cfg, ds = module.parse_args([*argv])
    return args, cfg, ds


def test_both_forms_of_an_option_mean_the_same():
    _, a, ds_a = parsed(
        "pretrain",
        "--ds_config", DS, "--train.max_steps=7", "--model.tie_embeddings", "--data.path=/d/1",
        "--model.moe.num_experts_per_layer=[4,8]", "--ds.optimizer.params.lr=1e-4",
    )  # fmt: skip
    _, b, ds_b = parsed(
        "pretrain",
        "--deepspeed_config", DS, "--train.max-steps", "7", "--model.tie_embeddings", "true",
        "--data.path", "/d/1", "--model.moe.num_experts_per_layer", "4", "8", "--ds.optimizer.params.lr", "1e-4",
    )  # fmt: skip
    assert a == b and ds_a == ds_b
    assert (a.train.max_steps, a.model.tie_embeddings, a.data.path) == (7, True, "/d/1")
    assert a.model.moe.num_experts_per_layer == [4, 8] and ds_a["optimizer"]["params"]["lr"] == 1e-4
    # a string field takes the text as it is, even where it would parse as JSON
    _, c, _ = parsed("pretrain", "--ds_config", DS, "--data.path", "123")
    assert c.data.path == "123"
    # fine-tuning: the same nested names as pretraining
    _, f, _ = parsed(
        "finetune",
        "--ds_config", DS, "--init", "runs/x", "--task", "ner", "--train", "t.conll", "--dev", "d.conll",
        "--train.max_steps", "5", "--train.patience=2", "--adversarial.method", "pgd", "--freeze_embeddings",
    )  # fmt: skip
    assert (f.train.init, f.train.max_steps, f.train.patience) == ("runs/x", 5, 2)
    assert f.adversarial.method == "pgd" and f.freeze_embeddings and f.tasks[0].train == "t.conll"


@pytest.mark.parametrize(
    "entry, argv, message",
    [
        ("pretrain", ["--max_steps=3"], "--max_steps: no such field; did you mean --train.max_steps?"),
        ("pretrain", ["--train.max_stpes", "3"], "did you mean --train.max_steps?"),
        ("pretrain", ["--train.max_steps"], "--train.max_steps: needs a value"),
        ("pretrain", ["--train.max_steps=abc"], "train.max_steps='abc': expected int"),
        ("pretrain", ["--model.moe=3"], "--model.moe: is a section"),
        ("pretrain", ["stray"], "stray: unexpected argument"),
        ("finetune", ["--max_steps=3"], "did you mean --train.max_steps?"),
        ("finetune", ["--upcycle_experts", "8"], "did you mean --train.upcycle_experts?"),
        ("pretrain", ["--ds.zero_optimisation.stage=2"], "ds_config.zero_optimisation.*did you mean 'zero_optimization'"),
        ("pretrain", ["--ds.zero_optimization.stagee=2"], "ds_config.zero_optimization.stagee.*did you mean 'stage'"),
        ("pretrain", ["--ds.optimizer.params.lrr=1"], "optimizer.params has no 'lrr'; did you mean --ds.optimizer.params.lr?"),
        ("pretrain", ["--ds.optimizer.type.x=1"], "ds_config.optimizer.type is 'AdamW', not a JSON object"),
    ],
)  # fmt: skip
def test_a_wrong_name_or_value_is_refused_with_the_fix(entry, argv, message, capsys):
    extra = ["--init", "x", "--task", "ner", "--train", "t", "--dev", "d"] if entry == "finetune" else []
    code, text = run_main(launcher(entry).main, ["--ds_config", DS, *extra, *argv], capsys)
    assert code == 2
    assert re.search(message.replace("?", r"\?").replace("[", r"\["), text), text


def test_ds_overrides_change_the_json_and_are_checked_like_it():
    _, _, ds = parsed(
        "pretrain",
        "--ds_config", DS, "--ds.train_micro_batch_size_per_gpu", "2", "--ds.gradient_accumulation_steps=3",
        "--ds.bf16.enabled=true", "--ds.zero_optimization.stage=1", "--ds.scheduler.params.warmup_num_steps=7",
    )  # fmt: skip
    base = json.loads(Path(DS).read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 1
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 7
    # nothing else changed, and the file itself is untouched
    for key in base:
        if key not in (
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "zero_optimization",
            "scheduler",
        ):
            assert ds[key] == base[key], key
    assert json.loads(Path(DS).read_text()) == base


def test_data_prep_speaks_the_same_language(tmp_path, capsys):
    code, text = run_main(
        data_prep_main,
        ["run", "--corpus", "a.txt", "b.xml", "--seq-len", "64", "--vocab_size=512", "--keep_parts",
         "--output", str(tmp_path / "o"), "--print_config"],
        capsys,
    )  # fmt: skip
    assert code == 0, text
    cfg = json.loads(text)
    assert cfg["corpus"] == ["a.txt", "b.xml"] and cfg["seq_len"] == 64 and cfg["vocab_size"] == 512
    assert cfg["keep_parts"] is True and cfg["output"] == str(tmp_path / "o")
    code, text = run_main(data_prep_main, ["run", "--corpus", "a.txt", "--seq_lenn", "64"], capsys)
    assert code == 2 and "did you mean --seq_len?" in text
    config = tmp_path / "prep.json"
    config.write_text(json.dumps({"corpus": ["a.txt"], "output": "o", "seq_len": "long"}))
    code, text = run_main(data_prep_main, ["run", "--config", str(config)], capsys)
    assert code == 2 and f"{config}: seq_len='long': expected int" in text


def subset(want, have, where: str = "") -> None:
    """Every value of `want` (a JSON config) is in `have` (the resolved config as a dict)."""
    if isinstance(want, dict):
        for k, v in want.items():
            subset(v, have[k], f"{where}.{k}")
    elif isinstance(want, list) and want and isinstance(want[0], dict):
        for i, (w, h) in enumerate(zip(want, have, strict=True)):
            subset(w, h, f"{where}[{i}]")
    else:
        assert want == have, where


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_run_configs_load_and_validate(path):
    """configs/ holds example run configs the docstrings point to: each is read whole by its launcher."""
    data = json.loads(path.read_text())
    entry = "finetune" if "tasks" in data else "pretrain"
    _, cfg, _ = parsed(entry, "--ds_config", DS, "--config", str(path))
    cfg.validate()
    subset(data, asdict(cfg))


def test_pretraining_prints_the_config_it_then_records(tmp_path, example_data):
    """The printed run config, resolved DeepSpeed config (batch triplet, AutoEP section, schedule) and
    DeepSpeed JSON (with the --ds overrides) are those the run writes to config.json; fusion's entity and
    relation tables are sized from the dataset in both."""
    args = [
        *TINY_MODEL, f"--data.path={example_data}", "--model.knowledge.mode=fusion", "--model.knowledge.entity_dim=16",
        "--train.max_steps", "2", "--train.eval_every=0", "--ds.optimizer.params.lr=2e-3",
        "--ds.train_micro_batch_size_per_gpu", "4",
    ]  # fmt: skip
    out = tmp_path / "run"
    shown = run_cmd(
        deepspeed_cmd(
            1, "launcher/pretrain.py", "--ds_config", DS, "--output_dir", str(out), *args, "--print_config"
        ),
        tmp_path,
    )
    printed = json.loads(shown.output[shown.output.index("{") :])
    assert not out.exists()  # printing starts nothing and writes nothing
    assert printed["run"]["model"]["knowledge"]["num_entities"] > 0
    pretrain(out, 1, DS, *args)
    recorded = json.loads((out / "config.json").read_text())
    for key in ("run", "ds_config", "ds_json", "world_size"):
        assert printed[key] == recorded[key], key
    assert recorded["ds_json"]["optimizer"]["params"]["lr"] == 2e-3
    assert recorded["ds_config"]["train_micro_batch_size_per_gpu"] == 4


def test_fine_tuning_prints_the_config_it_then_records(tmp_path, tiny_pretrained, shared_data):
    pre = tiny_pretrained
    src = (shared_data / "ner" / "wnut16" / "train.conll").read_text(encoding="utf-8").split("\n\n")[:16]
    data = tmp_path / "train.conll"
    data.write_text("\n\n".join(src) + "\n", encoding="utf-8")
    ds = write_ds_config(tmp_path / "ds.json", "moe_z2.json", train_micro_batch_size_per_gpu=4)
    out = tmp_path / "ft"
    cmd = deepspeed_cmd(
        1, "launcher/finetune.py", "--ds_config", str(ds), "--output_dir", str(out), "--init", str(pre),
        "--task", "ner", "--train", str(data), "--dev", str(data), "--train.max_steps", "1",
        "--train.eval_every=1", "--adversarial.method=fgm", "--ds.optimizer.params.lr", "1e-3",
    )  # fmt: skip
    shown = run_cmd([*cmd, "--print_config"], tmp_path)
    printed = json.loads(shown.output[shown.output.index("{") :])
    assert not out.exists()
    run_cmd(cmd, out)
    recorded = json.loads((out / "config.json").read_text())
    for key in ("run", "ds_json"):
        assert printed[key] == recorded[key], key
    assert (
        recorded["run"]["train"]["max_steps"] == 1
        and recorded["ds_json"]["optimizer"]["params"]["lr"] == 1e-3
    )
