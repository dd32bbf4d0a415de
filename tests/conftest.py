"""Shared fixtures: a debug-size model, the example dataset prepared once, and a launcher helper
that starts real processes (the `deepspeed` launcher, gloo on CPU) with a timeout and a free port."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPARSEXPERT_SHARED_DATA", REPO.parent / "shared" / "data"))

# The suite runs on the CPU, also on a GPU host (bench/gpu_smoke.sh runs it there): DeepSpeed's CPU
# accelerator with gloo, no CUDA device visible. In device check mode every tensor reaching a model
# or a collective must have passed through sparsexpert.distributed.device.to_device (see that module), which a
# CPU run cannot otherwise tell from a batch left on the host. Launched processes inherit both.
os.environ["DS_ACCELERATOR"] = "cpu"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["SPARSEXPERT_CHECK_DEVICE"] = "1"

# Small enough that one launch spends its time in start-up, not in training.
TINY_MODEL = [
    "--model.d_model=64",
    "--model.n_layers=2",
    "--model.n_heads=4",
    "--model.d_ff=128",
    "--model.max_seq_len=64",
    "--model.moe.num_experts=4",
    "--model.moe.top_k=2",
]


SLOWEST_FIRST = ("test_readme.py", "test_gpu_smoke.py", "test_launchers.py")
"""The files that take longest (about 5, 2.5 and 1.5 minutes on 2 cores), collected first."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The README's test command runs the suite on 2 workers (pytest-xdist `-n 2`; pyproject's addopts
    add `--dist loadfile`: each file on one worker, so module fixtures are built once, and
    `--no-loadscope-reorder`: the files in collection order, not by their number of tests): the
    longest go first, so that neither is left running alone at the end."""
    first = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAULTS = REPO / "tests" / "faults"
"""On PYTHONPATH of every launched process: with SPARSEXPERT_FAIL_AT set, it injects a failure."""


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULTS), env.get("PYTHONPATH")]))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@dataclass
class Run:
    returncode: int
    output: str
    output_dir: Path

    def metrics(self) -> list[dict]:
        path = self.output_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def losses(self, key: str = "loss") -> dict[int, float]:
        return {r["step"]: r[key] for r in self.metrics() if key in r}


def leaked_shm_buffers(port: int) -> list[Path]:
    """DeepSpeed's CPU all-reduce buffers left in /dev/shm by a job on `port` (there must be none)."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def run_cmd(
    cmd: list[str], output_dir: Path, timeout: float = 300, check: bool = True, env: dict | None = None
) -> Run:
    """Run a command in its own process group; kill the whole group on timeout. A `deepspeed`
    launch must leave no shared-memory buffers behind. env: added to launch_env()."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**launch_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}") from None
    run = Run(proc.returncode, out, output_dir)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}")
    port = master_port_of(cmd)
    if port is not None:
        assert not leaked_shm_buffers(port), leaked_shm_buffers(port)
    return run


def kill_when(
    cmd: list[str], ready: Callable[[], bool], timeout: float = 240, env: dict | None = None
) -> None:
    """Start `cmd` in its own process group and SIGKILL the whole group as soon as `ready()` holds
    (or when it exits, or at the timeout): an interruption at a moment the caller chose."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env or launch_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def master_port_of(cmd: list[str]) -> int | None:
    if "--master_port" in cmd:
        return int(cmd[cmd.index("--master_port") + 1])
    found = [c for c in cmd if c.startswith("MASTER_PORT=")]
    return int(found[0].split("=", 1)[1]) if found else None


def deepspeed_cmd(nproc: int, script: str, *args: str) -> list[str]:
    """Several processes go through the `deepspeed` launcher. One process runs the script itself
    (a world of one, as `python launcher/pretrain.py` does): the same DeepSpeed engine, without the
    launcher's two extra Python processes, which cost about 8 s of start-up each time. The README
    commands and every multi-process test still run through the launcher."""
    if nproc == 1:
        return ["env", f"MASTER_PORT={free_port()}", sys.executable, script, *args]
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    return [launcher, "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]


def pretrain(
    tmp_dir: Path,
    nproc: int,
    ds_config: Path | str,
    *overrides: str,
    timeout: float = 300,
    check: bool = True,
    env: dict | None = None,
) -> Run:
    out = Path(tmp_dir)
    cmd = deepspeed_cmd(
        nproc, "launcher/pretrain.py", "--ds_config", str(ds_config), "--output_dir", str(out), *overrides
    )
    return run_cmd(cmd, out, timeout=timeout, check=check, env=env)


def world_relations(example_data: Path, out: Path) -> Path:
    """`data_prep relations` on the built-in world's raw files (beside the example dataset): the
    distant-supervision relation examples, out/train.jsonl and out/dev.jsonl."""
    raw = example_data.parent / f"{example_data.name}_raw"
    cmd = [sys.executable, "-m", "data_prep", "relations", "--corpus", str(raw / "corpus.txt")]
    cmd += ["--kg", str(raw / "kg.tsv"), "--aliases", str(raw / "aliases.tsv"), "--case", "exact"]
    run = subprocess.run(
        [*cmd, "--output", str(out)], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def finetune_briefly(out: Path, init: Path, task: str, train: Path, dev: Path) -> Run:
    """Two fine-tuning steps of `task` from `init` (one process, moe_z2.json), dev evaluated at the end:
    for the tests that only need a fine-tuning checkpoint to start from."""
    cmd = deepspeed_cmd(
        1,
        "launcher/finetune.py",
        "--ds_config",
        str(REPO / "ds_configs" / "moe_z2.json"),
        "--init",
        str(init),
        "--task",
        task,
        "--train",
        str(train),
        "--dev",
        str(dev),
        "--output_dir",
        str(out),
        "--train.max_steps=2",
        "--train.eval_every=2",
    )
    return run_cmd(cmd, out)


def write_ds_config(path: Path, base: str = "moe_z2.json", **changes) -> Path:
    """A copy of ds_configs/<base> with top-level keys replaced (e.g. gradient_clipping=0.0)."""
    cfg = json.loads((REPO / "ds_configs" / base).read_text())
    for key, value in changes.items():
        cfg[key] = value
    path.write_text(json.dumps(cfg))
    return path


def made_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(path)` once per test run. Under pytest-xdist (`-n 2`, the README's test command) every
    worker is a session of its own: the first to ask builds under a file lock in the run's shared
    temporary folder, the others wait and reuse what it built (nothing writes into it afterwards)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-of-<user>/pytest-N/, above each worker's popen-gw<i>/
    out, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session", autouse=True)
def _weights_cache(tmp_path_factory):
    """Shared extractor weights (sparsexpert/finetune/predict.py) go to a folder of this session, not to
    ~/.cache: the processes the tests start inherit SPARSEXPERT_CACHE."""
    old = os.environ.get("SPARSEXPERT_CACHE")
    os.environ["SPARSEXPERT_CACHE"] = str(tmp_path_factory.mktemp("sparsexpert_cache"))
    yield
    if old is None:
        os.environ.pop("SPARSEXPERT_CACHE", None)
    else:
        os.environ["SPARSEXPERT_CACHE"] = old


@pytest.fixture(scope="session")
def example_data(tmp_path_factory) -> Path:
    """The built-in example world prepared once, with short rows for fast tests."""
    from data_prep.pipeline import PrepConfig, prepare_example

    def build(out: Path) -> None:
        prepare_example(out / "data", PrepConfig(vocab_size=512, seq_len=32), log=lambda *_: None)

    return made_once(tmp_path_factory, "example", build) / "data"


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory, example_data) -> Path:
    """A 2-step pretraining run of TINY_MODEL on the example world (one process, ZeRO-2), made once for
    the tests that only start from it (`--init`, a teacher's backbone); none of them writes into it."""

    def build(out: Path) -> None:
        pretrain(
            out / "run",
            1,
            REPO / "ds_configs" / "moe_z2.json",
            *TINY_MODEL,
            f"--data.path={example_data}",
            "--train.max_steps=2",
            "--train.eval_every=0",
        )

    return made_once(tmp_path_factory, "pre", build) / "run"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(
            f"{SHARED_DATA}: the shared real data is missing; set SPARSEXPERT_SHARED_DATA"
        )
    return SHARED_DATA
