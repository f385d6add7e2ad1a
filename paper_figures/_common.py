r"""Shared helpers of the paper figures: thread limits, command line, the regression problem,
factored (LoRA-style) baselines, learning-rate tuning and plotting.

Every figure script sets the thread variables itself *before* importing NumPy (they only take
effect then); this module sets them too, for scripts that import it first.

The regression problem used by ``fig_factorized`` and ``fig_metrics``
---------------------------------------------------------------------
Inputs ``x ~ N(0, diag(c)^2)`` (``N`` samples, rows of ``X``), outputs ``y = W* x`` with a
rank-r ``W*`` (m x n), per-output loss weights ``d`` (m). The empirical loss

    f(W) = 1/(2N) sum_i ||diag(d) (W - W*) x_i||^2 = 1/2 ||diag(d) (W - W*) L||_F^2,

with ``Sigma = X^T X / N = L L^T`` (Cholesky; ``N >= n`` makes it positive definite), is a
matrix-sensing problem with the linear operator ``A(W) = diag(d) W L`` (``k = m n``
measurements) and data ``b = A(W*)``. Its Euclidean Hessian is ``diag(d)^2 (.) Sigma``, so the
loss is ill-conditioned across rows when ``d`` is spread out and across columns when ``c`` is.
On a factored direction ``D = P Q^T`` (rank k) the operator costs ``O(n^2 k + m n k)``
(``A(D) = (diag(d) P) (L^T Q)^T``); the adjoint ``A^*(Y) = diag(d) Y L^T`` costs ``O(m n^2)``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import LogLocator, NullLocator

import rankopt as ro
from benchmarks.harness import pin_threads

__all__ = [
    "DEFAULT_OUT",
    "COLORS",
    "parse_args",
    "Regression",
    "regression_problem",
    "factored_run",
    "riemannian_run",
    "Tuned",
    "tune",
    "save",
]

DEFAULT_OUT = Path("out") / "paper_figures"

#: One color per method family, shared by all figures.
COLORS = {
    "factor GD": "tab:gray",
    "factor Adam": "tab:brown",
    "RGD": "tab:blue",
    "RCG": "tab:cyan",
    "auto": "tab:red",
    "RAdamW": "tab:green",
    "RAdaGrad": "tab:olive",
    "RGD (precond.)": "tab:purple",
    "RCG (precond.)": "tab:pink",
}


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Common command line: ``--quick`` (seconds, small sizes), ``--out DIR``, ``--seed``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="small sizes, runs in a few seconds")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder ({DEFAULT_OUT})")
    ap.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    args = ap.parse_args(argv)
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    pin_threads(1)  # BLAS, OpenMP and numba: one thread, as the measurements were taken
    return args


# ---------------------------------------------------------------------------
# The regression problem
# ---------------------------------------------------------------------------


@dataclass
class Regression:
    """A weighted low-rank regression problem (see the module docstring).

    Attributes
    ----------
    problem : rankopt.problems.MatrixSensing
        ``f(W) = 1/2 ||diag(d) (W - W*) L||_F^2`` with its operator.
    truth : FixedRankPoint
        ``W*``.
    row_weights, col_weights : np.ndarray
        ``d^2`` (the loss's output weights) and ``diag(Sigma)`` (the empirical second moments of
        the features): the diagonal of the Hessian's Kronecker factors, as a user can compute
        them from the loss and the data without knowing ``W*``.
    f_ref : float
        ``f(0) = 1/2 ||b||^2``, the scale losses are reported relative to.
    """

    problem: Any
    truth: Any
    row_weights: np.ndarray
    col_weights: np.ndarray
    f_ref: float


def regression_problem(
    m: int,
    n: int,
    r: int,
    kappa: float = 1.0,
    *,
    row_scale: np.ndarray | None = None,
    col_scale: np.ndarray | None = None,
    samples: int | None = None,
    seed: int = 0,
) -> Regression:
    """Build the regression problem of the module docstring.

    Parameters
    ----------
    m, n, r : int
        Outputs, inputs, rank of ``W*``.
    kappa : float
        Condition number of ``W*`` (geometric singular values 1 .. 1/kappa).
    row_scale : array (m,), optional
        Output weights ``d`` (default ones).
    col_scale : array (n,), optional
        Standard deviations ``c`` of the features (default ones).
    samples : int, optional
        ``N`` (default ``4 n``); must be at least ``n``.
    seed : int

    Returns
    -------
    Regression
    """
    samples = 4 * n if samples is None else int(samples)
    if samples < n:
        raise ValueError(f"samples must be >= n = {n} (Sigma must be invertible), got {samples}")
    d = np.ones(m) if row_scale is None else np.asarray(row_scale, dtype=float)
    c = np.ones(n) if col_scale is None else np.asarray(col_scale, dtype=float)
    if d.shape != (m,) or c.shape != (n,):
        raise ValueError(f"row_scale must have shape ({m},) and col_scale ({n},)")
    if not (np.all(d > 0) and np.all(c > 0)):
        raise ValueError("row_scale and col_scale must be positive")
    rng = np.random.default_rng(seed)
    truth = ro.problems.low_rank_truth(m, n, r, kappa, seed=rng)
    X = rng.standard_normal((samples, n)) * c[None, :]
    sigma = X.T @ X / samples
    L = np.linalg.cholesky(sigma)

    def forward(D: ro.LowRankMatrix) -> np.ndarray:
        return ((d[:, None] * D.A) @ (L.T @ D.B).T).reshape(-1)

    def adjoint(y: np.ndarray) -> np.ndarray:
        return d[:, None] * (y.reshape(m, n) @ L.T)

    b = forward(truth.to_lowrank())
    problem = ro.problems.MatrixSensing.from_operator(forward, adjoint, b, (m, n), truth=truth)
    return Regression(problem, truth, d**2, np.diag(sigma).copy(), 0.5 * float(b @ b))


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------


def factored_run(
    problem: Any,
    A0: np.ndarray,
    B0: np.ndarray,
    lr: float,
    iters: int,
    rule: str = "gd",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> np.ndarray:
    r"""Train ``W = A B^T`` by gradient descent or Adam on the factors (LoRA-style).

    With ``G = nabla f(A B^T)`` (the problem's ambient gradient), the factor gradients are
    ``G B`` and ``G^T A`` (chain rule). ``"gd"``: ``A <- A - lr G B``, ``B <- B - lr G^T A``
    (simultaneous). ``"adam"``: Adam (Kingma & Ba 2015) on each factor, entrywise,
    ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``,
    ``step = lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)``. One step costs one forward and
    one adjoint of the problem plus ``O(m n r)``.

    Returns
    -------
    np.ndarray
        Losses ``f(A_k B_k^T)`` for ``k = 0 .. iters``; ``inf`` from the first non-finite value on.
    """
    if rule not in ("gd", "adam"):
        raise ValueError(f"rule must be 'gd' or 'adam', got {rule!r}")
    A, B = A0.copy(), B0.copy()
    out = np.full(iters + 1, np.inf)
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging grid value is expected
        _factored_loop(problem, A, B, lr, iters, rule, betas, eps, out)
    return out


def _factored_loop(problem, A, B, lr, iters, rule, betas, eps, out) -> None:
    """The loop of :func:`factored_run` (fills ``out`` in place)."""
    mom = [np.zeros_like(A), np.zeros_like(B)]
    sec = [np.zeros_like(A), np.zeros_like(B)]
    for k in range(iters + 1):
        res = problem.forward(ro.LowRankMatrix(A, B)) - problem.b
        f = 0.5 * float(res @ res)
        if not math.isfinite(f):
            break
        out[k] = f
        if k == iters:
            break
        G = problem.adjoint(res)
        grads = [G @ B, G.T @ A]
        if rule == "gd":
            A, B = A - lr * grads[0], B - lr * grads[1]
            continue
        t = k + 1
        new = []
        for i, (p, g) in enumerate(zip((A, B), grads, strict=True)):
            mom[i] = betas[0] * mom[i] + (1 - betas[0]) * g
            sec[i] = betas[1] * sec[i] + (1 - betas[1]) * g * g
            mhat = mom[i] / (1 - betas[0] ** t)
            vhat = sec[i] / (1 - betas[1] ** t)
            new.append(p - lr * mhat / (np.sqrt(vhat) + eps))
        A, B = new


def riemannian_run(solver: Any, problem: Any, x0: Any, iters: int) -> np.ndarray:
    """Run a rankopt solver from ``x0``; losses per iteration, ``inf``-padded to ``iters + 1``.

    A run that stops early because it converged (gradient at machine precision) is padded with
    its last loss instead; one that stopped on a non-finite value is padded with ``inf``.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging grid value is expected
        res = solver.run(problem, x0)
    cost = np.asarray(res.history.cost, dtype=float)
    out = np.full(iters + 1, np.inf if res.stop_reason == "non-finite" else cost[-1])
    out[: min(len(cost), iters + 1)] = cost[: iters + 1]
    return out


@dataclass
class Tuned:
    """The best run of a learning-rate grid.

    Attributes
    ----------
    lr : float
        The chosen learning rate.
    curve : np.ndarray
        Its losses (relative to the problem's reference).
    finals : dict
        Final relative loss of every grid value (``inf``: diverged).
    ms_per_step : float
        Wall milliseconds per step, if the caller measured it (NaN otherwise).
    """

    lr: float
    curve: np.ndarray
    finals: dict
    ms_per_step: float = math.nan


def tune(
    run: Callable[[float], np.ndarray], lrs: Sequence[float], f_ref: float, target: float = 1e-10
) -> Tuned:
    """Run every learning rate; keep the fastest to reach ``target`` (relative loss), else the
    lowest final loss. Every method gets a grid of the same size, so tuning is equally fair.
    """
    best, best_key, finals = None, None, {}
    for lr in lrs:
        curve = run(float(lr)) / f_ref
        finals[float(lr)] = float(curve[-1])
        hit = np.flatnonzero(curve <= target)
        key = (hit[0] if hit.size else math.inf, curve[-1] if np.isfinite(curve[-1]) else math.inf)
        if best_key is None or key < best_key:
            best, best_key = Tuned(float(lr), curve, finals), key
    if best is None:
        raise ValueError("empty learning-rate grid")
    best.finals = finals
    return best


# ---------------------------------------------------------------------------
# Plotting
# ---------------------------------------------------------------------------


def save(fig: Any, out: Path, name: str) -> Path:
    """Save ``fig`` as ``out/name.png`` (150 dpi), close it, return the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    for ax in fig.get_axes():  # few log ticks: mathtext tick labels dominate drawing time
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            if axis.get_scale() == "log" and max(lim) > 1e4 * min(lim) > 0:
                axis.set_major_locator(LogLocator(base=10, numticks=8))
                axis.set_minor_locator(NullLocator())
    fig.savefig(path, dpi=150)  # the figures use constrained layout (no tight bbox pass)
    plt.close(fig)
    return path


def floor_curve(curve: Any, floor: float = 1e-16) -> np.ndarray:
    """A curve for a log plot that ends at ``floor``: the first value below ``floor`` becomes
    ``floor`` and later ones NaN (not drawn), so a converged run visibly stops at the axis
    instead of running along it (and exact zeros do not vanish from the plot)."""
    c = np.array(curve, dtype=float)
    below = np.flatnonzero(c < floor)
    if below.size:
        c[below[0]] = floor
        c[below[0] + 1 :] = np.nan
    return c
