"""launcher/compare.py with several seeds: every arm run per seed, metrics as mean ± sd [95% interval]
(sparsexpert/stats.py) recomputed here from the runs' results, each arm against b) by a paired t-test;
the same fine-tuning command and seed twice gives the same metrics; the bootstrap over dev examples of a
single-seed comparison scores as the fine-tuning's own metric does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_MODEL, launch_env, world_relations

from sparsexpert import stats


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def relations(example_data, tmp_path_factory) -> Path:
    return world_relations(example_data, tmp_path_factory.mktemp("re"))


def test_two_seeds_give_intervals_and_paired_tests_and_a_seed_reproduces(example_data, relations, tmp_path):
    out = tmp_path / "cmp"
    task = [
        "--task",
        "relation",
        "--train",
        str(relations / "train.jsonl"),
        "--dev",
        str(relations / "dev.jsonl"),
    ]
    cmd = [
        sys.executable,
        "launcher/compare.py",
        *task,
        "--data",
        str(example_data),
        "--output_dir",
        str(out),
    ]
    cmd += [
        "--pretrain_steps",
        "2",
        "--train.max_steps=4",
        "--train.eval_every=2",
        "--seeds",
        "2",
        "--jobs",
        "2",
        *TINY_MODEL,
    ]
    run = _run(cmd)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = (out / "comparison.txt").read_text()
    lines = text.splitlines()
    header = [h.strip() for h in lines[0].split("|")[1:]]
    rows = {
        x.split(" | ")[0].strip(): [c.strip() for c in x.split(" | ")[1:]] for x in lines[2:] if " | " in x
    }
    assert rows["seeds"] == ["2"] * 4
    for k, arm in enumerate(header):
        slug = arm.split(")")[0]
        results = [
            json.loads((out / f"finetune_{slug}{s}" / "results.json").read_text()) for s in ("", "_s1")
        ]
        config = json.loads((out / f"finetune_{slug}_s1" / "config.json").read_text())
        assert config["run"]["train"]["seed"] == 1  # the second seed's runs
        assert rows["best dev metric"][k] == str(stats.summary([r["best_dev_metric"] for r in results]))
        if slug == "b":
            continue
        base = [json.loads((out / f"finetune_b{s}" / "results.json").read_text()) for s in ("", "_s1")]
        want = stats.paired_t([r["best_dev_metric"] for r in results], [r["best_dev_metric"] for r in base])
        assert rows["vs b) on the best dev metric"][k] == str(want)
        assert f"{arm} - b): {want} (paired t over 2 seeds): " in text
    assert (out / "pretrain_a_s1" / "config.json").is_file() and not (out / "pretrain_d").exists()
    pre = json.loads((out / "pretrain_b_s1" / "config.json").read_text())["run"]
    assert pre["train"]["seed"] == 1 and pre["data"]["seed"] == 1

    # the same command and seed, on the same machine and thread count: the same metrics
    again = tmp_path / "again"
    first = json.loads((out / "finetune_b_s1" / "config.json").read_text())
    cmd = [sys.executable, "launcher/finetune.py", "--ds_config", "ds_configs/moe_z2.json"]
    cmd += ["--init", str(out / "pretrain_b_s1"), *task, "--output_dir", str(again)]
    cmd += ["--train.max_steps=4", "--train.eval_every=2", "--train.seed=1", *TINY_MODEL]
    assert first["run"]["train"]["max_steps"] == 4
    run = _run(cmd)
    assert run.returncode == 0, run.stderr[-3000:]
    one = json.loads((out / "finetune_b_s1" / "results.json").read_text())
    two = json.loads((again / "results.json").read_text())
    assert one["results"] == two["results"] and one["history"] == two["history"]
    # what else decides the numbers is recorded with each run: the thread count among it
    env = json.loads((again / "config.json").read_text())["environment"]
    assert env == first["environment"] and env["cpu_threads"] == 1 and env["torch"] == torch.__version__


def test_bootstrap_over_dev_examples_scores_as_fine_tuning_does(tmp_path):
    """dev_metric_of reads a run's dev predictions: on all examples it gives the micro F1 the fine-tuning
    reported (relation_scores), and on a subset the subset's."""
    from experiments.compare import dev_metric_of
    from sparsexpert.finetune.metrics import relation_scores

    rng = np.random.default_rng(0)
    labels = ["no_relation", "born_in", "works_for"]
    gold = rng.choice(labels, 300).tolist()
    runs = {}
    for name, flip in (("a", 0.2), ("b", 0.5)):
        ft = tmp_path / name
        (ft / "predictions").mkdir(parents=True)
        pred = [g if rng.random() > flip else rng.choice(labels) for g in gold]
        (ft / "predictions" / "relation_dev.jsonl").write_text(
            "".join(
                json.dumps({"index": i, "gold": g, "pred": p}) + "\n"
                for i, (g, p) in enumerate(zip(gold, pred))
            )
        )
        task = {"name": "relation", "kind": "relation", "negative_label": "no_relation"}
        (ft / "config.json").write_text(json.dumps({"run": {"tasks": [task]}}))
        runs[name] = (dev_metric_of(ft), pred)
    for found, pred in runs.values():
        assert found is not None
        n, metric = found
        assert n == 300 and metric(np.arange(n)) == relation_scores(gold, pred)["f1"]
        assert metric(np.arange(50)) == relation_scores(gold[:50], pred[:50])["f1"]
    a, b = runs["a"][0], runs["b"][0]
    assert a is not None and b is not None
    cmp = stats.bootstrap_diff(a[0], a[1], b[1], samples=500)
    assert cmp.diff > 0 and cmp.p < 0.05 and cmp.lo > 0


def test_jobs_side_by_side_return_in_order_and_stop_after_a_failure():
    import threading
    import time

    from experiments.ablation import run_jobs

    started: list[int] = []
    lock = threading.Lock()

    def job(i: int, fail: bool = False, wait: float = 0.05):
        def run() -> int:
            with lock:
                started.append(i)
            time.sleep(wait)
            if fail:
                raise RuntimeError(f"job {i} failed")
            return i

        return run

    assert run_jobs([job(i, wait=0.05 * (5 - i)) for i in range(5)], 2) == [0, 1, 2, 3, 4]
    started.clear()
    with pytest.raises(RuntimeError, match="job 0 failed"):
        run_jobs([job(0, fail=True), job(1, wait=0.3), job(2), job(3)], 2)
    assert sorted(started) == [0, 1]  # job 1 was running beside it and ended; 2 and 3 never started


def test_ablation_with_two_seeds_summarizes_and_pairs_every_figure(tmp_path):
    """launcher/ablate.py --seeds 2 on the built-in world: each arm pretrained twice (seed 1 in
    <arm>_s1), every figure as mean ± sd [95% interval] of the two eval.json, and each paired t-test
    against the first arm, all recomputed here."""
    out = tmp_path / "abl"
    cmd = [
        sys.executable,
        "launcher/ablate.py",
        "--corpus",
        "world",
        "--arms",
        "none",
        "fusion",
        "--seeds",
        "2",
        "--jobs",
        "2",
    ]
    cmd += ["--output_dir", str(out), "--seq_len", "32", "--max_facts", "4", "--train.max_steps=3"]
    cmd += ["--train.save_every=0", "--train.eval_every=0", *TINY_MODEL]
    run = _run(cmd)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    from experiments.ablation import figures_of

    text = (out / "ablation.txt").read_text()
    lines = text.splitlines()
    rows = {
        x.split(" | ")[0].strip(): [c.strip() for c in x.split(" | ")[1:]] for x in lines[2:] if " | " in x
    }
    res = {
        arm: [json.loads((out / f"{arm}{s}" / "eval.json").read_text()) for s in ("", "_s1")]
        for arm in ("none", "fusion")
    }
    assert json.loads((out / "fusion_s1" / "config.json").read_text())["run"]["train"]["seed"] == 1
    assert rows["seeds"] == ["2", "2"]
    figures = {arm: [figures_of(r) for r in rs] for arm, rs in res.items()}
    assert (
        "probe heldout (text) MRR" in figures["none"][0]
        and "probe heldout (random) MRR" in figures["none"][0]
    )
    for k, arm in enumerate(("none", "fusion")):
        for key in figures[arm][0]:
            assert rows[key][k] == str(stats.summary([f[key] for f in figures[arm]])), key
    key = "probe heldout (text) MRR"
    want = stats.paired_t([f[key] for f in figures["fusion"]], [f[key] for f in figures["none"]])
    assert rows[f"{key}: vs none"] == ["-", str(want)]
    assert "probe heldout (random) MRR: vs none" not in rows  # the same for every arm: nothing to test
    assert f"fusion - none, {key}: {want} (paired t over 2 seeds): " in text

    # --reuse: nothing is trained or evaluated again where the same evaluation of the same checkpoint is
    # there; another evaluation option evaluates again
    again = _run([*cmd, "--reuse"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("reusing its evaluation") == 4 and "pretraining into" not in again.stdout
    assert (out / "ablation.txt").read_text() == text
    other = _run([*[c if c != "4" else "3" for c in cmd], "--reuse", "--arms", "none"])
    assert other.returncode == 0 and other.stdout.count("ablation: arm none: evaluating") == 2
