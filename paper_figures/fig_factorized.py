r"""Figure: factorized (LoRA-style) training against Riemannian training on the fixed-rank manifold.

Low-rank regression with Gaussian inputs (``_common.regression_problem``): ``x ~ N(0, I_n)``,
``y = W* x`` with ``W*`` of rank r and condition number ``kappa``, loss
``f(W) = 1/(2N) sum_i ||(W - W*) x_i||^2`` (the loss Hessian is the empirical covariance,
well conditioned with ``N = 4 n`` samples: only the target is ill-conditioned). All methods
start from the same small rank-r matrix ``W0 = A0 B0^T`` (``A0`` entries ``1e-3 N(0, 1)``,
``B0`` entries ``N(0, 1/n)``: near zero, as a LoRA adapter starts):

* factor GD and factor Adam: ``W = A B^T``, the gradient or Adam step on ``(A, B)``;
* RGD: fixed-learning-rate Riemannian gradient descent on the fixed-rank manifold
  (``rankopt.solvers.RHeavyBall`` with ``momentum=0``);
* RAdamW: ``rankopt.solvers.RAdamW`` (Adam-adapted metric, weight decay 0).

Each method runs on a learning-rate grid of the same size (GD-type methods share one grid,
Adam-type methods another) and the best run is shown (first to reach relative loss 1e-10, else
the lowest final loss). The seed paper's claim (Bian et al., NeurIPS 2025; RESEARCH.md §2): the
factorization's conditioning slows factorized training (its rate depends on ``kappa``), the
Riemannian methods remove that dependence.

    python -m paper_figures.fig_factorized [--quick] [--out DIR]
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import rankopt as ro
from paper_figures._common import (
    COLORS,
    factored_run,
    floor_curve,
    parse_args,
    regression_problem,
    riemannian_run,
    save,
    tune,
)

NAME = "fig_factorized"
METHODS = ("factor GD", "factor Adam", "RGD", "RAdamW")
TARGET = 1e-10  # relative loss the tuning races to
TIMED_STEPS = 50  # steps timed at the chosen learning rate (the JSON's ms_per_step)


def grids(quick: bool) -> dict[str, list[float]]:
    """Learning-rate grids: the same size for every method (GD-type and Adam-type share)."""
    gd = [0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
    adam = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
    if quick:
        gd, adam = gd[3:6], adam[2:5]
    return {"factor GD": gd, "RGD": gd, "factor Adam": adam, "RAdamW": adam}


def run_kappa(kappa: float, m: int, n: int, r: int, iters: int, lrs: dict, seed: int) -> dict:
    """All four methods, tuned, on one problem; returns ``{method: Tuned}``."""
    reg = regression_problem(m, n, r, kappa, seed=seed)
    p = reg.problem
    rng = np.random.default_rng(seed + 1)
    A0 = 1e-3 * rng.standard_normal((m, r))
    B0 = rng.standard_normal((n, r)) / np.sqrt(n)
    x0 = p.manifold(r).from_matrix(A0 @ B0.T)

    def runner(method: str, n_iter: int, tol: float = 1e-14):
        if method == "factor GD":
            return lambda lr: factored_run(p, A0, B0, lr, n_iter, "gd")
        if method == "factor Adam":
            return lambda lr: factored_run(p, A0, B0, lr, n_iter, "adam")
        if method == "RGD":
            return lambda lr: riemannian_run(
                ro.solvers.RHeavyBall(lr, momentum=0.0, max_iter=n_iter, tol=tol), p, x0, n_iter
            )
        return lambda lr: riemannian_run(
            ro.solvers.RAdamW(lr, weight_decay=0.0, max_iter=n_iter, tol=tol), p, x0, n_iter
        )

    out = {}
    for method in METHODS:
        t0 = time.perf_counter()
        out[method] = tuned = tune(runner(method, iters), lrs[method], reg.f_ref, TARGET)
        # cost of one step: TIMED_STEPS steps at the chosen rate, no early stop (tol = 0)
        t1 = time.perf_counter()
        runner(method, TIMED_STEPS, tol=0.0)(tuned.lr)
        tuned.ms_per_step = 1e3 * (time.perf_counter() - t1) / TIMED_STEPS
        hit = first_below(tuned.curve, 1e-8)
        print(
            f"kappa={kappa:6g} {method:12s} lr={tuned.lr:<6g} final={tuned.curve[-1]:.2e} "
            f"iters_to_1e-8={hit} ({time.perf_counter() - t0:.1f}s, "
            f"{tuned.ms_per_step:.2f} ms/step)",
            flush=True,
        )
    return out


def first_below(curve: np.ndarray, target: float) -> int | None:
    """Index of the first entry ``<= target`` (None if never)."""
    hit = np.flatnonzero(np.asarray(curve) <= target)
    return int(hit[0]) if hit.size else None


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the experiment and write ``fig_factorized.png`` and ``fig_factorized.json``."""
    args = parse_args(__doc__.splitlines()[0], argv)
    if args.quick:
        m, n, r, iters = 24, 24, 3, 100
    else:
        m, n, r, iters = 100, 100, 5, 600
    kappas = (1.0, 10.0, 100.0)
    lrs = grids(args.quick)
    results = {k: run_kappa(k, m, n, r, iters, lrs, args.seed) for k in kappas}
    path = plot(results, kappas, m, n, r, iters, args.out)
    summary = {
        "m": m,
        "n": n,
        "r": r,
        "iterations": iters,
        "grids": lrs,
        "runs": {
            f"{k:g}": {
                meth: {
                    "lr": t.lr,
                    "final_rel_loss": t.curve[-1],
                    "iters_to_1e-8": first_below(t.curve, 1e-8),
                    "ms_per_step": round(t.ms_per_step, 3),
                    "grid_finals": {f"{a:g}": b for a, b in t.finals.items()},
                }
                for meth, t in results[k].items()
            }
            for k in kappas
        },
    }
    (Path(args.out) / f"{NAME}.json").write_text(json.dumps(summary, indent=1))
    return [path]


def plot(
    results: dict, kappas: Sequence[float], m: int, n: int, r: int, iters: int, out: Path
) -> Path:
    """One loss panel per kappa, and iterations to relative loss 1e-8 against kappa."""
    import matplotlib.pyplot as plt

    K = len(kappas)
    fig, axes = plt.subplots(1, K + 1, figsize=(4.0 * (K + 1), 4.2), layout="constrained")
    for ax, kappa in zip(axes[:K], kappas, strict=True):
        for method in METHODS:
            t = results[kappa][method]
            ls = "--" if method.startswith("factor") else "-"
            ax.semilogy(
                np.arange(len(t.curve)),
                floor_curve(t.curve),
                ls,
                color=COLORS[method],
                lw=1.6,
                label=f"{method} (lr {t.lr:g})",
            )
        ax.set_title(rf"$\kappa(W^*) = {kappa:g}$")
        ax.set_xlabel("iteration")
        ax.set_ylim(1e-16, 30)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel(r"relative loss $f(W_k) / f(0)$")
    ax = axes[K]
    shift = {"factor GD": 0.7, "factor Adam": 0.85, "RGD": 1.15, "RAdamW": 1.35}
    for method in METHODS:
        xs, ys, miss = [], [], []
        for kappa in kappas:
            j = first_below(results[kappa][method].curve, 1e-8)
            (miss if j is None else xs).append(kappa * (shift[method] if j is None else 1.0))
            if j is not None:
                ys.append(j)
        ls = "--" if method.startswith("factor") else "-"
        ax.semilogx(xs, ys, "o" + ls, color=COLORS[method], label=method)
        if miss:
            ax.plot(miss, [iters] * len(miss), "^", mfc="none", color=COLORS[method], ms=9, mew=1.5)
    ax.set_xlabel(r"condition number $\kappa$ of $W^*$")
    ax.set_ylabel("iterations to relative loss 1e-8")
    ax.set_title("cost of conditioning")
    ax.set_ylim(0, 1.12 * iters)
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=8,
        loc="center right",
        title=f"open triangle: not reached\nin {iters} iterations",
        title_fontsize=8,
    )
    fig.suptitle(
        f"Low-rank regression {m}x{n}, rank {r}, Gaussian inputs, same small start: "
        "factorized (dashed) against Riemannian (solid), each at its best learning rate",
        fontsize=11,
    )
    return save(fig, out, NAME)


if __name__ == "__main__":
    for p in main():
        print(p)
