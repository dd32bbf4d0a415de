"""Device-correct by construction: the source rules a GPU run depends on, the placement check that
the whole suite runs under (tests/conftest.py sets SPARSEXPERT_CHECK_DEVICE=1), and the harness's
device-side pieces (weights in, sums, prefetching) against plain references."""

from __future__ import annotations

import ast
import dataclasses
import shutil
import threading

import pytest
import torch
import torch.nn as nn
from conftest import REPO, TINY_MODEL, deepspeed_cmd, run_cmd

from sparsexpert.distributed import comm
from sparsexpert.distributed.device import DevicePlacementError, check_mode, guard, to_device
from sparsexpert.harness import DeviceSums, MicroOut, Prefetcher, load_state
from sparsexpert.knowledge.modules import KnowledgeBatch

CPU = torch.device("cpu")

# ---------------------------------------------------------------- the source rules

COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "irecv",
    "isend",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
}
DIST_MODULES = {"torch.distributed", "deepspeed.comm"}
COMM_MODULE = "sparsexpert/distributed/comm.py"


def violations(source: str, path: str) -> list[str]:
    """Where `source` breaks a rule that only a GPU run would otherwise reveal: a torch.distributed
    collective outside sparsexpert/distributed/comm.py (NCCL takes CUDA tensors only; ours go through one
    checked function), `.numpy()` on a tensor not first moved with `.cpu()`, `torch.load` without
    `map_location` (a CUDA tensor saved on one GPU would load onto that GPU of another host) or without
    `weights_only=True` (a file from elsewhere could run code when unpickled)."""
    tree = ast.parse(source)
    dist_names: set[str] = set()  # local names of torch.distributed / deepspeed.comm
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES and a.asname:
                    dist_names.add(a.asname)
        elif isinstance(node, ast.ImportFrom):
            if node.module in DIST_MODULES:
                for a in node.names:
                    if a.name in COLLECTIVES and path != COMM_MODULE:
                        found.append(f"{path}:{node.lineno}: imports the collective {a.name}")
            elif node.module in ("torch", "deepspeed"):
                for a in node.names:
                    if a.name in ("distributed", "comm"):
                        dist_names.add(a.asname or a.name)

    def dotted(expr: ast.expr) -> str:
        parts = []
        while isinstance(expr, ast.Attribute):
            parts.append(expr.attr)
            expr = expr.value
        if isinstance(expr, ast.Name):
            parts.append(expr.id)
        return ".".join(reversed(parts))

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        func, name = node.func, node.func.attr
        owner = dotted(func.value)
        if name in COLLECTIVES and (owner in dist_names or owner in DIST_MODULES) and path != COMM_MODULE:
            found.append(f"{path}:{node.lineno}: {owner}.{name} outside {COMM_MODULE}")
        if name == "numpy" and not node.args:
            receiver = func.value
            moved = (
                isinstance(receiver, ast.Call)
                and isinstance(receiver.func, ast.Attribute)
                and receiver.func.attr == "cpu"
            )
            if not moved and owner not in ("np", "numpy"):
                found.append(f"{path}:{node.lineno}: .numpy() without .cpu()")
        if dotted(func) == "torch.load":
            if not any(k.arg == "map_location" for k in node.keywords):
                found.append(f"{path}:{node.lineno}: torch.load without map_location")
            safe = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            if not safe:
                found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
    return found


def test_the_source_keeps_collectives_numpy_and_loads_device_safe():
    files = sorted(
        p
        for d in ("sparsexpert", "launcher", "data_prep", "bench", "experiments")
        for p in (REPO / d).rglob("*.py")
    )
    assert len(files) > 40
    found = []
    for f in files:
        found += violations(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "source, rule",
    [
        ("import torch.distributed as dist\ndist.all_reduce(t)", "outside sparsexpert/distributed/comm.py"),
        ("import torch\ntorch.distributed.barrier()", "outside sparsexpert/distributed/comm.py"),
        ("from torch import distributed\ndistributed.all_gather_object(o, x)", "outside"),
        ("import deepspeed.comm as dist\ndist.all_to_all_single(a, b)", "outside"),
        ("from torch.distributed import all_reduce", "imports the collective"),
        ("x = logits.argmax(-1).numpy()", ".numpy() without .cpu()"),
        ("import torch\nsd = torch.load(path, weights_only=True)", "without map_location"),
        ("import torch\nsd = torch.load(path, map_location='cpu')", "without weights_only=True"),
        (
            "import torch\nsd = torch.load(path, map_location='cpu', weights_only=False)",
            "without weights_only=True",
        ),
    ],
)
def test_the_source_rules_catch_each_mistake(source, rule):
    found = violations(source, "sparsexpert/x.py")
    assert len(found) == 1 and rule in found[0], found
    ok = "y = t.cpu().numpy()\nimport torch\nsd = torch.load(p, map_location='cpu', weights_only=True)\nz = np.asarray(a)"
    assert violations(ok, "sparsexpert/x.py") == []
    assert violations("import torch.distributed as dist\ndist.all_reduce(t)", COMM_MODULE) == []


# ---------------------------------------------------------------- the placement check


def test_the_suite_runs_in_check_mode():
    assert check_mode(), "tests/conftest.py must set SPARSEXPERT_CHECK_DEVICE=1"


def _kb() -> KnowledgeBatch:
    z = torch.zeros(0, dtype=torch.long)
    return KnowledgeBatch(torch.full((2, 3), -1), z, z, z, z, z.view(0, 3), z.view(0, 0, 3))


class Echo(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, input_ids, knowledge=None):
        return input_ids.float() * self.w


def test_a_guarded_model_refuses_inputs_that_skipped_to_device():
    model = guard(Echo(), "model")
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "knowledge": _kb()}
    with pytest.raises(DevicePlacementError, match=r"model input\['kwargs'\]\['input_ids'\]"):
        model(**batch)
    placed = to_device(batch, CPU)
    model(**placed)  # every tensor marked, the dataclass rebuilt with its fields placed
    assert dataclasses.is_dataclass(placed["knowledge"]) and placed["knowledge"].entity_ids.shape == (2, 3)
    placed["knowledge"] = dataclasses.replace(
        placed["knowledge"], triples=torch.zeros(0, 3, dtype=torch.long)
    )
    with pytest.raises(DevicePlacementError, match=r"\['knowledge'\]\.triples"):
        model(**placed)  # a field built after the move: named
    derived = placed["input_ids"] + 1  # computed from placed tensors: must be placed again (a no-op move)
    with pytest.raises(DevicePlacementError):
        model(derived)
    model(to_device(derived, CPU))


def test_collectives_refuse_unplaced_buffers():
    with pytest.raises(DevicePlacementError, match="all_reduce buffer"):
        comm.all_reduce(torch.zeros(3))
    t = to_device(torch.ones(3), CPU)
    assert comm.all_reduce(t) is t  # no process group here: returned as it is


def test_to_device_keeps_structure_and_non_tensors():
    batch = (3, {"a": [torch.ones(1), "x"], "b": None}, (torch.zeros(2),))
    out = to_device(batch, CPU)
    assert out[0] == 3 and out[1]["a"][1] == "x" and out[1]["b"] is None
    assert isinstance(out[2], tuple) and torch.equal(out[2][0], torch.zeros(2))


# ---------------------------------------------------------------- harness pieces


class Two(nn.Module):
    def __init__(self, heads: int = 2):
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.knowledge = nn.Embedding(heads, 2)
        self.heads = nn.Linear(3, heads)


def test_load_state_filters_keys_one_way():
    src = Two(4).state_dict()
    dst = Two(2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    # knowledge loads only where the shape fits (4 rows vs 2: fresh); heads are skipped and fresh
    load_state(
        dst, src, "src", skip=("heads.",), fresh=("heads.", "knowledge."), if_same_shape=("knowledge.",)
    )
    assert torch.equal(dst.body.weight, src["body.weight"])
    assert torch.equal(dst.knowledge.weight, before["knowledge.weight"])
    assert torch.equal(dst.heads.weight, before["heads.weight"])
    load_state(Two(4), src, "src")  # exact: every key both ways
    with pytest.raises(ValueError, match=r"src: weights do not fit the model: missing \['heads.weight'"):
        load_state(
            Two(2), {k: v for k, v in Two(2).state_dict().items() if not k.startswith("heads.")}, "src"
        )
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        load_state(Two(2), {**Two(2).state_dict(), "extra": torch.zeros(1)}, "src")


def test_device_sums_average_each_scalar_over_its_own_micro_batches():
    sums = DeviceSums(CPU)
    sums.add(MicroOut(torch.tensor(0.0), {"loss": torch.tensor(2.0), "a/loss": torch.tensor(1.0)}, None, 10))
    counts = torch.tensor([[1, 2], [3, 4]])
    sums.add(MicroOut(torch.tensor(0.0), {"loss": torch.tensor(4.0)}, {"expert_counts": counts}, 6))
    sums.add(MicroOut(torch.tensor(0.0), {"loss": torch.tensor(6.0)}, {"expert_counts": counts}, 6))
    r = sums.reduce({"grad_norm": torch.tensor(1.5), "absent": None})
    assert r["loss"] == 4.0 and r["a/loss"] == 1.0 and r["tokens"] == 22 and r["grad_norm"] == 1.5
    assert r["expert_counts"].tolist() == [[2.0, 4.0], [6.0, 8.0]] and "absent" not in r
    assert sums.reduce() == {"tokens": 0.0}  # emptied for the next interval


def _make(step: int, m: int) -> dict:
    g = torch.Generator().manual_seed(step * 10 + m)
    return {"x": torch.randint(0, 100, (2, 4), generator=g), "step": step, "m": m}


def test_prefetching_gives_the_batches_the_loop_would_build():
    """Any start step, the same batches in the same order as calling make(step, m) in the loop."""
    for start in (0, 5):
        pre = Prefetcher(_make, start, start + 6, grad_accum=3, device=CPU)
        for step in range(start, start + 6):
            for m in range(3):
                got, want = pre.get(step, m), _make(step, m)
                assert (got["step"], got["m"]) == (step, m) and torch.equal(got["x"], want["x"])
        pre.close()
    main = threading.get_ident()
    threads = []

    def failing(step: int, m: int):
        threads.append(threading.get_ident())
        if step == 2:
            raise ValueError("bad row in shard 3")
        return _make(step, m)

    pre = Prefetcher(failing, 0, 10, grad_accum=1, device=CPU)
    pre.get(0, 0), pre.get(1, 0)
    with pytest.raises(ValueError, match="bad row in shard 3"):  # the loop raises what the builder raised
        pre.get(2, 0)
    pre.close()
    assert main not in threads  # built off the loop's thread
    early = Prefetcher(_make, 0, 10**9, grad_accum=2, device=CPU)  # an early stop: close() ends the thread
    early.get(0, 0)
    early.close()
    assert not early._thread.is_alive()


def test_prefetched_batches_are_placed():
    pre = Prefetcher(_make, 0, 1, grad_accum=1, device=CPU)
    guard(Echo(), "model")(pre.get(0, 0)["x"])  # marked by the background thread's to_device
    pre.close()


def test_the_check_fails_when_a_move_is_removed(tmp_path, example_data):
    """On a real path: in a copy of the code whose pretraining validation loop no longer moves its
    batches (one `h.to_device` call removed), the run stops at the first validation forward, naming
    the input, instead of passing on the CPU and failing on the first GPU step."""
    copy = tmp_path / "repo"
    for d in ("sparsexpert", "data_prep", "launcher"):
        shutil.copytree(REPO / d, copy / d, ignore=shutil.ignore_patterns("__pycache__"))
    trainer = copy / "sparsexpert" / "train" / "trainer.py"
    moved = "out = self.engine(**self.h.to_device(self.valid_loader.batch(i, 0)))"
    src = trainer.read_text()
    assert moved in src
    trainer.write_text(src.replace(moved, "out = self.engine(**self.valid_loader.batch(i, 0))"))
    cmd = deepspeed_cmd(
        1,
        str(copy / "launcher" / "pretrain.py"),
        "--ds_config",
        str(REPO / "ds_configs" / "moe_z2.json"),
        "--output_dir",
        str(tmp_path / "out"),
        *TINY_MODEL,
        f"--data.path={example_data}",
        "--train.max_steps=1",
        "--train.eval_every=1",
    )
    run = run_cmd(cmd, tmp_path / "out", check=False)
    assert run.returncode != 0
    assert "DevicePlacementError: model input['kwargs']['input_ids'] (not passed through" in run.output
