"""The run harness's step on real runs: the host synchronizations of each optimizer step and each log
interval, counted by tests/scripts/count_host_syncs.py (a test hook around `Harness.step` and
`Harness.interval` that wraps torch's syncing calls), for pretraining in each knowledge mode and
backend and for fine-tuning with adversarial training and distillation."""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import TINY_MODEL, run_cmd, write_ds_config

from sparsexpert.distributed import parallel

STEPS = 4


def in_finite_guard(where: str) -> bool:
    """Whether a counted call site lies in `parallel.skip_step_if_not_finite`: on ZeRO-0 in fp32 (where
    we clip) the step must be skipped on the host when the gradient norm is not finite, as DeepSpeed's
    own optimizers do on every other path (4 `bool()` syncs per step of theirs at ZeRO-2)."""
    m = re.fullmatch(r"ours: sparsexpert/distributed/parallel\.py:(\d+) __bool__", where)
    lines, first = inspect.getsourcelines(parallel.skip_step_if_not_finite)
    return m is not None and first <= int(m.group(1)) < first + len(lines)


def counted(tmp_path: Path, *script_args: str) -> tuple[list[dict], list[dict]]:
    """(step windows, interval windows) of a run of `script_args` under the counting hook."""
    out = tmp_path / "syncs.jsonl"
    cmd = [sys.executable, "tests/scripts/count_host_syncs.py", str(out), *script_args]
    run_cmd(cmd, tmp_path)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return [r for r in records if r["window"] == "step"], [r for r in records if r["window"] == "interval"]


@pytest.mark.parametrize(
    "stage, extra",
    [
        (2, ["--model.knowledge.mode=fusion", "--model.knowledge.entity_dim=16"]),
        # the entity table's row-wise Adagrad step: its all-gathers and updates stay on the device
        (
            2,
            [
                "--model.knowledge.mode=fusion",
                "--model.knowledge.entity_dim=16",
                "--model.knowledge.entity_optimizer=rowwise_adagrad",
            ],
        ),
        # ZeRO-0 in fp32: our own gradient clipping; the native backend's drop counts; K-BERT injection
        (
            0,
            [
                "--model.knowledge.mode=inject",
                "--model.moe.backend=native",
                "--model.moe.capacity_factor=1.0",
            ],
        ),
    ],
    ids=["autoep-zero2-fusion", "autoep-zero2-fusion-rowwise", "native-zero0-inject"],
)
def test_pretraining_steps_make_no_host_sync_of_ours(tmp_path, example_data, stage, extra):
    ds = write_ds_config(tmp_path / "ds.json", f"moe_z{stage}.json", gradient_clipping=1.0)
    steps, intervals = counted(
        tmp_path,
        "launcher/pretrain.py",
        "--ds_config",
        str(ds),
        "--output_dir",
        str(tmp_path / "out"),
        *TINY_MODEL,
        *extra,
        f"--data.path={example_data}",
        f"--train.max_steps={STEPS}",
        "--train.log_every=2",
        "--train.eval_every=0",
        "--train.save_every=0",
    )
    assert [r["step"] for r in steps] == list(range(STEPS))
    for r in steps:
        ours = [w for w in r["where"] if w.startswith("ours:")]
        if stage == 0:  # the one host read of the non-finite guard, nothing else
            assert r["ours"] == 1 and all(in_finite_guard(w) for w in ours), r["where"]
        else:
            assert r["ours"] == 0, r["where"]
    # one device-to-host copy per log interval: every sum, count and the gradient norm at once
    assert [r["ours"] for r in intervals] == [1, 1], intervals
    for r in intervals:
        assert all(w.startswith("ours: sparsexpert/harness.py:") and w.endswith("tolist") for w in r["where"])


def test_fine_tuning_steps_make_no_host_sync_of_ours(tmp_path, tiny_pretrained, example_data, shared_data):
    """PGD (two extra forwards and a gradient per micro-batch) and distillation from a teacher. The
    teacher is a plain model outside DeepSpeed: its MoE blocks read their split sizes on the host,
    one synchronization per MoE layer and micro-batch; at ZeRO-0 in fp32 the non-finite guard reads the
    gradient norm once per step; nothing else of ours synchronizes."""
    src = (shared_data / "ner" / "wnut16" / "train.conll").read_text(encoding="utf-8").split("\n\n")[:48]
    train = tmp_path / "train.conll"
    train.write_text("\n\n".join(src) + "\n", encoding="utf-8")
    ds = write_ds_config(
        tmp_path / "ds.json", "moe_z0.json", gradient_clipping=1.0, train_micro_batch_size_per_gpu=4
    )
    task = ["--task", "ner", "--train", str(train), "--dev", str(train), "--init", str(tiny_pretrained)]
    teacher = tmp_path / "teacher"
    run_cmd(
        [
            sys.executable,
            "launcher/finetune.py",
            "--ds_config",
            str(ds),
            "--output_dir",
            str(teacher),
            *task,
            "--train.max_steps=1",
            "--train.eval_every=1",
        ],
        teacher,
    )
    steps, intervals = counted(
        tmp_path,
        "launcher/finetune.py",
        "--ds_config",
        str(ds),
        "--output_dir",
        str(tmp_path / "student"),
        *task,
        f"--train.max_steps={STEPS}",
        "--train.log_every=2",
        f"--train.eval_every={STEPS}",
        "--adversarial.method=pgd",
        "--adversarial.steps=2",
        f"--distill.teacher={teacher}",
    )
    assert [r["step"] for r in steps] == list(range(STEPS))
    for r in steps:
        ours = {w: n for w, n in r["where"].items() if w.startswith("ours:")}
        # the teacher's 2 MoE layers (TINY_MODEL), one micro-batch per step, and the non-finite guard
        # of ZeRO-0 in fp32
        teacher = {w: n for w, n in ours.items() if not in_finite_guard(w)}
        assert r["ours"] == 3 and sum(ours.values()) - sum(teacher.values()) == 1, ours
        assert all("sparsexpert/model/moe.py" in w and w.endswith("tolist") for w in teacher), ours
    assert [r["ours"] for r in intervals] == [1, 1], intervals
