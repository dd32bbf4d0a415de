"""Checkpoints that can be trusted, for real (real runs, real files, real processes): no code runs from
a checkpoint; damage at the same size is caught, naming the file; paths read from files stay inside;
a resume says which checkpoints it passed over and refuses when none is usable; rotation never
deletes the newest healthy checkpoint; a save that runs out of space says so and leaves the previous
checkpoint as `latest`; a run killed during a save continues bit-identically from the previous one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, deepspeed_cmd, kill_when, pretrain, run_cmd, write_ds_config

from sparsexpert.weights import checkpoint, deepspeed_formats
from sparsexpert.weights.checkpoint import CheckpointError, UnsafeCheckpointError

RUN_ARGS = [*TINY_MODEL, "--train.log_every=1", "--train.eval_every=0", "--train.tensorboard=false"]


class Payload:
    """Unpickling this calls exec, which creates `marker`: what a hostile checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _rewrite_manifest(tag: Path, name: str) -> None:
    """Record `name` as it is now in COMPLETE.json, as whoever prepared a hostile folder can."""
    manifest = json.loads((tag / checkpoint.COMPLETE).read_text())
    path = tag / name
    manifest["files"][name] = {"size": path.stat().st_size, checkpoint.CHECKSUM: checkpoint.file_digest(path)}
    (tag / checkpoint.COMPLETE).write_text(json.dumps(manifest))


def _poison(tag: Path, name: str, marker: Path) -> None:
    """Add a code-running object to a torch.save file of `tag`, with a matching COMPLETE.json."""
    data = checkpoint.load_file(tag / name, allow=deepspeed_formats.deepspeed_classes())
    data["extra"] = Payload(marker)
    torch.save(data, tag / name)
    _rewrite_manifest(tag, name)


def _flip_byte(path: Path, at: int = -100) -> None:
    """Damage a file without changing its size."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("metrics.jsonl", "universal"))
    return dst


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, example_data) -> Path:
    """One process, ZeRO-2, AutoEP: checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    ds = write_ds_config(out.parent / "ds.json", train_micro_batch_size_per_gpu=4)
    pretrain(
        out,
        1,
        ds,
        *RUN_ARGS,
        f"--data.path={example_data}",
        "--train.max_steps=2",
        "--train.save_every=1",
        "--train.keep_checkpoints=0",
    )
    return out


# ---------------------------------------------------------------------------------------------
# 1. No code from a checkpoint


def _entry_points(evil: Path, evil_z3: Path, clean: Path, ds: Path, data: Path, tmp: Path) -> dict:
    """Every command that opens a checkpoint folder someone else may have written, and one resume."""
    texts = tmp / "cls.jsonl"
    texts.write_text("".join(json.dumps({"text": f"word {i}", "label": str(i % 2)}) + "\n" for i in range(8)))
    finetune = [
        "launcher/finetune.py",
        "--ds_config",
        str(ds),
        "--task",
        "classification",
        f"--train={texts}",
        f"--dev={texts}",
        "--train.max_steps=1",
        "--train.eval_every=1",
    ]
    one = sys.executable
    return {
        "generate --model": [one, "launcher/generate.py", "--model", str(evil), "--prompt", "a"],
        "export": [one, "launcher/export.py", "--checkpoint", str(evil), "--output", str(tmp / "c")],
        "export --hf (ZeRO-3: DeepSpeed converts it)": [
            one,
            "launcher/export.py",
            "--checkpoint",
            str(evil_z3),
            "--output",
            str(tmp / "hf"),
            "--hf",
        ],
        "finetune --init": deepspeed_cmd(1, *finetune, "--output_dir", str(tmp / "f1"), "--init", str(evil)),
        "finetune --distill.teacher": deepspeed_cmd(
            1, *finetune, "--output_dir", str(tmp / "f2"), "--init", str(clean), f"--distill.teacher={evil}"
        ),
        "pretrain train.init": deepspeed_cmd(
            1,
            "launcher/pretrain.py",
            "--ds_config",
            str(ds),
            "--output_dir",
            str(tmp / "p"),
            f"--train.init={evil}",
            f"--data.path={data}",
            "--train.max_steps=1",
        ),
        "evaluate": deepspeed_cmd(1, "launcher/evaluate.py", "--run", str(evil)),
        "pretrain --resume (its optimizer states)": deepspeed_cmd(
            1,
            "launcher/pretrain.py",
            "--ds_config",
            str(ds),
            "--output_dir",
            str(tmp / "resume"),
            *RUN_ARGS,
            f"--data.path={data}",
            "--train.max_steps=3",
            "--resume",
        ),
    }


def test_no_code_runs_from_a_checkpoint(tiny_run, example_data, tmp_path):
    """A checkpoint whose files carry a pickle that would create a marker file, with a COMPLETE.json
    that matches them: every entry point refuses it, naming the file, and the marker never appears."""
    marker = tmp_path / "MARKER"
    evil = _copy_run(tiny_run, tmp_path / "evil")
    _poison(evil / "checkpoints" / "step_00000002", "mp_rank_00_model_states.pt", marker)
    resume = _copy_run(tiny_run, tmp_path / "work" / "resume")
    _poison(resume / "checkpoints" / "step_00000002", "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    ds3 = write_ds_config(tmp_path / "z3.json", "moe_z3.json", train_micro_batch_size_per_gpu=4)
    evil_z3 = tmp_path / "z3"
    pretrain(evil_z3, 1, ds3, *RUN_ARGS, f"--data.path={example_data}", "--train.max_steps=1")
    _poison(evil_z3 / "checkpoints" / "step_00000001", "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    ds = write_ds_config(tmp_path / "ds.json", train_micro_batch_size_per_gpu=4)

    commands = _entry_points(evil, evil_z3, tiny_run, ds, example_data, tmp_path / "work")
    for what, cmd in commands.items():
        run = run_cmd(cmd, tmp_path, timeout=240, check=False)
        assert not marker.exists(), f"{what}: the checkpoint ran code"
        assert run.returncode != 0, f"{what}: exit 0\n{run.output[-3000:]}"
        assert "refused: it holds pickled objects other than tensors" in run.output, (
            what,
            run.output[-3000:],
        )
        name = "optim_states.pt" if "ZeRO-3" in what or "resume" in what else "mp_rank_00_model_states.pt"
        assert name in run.output, (what, run.output[-3000:])

    # The other files a reader opens, one at a time: an expert file, older tags' RNG states.
    for name in ("layer_1_expert_3_mp_rank_00_model_states.pt", "rng_rank00000.pt"):
        tag = _copy_run(tiny_run, tmp_path / name) / "checkpoints" / "step_00000002"
        if name.startswith("rng"):  # the form before JSON: a pickle of NumPy's state
            torch.save({"numpy": Payload(marker)}, tag / name)
            (tag / "rng_rank00000.json").unlink()
            manifest = json.loads((tag / checkpoint.COMPLETE).read_text())
            del manifest["files"]["rng_rank00000.json"]
            (tag / checkpoint.COMPLETE).write_text(json.dumps(manifest))
            _rewrite_manifest(tag, name)
            with pytest.raises(UnsafeCheckpointError, match=name):
                checkpoint.read_rng(tag, 0)
        else:
            _poison(tag, name, marker)
            with pytest.raises(UnsafeCheckpointError, match=name):
                deepspeed_formats.load_weights(tag)
    assert not marker.exists()


def test_rng_states_are_json_and_resume_exactly(tiny_run, tmp_path):
    """RNG states go to plain JSON and come back to the bit; older tags' .pt states still read (as
    data, NumPy's array types allowed and nothing else)."""
    import random

    import numpy as np

    tag = tiny_run / "checkpoints" / "step_00000002"
    saved = json.loads((tag / "rng_rank00000.json").read_text())
    assert set(saved) == {"python", "numpy", "torch"}
    state = checkpoint.rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    back = checkpoint.rng_from_json(json.loads(json.dumps(checkpoint.rng_to_json(state))))
    checkpoint.set_rng_state(back)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
    legacy = tmp_path / "rng_rank00000.pt"
    torch.save(state, legacy)  # as tags were written before
    checkpoint.set_rng_state(checkpoint.read_rng(tmp_path, 0))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


# ---------------------------------------------------------------------------------------------
# 2. Integrity, checked; 3. paths from files stay inside


def test_damage_at_the_same_size_is_refused_naming_the_file(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    tag2, tag1 = (run / "checkpoints" / checkpoint.tag_for(s) for s in (2, 1))
    manifest = json.loads((tag2 / checkpoint.COMPLETE).read_text())
    assert manifest["checksum"] == "xxh3_128" and manifest["healthy"] is True
    assert all(set(e) == {"size", "xxh3_128"} for e in manifest["files"].values())
    assert deepspeed_formats.load_weights(tag2)[1]["step"] == 2

    expert = "layer_0_expert_1_mp_rank_00_model_states.pt"
    _flip_byte(tag2 / expert)
    for read in (deepspeed_formats.load_weights, checkpoint.resolve_tag):
        with pytest.raises(CheckpointError, match=f"{expert} differs from what was written"):
            read(tag2)
    # a run folder: the damaged newest is passed over, saying why; the older one is read
    said = []
    assert checkpoint.resolve_tag(run, log=said.append) == tag1
    assert f"step_00000002: {expert} differs from what was written" in said[0]
    # a truncated file: its size says so
    with open(tag1 / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError) as err:
        checkpoint.resolve_tag(run)
    assert "step_00000001: mp_rank_00_model_states.pt is 100 bytes where" in str(err.value)
    assert f"step_00000002: {expert} differs" in str(err.value)


def test_a_checkpoint_from_before_checksums_is_read_on_its_sizes_with_a_warning(tiny_run, tmp_path):
    """Tags written before checksums (COMPLETE.json with sizes only, RNG as .pt) still resume and load:
    refusing them would strand every existing run; sizes still catch a truncated file."""
    tag = _copy_run(tiny_run, tmp_path / "old") / "checkpoints" / "step_00000002"
    manifest = json.loads((tag / checkpoint.COMPLETE).read_text())
    (tag / checkpoint.COMPLETE).write_text(
        json.dumps({"step": 2, "files": {k: v["size"] for k, v in manifest["files"].items()}})
    )
    said = []
    assert checkpoint.resolve_tag(tag, log=said.append) == tag
    assert "written before checksums" in said[0]
    assert checkpoint.verify(tag).sizes_only and checkpoint.find_latest(tag.parent) == tag
    (tag / "sparsexpert.json").write_text((tag / "sparsexpert.json").read_text() + " ")
    assert "sparsexpert.json is" in checkpoint.verify(tag).problems[0]


def test_save_fsyncs_every_file_and_folder_before_it_says_complete(tmp_path, monkeypatch):
    """The order of a save's fsyncs, recorded on real files: every file of the tag and the tag folder,
    then COMPLETE.json; the checkpoints folder after `latest`."""
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    root = tmp_path / "checkpoints"
    checkpoint.save(_FakeEngine(), root, 3, {"step": 3}, None)
    files = set(json.loads((root / "step_00000003" / checkpoint.COMPLETE).read_text())["files"])
    complete = synced.index("COMPLETE.json.tmp")
    assert files == {"mp_rank_00_model_states.pt", "rng_rank00000.json", "sparsexpert.json"}
    assert files | {"step_00000003"} <= set(synced[:complete])
    assert synced[-2:] == ["latest.tmp", "checkpoints"]


def test_a_damaged_universal_conversion_is_converted_again(tiny_run, tmp_path):
    """<tag>/universal/ (DeepSpeed's converter's output, reused by elastic resumes and ZeRO-3 readers)
    records its files' checksums in CONVERTED.json; a damaged file there means converting again."""
    tag = _copy_run(tiny_run, tmp_path / "run") / "checkpoints" / "step_00000002"
    out = deepspeed_formats.to_universal(tag)
    converted = json.loads((out / checkpoint.CONVERTED).read_text())
    name = "zero/layers.0.mlp.experts.w1/fp32.pt"
    assert converted["checksum"] == "xxh3_128" and name in converted["files"]
    want = (out / name).read_bytes()
    _flip_byte(out / name)
    assert "differs from what was written" in deepspeed_formats._converted_problems(out)[0]
    deepspeed_formats.to_universal(tag)
    assert (out / name).read_bytes() == want and not deepspeed_formats._converted_problems(out)


@pytest.mark.parametrize(
    "latest", ["../../outside/step_00000002", "{outside}/step_00000002", "step_2", "garbage\n\x00"]
)
def test_latest_must_name_a_tag_of_its_own_folder(tiny_run, tmp_path, latest):
    outside = tmp_path / "outside"
    shutil.copytree(tiny_run / "checkpoints" / "step_00000002", outside / "step_00000002")
    run = _copy_run(tiny_run, tmp_path / "a" / "b")
    root = run / "checkpoints"
    (root / checkpoint.LATEST).write_text(latest.format(outside=outside))
    found = checkpoint.scan(root)
    assert found.tag == root / "step_00000002"  # not the folder outside
    assert (
        found.passed_over[0][0] == "latest" and "not a tag name (step_<8 digits>)" in found.passed_over[0][1]
    )
    for tag in ("step_00000001", "step_00000002"):
        shutil.rmtree(root / tag)
    with pytest.raises(CheckpointError, match=r"latest: holds '.*', not a tag name"):
        checkpoint.for_resume(root)
    with pytest.raises(CheckpointError, match=r"latest: holds"):
        deepspeed_formats.load_weights(run)


def test_files_listed_outside_the_tag_are_refused(tiny_run, tmp_path):
    tag = _copy_run(tiny_run, tmp_path / "run") / "checkpoints" / "step_00000002"
    (tmp_path / "secret").write_text("x")
    manifest = json.loads((tag / checkpoint.COMPLETE).read_text())
    manifest["files"]["../../../secret"] = 1
    (tag / checkpoint.COMPLETE).write_text(json.dumps(manifest))
    assert "'../../../secret', a path outside the tag; refused" in checkpoint.verify(tag).problems[0]
    os.symlink(tmp_path / "secret", tag / "link")
    manifest["files"] = {"link": 1}
    (tag / checkpoint.COMPLETE).write_text(json.dumps(manifest))
    assert "'link', a path outside the tag" in checkpoint.verify(tag).problems[0]


# ---------------------------------------------------------------------------------------------
# 4. Resume tells the truth


def test_resume_lists_what_it_passed_over_and_refuses_when_nothing_is_usable(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    root = run / "checkpoints"
    said = []
    assert checkpoint.for_resume(root, said.append) == root / "step_00000002" and not said
    _flip_byte(root / "step_00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (root / "step_00000003").mkdir()  # a save killed before it finished
    assert checkpoint.for_resume(root, said.append) == root / "step_00000001"
    assert said == [
        "resume: passed over step_00000003: incomplete: no COMPLETE.json (a save that did not finish); "
        "step_00000002: zero_pp_rank_0_mp_rank_00_optim_states.pt differs from what was written (its "
        "xxh3_128 checksum; same size); continuing from step_00000001"
    ]
    (root / "step_00000001" / "rng_rank00000.json").unlink()
    with pytest.raises(CheckpointError) as err:
        checkpoint.for_resume(root)
    for text in (
        "step_00000003: incomplete",
        "step_00000002: zero_pp_rank_0",
        "step_00000001: rng_rank00000.json is missing",
    ):
        assert text in str(err.value)
    assert checkpoint.for_resume(tmp_path / "nothing") is None  # no checkpoint at all: a fresh start


def test_resume_with_every_checkpoint_damaged_fails_and_changes_nothing(tiny_run, example_data, tmp_path):
    """`--resume` when no checkpoint is usable: exit status 1, each one named with its fault, and the
    folder as it was (no new checkpoint, `latest` untouched)."""
    run = _copy_run(tiny_run, tmp_path / "run")
    root = run / "checkpoints"
    _flip_byte(root / "step_00000002" / "mp_rank_00_model_states.pt")
    with open(root / "step_00000001" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "r+b") as f:
        f.truncate(1000)
    before = sorted(p.name for p in root.iterdir())
    ds = write_ds_config(tmp_path / "ds.json", train_micro_batch_size_per_gpu=4)
    resumed = pretrain(
        run, 1, ds, *RUN_ARGS, f"--data.path={example_data}", "--train.max_steps=4", "--resume", check=False
    )
    assert resumed.returncode == 1, resumed.output[-3000:]
    assert "no usable checkpoint in" in resumed.output and "starting from step 0" not in resumed.output
    assert "step_00000002: mp_rank_00_model_states.pt differs from what was written" in resumed.output
    assert "step_00000001: zero_pp_rank_0_mp_rank_00_optim_states.pt is 1,000 bytes where" in resumed.output
    assert sorted(p.name for p in root.iterdir()) == before
    assert (root / checkpoint.LATEST).read_text() == "step_00000002"


# ---------------------------------------------------------------------------------------------
# 5. Rotation


class _FakeEngine:
    """Stands in for DeepSpeed's engine in `save`: writes one real file per tag."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(os.urandom(64))


def _tags(root: Path) -> list[int]:
    return [int(p.name[5:]) for p in sorted(root.glob("step_*"))]


def test_rotation_never_deletes_the_newest_healthy_checkpoint(tmp_path):
    root, engine = tmp_path / "checkpoints", _FakeEngine()
    for step in (5, 8):
        checkpoint.save(engine, root, step, {"step": step}, None)
    # A resume from step 5 (`latest` names it), a newer step 8 left by an earlier life of the run: the
    # old rule (keep the newest complete names) deleted both 5 and the tag it had just written.
    (root / checkpoint.LATEST).write_text("step_00000005")
    checkpoint.save(engine, root, 6, {"step": 6}, None, keep=1)
    assert _tags(root) == [5, 6, 8] and checkpoint.find_latest(root) == root / "step_00000006"
    # healthy=False: written for a look, marked, `latest` stays, nothing rotated
    checkpoint.save(engine, root, 7, {"step": 7}, None, keep=1, healthy=False)
    assert _tags(root) == [5, 6, 7, 8] and (root / checkpoint.LATEST).read_text() == "step_00000006"
    assert json.loads((root / "step_00000007" / checkpoint.COMPLETE).read_text())["healthy"] is False
    assert checkpoint.find_latest(root) == root / "step_00000006"
    assert ("step_00000007", "marked unhealthy (saved after a step whose loss was not finite)") in (
        checkpoint.scan(root).passed_over
    )
    # A damaged or incomplete tag is never deleted, nor counted as kept.
    (root / "step_00000004").mkdir()
    _flip_byte(root / "step_00000005" / "mp_rank_00_model_states.pt", at=0)
    (root / "step_00000005" / "mp_rank_00_model_states.pt").write_bytes(b"short")
    checkpoint.save(engine, root, 9, {"step": 9}, None, keep=1)
    # kept: 9 (written), 6 (latest before it), 4 and 5 (do not verify); deleted: 7 (unhealthy), 8
    assert _tags(root) == [4, 5, 6, 9]
    checkpoint.save(engine, root, 10, {"step": 10}, None, keep=2)
    assert _tags(root) == [4, 5, 9, 10]
    checkpoint.save(engine, root, 11, {"step": 11}, None, keep=0)  # 0 keeps everything
    assert _tags(root) == [4, 5, 9, 10, 11]


# ---------------------------------------------------------------------------------------------
# 6. Disk full during a save


class _FullDiskEngine:
    """Stands in for DeepSpeed's engine in `save` where no filesystem can be mounted: its file goes to
    /dev/full (written to, never read from: reading it gives zeros without end)."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        os.symlink("/dev/full", Path(root) / tag / "mp_rank_00_model_states.pt")
        with open(Path(root) / tag / "mp_rank_00_model_states.pt", "wb") as f:
            f.write(os.urandom(1 << 16))


@contextlib.contextmanager
def _small_filesystem(path: Path, size: int):
    path.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    try:
        yield done.returncode == 0
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_save_that_does_not_fit_says_so_and_keeps_the_previous_checkpoint(tiny_run, example_data, tmp_path):
    """The run's output folder on a tmpfs with room for one checkpoint and a half: the second save
    fails; the run stops with "no space left on device", the path and the room the previous checkpoint
    took; its partial tag is gone, `latest` still names the first, which verifies. Without the right to
    mount (not root), the same error comes from a real file on /dev/full, which accepts no byte."""
    tag_size = checkpoint._total_size(tiny_run / "checkpoints" / "step_00000001")
    with _small_filesystem(tmp_path / "small", int(tag_size * 1.5)) as mounted:
        if mounted:
            out = tmp_path / "small" / "run"
            ds = write_ds_config(tmp_path / "ds.json", train_micro_batch_size_per_gpu=4)
            args = [f"--data.path={example_data}", "--train.max_steps=3", "--train.save_every=1"]
            run = pretrain(out, 1, ds, *RUN_ARGS, *args, check=False)
            assert run.returncode == 1, run.output[-3000:]
            output = run.output
        else:
            out = tmp_path / "run"
            root = out / "checkpoints"
            checkpoint.save(_FakeEngine(), root, 1, {"step": 1}, None)
            tag_size = checkpoint._total_size(root / "step_00000001")
            with pytest.raises(checkpoint.NoSpaceError) as err:
                checkpoint.save(_FullDiskEngine(), root, 2, {"step": 2}, None)
            output = str(err.value)
        root = out / "checkpoints"
        assert "no space left on device: saving checkpoint step_00000002 into" in output, output[-3000:]
        assert str(root) in output
        assert f"the previous checkpoint step_00000001 took {checkpoint._human(tag_size)}" in output
        assert not (root / "step_00000002").exists()
        assert (root / checkpoint.LATEST).read_text() == "step_00000001"
        assert checkpoint.verify(root / "step_00000001").ok


# ---------------------------------------------------------------------------------------------
# 7. kill -9 during a save, then --resume


def _steps_logged(path: Path) -> dict[int, float]:
    out = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if "loss" in record:
                    out[record["step"]] = record["loss"]
    return out


def test_killed_during_a_save_resumes_bit_identically_from_the_previous_checkpoint(tmp_path, example_data):
    """Two processes, a checkpoint every 3 steps; SIGKILL to the whole job the moment a save is under
    way (a tag folder without COMPLETE.json, after a first complete checkpoint). The resume continues
    from the checkpoint before it, and the steps it repeats have exactly the losses the killed run
    logged for them before it was killed: optimizer state, data position, schedule and RNG restored.
    The resume says which newer tag it passed over, and why."""
    ds = write_ds_config(tmp_path / "ds.json", gradient_clipping=1.0, train_micro_batch_size_per_gpu=4)
    out = tmp_path / "run"
    root = out / "checkpoints"
    args = [
        *RUN_ARGS,
        f"--data.path={example_data}",
        "--train.max_steps=12",
        "--train.save_every=3",
        "--train.keep_checkpoints=0",
        "--model.moe.ep_size=2",
    ]

    def saving() -> bool:
        if not (root / checkpoint.LATEST).is_file():
            return False
        return any(not (t / checkpoint.COMPLETE).exists() for t in root.glob("step_*"))

    start = time.time()
    kill_when(
        deepspeed_cmd(2, "launcher/pretrain.py", "--ds_config", str(ds), "--output_dir", str(out), *args),
        saving,
    )
    interrupted = [t.name for t in sorted(root.glob("step_*")) if not (t / checkpoint.COMPLETE).exists()]
    assert interrupted, (
        f"no save was under way when the job was killed ({time.time() - start:.0f}s); the test proves nothing"
    )
    killed_step = int(interrupted[-1][5:])
    previous = (root / checkpoint.LATEST).read_text()
    assert previous == checkpoint.tag_for(killed_step - 3)
    before = _steps_logged(out / "metrics.jsonl")
    assert max(before) == killed_step  # the interrupted save's step was logged before its save began

    resumed = pretrain(out, 2, ds, *args, "--resume")
    assert f"resumed from {root / previous} at step {killed_step - 3}" in resumed.output
    skipped = f"passed over {interrupted[-1]}: incomplete: no COMPLETE.json (a save that did not finish)"
    assert skipped in resumed.output, resumed.output[-3000:]
    after = _steps_logged(out / "metrics.jsonl")
    assert max(after) == 12
    for step in range(killed_step - 2, killed_step + 1):
        assert after[step] == before[step], (step, after[step], before[step])
    assert checkpoint.verify(root / checkpoint.tag_for(killed_step)).ok  # written again, complete
