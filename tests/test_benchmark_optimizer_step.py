"""Smoke test of ``python -m benchmarks.optimizer_step --quick``: it runs as a user runs it and its
output holds what it claims (a row per method with positive times, rankopt's state below
AdamW's, the exact metric solve matching a tight PCG solve, a PNG marked as a smoke run)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="PyTorch not installed")


@pytest.fixture(scope="module")
def quick(tmp_path_factory, run_script):
    out = tmp_path_factory.mktemp("optimizer_step")
    proc = run_script(["-m", "benchmarks.optimizer_step", "--quick", "--out", out], timeout=600)
    return proc.stdout, out


def test_step_table_and_state(quick):
    stdout, out = quick
    assert "torch threads 1" in stdout and "| set | layers | r |" in stdout
    res = json.loads((out / "optimizer_step.json").read_text())
    by = {d["method"]: d for d in res["steps"]}
    assert {"AdamW foreach", "RAdamW"} <= set(by)
    for d in by.values():
        assert 0 < d["min_ms"] <= d["median_ms"] <= d["max_ms"]
    assert 0 < by["RAdamW"]["state_ratio"] <= 0.7  # every tensor reachable from optimizer.state


def test_solves_and_png(quick):
    _, out = quick
    res = json.loads((out / "optimizer_step.json").read_text())
    errs = {d["solve"]: d["direction_error"] for d in res["solves"]}
    assert errs["direct (exact, closed form)"] < 1e-10
    assert errs["preconditioner only (exact=False)"] > 1e-2  # it is not the gradient
    png = (out / "optimizer_step.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_breakdown_splits_per_call_and_per_layer_cost(quick):
    """Part 4: one row per stack size, each timed; the fitted line is consistent with them."""
    stdout, out = quick
    res = json.loads((out / "optimizer_step.json").read_text())["breakdown"]
    assert [r["layers"] for r in res["rows"]] == [1, 2, 4]
    assert all(r["step_ms"] > 0 and r["bmm_us_per_matrix"] > 0 for r in res["rows"])
    a, b = res["per_call_ms"], res["per_layer_ms"]
    for r in res["rows"]:  # the line passes near every median (timings: a loose check)
        assert abs(a + b * r["layers"] - r["step_ms"]) < r["step_ms"]
    assert "per call" in stdout and "| layers B |" in stdout


def test_floor_sums_its_parts_and_probe_agrees(quick):
    """Part 5: the floor is the sum of the parts it names (both clocks), every part was timed,
    and the numba probe computes the same direct solve as torch (float64)."""
    stdout, out = quick
    res = json.loads((out / "optimizer_step.json").read_text())["floor"]
    assert res["fused_error"] < 1e-12
    assert res["thin_products"] > 0
    for mode in ("interleaved", "back to back"):
        ms = res[mode]
        assert all(v > 0 for k, v in ms.items() if k != "outside the rule")
        parts = sum(ms[k] for k in res["floor_parts"]) + ms["outside the rule"]
        assert ms["floor"] == pytest.approx(parts)
        assert ms["4 x AdamW foreach"] == pytest.approx(4 * ms["AdamW foreach"])
    assert "**floor**" in stdout and "numba probe" in stdout
