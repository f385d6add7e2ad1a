"""The ALS comparison of ``python -m benchmarks.completion --als`` (``benchmarks/_als.py``): its
error measure and time-to-error reading without Spark, and a ``--quick`` run with Spark when the
extra ``als`` (pyspark, pyarrow) and Java are installed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import _als as als
from rankopt.problems import low_rank_truth

ROOT = Path(__file__).resolve().parents[1]


def test_relative_error_is_exact_in_the_joint_basis():
    truth = low_rank_truth(300, 200, 4, kappa=10.0, seed=0)
    X = truth.to_dense()
    rng = np.random.default_rng(1)
    A = truth.U * truth.s + 1e-9 * rng.standard_normal((300, 4))
    B = truth.V.copy()
    dense = np.linalg.norm(A @ B.T - X) / np.linalg.norm(X)
    got = als.relative_error(A, B, truth)
    assert got == pytest.approx(dense, rel=1e-6)  # 1e-9 errors: no cancellation
    assert als.relative_error(truth.U * truth.s, truth.V, truth) < 1e-14
    assert als.relative_error(np.zeros((300, 4)), B, truth) == pytest.approx(1.0)


def test_time_to_reads_the_first_time_at_or_below():
    trace = [(1.0, 0.5), (2.0, 0.1), (3.0, 1e-3), (4.0, 1e-9)]
    assert als.time_to(trace, 0.1) == 2.0
    assert als.time_to(trace, 1e-4) == 4.0
    assert als.time_to(trace, 1e-12) is None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_als_run(tmp_path, run_script):
    missing = als.als_available()
    if missing:
        pytest.skip(f"ALS comparison needs {missing}")
    args = ["-m", "benchmarks.completion", "--als", "--quick", "--out", tmp_path]
    proc = run_script(args, timeout=580, PYTHONPATH=str(ROOT))
    out = json.loads((tmp_path / "completion_als.json").read_text())["als"]
    assert out["startup"] > 0 and len(out["cases"]) == 2  # kappa 1 and 100 at n = 2000
    for case in out["cases"]:
        assert case["rankopt"]["error"] <= 1e-8 and case["load"] > 0
        assert len(case["als"]) == 4 and all(f["fit"] > 0 for f in case["als"])
        assert case["best"]["error"] == min(f["error"] for f in case["als"])
    assert "Spark start-up" in proc.stdout
    assert (tmp_path / "completion_als.png").read_bytes()[:4] == b"\x89PNG"
