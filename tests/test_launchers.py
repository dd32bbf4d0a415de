"""Launchers other than DeepSpeed's: `torchrun` (what many clusters use) and `accelerate launch` with its
DeepSpeed plugin (how Hugging Face users start DeepSpeed jobs) start every entry point as `deepspeed`
does. Two processes, experts split over both: pretraining gives the losses the `deepspeed` launcher
gives, then evaluation and fine-tuning run on its checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import REPO, TINY_MODEL, free_port, pretrain, run_cmd


def torchrun(script: str, *args: str) -> list[str]:
    launcher = str(Path(sys.executable).with_name("torchrun"))
    return [launcher, "--nproc_per_node", "2", "--master_port", str(free_port()), script, *args]


def accelerate(script: str, ds_config: str, *args: str) -> list[str]:
    """`accelerate launch` with its DeepSpeed plugin pointing at our JSON (no --ds_config: the entry
    point takes the plugin's file)."""
    launcher = str(Path(sys.executable).with_name("accelerate"))
    return [
        launcher,
        "launch",
        "--use_deepspeed",
        "--deepspeed_config_file",
        ds_config,
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        script,
        *args,
    ]


def test_torchrun_and_accelerate_run_pretraining_evaluation_and_fine_tuning(
    tmp_path, example_data, shared_data
):
    common = [
        *TINY_MODEL,
        "--model.moe.ep_size=2",
        f"--data.path={example_data}",
        "--train.max_steps=4",
        "--train.log_every=1",
        "--train.eval_every=0",
    ]
    ds = str(REPO / "ds_configs" / "moe_z2.json")
    reference = pretrain(tmp_path / "deepspeed", 2, ds, *common)
    out = tmp_path / "torchrun"
    run = run_cmd(torchrun("launcher/pretrain.py", "--ds_config", ds, "--output_dir", str(out), *common), out)
    assert "world 2, ep 2" in run.output
    assert run.losses() == reference.losses() and len(run.losses()) == 4

    # --run_dir: torchrun's own parser would take --run for its --run-path
    run_cmd(torchrun("launcher/evaluate.py", "--run_dir", str(out)), out)
    assert json.loads((out / "eval.json").read_text())["step"] == 4

    ner = shared_data / "ner" / "wnut16"
    ft = tmp_path / "ner"
    cmd = torchrun(
        "launcher/finetune.py",
        "--ds_config",
        ds,
        "--init",
        str(out),
        "--task",
        "ner",
        "--train",
        str(ner / "dev.conll"),
        "--dev",
        str(ner / "dev.conll"),
        "--output_dir",
        str(ft),
        "--model.moe.ep_size=2",
        "--train.max_steps=2",
        "--train.eval_every=2",
    )
    run_cmd(cmd, ft)
    assert json.loads((ft / "results.json").read_text())["steps"] == 2

    acc = tmp_path / "accelerate"
    run = run_cmd(accelerate("launcher/pretrain.py", ds, "--output_dir", str(acc), *common), acc)
    assert run.losses() == reference.losses()
    ft2 = tmp_path / "ner_accelerate"
    ft_args = cmd[cmd.index("--init") :]
    ft_args[ft_args.index("--output_dir") + 1] = str(ft2)
    run_cmd(accelerate("launcher/finetune.py", ds, *ft_args), ft2)
    assert json.loads((ft2 / "results.json").read_text())["steps"] == 2
