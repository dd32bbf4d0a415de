"""Several nodes on one machine: one DeepSpeed launcher per "node" with --no_ssh (as on a cluster
without ssh, or under Slurm), one rank each, against a single-node run of the same world size;
a rank that dies stops the other node promptly; the Slurm template starts one launcher per node."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    TINY_MODEL,
    Run,
    deepspeed_cmd,
    free_port,
    launch_env,
    leaked_shm_buffers,
    master_port_of,
    pretrain,
    write_ds_config,
)

from sparsexpert.distributed.comm import Heartbeats, describe_failure
from sparsexpert.weights.checkpoint import find_latest

STEPS = 4
LOSS_KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm")


def _overrides(example_data: Path, *extra: str) -> list[str]:
    return [
        *TINY_MODEL,
        "--model.moe.ep_size=2",
        f"--data.path={example_data}",
        f"--train.max_steps={STEPS}",
        "--train.log_every=1",
        "--train.save_every=0",
        "--train.eval_every=0",
        *extra,
    ]


def _pretrain_args(ds: Path, out: Path, args: list[str]) -> list[str]:
    return ["launcher/pretrain.py", "--ds_config", str(ds), "--output_dir", str(out), *args]


def start_nodes(tmp: Path, script_args: list[str], env: dict, nnodes: int = 2):
    """`deepspeed --no_ssh --node_rank=i <script> <args>` once per node, as each node of a cluster
    would run it; returns the launcher processes (each in its own process group), their logs and the port."""
    hostfile = tmp / "hostfile"
    hostfile.write_text("".join(f"node{i} slots=1\n" for i in range(nnodes)))
    port = free_port()
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    procs, logs = [], []
    for i in range(nnodes):
        cmd = [
            launcher,
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            f"--node_rank={i}",
            f"--num_nodes={nnodes}",
            "--num_gpus=1",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            *script_args,
        ]
        log = tmp / f"node{i}.log"
        with open(log, "w") as f:
            procs.append(
                subprocess.Popen(
                    cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        logs.append(log)
    return procs, logs, port


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[float]:
    """Wait for every launcher; returns when each exited (time.monotonic). Kills all on timeout."""
    deadline, ended = time.monotonic() + timeout, {}
    while len(ended) < len(procs) and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.monotonic()
        time.sleep(0.05)
    if len(ended) < len(procs):
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
        raise AssertionError(f"launchers still running after {timeout}s\n{tails}")
    return [ended[i] for i in range(len(procs))]


def wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> float:
    """When (time.time) `text` appeared in the log, or the launcher ended, or the timeout."""
    deadline = time.time() + timeout
    while proc.poll() is None and text not in log.read_text() and time.time() < deadline:
        time.sleep(0.1)
    return time.time()


def assert_group_gone(proc: subprocess.Popen) -> None:
    """Nothing of a launcher's process group (its ranks included) is still running."""
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def test_two_nodes_without_ssh_match_one_node(tmp_path, example_data):
    ds = write_ds_config(tmp_path / "ds.json", "moe_z2.json", train_micro_batch_size_per_gpu=4)
    one_node = pretrain(tmp_path / "one", 2, ds, *_overrides(example_data))

    out = tmp_path / "two"
    procs, logs, port = start_nodes(tmp_path, _pretrain_args(ds, out, _overrides(example_data)), launch_env())
    wait_all(procs, logs, timeout=240)
    output = "\n".join(log.read_text() for log in logs)
    assert [p.returncode for p in procs] == [0, 0], output[-6000:]
    for p in procs:
        assert_group_gone(p)
    assert not leaked_shm_buffers(port)
    assert "world 2, ep 2, ZeRO-2" in output

    two_nodes = Run(0, output, out)
    got, ref = two_nodes.metrics(), one_node.metrics()
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(got, ref):
        for key in LOSS_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key, a[key], b[key])
    # both nodes wrote their ranks' parts of one checkpoint into the shared output folder
    tag_two, tag_one = find_latest(out / "checkpoints"), find_latest(tmp_path / "one" / "checkpoints")
    assert tag_two is not None and tag_two.name == tag_one.name
    assert sorted(f.name for f in tag_two.iterdir()) == sorted(f.name for f in tag_one.iterdir())


@pytest.mark.parametrize(
    "fault, verdict",
    [
        ("1:2", "rank 1 stopped responding (process exited or hangs)"),
        ("1:2:raise", "rank 1 raised RuntimeError: injected failure (SPARSEXPERT_FAIL_AT)"),
    ],
    ids=["dies", "raises"],
)
def test_a_failed_rank_stops_the_other_node_naming_it(tmp_path, example_data, fault, verdict):
    """Rank 1 (node 1) fails at the start of step 2 while rank 0 (node 0) goes on into its next
    collective: either rank 1's process dies (rank 0's collective errors), or rank 1 raises and
    stays alive (rank 0's collective waits; its watch thread stops it)."""
    ds = write_ds_config(tmp_path / "ds.json", "moe_z2.json", train_micro_batch_size_per_gpu=4)
    env = {**launch_env(), "SPARSEXPERT_FAIL_AT": fault}
    args = _overrides(example_data, "--train.collective_timeout_minutes=0.5")
    procs, logs, port = start_nodes(tmp_path, _pretrain_args(ds, tmp_path / "out", args), env)
    ended = wait_all(procs, logs, timeout=180)
    node0 = logs[0].read_text()

    assert procs[1].returncode != 0 and procs[0].returncode != 0, node0[-4000:]
    # the launchers end within seconds of each other, not at the collective timeout (30 s)
    assert abs(ended[0] - ended[1]) < 20, (ended[0] - ended[1], node0[-4000:])
    assert f"training failed: {verdict}; rank 0 stops at step 2 with exit status 1" in node0, node0[-4000:]
    if fault.endswith("raise"):
        node1 = logs[1].read_text()
        assert f"training failed: {verdict}; rank 1 stops at step 2" in node1, node1[-4000:]
    assert [r["step"] for r in Run(1, node0, tmp_path / "out").metrics()] == [1]
    for p in procs:
        assert_group_gone(p)
    assert not leaked_shm_buffers(port)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, example_data) -> Path:
    """A 2-step pretraining run (one process) whose checkpoint the fine-tuning and evaluation
    failure tests start from; its collective timeout (which evaluation takes over) is 30 s."""
    out = tmp_path_factory.mktemp("small") / "run"
    ds = write_ds_config(out.parent / "ds.json", "moe_z2.json", train_micro_batch_size_per_gpu=4)
    pretrain(
        out,
        1,
        ds,
        *_overrides(example_data, "--train.collective_timeout_minutes=0.5", "--model.moe.ep_size=1"),
    )
    return out


@pytest.mark.parametrize("job", ["fine-tuning", "evaluation"])
def test_fine_tuning_and_evaluation_stop_every_node_when_a_rank_dies(tmp_path, small_run, shared_data, job):
    """The harness's watch around the other loops: rank 1 (node 1) dies at the start of its second
    step (fine-tuning) or evaluation batch, while rank 0 (node 0) goes on into a collective. Both
    launchers end within seconds of each other, not at the collective timeout (30 s), with the
    line naming rank 1."""
    if job == "fine-tuning":
        ner = shared_data / "ner" / "wnut16"
        train = tmp_path / "train.conll"
        train.write_text("\n\n".join(ner.joinpath("train.conll").read_text().split("\n\n")[:64]) + "\n")
        ds = write_ds_config(tmp_path / "ds.json", "moe_z2.json", train_micro_batch_size_per_gpu=4)
        script = ["launcher/finetune.py", "--ds_config", str(ds), "--output_dir", str(tmp_path / "out")]
        script += ["--init", str(small_run), "--task", "ner", "--train", str(train), "--dev", str(train)]
        script += ["--train.max_steps=6", "--train.log_every=1", "--train.collective_timeout_minutes=0.5"]
    else:
        script = ["launcher/evaluate.py", "--run", str(small_run)]
    env = {**launch_env(), "SPARSEXPERT_FAIL_AT": "1:2"}
    procs, logs, port = start_nodes(tmp_path, script, env)
    ended = wait_all(procs, logs, timeout=180)
    node0 = logs[0].read_text()
    assert procs[1].returncode != 0 and procs[0].returncode != 0, node0[-4000:]
    assert abs(ended[0] - ended[1]) < 20, (ended[0] - ended[1], node0[-4000:])
    verdict = f"{job} failed: rank 1 stopped responding (process exited or hangs); rank 0 stops at step 2"
    assert verdict in node0, node0[-4000:]
    for p in procs:
        assert_group_gone(p)
    assert not leaked_shm_buffers(port)


def test_a_hung_rank_is_named_within_seconds(tmp_path, example_data):
    """Rank 1 stops (SIGSTOP) at the start of step 2: alive, its sockets open, silent, so rank 0's
    next collective waits (as under NCCL) instead of raising. Rank 0's watch sees rank 1's
    heartbeats stop and names it long before the collective timeout (30 s)."""
    ds = write_ds_config(tmp_path / "ds.json", "moe_z2.json", train_micro_batch_size_per_gpu=4)
    out = tmp_path / "out"
    args = _overrides(example_data, "--train.collective_timeout_minutes=0.5")
    cmd = deepspeed_cmd(2, "launcher/pretrain.py", "--ds_config", str(ds), "--output_dir", str(out), *args)
    verdict = "training failed: rank 1 stopped responding (process exited or hangs); rank 0 stops at step 2"
    log = tmp_path / "launcher.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**launch_env(), "SPARSEXPERT_FAIL_AT": "1:2:hang"},
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    named = wait_for_line(proc, log, verdict, timeout=120)
    # rank 0 has left; the launcher's SIGTERM stays pending on the stopped rank 1 (it would SIGKILL
    # it 30 s later): once sent, let it through
    wait_for_line(proc, log, "Killing subprocess", timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGCONT)
    wait_all([proc], [log], timeout=30)
    output = log.read_text()

    assert proc.returncode != 0, output[-4000:]
    assert f"{verdict} with exit status 1" in output, output[-4000:]
    assert [r["step"] for r in Run(1, output, out).metrics()] == [1]
    # rank 1 stopped right after rank 0 logged step 1 (metrics.jsonl is line-buffered)
    assert named - (out / "metrics.jsonl").stat().st_mtime < 20, output[-4000:]
    assert_group_gone(proc)
    assert not leaked_shm_buffers(master_port_of(cmd))


def test_failure_verdict_names_the_root_cause():
    comm = {"comm": True, "what": "DistBackendError: Connection closed by peer"}
    assert describe_failure([3], {0: comm}) == "rank 3 stopped responding (process exited or hangs)"
    assert describe_failure([], {0: comm, 2: {"comm": False, "what": "ValueError: bad batch"}, 1: comm}) == (
        "rank 2 raised ValueError: bad batch"
    )
    assert describe_failure([], {1: comm, 0: comm}) == (
        "a collective failed on ranks 0, 1 (DistBackendError: Connection closed by peer)"
    )
    assert describe_failure([1, 2], {}) == "ranks 1, 2 stopped responding (process exited or hangs)"


def test_heartbeats_name_the_ranks_that_stopped_beating():
    """Rank 0 reads the counters once a second (none from t=70 to 90: its thread was held up);
    dead: no move for 10 s, or no first beat within 60 s; a rank that finished is never dead."""
    finished = Heartbeats.FINISHED
    counters = {
        1: lambda t: t + 1,  # beats throughout
        2: lambda t: min(t, 5) + 1,  # last beat at t=5
        3: lambda t: max(t - 29, 0),  # first beat at t=30
        4: lambda t: 0,  # never beats
        5: lambda t: t + 1 if t <= 3 else 4 + finished,  # leaves its watch normally at t=4
    }
    beats = Heartbeats(list(counters), now=0.0, dead_s=10, start_s=60)
    first_dead: dict[int, int] = {}
    for t in [*range(70), *range(90, 100)]:
        for r in beats.update({r: c(t) for r, c in counters.items()}, now=float(t)):
            first_dead.setdefault(r, t)
    assert first_dead == {2: 16, 4: 61}


FAKE_SLURM = {
    # the allocation's hosts, in Slurm's order
    "scontrol": "echo gpu-a01; echo gpu-a02; echo gpu-b07\n",
    # one task per node, as srun would start them (sequentially here), each with its SLURM_NODEID
    "srun": 'while [[ $1 == --* ]]; do shift; done\nfor i in 0 1 2; do SLURM_NODEID=$i "$@" || exit; done\n',
    # records what each node's launcher was asked to do, with the hostfile it was given
    "deepspeed": 'echo "node $SLURM_NODEID: $*"; cat "$2"\n',
}


def test_slurm_template_starts_one_launcher_per_node(tmp_path):
    for name, body in FAKE_SLURM.items():
        (tmp_path / name).write_text("#!/bin/bash\n" + body)
        (tmp_path / name).chmod(0o755)
    env = {
        **launch_env(),
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-a[01-02],gpu-b07",
        "SLURM_NNODES": "3",
        "SLURM_GPUS_ON_NODE": "8",
        "TMPDIR": str(tmp_path),
    }
    args = ["--ds_config", "ds_configs/moe_z2_bf16.json", "--output_dir", "/shared/runs/a b"]
    res = subprocess.run(
        ["bash", "launcher/slurm/pretrain.sbatch", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    hosts = "gpu-a01 slots=8\ngpu-a02 slots=8\ngpu-b07 slots=8\n"
    hostfile = tmp_path / "sparsexpert-4242.hostfile"
    for i in range(3):
        expect = (
            f"node {i}: --hostfile {hostfile} --no_ssh --node_rank={i} --num_nodes=3 --num_gpus=8 "
            "--master_addr=gpu-a01 --master_port=29742 launcher/pretrain.py "
            "--ds_config ds_configs/moe_z2_bf16.json --output_dir /shared/runs/a b\n" + hosts
        )
        assert expect in res.stdout, res.stdout

    del env["SLURM_GPUS_ON_NODE"]
    res = subprocess.run(
        ["bash", "launcher/slurm/pretrain.sbatch", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert res.returncode == 2 and "set NUM_GPUS" in res.stderr
