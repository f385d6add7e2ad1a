"""The finetune benchmark's timing stage: every method at its chosen rate, interleaved.

Measured apart from the accuracy runs: all models built first (seed 0), then ``rounds`` rounds
of ``steps`` steps per method, interleaved (:func:`benchmarks.harness.time_interleaved`, one
untimed step each first), under the benchmark lock; medians over all timed steps of the ms per
step (forward + backward + step) and per optimizer step. Written to ``timing_<task>.json`` and
read back by a second call.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.finetune.methods import COMPRESS_METHODS, METHODS
from benchmarks.finetune.runs import Runner, build_run
from benchmarks.finetune.tasks import COMPRESS_DATA
from benchmarks.harness import bench_lock, time_interleaved


def _stepper(model: nn.Module, opt: Any, train: tuple, batches: list) -> Callable[[], float]:
    """One training step per call on the next of ``batches``; returns the optimizer step's
    seconds (the caller times the whole step)."""
    h, m, y = train
    todo = iter(batches)

    def step() -> float:
        b = next(todo)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(h[b], m[b]), y[b]).backward()
        t1 = time.perf_counter()
        opt.step()
        return time.perf_counter() - t1

    return step


def timing_stage(runner: Runner, task: str, results: dict, rounds: int, steps: int) -> dict:
    """ms per step and per optimizer step of each method of ``results`` at its best rate
    (see the module docstring); ``key -> {ms_step, ms_opt, n}``."""
    path = runner.dir.parent / f"timing_{task}.json"
    if path.exists():
        return json.loads(path.read_text())
    methods = COMPRESS_METHODS if task == "compress" else METHODS
    data = runner.task_data(COMPRESS_DATA if task == "compress" else task)
    train = data["train"]
    rng = np.random.default_rng(0)
    fns = {}
    for key, res in results.items():
        torch.manual_seed(0)
        model, opt = build_run(task, methods[key], res["best_lr"], 0, data, runner.template(task),
                               runner.args.batch)  # fmt: skip
        batches = [torch.as_tensor(rng.choice(len(train[2]), runner.args.batch, replace=False))
                   for _ in range(1 + rounds * steps)]  # fmt: skip
        fns[key] = _stepper(model, opt, train, batches)
    with bench_lock(runner.args.lock):
        timings = time_interleaved(fns, rounds, calls=steps, per_call=True, keep_results=True)
    out = {k: dict(ms_step=1e3 * t.median, ms_opt=1e3 * statistics.median(t.results),
                   n=len(t.seconds)) for k, t in timings.items()}  # fmt: skip
    path.write_text(json.dumps(out))
    for k, v in out.items():
        print(
            f"  timing {task} {k:17s} {v['ms_step']:.0f} ms/step, {v['ms_opt']:.1f} ms/opt step",
            flush=True,
        )
    return out
