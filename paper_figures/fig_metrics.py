r"""Figure: the Euclidean metric against adapted metrics on a loss that is badly scaled across
rows and columns.

Weighted low-rank regression (``_common.regression_problem``): features with standard
deviations ``c_j`` and outputs with loss weights ``d_i``, both spread geometrically over
``[1e-2, 1]`` (in random order), ``f(W) = 1/(2N) sum_k ||diag(d) (W - W*) x_k||^2``, a
well-conditioned rank-r target (``kappa = 1``). The loss Hessian is
``diag(d)^2 (x) Sigma`` with ``Sigma ~ diag(c)^2``: its diagonal spans eight decades, so the
ill-conditioning is entirely across rows and columns. Methods, all from the problem's
spectral start:

* RGD and RCG under the embedded Euclidean metric (exact line search, no step size to tune);
* the same under ``rankopt.metrics.Preconditioned(left=d^2, right=diag(Sigma))``: the weights
  a user reads off the loss (``d^2``) and the data (feature second moments), without ``W*``;
* RAdaGrad and RAdamW (metrics adapted from the gradients' row/column statistics) and the
  Euclidean Riemannian heavy ball (momentum 0.9), each at its best learning rate on a grid of
  the same size.

Left: relative loss; right: relative error to ``W*`` (the loss weights hide errors in
low-weight rows/columns, the error does not), both against iteration.

    python -m paper_figures.fig_metrics [--quick] [--out DIR]
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import rankopt as ro
from paper_figures._common import (
    COLORS,
    floor_curve,
    parse_args,
    regression_problem,
    riemannian_run,
    save,
    tune,
)

NAME = "fig_metrics"
COLORS = {**COLORS, "RHeavyBall": "tab:orange"}
LINE_SEARCH = ("RGD", "RCG", "RGD (precond.)", "RCG (precond.)")
TUNED = ("RHeavyBall", "RAdaGrad", "RAdamW")
METHODS = LINE_SEARCH + TUNED


def make_solver(
    method: str, iters: int, metric: Any, lr: float | None = None, track: bool = False
) -> Any:
    """The solver of a method (``lr`` for the fixed-step ones)."""
    kw = {"max_iter": iters, "tol": 1e-14, "track_error": track}
    if method in ("RGD", "RCG"):
        return getattr(ro.solvers, method)(**kw)
    if method in ("RGD (precond.)", "RCG (precond.)"):
        return getattr(ro.solvers, method.split()[0])(metric=metric, **kw)
    if method == "RHeavyBall":
        return ro.solvers.RHeavyBall(lr, momentum=0.9, **kw)
    if method == "RAdaGrad":
        return ro.solvers.RAdaGrad(lr, **kw)
    if method == "RAdamW":
        return ro.solvers.RAdamW(lr, weight_decay=0.0, **kw)
    raise ValueError(f"unknown method {method!r}")


def learned_exponents(
    res: Any, d: np.ndarray, c: np.ndarray, spec: Any = None
) -> list[float] | None:
    """How the weights an adaptive metric learned scale with the true ones.

    Fits ``log D_L ~ a log d`` and ``log D_R ~ b log c`` (least squares) for the final metric of
    a RAdaGrad/RAdamW run: its rule state (``res.info["state"]``) holds the row/column mean
    squares, from which ``spec.metric`` builds ``D_L``, ``D_R`` (bias-corrected for RAdamW, as
    its step does). The exactly conditioning weights of the known-weights metric are
    ``D_L = d^2``, ``D_R ~ c^2``: exponents 2. Returns ``[a, b]``, or None for a run without an
    adaptive metric.
    """
    state = res.info.get("state")
    st = state[1] if isinstance(state, list) else None
    if spec is None or getattr(st, "row_stats", None) is None:
        return None
    corr = 1.0 - spec.betas[1] ** st.count if hasattr(spec, "betas") else 1.0
    M = ro.FixedRankManifold(len(d), len(c), 1, validate=False)
    metric = spec.metric(M, np.asarray(st.row_stats) / corr, np.asarray(st.col_stats) / corr)
    a = np.polyfit(np.log(d), np.log(np.asarray(metric.left)), 1)[0]
    b = np.polyfit(np.log(c), np.log(np.asarray(metric.right)), 1)[0]
    return [round(float(a), 3), round(float(b), 3)]


def grids(quick: bool) -> dict[str, list[float]]:
    """Learning-rate grids of the same size for the fixed-step methods."""
    hb = [1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0]
    ada = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    if quick:
        hb, ada = hb[2:5], ada[1:4]
    return {"RHeavyBall": hb, "RAdaGrad": ada, "RAdamW": ada}


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the experiment and write ``fig_metrics.png`` and ``fig_metrics.json``."""
    args = parse_args(__doc__.splitlines()[0], argv)
    if args.quick:
        m, n, r, iters = 20, 30, 3, 60
    else:
        m, n, r, iters = 100, 150, 5, 400
    rng = np.random.default_rng(args.seed + 7)
    d = rng.permutation(np.geomspace(1e-2, 1.0, m))
    c = rng.permutation(np.geomspace(1e-2, 1.0, n))
    reg = regression_problem(m, n, r, 1.0, row_scale=d, col_scale=c, seed=args.seed)
    p = reg.problem
    x0 = p.spectral_init(r)
    metric = ro.metrics.Preconditioned(left=reg.row_weights, right=reg.col_weights)
    lrs = grids(args.quick)
    curves: dict[str, dict] = {}
    for method in METHODS:
        t0 = time.perf_counter()
        lr = None
        if method in TUNED:
            tuned = tune(
                lambda lr, meth=method: riemannian_run(
                    make_solver(meth, iters, metric, lr), p, x0, iters
                ),
                lrs[method],
                reg.f_ref,
            )
            lr = tuned.lr
        t1 = time.perf_counter()
        solver = make_solver(method, iters, metric, lr, track=True)
        with np.errstate(over="ignore", invalid="ignore"):
            res = solver.run(p, x0)
        secs = (time.perf_counter() - t1) / max(res.iterations, 1)
        loss = np.asarray(res.history.cost) / reg.f_ref
        err = np.asarray(res.history.rel_error)
        curves[method] = {
            "loss": loss,
            "err": err,
            "lr": lr,
            "ms_per_iter": 1e3 * secs,
            "grid_finals": None if lr is None else {f"{a:g}": b for a, b in tuned.finals.items()},
            "weight_exponents": learned_exponents(res, d, c, getattr(solver, "spec", None)),
        }
        print(
            f"{method:15s} lr={lr!s:6s} iters={res.iterations:4d} loss={loss[-1]:.2e} "
            f"err={err[-1]:.2e} stop={res.stop_reason} ({time.perf_counter() - t0:.1f}s, "
            f"{1e3 * secs:.1f} ms/iter)",
            flush=True,
        )
    path = plot(curves, m, n, r, args.out)
    summary = {
        "m": m,
        "n": n,
        "r": r,
        "iterations": iters,
        "grids": lrs,
        "start_rel_error": float(p.relative_error(x0)),
        "runs": {
            k: {
                "lr": v["lr"],
                "iterations": len(v["loss"]) - 1,
                "final_rel_loss": float(v["loss"][-1]),
                "final_rel_error": float(v["err"][-1]),
                "ms_per_iter": round(v["ms_per_iter"], 2),
                "grid_finals": v["grid_finals"],
                "learned_weight_exponents": v["weight_exponents"],
            }
            for k, v in curves.items()
        },
    }
    (Path(args.out) / f"{NAME}.json").write_text(json.dumps(summary, indent=1))
    return [path]


def plot(curves: dict, m: int, n: int, r: int, out: Path) -> Path:
    """Relative loss and relative error against iteration."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13.5, 4.6), layout="constrained")
    for method in METHODS:
        v = curves[method]
        ls = "-" if "precond" in method or method in ("RAdaGrad", "RAdamW") else "--"
        label = method + (f" (lr {v['lr']:g})" if v["lr"] is not None else " (line search)")
        for ax, key, floor in ((axes[0], "loss", 1e-28), (axes[1], "err", 1e-14)):
            y = v[key]
            ax.semilogy(
                np.arange(len(y)),
                floor_curve(y, floor),
                ls,
                color=COLORS[method],
                lw=1.6,
                label=label,
            )
    axes[0].set_ylabel(r"relative loss $f(W_k) / f(0)$")
    axes[1].set_ylabel(r"relative error $\|W_k - W^*\|_F / \|W^*\|_F$")
    axes[0].set_ylim(1e-28, 30)
    notes = [
        f"{k}: learned $D_L \\propto d^{{{v['weight_exponents'][0]:.2f}}}$, "
        f"$D_R \\propto c^{{{v['weight_exponents'][1]:.2f}}}$"
        for k, v in curves.items()
        if v["weight_exponents"] is not None
    ]
    if notes:
        notes.append("(precond.: $D_L = d^2$, $D_R = \\mathrm{diag}\\,\\Sigma \\approx c^2$)")
        axes[0].text(
            0.98,
            0.55,
            "\n".join(notes),
            transform=axes[0].transAxes,
            ha="right",
            va="center",
            fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.8"},
        )
    axes[1].set_ylim(1e-14, 10)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(
        f"Weighted low-rank regression {m}x{n}, rank {r}, row weights and feature scales spread "
        "over [1e-2, 1]:\nEuclidean metric (dashed) against adapted metrics (solid)",
        fontsize=11,
    )
    return save(fig, out, NAME)


if __name__ == "__main__":
    for p in main():
        print(p)
