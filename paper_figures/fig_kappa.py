r"""Figure: convergence against the condition number of the target (matrix completion).

Synthetic completion ``random_completion(n, n, r, kappa, oversampling=3)``: the truth has
singular values spaced geometrically from 1 to ``1/kappa``; the same factors and the same
observed positions for every ``kappa`` (one seed), so only the spectrum changes. Methods, all
from the problem's spectral start:

* fixed-rank RGD and RCG (``rankopt.solvers``, exact line search along the tangent direction);
* ``rankopt.solve(method="auto")``: Riemannian Gauss-Newton at full rank, and if that does
  not converge fast, rank-adaptive Gauss-Newton from rank 1 (``rankopt.solvers.Auto``).

Top row: relative error ``||X_k - X*||_F / ||X*||_F`` against iteration, one panel per
``kappa``. Bottom row: final error after the iteration budget, iterations to reach the target
error, and the number of O(|Omega| r) passes over the observed entries to reach it (cost
evaluations, gradients and Hessian-vector products each count one), which puts a Gauss-Newton
iteration (many inner CG steps) and a gradient iteration on the same scale without timing
on a loaded machine.

    python -m paper_figures.fig_kappa [--quick] [--out DIR]
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import rankopt as ro
from paper_figures._common import COLORS, floor_curve, parse_args, save

NAME = "fig_kappa"
METHODS = ("RGD", "RCG", "auto")
LABELS = {
    "RGD": "RGD (fixed rank)",
    "RCG": "RCG (fixed rank)",
    "auto": 'rankopt.solve(method="auto")',
}


class PassCounter:
    """Counts the O(|Omega| r) passes a solver makes over the observed entries.

    Wraps the problem instance's public ``cost``, ``cost_and_egrad`` and ``sample`` (the last
    is what the Hessian-vector product and the exact line search call). ``marks`` holds the
    count after each iteration, fed by the solver's callback. Not counted: the spectral starts
    (a truncated SVD of the sparse data, a few dozen sparse products, the same for every
    method) and the randomized SVD with which a rank-adaptive stage picks its new pair.
    """

    def __init__(self, problem: Any) -> None:
        self.count = 0
        self.marks: list[int] = []
        for name in ("cost", "cost_and_egrad", "sample"):
            setattr(problem, name, self._wrap(getattr(problem, name)))

    def _wrap(self, fn):
        def counted(*args, **kw):
            self.count += 1
            return fn(*args, **kw)

        return counted

    def callback(self, info: Any) -> bool:
        self.marks.append(self.count)
        return False


def run_method(method: str, problem: Any, r: int, max_iter: int, seed: int) -> dict:
    """One run with error tracking and pass counting; returns curves and counters."""
    counter = PassCounter(problem)
    t0 = time.perf_counter()
    if method == "auto":
        res = ro.solve(
            problem,
            rank=r,
            method="auto",
            tol=1e-12,
            max_iter=max_iter,
            seed=seed,
            callback=counter.callback,
            track_error=True,
        )
    else:
        cls = {"RGD": ro.solvers.RGD, "RCG": ro.solvers.RCG}[method]
        x0 = problem.spectral_init(r, seed=seed)
        res = cls(tol=1e-12, max_iter=max_iter, track_error=True).run(
            problem, x0, callback=counter.callback
        )
    seconds = time.perf_counter() - t0
    err = np.asarray(res.history.rel_error, dtype=float)
    passes = np.asarray([1, *counter.marks], dtype=float)
    if len(passes) != len(err):
        raise RuntimeError(
            f"{method}: {len(passes)} callback marks for {len(err)} history entries; "
            "the pass count per iteration would be misaligned"
        )
    return {
        "err": err,
        "passes": passes,
        "iterations": res.iterations,
        "time": seconds,
        "stop": str(res.stop_reason),
        "rank": res.rank,
    }


def first_below(curve: np.ndarray, target: float) -> int | None:
    """Index of the first entry ``<= target`` (None if never)."""
    hit = np.flatnonzero(np.asarray(curve) <= target)
    return int(hit[0]) if hit.size else None


def summarize(v: dict, target: float) -> dict:
    """The numbers of one run that go into the JSON file."""
    j = first_below(v["err"], target)
    return {
        "iterations": v["iterations"],
        "final_error": float(v["err"][-1]),
        "iters_to_target": j,
        "passes_to_target": None if j is None else int(v["passes"][j]),
        "passes": int(v["passes"][-1]),
        "seconds": round(v["time"], 2),
        "stop": v["stop"],
    }


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the experiment and write ``fig_kappa.png`` and ``fig_kappa.json``."""
    args = parse_args(__doc__.splitlines()[0], argv)
    if args.quick:
        n, r, kappas, n_seeds = 150, 10, (1.0, 1e2, 1e4), 1
        budgets = {"RGD": 60, "RCG": 60, "auto": 100}
    else:
        n, r, kappas, n_seeds = 1000, 10, (1.0, 1e1, 1e2, 1e3, 1e4), 3
        budgets = {"RGD": 400, "RCG": 400, "auto": 200}  # 200: solve()'s default for "auto"
    target = 1e-8
    seeds = list(range(args.seed, args.seed + n_seeds))
    runs: dict[int, dict[float, dict[str, dict]]] = {}
    for seed in seeds:
        runs[seed] = {}
        for kappa in kappas:
            runs[seed][kappa] = {}
            for method in METHODS:
                problem = ro.problems.random_completion(
                    n, n, r, kappa=kappa, oversampling=3.0, seed=seed
                )
                runs[seed][kappa][method] = res = run_method(
                    method, problem, r, budgets[method], seed
                )
                print(
                    f"seed={seed} kappa={kappa:8.0e} {method:5s} iters={res['iterations']:4d} "
                    f"err={res['err'][-1]:.2e} passes={int(res['passes'][-1]):5d} "
                    f"time={res['time']:.1f}s stop={res['stop']}",
                    flush=True,
                )
    path = plot(runs, kappas, n, r, target, args.out)
    summary = {
        "n": n,
        "r": r,
        "oversampling": 3.0,
        "target_error": target,
        "budgets": budgets,
        "seeds": seeds,
        # runs of the first seed (the curves of the top row), then every seed
        "runs": {
            f"{k:g}": {m: summarize(v, target) for m, v in runs[seeds[0]][k].items()}
            for k in kappas
        },
        "all_seeds": {
            str(seed): {
                f"{k:g}": {m: summarize(v, target) for m, v in per[k].items()} for k in kappas
            }
            for seed, per in runs.items()
        },
    }
    jpath = Path(args.out) / f"{NAME}.json"
    jpath.write_text(json.dumps(summary, indent=1))
    return [path]


def plot(runs: dict, kappas: Sequence[float], n: int, r: int, target: float, out: Path) -> Path:
    """Top: error curves per kappa (first seed); bottom: final error, iterations and passes to
    the target against kappa, one marker per seed, the line through the medians."""
    import matplotlib.pyplot as plt

    seeds = list(runs)
    K = len(kappas)
    fig = plt.figure(figsize=(3.3 * max(K, 3), 7.6), layout="constrained")
    sf_top, sf_bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.0])
    top = sf_top.subplots(1, K, sharey=True)
    bottom = sf_bottom.subplots(1, 3)
    for i, kappa in enumerate(kappas):
        ax = top[i]
        for method in METHODS:
            e = runs[seeds[0]][kappa][method]["err"]
            ax.semilogy(
                np.arange(len(e)),
                floor_curve(e),
                color=COLORS[method],
                label=LABELS[method],
                lw=1.6,
            )
        ax.axhline(target, color="k", lw=0.6, ls=":")
        ax.set_title(rf"$\kappa = {kappa_tex(kappa)}$")
        ax.set_xlabel("iteration")
        ax.set_ylim(1e-16, 3)
        ax.grid(alpha=0.3, which="major")
        if i == 0:
            ax.set_ylabel(r"relative error $\|X_k - X^*\|_F / \|X^*\|_F$")
    handles, labels = top[0].get_legend_handles_labels()
    sf_top.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=len(METHODS),
        fontsize=9,
        title=f"curves: seed {seeds[0]}",
        title_fontsize=8,
        frameon=False,
    )
    shift = {"RGD": 0.75, "RCG": 1.0, "auto": 1.33}  # horizontal offsets: markers don't hide
    for method in METHODS:
        col, sh = COLORS[method], shift[method]
        for ax, key in ((bottom[0], "final"), (bottom[1], "iter"), (bottom[2], "passes")):
            med_x, med_y = [], []
            for k in kappas:
                vals, miss = [], []
                for seed in seeds:
                    v = runs[seed][k][method]
                    j = first_below(v["err"], target)
                    if key == "final":
                        vals.append(max(float(v["err"][-1]), 1e-16))
                    elif j is None:  # not reached: mark what was spent (a lower bound)
                        miss.append(len(v["err"]) - 1 if key == "iter" else v["passes"][-1])
                        vals.append(np.inf)
                    else:
                        vals.append(float(j if key == "iter" else v["passes"][j]))
                fin = [x for x in vals if np.isfinite(x)]
                ax.plot([k * sh] * len(fin), fin, "o", color=col, ms=4, alpha=0.6)
                ax.plot([k * sh] * len(miss), miss, "^", mfc="none", color=col, ms=8, mew=1.4)
                med = float(np.median(vals))
                if np.isfinite(med):
                    med_x.append(k * sh)
                    med_y.append(med)
            ax.plot(med_x, med_y, "-", color=col, lw=1.6, label=LABELS[method])
            ax.set_xscale("log")
            ax.set_yscale("log")
    bottom[0].set_ylabel("relative error after the budget")
    bottom[0].axhline(target, color="k", lw=0.6, ls=":")
    bottom[1].set_ylabel(f"iterations to error {target:.0e}")
    bottom[2].set_ylabel(f"passes over $\\Omega$ to error {target:.0e}")
    for ax in bottom:
        ax.set_xlabel(r"condition number $\kappa$ of $X^*$")
        ax.grid(alpha=0.3)
    note = (
        f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}: dots per seed, line through medians;\n"
        "open triangle: target not reached, placed at what was spent"
    )
    sf_bottom.suptitle(note, fontsize=8, x=0.99, ha="right")
    fig.suptitle(
        f"Matrix completion {n}x{n}, rank {r}, oversampling 3, spectral start:\n"
        "fixed-rank first-order methods against rank-adaptive Gauss-Newton",
        fontsize=11,
    )
    return save(fig, out, NAME)


def kappa_tex(kappa: float) -> str:
    """``1``, ``10``, ``10^{2}``, ... for titles (other values as ``%g``)."""
    e = float(np.log10(kappa))
    if kappa in (1.0, 10.0) or abs(e - round(e)) > 1e-9:
        return f"{kappa:g}"
    return f"10^{{{round(e)}}}"


if __name__ == "__main__":
    for p in main():
        print(p)
