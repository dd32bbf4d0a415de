#!/usr/bin/env bash
# Smoke test of every sparsexpert path on this machine's GPUs (or, with --cpu, DeepSpeed's CPU
# accelerator at tiny sizes); see bench/gpu_smoke.py for the steps. Exits non-zero at the first miss.
#   bash bench/gpu_smoke.sh            # GPU host: 1 GPU, 2 ranks where there are 2+; then the CPU suite
#   bash bench/gpu_smoke.sh --cpu      # what tests/test_gpu_smoke.py runs
set -euo pipefail
cd "$(dirname "$0")/.."
exec python bench/gpu_smoke.py "$@"
