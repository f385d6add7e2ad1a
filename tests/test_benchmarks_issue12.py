"""Smoke tests of the issue-12 benchmark modes, run as a user runs them (subprocesses, small
sizes): ``python -m benchmarks.completion --noise --sampling --quick``, ``--scale`` with one
tiny size, ``--backend torch --device cpu``, ``--device cuda`` without a GPU (a clear error),
and ``python -m benchmarks.movielens --quick``. Each checks what its output claims, not only
that it ran."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPLETION = ["-m", "benchmarks.completion"]

pytestmark = pytest.mark.timeout(300)


def _run(run_script, args: list[str], tmp: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run_script([*args, "--out", tmp], timeout=280, check=check, PYTHONPATH=str(ROOT))


def test_noise_and_sampling_sections(tmp_path, run_script):
    proc = _run(run_script, [*COMPLETION, "--noise", "--sampling", "--quick"], tmp_path)
    out = json.loads((tmp_path / "completion_noise_sampling.json").read_text())
    noise = out["noise"]
    assert len(noise) == 2 * 2 * 3  # two sigmas x two ways of calling solve x three kappas
    for r in noise:  # every cell within 1.5x the oracle and no worse than zero
        assert r["pass"] and r["error"] <= min(1.5 * r["oracle"], 1.0), r
        assert r["noise_estimate"] == pytest.approx(r["sigma"], rel=0.5)
    assert "cells within min(1.5 x oracle, 1): 12 of 12" in proc.stdout
    for r in out["sampling"]:
        assert r["error"] <= 1e-6 or r["under_rows"] + r["under_cols"] > 0, r
    png = (tmp_path / "completion_noise.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_scale_section_reports_time_memory_and_error(tmp_path, run_script):
    proc = _run(run_script, [*COMPLETION, "--scale", "400", "--quick"], tmp_path)
    rows = json.loads((tmp_path / "completion_scale.json").read_text())["scale"]
    (r,) = rows
    assert r["n"] == 400 and r["nnz"] == round(3 * 10 * (800 - 10))
    assert r["rel_error"] <= 1e-8 and r["peak_rss_gib"] > 0 and r["time_per_iteration"] > 0
    assert "iteration 1:" in proc.stdout  # progress lines from the worker
    assert (tmp_path / "completion_scale.png").stat().st_size > 10_000


def test_torch_backend_grid_on_the_cpu(tmp_path, run_script):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch backend needs PyTorch")
    proc = _run(
        run_script,
        [
            *COMPLETION,
            "--quick",
            "--repeats",
            "0",
            "--backend",
            "torch",
            "--device",
            "cpu",
        ],
        tmp_path,
    )
    assert "backend torch, device cpu" in proc.stdout
    rows = json.loads((tmp_path / "completion_results.json").read_text())["rows"]
    auto = [r for r in rows if r["method"] == "auto"]
    assert auto and all(r["rel_error"] <= 1e-8 for r in auto)
    assert "pymanopt CG" not in {r["method"] for r in rows}


def test_device_cuda_without_a_gpu_fails_clearly(tmp_path, run_script):
    torch_ok = importlib.util.find_spec("torch") is not None
    if torch_ok:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present: the cuda run is a real benchmark, not smoke")
    proc = _run(
        run_script,
        [*COMPLETION, "--quick", "--device", "cuda"],
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "no CUDA GPU" in proc.stderr or "needs PyTorch" in proc.stderr, proc.stderr[-2000:]


def test_movielens_benchmark_quick(tmp_path, run_script):
    if importlib.util.find_spec("recbole") is None:
        pytest.skip("recbole is not installed (pip install --no-deps recbole)")
    proc = _run(run_script, ["-m", "benchmarks.movielens", "--quick"], tmp_path)
    (res,) = json.loads((tmp_path / "movielens_results.json").read_text())
    assert res["dataset"] == "MovieLens-100k"
    for key in ("biases", "soft-impute", "ALS (best rank)", 'rankopt solve(rank="auto")'):
        assert 0.85 < res[key] < 1.0, (key, res[key])
    assert res["global mean"] > res["biases"] > res['rankopt solve(rank="auto")']
    assert "| soft-impute |" in proc.stdout and "| biases |" in proc.stdout
    assert (tmp_path / "movielens.png").stat().st_size > 10_000
