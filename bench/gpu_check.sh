#!/usr/bin/env bash
# One GPU check, ready to run on one H100/H200 (about 5-10 minutes): the benchmark's GPU figures in one table
# and one JSON file.
#   bash bench/gpu_check.sh [OUT.json]       (a CUDA venv: make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128)
# Rows: training img/s and MFU at 128 px for ours against the faithful MONAI-tutorial loop (step-only and end to
# end), compile off/on for ddpm and rflow with the first-step (compile) time, peak memory, sampling img/s per
# sampler and against diffusers' DDIMScheduler on the same network, generation with writing vs sampling alone,
# the batch-invariance difference on CUDA, evaluation images/s, and 3D steps (128x128x96 with gradient
# checkpointing, latents, the largest volume at batch 1) with their memory.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-bench/gpu_check.json}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" bench/benchmark.py --device cuda --preset research --suite training --suite gpu --suite sampling \
    --suite metrics --suite volumes --json "$OUT"
