"""Runs that go wrong, for real (real launches, real files): a diverging run stops with status 1 and
keeps its last healthy checkpoint; an output folder holding a run is not written over by accident;
a fine-tuning run continues after a failure; metrics.jsonl stays strict JSON."""

from __future__ import annotations

import json
import math

import pytest
from conftest import REPO, TINY_MODEL, deepspeed_cmd, pretrain, run_cmd, write_ds_config

from sparsexpert.weights.checkpoint import find_latest


def strict_records(path) -> list[dict]:
    """metrics.jsonl read by a reader that refuses NaN and Infinity, as strict JSON parsers do."""

    def refuse(token: str):
        raise ValueError(f"{path}: non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("stage", [2, 0], ids=["zero2-deepspeed-skips", "zero0-we-skip"])
def test_a_diverging_run_stops_and_keeps_its_last_healthy_checkpoint(tmp_path, example_data, stage):
    """Learning rate 1e12 (at this size 1e6 only saturates the model; on the default data and model it
    diverges too): after the first step the loss is NaN and the gradients infinite. Their updates
    are skipped (DeepSpeed's ZeRO optimizers do it; at ZeRO-0 in fp32 we do), no checkpoint is written
    after them, and after train.max_nonfinite_steps in a row the run stops with exit status 1 naming the
    steps and the last healthy checkpoint, which is still on disk (keep_checkpoints=1 rotated nothing away)."""
    ds = write_ds_config(
        tmp_path / "ds.json",
        f"moe_z{stage}.json",
        optimizer={"type": "AdamW", "params": {"lr": 1e12, "torch_adam": True}},
        gradient_clipping=0.0,
    )
    constant = json.loads(ds.read_text())
    del constant["scheduler"]  # the rate from the first step
    ds.write_text(json.dumps(constant))
    out = tmp_path / "run"
    run = pretrain(
        out,
        1,
        ds,
        "--model.max_seq_len=32",  # the default model otherwise (TINY_MODEL's only saturates at this rate)
        f"--data.path={example_data}",
        "--train.max_steps=30",
        "--train.log_every=1",
        "--train.save_every=1",
        "--train.keep_checkpoints=1",
        "--train.eval_every=0",
        check=False,
    )
    assert run.returncode == 1, run.output[-3000:]
    assert "updates in a row skipped, the loss or gradients not finite" in run.output, run.output[-3000:]
    assert "Traceback" not in run.output  # a message, not a crash
    records = strict_records(out / "metrics.jsonl")
    bad = [r for r in records if "nonfinite" in r]
    assert bad and bad[-1]["loss"] is None and "loss" in bad[-1]["nonfinite"]
    last_step = records[-1]["step"]
    assert last_step < 30
    healthy = find_latest(out / "checkpoints")
    assert healthy is not None and healthy.name in run.output
    saved = int(healthy.name.split("_")[1])
    assert saved <= last_step - 3  # not one of the 3 non-finite steps
    finite = [r for r in records if r["step"] <= saved and "nonfinite" not in r]
    assert finite and all(math.isfinite(r["loss"]) for r in finite)


def test_an_output_folder_holding_a_run_is_not_reused_by_accident(tmp_path, example_data):
    ds = REPO / "ds_configs" / "moe_z2.json"
    args = [*TINY_MODEL, f"--data.path={example_data}", "--train.max_steps=2", "--train.eval_every=0"]
    out = tmp_path / "run"
    pretrain(out, 1, ds, *args, "--train.log_every=1")
    (out / "notes.txt").write_text("mine")  # not the run's: never touched
    again = pretrain(out, 1, ds, *args, check=False)
    assert again.returncode == 1
    assert "holds a run (checkpoints, metrics.jsonl, tensorboard, config.json)" in again.output
    assert "--resume" in again.output and "--overwrite" in again.output
    assert [r["step"] for r in strict_records(out / "metrics.jsonl")] == [1, 2]  # untouched
    over = pretrain(out, 1, ds, *args, "--train.log_every=2", "--overwrite")
    assert "--overwrite: removed the former run's" in over.output
    assert [r["step"] for r in strict_records(out / "metrics.jsonl")] == [2]  # only the new run's
    assert (out / "notes.txt").read_text() == "mine"


def test_fine_tuning_resumes_where_it_stopped(tmp_path, tiny_pretrained, shared_data):
    """A fine-tuning run that fails at step 5 (after its step-4 evaluation wrote checkpoints/) continues
    with --resume and computes exactly what an uninterrupted run computes: the same losses from step 5,
    the same best step and dev metric; every step once in metrics.jsonl."""
    src = (shared_data / "ner" / "wnut16" / "train.conll").read_text(encoding="utf-8").split("\n\n")[:64]
    data = tmp_path / "train.conll"
    data.write_text("\n\n".join(src) + "\n", encoding="utf-8")
    ds = write_ds_config(tmp_path / "ds.json", "moe_z2.json", train_micro_batch_size_per_gpu=4)

    def finetune(out, *extra, env=None, check=True):
        cmd = deepspeed_cmd(
            1, "launcher/finetune.py", "--ds_config", str(ds), "--output_dir", str(out), "--init",
            str(tiny_pretrained), "--task", "ner", "--train", str(data), "--dev", str(data),
            "--train.max_steps=6", "--train.eval_every=2", "--train.log_every=1", *extra,
        )  # fmt: skip
        return run_cmd(cmd, out, check=check, env=env)

    full = tmp_path / "full"
    finetune(full)
    cut = tmp_path / "cut"
    failed = finetune(cut, env={"SPARSEXPERT_FAIL_AT": "0:5:raise"}, check=False)
    assert failed.returncode != 0 and "injected failure" in failed.output
    assert find_latest(cut / "checkpoints").name == "step_00000004"
    refused = finetune(cut, check=False)
    assert refused.returncode == 1 and "holds a run" in refused.output
    resumed = finetune(cut, "--resume")
    assert "resumed from" in resumed.output and "at step 4" in resumed.output
    got, want = strict_records(cut / "metrics.jsonl"), strict_records(full / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want]  # each step once, in order
    for a, b in zip(got, want):
        for key in ("loss", "dev_metric"):
            if key in b:
                assert a[key] == b[key], (a["step"], key)
    res_cut = json.loads((cut / "results.json").read_text())
    res_full = json.loads((full / "results.json").read_text())
    assert (res_cut["best_step"], res_cut["best_dev_metric"]) == (
        res_full["best_step"],
        res_full["best_dev_metric"],
    )
    assert res_cut["history"] == res_full["history"]
