"""The architecture as the imports show it (read with `ast`, function-level imports included, since a
deferred import still couples two layers): no cycle between sparsexpert's parts (its sub-packages and
top-level modules), and the model is plain PyTorch (neither DeepSpeed nor training code)."""

from __future__ import annotations

import ast
from collections import defaultdict

from conftest import REPO

PACKAGE = REPO / "sparsexpert"


def unit_of(module: str) -> str | None:
    """The part of sparsexpert a dotted module name belongs to (`sparsexpert.model.moe` -> "model",
    `sparsexpert.harness` -> "harness"); "deepspeed", "experiments" and "launcher" for those; None for
    anything else."""
    parts = module.split(".")
    if parts[0] in ("deepspeed", "experiments", "launcher"):
        return parts[0]
    if parts[0] != "sparsexpert" or len(parts) < 2:
        return None
    return parts[1]


def import_graph() -> dict[str, set[str]]:
    """{part: the parts (and "deepspeed") it imports}, over every file of sparsexpert/."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        unit = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if unit == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from sparsexpert import comm` imports the part `comm`
                names = (
                    [f"{node.module}.{a.name}" for a in node.names]
                    if node.module == "sparsexpert"
                    else [node.module]
                )
            for name in names:
                target = unit_of(name)
                if target is not None and target != unit:
                    graph[unit].add(target)
        graph.setdefault(unit, set())
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once, from its smallest name)."""
    found: set[tuple[str, ...]] = set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cyc = path[path.index(nxt) :]
                i = cyc.index(min(cyc))
                found.add(tuple(cyc[i:] + cyc[:i]))
            elif nxt in graph:
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    return [list(c) for c in sorted(found)]


def test_the_parts_of_sparsexpert_import_each_other_without_a_cycle():
    graph = import_graph()
    assert {"model", "knowledge", "data", "train", "finetune", "weights", "harness", "distributed"} <= set(
        graph
    )
    assert cycles(graph) == [], "\n".join(" -> ".join(c + c[:1]) for c in cycles(graph))


def test_the_library_does_not_reach_up_to_experiments_or_launchers():
    """experiments/ (ablation, comparison) start the launchers; the library imports neither."""
    graph = import_graph()
    assert not any({"experiments", "launcher"} & targets for targets in graph.values()), graph


def test_deepspeed_is_used_in_the_distributed_package_and_for_checkpoints_only():
    """DeepSpeed-facing code lives in sparsexpert/distributed/, and in weights/deepspeed_formats.py,
    which reads DeepSpeed's checkpoint formats inside our tags (its universal conversion, the classes its
    files hold, the engine's loading). That module is built on our tag format, which uses distributed's
    collectives: in distributed/ it would make the two packages import each other."""
    graph = import_graph()
    users = sorted(part for part, targets in graph.items() if "deepspeed" in targets)
    assert users == ["distributed", "weights"], users
    files = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] != "distributed"
        and any(
            (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "deepspeed" for a in n.names))
            or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "deepspeed")
            for n in ast.walk(ast.parse(path.read_text()))
        )
    )
    assert files == ["weights/deepspeed_formats.py"], files


def test_the_model_is_plain_pytorch():
    graph = import_graph()
    for part in ("model", "knowledge"):
        assert graph[part] <= {"config", "model", "knowledge"}, (part, graph[part])


def test_the_checks_find_what_they_look_for():
    """The cycle search on a graph with cycles, and the parts of module names."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert unit_of("sparsexpert.model.moe") == "model" and unit_of("deepspeed.comm") == "deepspeed"
    assert unit_of("torch.nn") is None


def test_data_prep_does_not_import_torch():
    """data_prep's processes (the main one and every worker) start without torch: a second of start-up
    and ~150 MB each, for a library they do not use."""
    import subprocess
    import sys

    code = "import sys, data_prep.__main__, data_prep.join, data_prep.kg_index; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"
