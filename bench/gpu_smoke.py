"""Smoke test of every path of sparsexpert on this machine's accelerator, in one command. Each step
prints what it must show; the script exits non-zero at the first miss.

    bash bench/gpu_smoke.sh                     # a GPU host: 1 GPU, and 2 ranks where there are 2 or
                                                # more GPUs; then the CPU test suite (DS_ACCELERATOR=cpu)
    bash bench/gpu_smoke.sh --cpu               # DeepSpeed's CPU accelerator with gloo: tiny sizes, 2 ranks
                                                # (the test suite runs this: tests/test_gpu_smoke.py)
    bash bench/gpu_smoke.sh --skip_suite --out /tmp/smoke    # keep the runs, skip the CPU suite

Steps: pretraining with AutoEP at ZeRO-2 in bf16 (fp16 where the GPU lacks bf16), the knowledge modes
fusion and inject, fusion with the entity table on row-wise Adagrad (its rows all-gathered), the native DeepSpeed-MoE backend, ZeRO-3, a failure that stops the run (exit
status 1, a checkpoint kept) and its resume, an elastic resume 2 -> 1 ranks, evaluation, fine-tuning
with FGM, then PGD with distillation, consolidation, Hugging Face export, generation on the device,
a rank that hangs named by the others (heartbeats), the CPU suite. Device check mode is on (SPARSEXPERT_CHECK_DEVICE=1):
every tensor reaching a model or a collective must have passed through sparsexpert.distributed.device.to_device.

Resumes are compared with the uninterrupted run: exactly on the CPU; on CUDA within a tolerance,
because CUDA's index_add_/index_select/gather backward kernels (expert dispatch and combine, entity
lookups) accumulate with atomics in no fixed order, so two runs differ in the last bits and drift.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Miss(Exception):
    """A step did not show what it must."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Smoke:
    def __init__(self, args: argparse.Namespace):
        self.cpu = args.cpu
        self.out = Path(args.out or tempfile.mkdtemp(prefix="sparsexpert-smoke-"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", SPARSEXPERT_CHECK_DEVICE="1")
        # the failure steps' fault injection (SPARSEXPERT_FAIL_AT): tests/faults/sitecustomize.py
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO / "tests" / "faults"), self.env.get("PYTHONPATH")])
        )
        self.env.pop("RANK", None)
        self.env.pop("WORLD_SIZE", None)
        if self.cpu:
            self.env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
            self.gpus, self.device = 0, "cpu"
        else:
            import torch

            if not torch.cuda.is_available():
                raise SystemExit("no CUDA device: run with --cpu for DeepSpeed's CPU accelerator")
            self.gpus, self.device = torch.cuda.device_count(), "cuda"
        self.ranks = 2 if self.cpu or self.gpus >= 2 else 1
        self.tol = 0.0 if self.cpu else 1e-3  # relative, for resumed losses (see the module docstring)
        if self.cpu:
            self.model = ["--model.d_model=64", "--model.n_layers=2", "--model.n_heads=4", "--model.d_ff=128"]
            self.model += ["--model.max_seq_len=64", "--model.moe.num_experts=4", "--model.moe.top_k=2"]
            self.seq_len, self.micro = 32, 4
        else:
            self.model = [
                "--model.d_model=256",
                "--model.n_layers=4",
                "--model.n_heads=4",
                "--model.d_ff=512",
            ]
            self.model += ["--model.max_seq_len=128", "--model.moe.num_experts=8", "--model.moe.top_k=2"]
            self.seq_len, self.micro = 128, 8
        self.half = "bf16" if self.cpu or self._bf16_gpu() else "fp16"
        self.t0 = time.time()

    @staticmethod
    def _bf16_gpu() -> bool:
        import torch

        return torch.cuda.get_device_capability(0)[0] >= 8

    # ------------------------------------------------------------------ helpers
    def say(self, step: str, what: str) -> None:
        print(f"[smoke {time.time() - self.t0:6.1f}s] {step}: ok: {what}", flush=True)

    def run(self, script: list[str], ranks: int = 1, env: dict | None = None, check: bool = True):
        """A launcher script: through `deepspeed --num_gpus N` for several ranks, the script itself for one."""
        if ranks > 1:
            launcher = str(Path(sys.executable).with_name("deepspeed"))
            cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), *script]
        else:
            cmd = [sys.executable, *script]
        e = dict(self.env, **(env or {}))
        if ranks == 1:
            e["MASTER_PORT"] = str(free_port())
        t = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            raise Miss(f"exit {proc.returncode}: {' '.join(cmd)}\n{output[-5000:]}")
        self.stdout = proc.stdout
        return proc.returncode, output, time.time() - t

    def ds(self, name: str, base: str = "moe_z2.json", **changes) -> Path:
        cfg = json.loads((REPO / "ds_configs" / base).read_text())
        cfg["train_micro_batch_size_per_gpu"] = self.micro
        cfg.update(changes)
        path = self.out / f"{name}.json"
        path.write_text(json.dumps(cfg))
        return path

    def pretrain(self, name: str, ds: Path, *extra: str, ranks: int | None = None, steps: int = 6, **kw):
        ranks = self.ranks if ranks is None else ranks
        args = ["launcher/pretrain.py", "--ds_config", str(ds), "--output_dir", str(self.out / name)]
        args += [*self.model, f"--data.path={self.data}", f"--train.max_steps={steps}", "--train.log_every=1"]
        args += ["--train.eval_every=0", f"--model.moe.ep_size={ranks}", *extra]
        if "--resume" not in extra:
            args.append("--overwrite")  # a smoke folder given again with --out: this script's runs
        return self.run(args, ranks, **kw)

    def metrics(self, name: str) -> list[dict]:
        path = self.out / name / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def finite(
        self, name: str, keys: tuple[str, ...] = ("loss", "lm_loss", "aux_loss", "z_loss")
    ) -> list[dict]:
        recs = [r for r in self.metrics(name) if "loss" in r]
        if not recs:
            raise Miss(f"{name}: no training records in metrics.jsonl")
        for r in recs:
            for k in keys:
                if not (isinstance(r.get(k), (int, float)) and math.isfinite(r[k])):
                    raise Miss(f"{name}: step {r['step']}: {k}={r.get(k)!r}")
        return recs

    def same_losses(self, got: list[dict], want: list[dict], steps: range, what: str) -> float:
        by_step = {r["step"]: r["loss"] for r in want}
        worst = 0.0
        for r in got:
            if r["step"] in steps:
                rel = abs(r["loss"] - by_step[r["step"]]) / abs(by_step[r["step"]])
                worst = max(worst, rel)
                if rel > self.tol:
                    raise Miss(
                        f"{what}: step {r['step']} loss {r['loss']} vs {by_step[r['step']]} (rel {rel:.2e})"
                    )
        if not any(r["step"] in steps for r in got):
            raise Miss(f"{what}: no losses for steps {list(steps)}")
        return worst

    # ------------------------------------------------------------------ steps
    def prepare(self) -> None:
        from data_prep.pipeline import PrepConfig, prepare_example
        from sparsexpert.data.format import is_dataset

        self.data = self.out / "data"
        if not is_dataset(self.data):
            prepare_example(self.data, PrepConfig(vocab_size=512, seq_len=self.seq_len), log=lambda *_: None)
        self.raw = self.out / "data_raw"
        import deepspeed
        import torch

        where = "CPU accelerator (gloo)" if self.cpu else f"{self.gpus} x {torch.cuda.get_device_name(0)}"
        self.say(
            "setup",
            f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, {where}, {self.ranks} rank(s), {self.half}",
        )

    def pretrain_half(self) -> None:
        ds = self.ds(self.half, f"moe_z2_{self.half}.json")
        _, out, _ = self.pretrain(self.half, ds, steps=8)
        header = f"world {self.ranks}, ep {self.ranks}, ZeRO-2, {self.half}"
        if header not in out:
            raise Miss(f"pretrain {self.half}: the header does not say {header!r}")
        recs = self.finite(self.half)
        load = recs[-1]["expert_load"]["layer0"]
        if abs(sum(load) - 1) > 1e-4:
            raise Miss(f"expert load of layer 0 sums to {sum(load)}")
        if recs[-1]["loss"] >= recs[0]["loss"]:
            raise Miss(f"the loss did not fall: {recs[0]['loss']:.4f} -> {recs[-1]['loss']:.4f}")
        mem = f", peak memory {recs[-1]['max_memory_gb']:.2f} GB" if "max_memory_gb" in recs[-1] else ""
        if not self.cpu and not mem:
            raise Miss("no max_memory_gb in the metrics of a GPU run")
        scale = f", loss scale {recs[-1]['loss_scale']:g}" if "loss_scale" in recs[-1] else ""
        self.say(
            f"pretrain AutoEP ZeRO-2 {self.half}",
            f"{header}; loss {recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f}, {recs[-1]['tokens_per_s']:,.0f} tok/s{mem}{scale}",
        )

    def knowledge(self) -> None:
        ds = self.ds("fp32")
        for mode, keys in (("fusion", ("entity_loss", "triple_loss")), ("inject", ())):
            self.pretrain(
                mode, ds, f"--model.knowledge.mode={mode}", "--model.knowledge.entity_dim=16", steps=3
            )
            recs = self.finite(mode, ("loss", "lm_loss", *keys))
            self.say(
                f"knowledge {mode}",
                f"loss {recs[-1]['loss']:.3f}" + "".join(f", {k} {recs[-1][k]:.3f}" for k in keys),
            )
        # the entity table on row-wise Adagrad: its rows all-gathered over the ranks (NCCL on a GPU), fp32
        # under bf16 (the path refuses fp16: fp32 where the GPU lacks bf16)
        rows_ds = self.ds("bf16", "moe_z2_bf16.json") if self.half == "bf16" else ds
        _, out, _ = self.pretrain(
            "fusion_rowwise",
            rows_ds,
            "--model.knowledge.mode=fusion",
            "--model.knowledge.entity_dim=16",
            "--model.knowledge.entity_optimizer=rowwise_adagrad",
            steps=3,
        )
        if "with row-wise Adagrad" not in out:
            raise Miss("fusion rowwise: the run header does not state the row-wise table")
        recs = self.finite("fusion_rowwise", ("loss", "lm_loss", "entity_loss", "triple_loss"))
        self.say(
            "knowledge fusion rowwise",
            f"{'bf16' if self.half == 'bf16' else 'fp32'}, loss {recs[-1]['loss']:.3f}, entity_loss "
            f"{recs[-1]['entity_loss']:.3f}, triple_loss {recs[-1]['triple_loss']:.3f}",
        )

    def native(self) -> None:
        ds = self.ds("native")
        self.pretrain("native", ds, "--model.moe.backend=native", "--model.moe.capacity_factor=1.0", steps=3)
        recs = self.finite("native")
        drops = recs[-1]["dropped_frac"]
        if not all(0 <= v <= 1 for v in drops.values()):
            raise Miss(f"native: dropped_frac {drops}")
        self.say("native DeepSpeed-MoE ZeRO-2", f"loss {recs[-1]['loss']:.3f}, dropped {drops}")

    def zero3(self) -> None:
        self.pretrain("zero3", self.ds("zero3", "moe_z3.json"), steps=3)
        recs = self.finite("zero3")
        self.say("AutoEP ZeRO-3", f"loss {recs[-1]['loss']:.3f}, grad norm {recs[-1]['grad_norm']:.3f}")

    def failure_and_resume(self) -> None:
        """A run that raises at step 4 stops with status 1 and keeps its step-3 checkpoint; --resume
        continues it to the uninterrupted run's losses; a 2-rank checkpoint continues on 1 rank."""
        ds = self.ds("resume")
        self.pretrain("full", ds, "--train.save_every=3")
        code, out, _ = self.pretrain(
            "stopped", ds, "--train.save_every=3", env={"SPARSEXPERT_FAIL_AT": "0:4:raise"}, check=False
        )
        if code == 0 or "injected failure" not in out:
            raise Miss(f"an injected failure exited {code}:\n{out[-3000:]}")
        tag = self.out / "stopped" / "checkpoints" / "latest"
        if not tag.is_file() or tag.read_text().strip() != "step_00000003":
            raise Miss("the failed run's latest checkpoint is not step 3")
        self.say("failure exit", f"exit status {code}, 'injected failure' reported, checkpoint step 3 kept")
        if self.ranks == 2:
            shutil.copytree(self.out / "stopped", self.out / "elastic")
        self.pretrain("stopped", ds, "--train.save_every=3", "--resume")
        worst = self.same_losses(self.metrics("stopped"), self.metrics("full"), range(4, 7), "resume")
        self.say("resume", f"steps 4-6 equal the uninterrupted run (largest relative difference {worst:.1e})")
        if self.ranks == 2:
            one = self.ds("resume1", gradient_accumulation_steps=2)
            _, out, _ = self.pretrain("elastic", one, "--train.save_every=3", "--resume", ranks=1)
            if "elastic resume: world 2 -> 1" not in out:
                raise Miss(f"no elastic resume:\n{out[-3000:]}")
            tol, self.tol = self.tol, max(self.tol, 1e-5)  # resharded: fp32 rounding
            worst = self.same_losses(
                self.metrics("elastic"), self.metrics("full"), range(4, 7), "elastic resume"
            )
            self.tol = tol
            self.say(
                "elastic resume 2 -> 1",
                f"steps 4-6 equal the 2-rank run (largest relative difference {worst:.1e})",
            )

    def evaluate(self) -> None:
        self.run(
            [
                "launcher/evaluate.py",
                "--run",
                str(self.out / "full"),
                "--probe_world",
                str(self.raw),
                "--max_facts",
                "4",
            ],
            self.ranks,
        )
        res = json.loads((self.out / "full" / "eval.json").read_text())
        if not math.isfinite(res["perplexity"]) or res["knowledge_probe"]["heldout"]["text"]["n"] != 4:
            raise Miss(f"evaluation: {res}")
        self.say(
            "evaluation",
            f"perplexity {res['perplexity']:.1f}, probe MRR {res['knowledge_probe']['heldout']['text']['mrr']:.3f}",
        )

    def finetune(self) -> None:
        re_dir = self.out / "re"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_prep",
                "relations",
                "--corpus",
                str(self.raw / "corpus.txt"),
                "--kg",
                str(self.raw / "kg.tsv"),
                "--aliases",
                str(self.raw / "aliases.tsv"),
                "--case",
                "exact",
                "--output",
                str(re_dir),
            ],
            cwd=REPO,
            env=self.env,
            check=True,
            capture_output=True,
        )
        ds = self.ds("ft")
        common = [
            "--ds_config",
            str(ds),
            "--init",
            str(self.out / "full"),
            "--task",
            "relation",
            "--train",
            str(re_dir / "train.jsonl"),
            "--dev",
            str(re_dir / "dev.jsonl"),
            "--train.max_steps=4",
            "--train.eval_every=4",
            "--train.log_every=1",
            "--overwrite",  # a smoke folder given again with --out: this script's runs
        ]
        self.run(
            [
                "launcher/finetune.py",
                *common,
                "--output_dir",
                str(self.out / "fgm"),
                "--adversarial.method=fgm",
            ],
            self.ranks,
        )
        self.run(
            [
                "launcher/finetune.py",
                *common,
                "--output_dir",
                str(self.out / "pgd"),
                "--adversarial.method=pgd",
                f"--distill.teacher={self.out / 'fgm'}",
            ],
            self.ranks,
        )
        for name, keys in (("fgm", ("adv_loss",)), ("pgd", ("adv_loss", "distill_kl"))):
            recs = self.finite(name, ("loss", *keys))
            res = json.loads((self.out / name / "results.json").read_text())
            self.say(
                f"fine-tuning {name}",
                f"loss {recs[-1]['loss']:.3f}"
                + "".join(f", {k} {recs[-1][k]:.4f}" for k in keys)
                + f", dev F1 {res['best_dev_metric']:.3f}",
            )

    def export(self) -> None:
        import torch
        from safetensors.torch import load_file

        from sparsexpert.weights.deepspeed_formats import load_weights

        self.run(
            [
                "launcher/export.py",
                "--checkpoint",
                str(self.out / "full"),
                "--output",
                str(self.out / "consolidated"),
            ]
        )
        got = load_file(str(self.out / "consolidated" / "model.safetensors"))
        want, _ = load_weights(self.out / "full")
        if got.keys() != want.keys() or any(not torch.equal(got[k], want[k]) for k in want):
            raise Miss("consolidated weights differ from the checkpoint's")
        self.say("consolidation", f"{len(got)} tensors equal the checkpoint's")
        self.run(
            [
                "launcher/export.py",
                "--checkpoint",
                str(self.out / "full"),
                "--output",
                str(self.out / "hf"),
                "--hf",
            ]
        )
        import transformers

        from sparsexpert.model.transformer import Transformer
        from sparsexpert.weights.export import load_init

        hf = transformers.AutoModelForCausalLM.from_pretrained(self.out / "hf").eval()
        init = load_init(self.out / "full")
        ours = Transformer(init.cfg).eval()
        ours.load_state_dict(init.state)
        x = torch.randint(0, init.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (ours(x).logits - hf(x).logits).abs().max().item()
        if diff > 1e-4:
            raise Miss(f"Hugging Face logits differ from ours by {diff}")
        self.say("Hugging Face export", f"{type(hf).__name__}, logits within {diff:.1e} of ours")

    def generate(self) -> None:
        _, out, _ = self.run(
            [
                "launcher/generate.py",
                "--model",
                str(self.out / "full"),
                "--prompt",
                "The",
                "--max_new_tokens",
                "12",
                "--device",
                self.device,
            ]
        )
        text = self.stdout.strip().splitlines()[-1]
        if not text.startswith("The") or len(text) <= 3:
            raise Miss(f"generation printed {text!r}")
        self.say(f"generation on {self.device}", repr(text[:80]))

    def hung_rank(self) -> None:
        """Rank 1 stops (SIGSTOP: alive, silent, its sockets open) at step 3, so rank 0's next collective
        waits, as NCCL's does for a dead or stuck peer. Rank 0's watch must name rank 1 from its
        heartbeats within seconds, long before the collective timeout (60 s), and exit 1."""
        if self.ranks < 2:
            print("[smoke] hung rank: skipped (needs 2 GPUs)", flush=True)
            return
        import signal

        ds = self.ds("hang")
        args = [
            "launcher/pretrain.py",
            "--ds_config",
            str(ds),
            "--output_dir",
            str(self.out / "hang"),
            *self.model,
        ]
        args += [
            f"--data.path={self.data}",
            "--train.max_steps=20",
            "--train.eval_every=0",
            "--model.moe.ep_size=2",
        ]
        args += ["--train.collective_timeout_minutes=1", "--overwrite"]
        launcher = str(Path(sys.executable).with_name("deepspeed"))
        cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), *args]
        log = self.out / "hang.log"
        line = "training failed: rank 1 stopped responding (process exited or hangs); rank 0 stops at step 3"
        with open(log, "w") as f:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=dict(self.env, SPARSEXPERT_FAIL_AT="1:3:hang"),
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        t0, stopped_at = time.time(), None
        try:
            while time.time() - t0 < 180 and line not in log.read_text() and proc.poll() is None:
                if stopped_at is None and "stops itself (SIGSTOP)" in log.read_text():
                    stopped_at = time.time()
                time.sleep(0.2)
            named_at = time.time()
        finally:
            # DeepSpeed's launcher SIGTERMs the stopped rank once rank 0 exits; let the signal through
            os.killpg(proc.pid, signal.SIGCONT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out = log.read_text()
        if line not in out or proc.returncode == 0:
            raise Miss(f"a hung rank: exit {proc.returncode}, no line {line!r}:\n{out[-3000:]}")
        after = named_at - (stopped_at or t0)
        if after > 45:
            raise Miss(f"a hung rank was named {after:.0f} s after it stopped (heartbeats: about 10 s)")
        self.say(
            "a hung rank",
            f"rank 0 named rank 1 {after:.0f} s after it stopped and exited; launcher exit {proc.returncode}",
        )

    def suite(self) -> None:
        env = dict(self.env, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-n", "2"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:]
        if proc.returncode:
            raise Miss(f"the CPU suite failed:\n{(proc.stdout + proc.stderr)[-5000:]}")
        self.say("CPU suite (DS_ACCELERATOR=cpu)", tail[0] if tail else "passed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="DeepSpeed's CPU accelerator, tiny sizes, 2 ranks")
    p.add_argument("--out", help="folder for the runs (default: a new temporary folder)")
    p.add_argument("--skip_suite", action="store_true", help="do not run the CPU test suite at the end")
    args = p.parse_args()
    smoke = Smoke(args)
    steps = [smoke.prepare, smoke.pretrain_half, smoke.knowledge, smoke.native, smoke.zero3]
    steps += [
        smoke.failure_and_resume,
        smoke.evaluate,
        smoke.finetune,
        smoke.export,
        smoke.generate,
        smoke.hung_rank,
    ]
    if not (args.cpu or args.skip_suite):
        steps.append(smoke.suite)
    for step in steps:
        try:
            step()
        except Miss as miss:
            print(f"[smoke] {step.__name__}: MISS: {miss}", flush=True)
            sys.exit(1)
    print(f"[smoke] all steps passed in {time.time() - smoke.t0:.0f} s ({smoke.out})", flush=True)


if __name__ == "__main__":
    main()
