#!/usr/bin/env bash
# The whole GPU check in one short run (under 8 minutes on one GPU): every CUDA test, then the
# CUDA part of python -m benchmarks.optimizer_step (224 matrices of LLaMA-7B shapes at r = 16 and 64,
# float32 and bfloat16 parameters, against fused AdamW on LoRA factors). Writes its outputs to
# $OUT (default out/gpu) and prints them; paste them into docs/optimizer-core.md (GPU).
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; } | tee "$OUT/nvidia_smi.txt"
echo "== CUDA tests"
timeout 240 python -m pytest -q -p no:cacheprovider tests -k "cuda or cupy or grouped" -rs 2>&1 \
  | tail -40 | tee "$OUT/gpu_tests.txt"
echo "== step benchmark (CUDA)"
timeout 300 python -m benchmarks.optimizer_step --device cuda --sets llama-224 --ranks 16 64 \
  --dtypes float32 bfloat16 --reps 20 --variants --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.txt"
