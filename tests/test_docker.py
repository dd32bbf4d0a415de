"""The Docker images, checked without a Docker engine (none on our machines): every pip pin inside
pyproject.toml's ranges, the torch pin equal to the README's, the CUDA base matching the torch
index, the DeepSpeed ops the shipped configs need compiled into the GPU image, every path the
images, the entry point, the compose file and docker/README.md name present and not excluded by
.dockerignore, and the entry point's commands (with stand-ins for deepspeed and python)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli below Python 3.11
    import tomli as tomllib

DOCKER = REPO / "docker"
GPU, CPU = DOCKER / "Dockerfile.gpu", DOCKER / "Dockerfile.cpu"
DOCKERFILES = [GPU, CPU]
ENTRYPOINT = DOCKER / "entrypoint.sh"
COMPOSE = DOCKER / "compose.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# pip options followed by a value (the value is not a requirement)
PIP_VALUE_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links"}
PIP_VALUE_OPTIONS |= {"-c", "--constraint", "-r", "--requirement", "-t", "--target"}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.endswith("\\"):
            pending += s[:-1] + " "
            continue
        word, _, rest = (pending + s).partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def arg_defaults(dockerfile: Path) -> dict[str, str]:
    args = {}
    for instr, rest in instructions(dockerfile):
        if instr == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name.strip()] = value.strip().strip("\"'")
    return args


@dataclass
class PipInstall:
    """One `pip install` command of a RUN instruction."""

    step: int  # index of its instruction in the Dockerfile
    env: dict[str, str]  # NAME=value words before `pip`
    options: list[str]
    pins: dict[str, Version] = field(default_factory=dict)
    unpinned: list[str] = field(default_factory=list)  # requirements without an exact ==
    project_extras: set[str] | None = None  # set when it installs the project (`.`, `-e ".[x]"`)

    def option(self, *names: str) -> str | None:
        for i, opt in enumerate(self.options):
            for name in names:
                if opt == name and i + 1 < len(self.options):
                    return self.options[i + 1]
                if opt.startswith(name + "="):
                    return opt.split("=", 1)[1]
        return None


def pip_installs(dockerfile: Path) -> list[PipInstall]:
    out = []
    for step, (instr, rest) in enumerate(instructions(dockerfile)):
        if instr != "RUN":
            continue
        words = shlex.split(rest)
        commands, current = [], []
        for w in words:
            if w in ("&&", "||", ";", "|"):
                commands.append(current)
                current = []
            else:
                current.append(w)
        commands.append(current)
        for cmd in commands:
            env = {}
            while cmd and re.fullmatch(r"[A-Za-z_]\w*=.*", cmd[0]):
                name, value = cmd.pop(0).split("=", 1)
                env[name] = value
            if cmd[:2] == ["python", "-m"]:
                cmd = cmd[2:]
            if cmd[:2] in (["pip", "install"], ["pip3", "install"]):
                out.append(parse_pip_args(step, env, cmd[2:]))
    return out


def parse_pip_args(step: int, env: dict[str, str], args: list[str]) -> PipInstall:
    pip = PipInstall(step, env, [])
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-e", "--editable"):
            a, i = args[i + 1], i + 1
        elif a.startswith("-"):
            pip.options.append(a)
            if a in PIP_VALUE_OPTIONS:
                pip.options.append(args[i + 1])
                i += 1
            i += 1
            continue
        project = re.fullmatch(r"\.(?:\[([\w,-]*)\])?", a)
        if project:
            pip.project_extras = set(filter(None, (project.group(1) or "").split(",")))
        else:
            req = Requirement(a)
            spec = list(req.specifier)
            name = canonicalize_name(req.name)
            if len(spec) == 1 and spec[0].operator == "==" and "*" not in spec[0].version:
                pip.pins[name] = Version(spec[0].version)
            else:
                pip.unpinned.append(a)
        i += 1
    return pip


def pyproject_ranges() -> dict[str, SpecifierSet]:
    """Each dependency's allowed versions: project, every extra, and the build backend."""
    reqs = list(PYPROJECT["project"]["dependencies"]) + list(PYPROJECT["build-system"]["requires"])
    for extra in PYPROJECT["project"].get("optional-dependencies", {}).values():
        reqs += extra
    ranges: dict[str, SpecifierSet] = {}
    for r in map(Requirement, reqs):
        name = canonicalize_name(r.name)
        ranges[name] = ranges.get(name, SpecifierSet()) & r.specifier
    return ranges


def pins(dockerfile: Path) -> dict[str, Version]:
    out: dict[str, Version] = {}
    for pip in pip_installs(dockerfile):
        out.update(pip.pins)
    return out


def readme_torch_pins() -> set[str]:
    return set(re.findall(r"pip install torch==([\w.+-]+)", (REPO / "README.md").read_text()))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pins_are_exact_and_inside_pyproject_ranges(dockerfile):
    ranges = pyproject_ranges()
    for pip in pip_installs(dockerfile):
        assert not pip.unpinned, (
            f"{dockerfile.name}: pin {pip.unpinned} with ==, so the image is reproducible"
        )
        for name, version in pip.pins.items():
            if name in ranges:
                assert ranges[name].contains(version, prereleases=True), (
                    f"{dockerfile.name} pins {name}=={version}, outside pyproject.toml's "
                    f"{name}{ranges[name]}: move the pin into the range"
                    + (" (with the README's and the other Dockerfile's)" if name == "torch" else "")
                )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_installs_the_project_with_every_dependency_pinned(dockerfile):
    installs = pip_installs(dockerfile)
    project = [p for p in installs if p.project_extras is not None]
    assert project, f"{dockerfile.name}: no `pip install -e .`: the image would lack sparsexpert itself"
    copy_steps = [
        i
        for i, (instr, rest) in enumerate(instructions(dockerfile))
        if instr == "COPY" and rest.split()[0] == "."
    ]
    assert copy_steps and copy_steps[0] < project[0].step, f"{dockerfile.name}: COPY . before installing it"
    # every direct dependency (and those of the extras it installs) pinned in an earlier layer,
    # so that installing the project pulls none of them at whatever version is newest
    wanted = list(PYPROJECT["project"]["dependencies"])
    for extra in project[0].project_extras:
        wanted += PYPROJECT["project"]["optional-dependencies"][extra]
    earlier = {n for p in installs if p.step < project[0].step for n in p.pins}
    missing = sorted({canonicalize_name(Requirement(r).name) for r in wanted} - earlier)
    assert not missing, f"{dockerfile.name}: pin {missing} (pyproject.toml dependencies) before the COPY"


def test_torch_pin_equals_the_readme():
    readme = readme_torch_pins()
    assert len(readme) == 1, f"README.md pins torch as {readme}: one version everywhere"
    for dockerfile in DOCKERFILES:
        assert str(pins(dockerfile).get("torch")) in readme, (
            f"{dockerfile.name} pins torch=={pins(dockerfile).get('torch')}, the README {readme}"
        )


@pytest.mark.parametrize("dockerfile, variant", [(GPU, "cu"), (CPU, "cpu")], ids=["gpu", "cpu"])
def test_torch_build_matches_the_base_image(dockerfile, variant):
    """The torch wheel comes from the index of the image's CUDA release (or the CPU one), and the
    build's own check of torch.__version__ names that same build."""
    (torch,) = [p for p in pip_installs(dockerfile) if "torch" in p.pins]
    index = torch.option("--index-url", "-i") or ""
    m = re.fullmatch(r"https://download\.pytorch\.org/whl/(cpu|cu\d+)/?", index)
    assert m and m.group(1).startswith(variant), f"{dockerfile.name}: torch from {index!r}"
    build = m.group(1)
    base = [rest for instr, rest in instructions(dockerfile) if instr == "FROM"][0]
    if variant == "cu":
        cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-[\w.-]*devel[\w.-]*", base)
        assert cuda, f"{dockerfile.name}: {base} is not an nvidia/cuda devel image (ops need nvcc)"
        assert build == f"cu{cuda.group(1)}{cuda.group(2)}", f"{base} with torch from the {build} index"
    else:
        assert "cuda" not in base, base
    checks = re.findall(r"torch\.__version__ == '([^']+)'", dockerfile.read_text())
    assert checks == [f"{torch.pins['torch']}+{build}"], f"{dockerfile.name}: build check {checks}"


def test_gpu_image_compiles_the_ops_the_configs_use():
    needed = set()
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        cfg = json.loads(path.read_text())
        zero = cfg.get("zero_optimization", {})
        optimizer = cfg.get("optimizer", {})
        if zero.get("offload_optimizer", {}).get("device") == "cpu":
            needed.add("DS_BUILD_CPU_ADAM")  # DeepSpeedCPUAdam
        elif optimizer.get("type", "").lower() in ("adam", "adamw"):
            if not optimizer.get("params", {}).get("torch_adam"):
                needed.add("DS_BUILD_FUSED_ADAM")
    (ds,) = [p for p in pip_installs(GPU) if "deepspeed" in p.pins]
    args = arg_defaults(GPU)
    env = {k: args.get(v[1:], v) if v.startswith("$") else v for k, v in ds.env.items()}
    built = {k for k, v in env.items() if k.startswith("DS_BUILD_") and v == "1"}
    assert needed <= built, f"the configs need {sorted(needed)} prebuilt, Dockerfile.gpu builds {built}"
    assert env.get("DS_ACCELERATOR") == "cuda", "without it DeepSpeed installs for the CPU (no GPU at build)"
    assert env.get("TORCH_CUDA_ARCH_LIST"), "no GPU at build: name the architectures explicitly"
    assert "--no-build-isolation" in ds.options, "the DeepSpeed build must see torch to compile ops"


def referenced_paths() -> dict[str, set[str]]:
    """Repository paths named by the Docker files and docker/README.md, by where they are named."""
    rx = re.compile(r"(?<![\w/.$-])((?:launcher|ds_configs|docker|tests|data_prep)/[\w./-]*\w)")
    files = [*DOCKERFILES, ENTRYPOINT, COMPOSE, DOCKER / "README.md"]
    found = {f.name: set(rx.findall(f.read_text())) for f in files}
    for dockerfile in DOCKERFILES:
        for instr, rest in instructions(dockerfile):
            if instr == "COPY":
                words = [w for w in rest.split() if not w.startswith("--")]
                found[dockerfile.name] |= set(words[:-1])
        workdir = [rest for instr, rest in instructions(dockerfile) if instr == "WORKDIR"][-1]
        entry = [rest for instr, rest in instructions(dockerfile) if instr == "ENTRYPOINT"][-1]
        found[dockerfile.name] |= {
            os.path.relpath(w, workdir) for w in json.loads(entry) if w.startswith(workdir + "/")
        }
    return found


def test_paths_named_by_the_images_exist():
    missing = {f: sorted(p for p in ps if not (REPO / p).exists()) for f, ps in referenced_paths().items()}
    assert not any(missing.values()), f"named but not in the repository: {missing}"
    assert {"launcher/pretrain.py", "launcher/finetune.py"} <= referenced_paths()["entrypoint.sh"]


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """(exclude?, pattern) per line of .dockerignore, as Docker reads them: relative to the
    context root, `*` within one path element, `**` across any number, `!` re-includes."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        p = line.strip()
        if not p or p.startswith("#"):
            continue
        keep = p.startswith("!")
        p = p.lstrip("!").strip().strip("/")
        rx, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                rx, i = rx + ".*", i + 2
            else:
                rx += {"*": "[^/]*", "?": "[^/]"}.get(p[i], re.escape(p[i]))
                i += 1
        rules.append((not keep, re.compile(rx)))
    return rules


def excluded_by_dockerignore(rel: str) -> bool:
    """Whether Docker leaves `rel` out of the build context: the last rule matching the path or a
    folder above it decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    out = False
    for exclude, rx in dockerignore_rules():
        if any(rx.fullmatch(p) for p in prefixes):
            out = exclude
    return out


def test_dockerignore_keeps_what_the_images_use():
    roots = {"pyproject.toml", PYPROJECT["project"]["readme"]}
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        roots |= {p.name for p in REPO.glob(pattern) if (p / "__init__.py").exists()}
    roots |= set(PYPROJECT["tool"]["pytest"]["ini_options"]["testpaths"])
    for paths in referenced_paths().values():
        roots |= {p.split("/")[0] for p in paths}
    files = []
    for root in sorted(roots - {"."}):
        path = REPO / root
        files += [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    left_out = [
        str(f.relative_to(REPO))
        for f in files
        if "__pycache__" not in f.parts and excluded_by_dockerignore(str(f.relative_to(REPO)))
    ]
    assert not left_out, f".dockerignore leaves out files the images use: {left_out[:10]}"
    # local state stays out of the context (a .venv or runs/ would make it gigabytes)
    for local in (".git", ".venv", "runs", "sparsexpert.egg-info"):
        assert excluded_by_dockerignore(local), f".dockerignore should exclude {local}"


def test_compose_builds_existing_dockerfiles_and_shares_the_runs():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    built = set()
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: {build}"
            built.add(svc.get("image"))
        else:
            assert svc["image"] in built, f"{name}: image {svc['image']} is built by no service"
    train, board = services["train"], services["tensorboard"]
    assert train["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    logdir = board["command"][board["command"].index("--logdir") + 1]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in board["volumes"]}
    assert logdir in mounts.values(), f"tensorboard reads {logdir}, which no volume provides"
    volume = next(src for src, dst in mounts.items() if dst == logdir)
    assert any(v.split(":")[0] == volume for v in train["volumes"]), "train writes to another volume"


@pytest.fixture
def run_entrypoint(tmp_path):
    """Runs docker/entrypoint.sh with stand-ins for deepspeed and python that print their
    working directory and arguments."""
    for tool in ("deepspeed", "python"):
        stub = tmp_path / tool
        stub.write_text(f'#!/bin/sh\necho "$PWD {tool} $*"\n')
        stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}

    def run(*args: str, **extra_env: str) -> str:
        proc = subprocess.run(
            ["bash", str(ENTRYPOINT), *args],
            cwd=tmp_path,
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    return run


def test_entrypoint_commands(run_entrypoint):
    default = f"{REPO} deepspeed launcher/pretrain.py --ds_config ds_configs/moe_z2.json"
    assert run_entrypoint() == default
    assert run_entrypoint("--train.max_steps=20") == default + " --train.max_steps=20"
    assert run_entrypoint(SPARSEXPERT_DS_CONFIG="ds_configs/moe_z2_bf16.json") == default.replace(
        "moe_z2.json", "moe_z2_bf16.json"
    )
    assert run_entrypoint("finetune", "--init", "runs/pretrain") == (
        f"{REPO} deepspeed launcher/finetune.py --ds_config ds_configs/moe_z2.json --init runs/pretrain"
    )
    assert run_entrypoint("evaluate", "--run", "r") == f"{REPO} deepspeed launcher/evaluate.py --run r"
    assert run_entrypoint("ablate", "--reuse") == (
        f"{REPO} python launcher/ablate.py --ds_config ds_configs/moe_z2.json --reuse"
    )
    # anything else runs as given, where it was started
    assert run_entrypoint("python", "-m", "pytest", "-q").endswith(" python -m pytest -q")
    assert run_entrypoint("echo", "a b") == "a b"
    for dockerfile in DOCKERFILES:
        (cfg,) = re.findall(r"SPARSEXPERT_DS_CONFIG=(\S+)", dockerfile.read_text())
        assert (REPO / cfg).is_file(), f"{dockerfile.name}: default config {cfg}"
