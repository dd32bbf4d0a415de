"""Elastic resume: a checkpoint written at one world size / ep_size continues at another, resharded
through DeepSpeed's universal checkpoint, with the losses of the uninterrupted run.

Each chain starts with an uninterrupted reference run (checkpoints every 2 steps), continues its
step-2 checkpoint at another world size or ep_size (link 1), and link 1's step-4 checkpoint, written
after an elastic resume, at a third (link 2). The global batch (4 rows x 2 micro-batches) stays the
same: 2 ranks x 1 accumulation step or 1 rank x 2. Covered: ZeRO-1 1 -> 2 ranks (ep 1 -> 2); ZeRO-2
2 -> 1 (ep 2 -> 1) and back; ZeRO-3 ep 2 -> 1 on 2 ranks, then 2 -> 1 ranks."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, pretrain, write_ds_config

from sparsexpert.config import ConfigError
from sparsexpert.train.config import RunConfig
from sparsexpert.train.trainer import _check_resume_compatible
from sparsexpert.weights import checkpoint, deepspeed_formats
from sparsexpert.weights.deepspeed_formats import load_weights

STEPS = 6
LOSS_KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm")
# (world, ep) of the reference run and of each link of a chain, per ZeRO stage
CHAINS = {1: [(1, 1), (2, 2)], 2: [(2, 2), (1, 1), (2, 2)], 3: [(2, 2), (2, 1), (1, 1)]}
FINAL_WEIGHTS: dict[int, dict[str, torch.Tensor]] = {}  # per ZeRO stage, of the uninterrupted run


def _run(out: Path, stage: int, world: int, ep: int, data: Path, *extra: str, check: bool = True):
    ds = write_ds_config(
        out.with_suffix(".json"),
        f"moe_z{stage}.json",
        train_micro_batch_size_per_gpu=4,
        gradient_accumulation_steps=2 // world,
    )
    return pretrain(
        out,
        world,
        ds,
        *TINY_MODEL,
        f"--model.moe.ep_size={ep}",
        f"--data.path={data}",
        f"--train.max_steps={STEPS}",
        "--train.log_every=1",
        "--train.save_every=2",
        "--train.keep_checkpoints=0",
        *extra,
        check=check,
    )


def _continue(tag: Path, out: Path) -> None:
    """A fresh output folder whose latest checkpoint is a copy of `tag`."""
    shutil.copytree(tag, out / "checkpoints" / tag.name)
    (out / "checkpoints" / checkpoint.LATEST).write_text(tag.name)


def _expected_experts(world: int, ep: int, n_experts: int = 4) -> str:
    per = n_experts // ep
    return ", ".join(f"rank {r} {list(range(r % ep * per, (r % ep + 1) * per))}" for r in range(world))


@pytest.fixture(scope="module", params=sorted(CHAINS), ids=lambda s: f"zero{s}")
def chain(request, tmp_path_factory, example_data):
    """[reference, link 1, link 2 ...] runs of one ZeRO stage."""
    stage, tmp = request.param, tmp_path_factory.mktemp(f"zero{request.param}")
    (world, ep), *links = CHAINS[stage]
    runs = [_run(tmp / "ref", stage, world, ep, example_data)]
    for i, (world, ep) in enumerate(links):
        src = runs[-1].output_dir / "checkpoints" / checkpoint.tag_for(2 * (i + 1))
        out = tmp / f"link{i + 1}"
        _continue(src, out)
        runs.append(_run(out, stage, world, ep, example_data, "--resume"))
    return stage, runs


def _saved_steps(tag: Path) -> tuple[int, int, set[int], set[str]]:
    """global_steps, the schedule's step, every Adam state's step and the group names, as saved."""
    dense = tag / "mp_rank_00_model_states.pt"  # ZeRO-3: one per rank
    model = checkpoint.load_file(
        dense if dense.is_file() else tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    )
    adam, names = set(), set()
    for f in tag.glob("zero_pp_rank_*_optim_states.pt"):
        sd = checkpoint.load_file(f, allow=deepspeed_formats.deepspeed_classes())["optimizer_state_dict"]
        base = sd.get("base_optimizer_state") or sd["optimizer_state_dict"]  # ZeRO-1/2, ZeRO-3
        adam |= {int(s["step"]) for s in base["state"].values()}
        names |= {g["name"] for g in base["param_groups"]}
    return model["global_steps"], model["lr_scheduler"]["last_batch_iteration"] + 1, adam, names


def test_elastic_resume_continues_the_uninterrupted_run(chain):
    stage, (ref, *links) = chain
    ref_records = {r["step"]: r for r in ref.metrics()}
    assert sorted(ref_records) == list(range(1, STEPS + 1))
    _, *shapes = CHAINS[stage]
    for i, (run, (world, ep)) in enumerate(zip(links, shapes)):
        start = 2 * (i + 1)
        before = CHAINS[stage][i]
        line = next(ln for ln in run.output.splitlines() if ln.startswith("elastic resume: "))
        # the trainer checked every rank's experts and the optimizer step after the load; it says which
        assert f"world {before[0]} -> {world}, ep {before[1]} -> {ep}" in line
        assert f"the optimizer step {start} " in line
        assert line.endswith(f"the experts by global id: {_expected_experts(world, ep)}"), line
        assert f"world {world}, ep {ep}, ZeRO-{stage}" in run.output
        got = run.metrics()
        assert [r["step"] for r in got] == list(range(start + 1, STEPS + 1))
        for r in got:
            for key in LOSS_KEYS:
                assert r[key] == pytest.approx(ref_records[r["step"]][key], rel=1e-5), (i, r["step"], key)
        # what the resumed run saved at the end: the step everywhere, the expert groups of its own ep_size
        tag = run.output_dir / "checkpoints" / checkpoint.tag_for(STEPS)
        assert _saved_steps(tag) == (STEPS, STEPS, {STEPS}, {"decay", "no_decay", f"ep_size_{ep}"})
        # and the same weights as the uninterrupted run, every expert by its global id (ZeRO-3:
        # read through the universal form, which load_weights converts once)
        want, _ = load_weights(ref.output_dir)
        have, meta = load_weights(tag)
        assert meta["world_size"] == world and have.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(have[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
    # The uninterrupted runs at ZeRO-2 and ZeRO-3 have the same world size, ep_size, data and init:
    # their final weights agree, so ZeRO-3's weights read back right (not only self-consistently).
    FINAL_WEIGHTS[stage] = load_weights(ref.output_dir)[0]
    if stage == 3 and 2 in FINAL_WEIGHTS:
        for key, value in FINAL_WEIGHTS[2].items():
            torch.testing.assert_close(FINAL_WEIGHTS[3][key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("chain", [2], indirect=True, ids=["zero2"])
def test_elastic_resume_refuses_experts_out_of_place(tmp_path, example_data, chain):
    """Experts out of place after loading (as DeepSpeed's native MoE layer loads a universal
    checkpoint at ep_size 2) are caught by the check that follows: every rank stops, naming them,
    before training. Here the universal form of a world-1 checkpoint, converted by link 2 and reused,
    has two experts of one layer swapped with the other two, and CONVERTED.json records the file so (as
    a conversion that misplaced them would have: otherwise the damaged file is converted again)."""
    stage, runs = chain
    tag = runs[2].output_dir / "checkpoints" / checkpoint.tag_for(4)
    assert (tag / checkpoint.UNIVERSAL / checkpoint.CONVERTED).is_file()
    _continue(tag, tmp_path / "out")
    w1 = tmp_path / "out" / "checkpoints" / tag.name / "universal" / "zero" / "layers.1.mlp.experts.w1"
    saved = checkpoint.load_file(w1 / "fp32.pt")
    saved["param"] = saved["param"][[2, 3, 0, 1]]
    torch.save(saved, w1 / "fp32.pt")
    universal = w1.parents[1]
    converted = json.loads((universal / checkpoint.CONVERTED).read_text())
    name = str((w1 / "fp32.pt").relative_to(universal))
    converted["files"][name] = {
        "size": (w1 / "fp32.pt").stat().st_size,
        "xxh3_128": checkpoint.file_digest(w1 / "fp32.pt"),
    }
    (universal / checkpoint.CONVERTED).write_text(json.dumps(converted))
    run = _run(tmp_path / "out", stage, 2, 2, example_data, "--resume", check=False)
    assert run.returncode != 0
    for rank, ids in ((0, [0, 1]), (1, [2, 3])):
        assert (
            f"rank {rank}: layers.1.mlp.experts.w1 (experts {ids}) differs from the checkpoint" in run.output
        )
    assert "layers.0.mlp.experts" not in run.output and "w2" not in run.output
    assert not run.metrics()


def _meta(world: int = 2, ep: int = 2, global_batch: int = 8, stage: int = 2) -> tuple[dict, RunConfig]:
    cfg = RunConfig()
    cfg.model.moe.ep_size = ep
    meta = {
        "run": json.loads(json.dumps(asdict(cfg))),
        "world_size": world,
        "ep_size": ep,
        "global_batch": global_batch,
        "ds_config": {"zero_optimization": {"stage": stage}},
    }
    return meta, cfg


def test_which_resumes_are_elastic_and_which_are_refused():
    meta, cfg = _meta()
    assert not _check_resume_compatible(meta, cfg, 2, 2, 8, 2, Path("t"))
    cfg.model.moe.ep_size = 1  # another ep_size is no model change
    assert _check_resume_compatible(meta, cfg, 2, 1, 8, 2, Path("t"))
    assert _check_resume_compatible(meta, cfg, 1, 1, 8, 3, Path("t"))
    with pytest.raises(ConfigError, match="global batch of 8") as err:
        _check_resume_compatible(meta, cfg, 1, 1, 4, 2, Path("t"))
    assert err.value.field == "global_batch"
    with pytest.raises(ConfigError, match="needs ZeRO 1-3 on both sides"):
        _check_resume_compatible(meta, cfg, 1, 1, 8, 0, Path("t"))
    meta0, cfg0 = _meta(stage=0)
    with pytest.raises(ConfigError, match="ZeRO-0"):
        _check_resume_compatible(meta0, cfg0, 1, 2, 8, 2, Path("t"))
    assert not _check_resume_compatible(meta0, cfg0, 2, 2, 8, 0, Path("t"))  # a plain resume
    cfg.model.d_model *= 2
    with pytest.raises(ConfigError, match="resume with the same model config"):
        _check_resume_compatible(meta, cfg, 2, 2, 8, 2, Path("t"))
