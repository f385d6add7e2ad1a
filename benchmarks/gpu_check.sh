#!/usr/bin/env bash
# The whole GPU check in one short run (under 12 minutes on one GPU): every CUDA test, then the
# CUDA part of python -m benchmarks.optimizer_step (224 matrices of LLaMA-7B shapes at r = 16 and 64,
# float32 and bfloat16 parameters, against fused AdamW on LoRA factors), then a compiled
# opt.step under mode="reduce-overhead" (CUDA graphs) against eager. Writes its outputs to
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
echo "== compiled step, mode=\"reduce-overhead\" (CUDA graphs) against eager"
timeout 240 python - <<'PY' 2>&1 | tee "$OUT/gpu_compiled_step.txt"
import time

import torch
from torch import nn

import rankopt.torch as rt

torch.manual_seed(0)
dev = "cuda"
model = nn.Sequential(nn.Linear(1024, 1024), nn.GELU(), rt.LowRankLinear(1024, 1024, rank=16),
                      nn.GELU(), nn.Linear(1024, 10)).to(dev)
model = rt.apply_low_rank(model, rank=16, target_modules=["0"], modules_to_save=["2", "4"])
x, y = torch.randn(256, 1024, device=dev), torch.randint(0, 10, (256,), device=dev)


def timed(step, n=30):
    """Seconds per step (median of n; the first 3 steps compile and are left out)."""
    times = []
    for i in range(n + 3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


for mode in (None, "default", "reduce-overhead"):
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=1e-3)
    step = opt.step if mode is None else torch.compile(opt.step, mode=mode)
    print(f"RAdamW step, {mode or 'eager'}: {timed(step) * 1e3:.3f} ms per step (median of 30)")
PY
