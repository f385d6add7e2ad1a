"""The finetune benchmark's learning-rate protocol: tune on one seed, then run more seeds.

Every method starts from its own 3-point grid; when the best rate (validation accuracy, then
loss, on seed ``seeds[0]``) is at an end of the grid, the grid is extended by one point (1, 3,
10, ... times a power of 10) beyond it, at most ``EXTEND`` times: the same rule for every method,
so no method is judged at the edge of its range. The best rate is then run with the other seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from benchmarks.finetune.methods import Method
from benchmarks.finetune.runs import Runner

EXTEND = 2  # at most this many grid extensions when the best lr is at an end of the grid


def best_run(runs: list[dict]) -> dict:
    """The run of highest validation accuracy (then lowest validation loss), among those that
    did not diverge when there are any."""
    ok = [r for r in runs if r["status"] == "ok"] or runs
    return max(ok, key=lambda r: (r["val_acc"], -r["val_loss"]))


def next_lr(lr: float, up: bool) -> float:
    """The next point of the grid 1, 3, 10, 30, ... (times a power of 10) above or below lr."""
    e = math.floor(math.log10(lr) + 1e-9)
    one = abs(lr / 10**e - 1) < 1e-6
    if up:
        return float(f"{(3 if one else 10) * 10**e:.1g}")
    return float(f"{(0.3 if one else 1) * 10**e:.1g}")


def tune(runner: Runner, task: str, key: str, method: Method, grid: list[float], seed: int,
         data_task: str) -> tuple[list[dict], list[float]]:  # fmt: skip
    """The runs of the (extended) grid on ``seed``, and the grid."""
    runs = [runner.run(task, key, method, lr, seed, data_task) for lr in grid]
    for _ in range(EXTEND if len(grid) > 1 else 0):
        best = best_run(runs)
        if best["lr"] not in (grid[0], grid[-1]):
            break
        up = best["lr"] == grid[-1]
        lr = next_lr(grid[-1], up=True) if up else next_lr(grid[0], up=False)
        grid = [*grid, lr] if up else [lr, *grid]
        runs.append(runner.run(task, key, method, lr, seed, data_task))
    return runs, grid


def run_task(runner: Runner, task: str, methods: dict[str, Method], data_task: str,
             seeds: Sequence[int], grids: Callable[[Method], Sequence[float]]) -> dict:  # fmt: skip
    """Every method of ``methods`` on ``task`` (its data from ``data_task``): tuned on
    ``seeds[0]``, then its best rate on the other seeds. Returns key -> label, the tuning and
    final runs, the best rate, whether it is at the grid's end, and the grid."""
    results = {}
    for key, method in methods.items():
        try:
            runs, grid = tune(runner, task, key, method, list(grids(method)), seeds[0], data_task)
        except NotImplementedError as e:
            print(f"  {task:8s} {key:17s} skipped: {e}", flush=True)
            continue
        best = best_run(runs)
        finals = [best] + [
            runner.run(task, key, method, best["lr"], s, data_task) for s in seeds[1:]
        ]
        edge = len(grid) > 1 and best["lr"] in (grid[0], grid[-1])
        results[key] = dict(label=method.label, rankopt=method.rankopt, tune=runs, finals=finals,
                            best_lr=best["lr"], at_grid_edge=edge, grid=sorted(grid))  # fmt: skip
    return results
