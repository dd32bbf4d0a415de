"""The GPU smoke script (bench/gpu_smoke.sh) run with --cpu: every step on DeepSpeed's CPU accelerator at
tiny sizes, 2 ranks where the GPU run uses 2, so the one command a GPU host runs cannot rot unseen."""

from conftest import run_cmd

STEPS = [
    "setup",
    "pretrain AutoEP ZeRO-2 bf16",
    "knowledge fusion",
    "knowledge inject",
    "knowledge fusion rowwise",
    "native DeepSpeed-MoE ZeRO-2",
    "AutoEP ZeRO-3",
    "failure exit",
    "resume",
    "elastic resume 2 -> 1",
    "evaluation",
    "fine-tuning fgm",
    "fine-tuning pgd",
    "consolidation",
    "Hugging Face export",
    "generation on cpu",
    "a hung rank",
]


def test_gpu_smoke_script_passes_on_the_cpu(tmp_path):
    run = run_cmd(["bash", "bench/gpu_smoke.sh", "--cpu", "--out", str(tmp_path)], tmp_path, timeout=600)
    for step in STEPS:
        assert f"] {step}: ok: " in run.output, (step, run.output[-3000:])
    assert "[smoke] all steps passed" in run.output
