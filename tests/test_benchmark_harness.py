"""The benchmarks' harness (``benchmarks/harness.py``): the one optimizer-state measure, the
interleaved timing loop, the thread line and the lock, on tiny inputs (milliseconds)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import harness


def test_state_bytes_counts_each_region_once():
    a = np.zeros((10, 10))
    state = {"a": a, "half": a[:5], "t": a.T, "t again": a.T, "count": 3, "s": np.float64(1.0)}
    assert harness.state_bytes(state) == 800 + 800  # a (its half inside it), a.T once; no numbers
    nested = {"projector": type("P", (), {})()}
    nested["projector"].matrix = np.ones(4, dtype=np.float32)
    assert harness.state_bytes([nested]) == 16  # through an object's attributes


def test_optimizer_state_bytes_of_torch_adamw_and_stacked_views():
    torch = pytest.importorskip("torch")
    lin = torch.nn.Linear(10, 3, dtype=torch.float64)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.ones(2, 10, dtype=torch.float64)).sum().backward()
    opt.step()
    # two moments of the weight and the bias (float64) and two scalar step counters
    steps = sum(st["step"].numel() * st["step"].element_size() for st in opt.state.values())
    assert harness.optimizer_state_bytes(opt) == 2 * (30 + 3) * 8 + steps
    stacked = torch.zeros(3, 4)
    views = type("Opt", (), {"state": {i: {"m": stacked[i]} for i in range(3)}})()
    assert harness.optimizer_state_bytes(views) == 3 * 4 * 4
    assert harness.optimizer_state_bytes(object()) == 0


def test_time_interleaved_rounds_order_and_samples():
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k) or k) for k in "ab"}
    t = harness.time_interleaved(fns, 3, calls=2, warmup=1, alternate=True, keep_results=True)
    assert calls == list("ab") + list("aabbbbaaaabb")  # warm-up, then A B, B A, A B
    assert all(len(v.seconds) == 3 and v.rounds == 3 for v in t.values())
    assert t["a"].results == ["a"] * 3 and t["b"].last == "b"
    assert 0 < t["a"].min <= t["a"].median <= t["a"].max
    per_call = harness.time_interleaved({"a": lambda: None}, 2, calls=3, per_call=True)
    assert len(per_call["a"].seconds) == 6 and per_call["a"].rounds == 2


def test_time_interleaved_budget_keeps_a_slow_warmup():
    import time

    t = harness.time_interleaved(
        {"slow": lambda: time.sleep(0.02), "fast": lambda: None}, 9, budget=0.1
    )
    assert 1 <= len(t["slow"].seconds) < 9 and t["slow"].spent <= 0.1 + 0.05
    assert len(t["fast"].seconds) == 9


def test_threads_line_and_lock(tmp_path):
    line = harness.pin_threads(None)
    assert line.startswith("threads: ") and "BLAS" in line
    with harness.bench_lock(str(tmp_path / "lock")), harness.bench_lock(""):
        pass
    assert "python -m benchmarks.x --quick" == harness.command_line("benchmarks.x", ["--quick"])
