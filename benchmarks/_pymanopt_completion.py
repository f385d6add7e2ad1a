r"""The pymanopt 2.2.1 baseline of ``python -m benchmarks.completion``.

Pymanopt's ``FixedRankEmbedded`` manifold + ``ConjugateGradient`` (its defaults:
Hestenes-Stiefel beta, adaptive backtracking line search) on the completion cost

    f(X) = 1/2 || P_Omega(X) - b ||^2,     X = u diag(s) vt,

written by hand the way a careful pymanopt user would write it (no autodiff):

* **What pymanopt 2.2.1 expects.** ``FixedRankEmbedded`` has ``point_layout=3``: the cost and
  the Euclidean gradient are called as ``f(u, s, vt)``, and the gradient must be the tuple of
  partial derivatives *with respect to the factors*, ``(df/du, df/ds, df/dvt)``; the manifold's
  ``euclidean_to_riemannian_gradient`` unpacks exactly that tuple (it does not accept an
  ambient m x n matrix). With the ambient gradient ``Z = P_Omega^*(P_Omega(X) - b)`` (a sparse
  matrix) the chain rule gives

      df/du = Z V diag(s),   df/ds = diag(u^T Z V),   df/dvt = diag(s) u^T Z,

  so ``Z`` enters only through the products ``Z V`` and ``Z^T u``: it stays a
  ``scipy.sparse.csr_matrix`` (fixed CSR pattern, only the data array changes), and the three
  returned arrays are m x r, r, r x n. Cost O(|Omega| r) per evaluation.
  (Pymanopt then forms the Riemannian gradient with ``1/s`` and ``1/(s_j^2 - s_i^2)`` factors;
  this is the known weakness near equal singular values, RESEARCH.md section 1, kept as is:
  it is what pymanopt 2.2.1 does.)
* **Sampling** ``X`` at Omega in NumPy: two row gathers and a row-wise dot product,
  O(|Omega| r). Pymanopt calls the cost and the gradient separately at the same point; the
  gradient reuses the residual of the last cost call when the point is the same object
  (a cache any expert would add; it only helps the baseline).
* **Start and stopping**: the same spectral start as rankopt (``problem.spectral_init``), and
  the same rule: stop when the Riemannian gradient norm ``||P_x(Z)||`` falls below
  ``tol * ||P_x0(Z_0)||`` or after ``max_iter`` steps (or ``max_time`` seconds). Pymanopt's
  ``min_step_size`` guard (1e-10 on ``alpha ||d||``) is kept at its default.

Pymanopt counts the starting point as iteration 1; the number of *steps* (iterations - 1) is
reported, which is what rankopt's ``SolverResult.iterations`` counts.

Nothing from pymanopt's checking tools is used (``check_gradient`` and friends raise under
NumPy >= 2.4); the optimizer itself runs unchanged under NumPy 2.4.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["BaselineResult", "pymanopt_available", "run_pymanopt_cg"]


def pymanopt_available() -> str | None:
    """pymanopt's version string, or None when it is not importable."""
    try:
        import pymanopt
    except ImportError:
        return None
    return str(pymanopt.__version__)


@dataclass
class BaselineResult:
    """Outcome of one pymanopt run (times in seconds, end to end)."""

    iterations: int
    time: float
    rel_error: float
    stop: str
    converged: bool
    grad_norm: float
    trace_time: list[float] = field(default_factory=list)
    trace_error: list[float] = field(default_factory=list)


def _stop_label(text: str) -> str:
    text = text or ""
    if "min grad norm" in text:
        return "gradient"
    if "max time" in text:
        return "max-time"
    if "max iterations" in text:
        return "max-iter"
    if "step_size" in text:
        return "min-step"
    return text or "?"


def run_pymanopt_cg(
    problem: Any,
    rank: int,
    *,
    tol: float = 1e-10,
    max_iter: int = 1000,
    max_time: float = 60.0,
    seed: int = 0,
    record: bool = False,
) -> BaselineResult:
    """Solve a ``rankopt`` completion problem with pymanopt's ConjugateGradient.

    Parameters
    ----------
    problem : rankopt.problems.MatrixCompletion
        NumPy backend, with ``truth`` (for the relative error).
    rank : int
    tol : float
        Relative gradient tolerance (``||grad|| <= tol ||grad(x0)||``), as in ``rankopt.solve``.
    max_iter : int
        Most steps.
    max_time : float
        Seconds (pymanopt's own ``max_time``, measured from the optimizer's start).
    seed : int
        Seed of the spectral start (the same as rankopt's).
    record : bool
        Keep per-iteration (time, relative error) pairs (pymanopt log; errors computed
        afterwards, outside the timed region).

    Returns
    -------
    BaselineResult
        ``time`` covers the spectral start, the setup and the optimizer run.
    """
    import pymanopt
    from pymanopt.manifolds import FixedRankEmbedded
    from pymanopt.optimizers import ConjugateGradient

    from rankopt import FixedRankPoint

    if problem.backend != "numpy":
        raise ValueError(f"the pymanopt baseline needs a NumPy problem, got {problem.backend!r}")
    m, n = problem.shape
    t0 = time.perf_counter()
    wall0 = time.time()
    x0 = problem.spectral_init(rank, seed=seed)  # the same start as rankopt's solvers
    rows = np.asarray(problem.rows)
    cols = np.asarray(problem.cols)
    indptr = np.asarray(problem.indptr)
    b = np.asarray(problem.vals)
    cache: dict[str, Any] = {"point": (None, None, None), "res": None}

    def residual(u: np.ndarray, s: np.ndarray, vt: np.ndarray) -> np.ndarray:
        cu, cs, cvt = cache["point"]  # holding the arrays keeps the identity test sound
        if cu is u and cs is s and cvt is vt:
            return cache["res"]
        us = u * s  # m x r
        v = np.ascontiguousarray(vt.T)  # n x r, rows gathered at cols
        res = np.einsum("ij,ij->i", us[rows], v[cols]) - b
        cache.update(point=(u, s, vt), res=res)
        return res

    manifold = FixedRankEmbedded(m, n, rank)

    @pymanopt.function.numpy(manifold)
    def cost(u, s, vt):
        res = residual(u, s, vt)
        return 0.5 * float(res @ res)

    @pymanopt.function.numpy(manifold)
    def euclidean_gradient(u, s, vt):
        Z = sp.csr_matrix((residual(u, s, vt), cols, indptr), shape=(m, n))
        ZV = Z @ vt.T  # m x r, O(|Omega| r)
        ZtU = Z.T @ u  # n x r
        du = ZV * s
        ds = np.einsum("ij,ij->j", u, ZV)
        dvt = (ZtU * s).T
        return du, ds, dvt

    prob = pymanopt.Problem(manifold, cost, euclidean_gradient=euclidean_gradient)
    start = (x0.U, x0.s, x0.V.T)  # pymanopt's (u, s, vt) layout; it only unpacks points
    g0 = manifold.norm(start, prob.riemannian_gradient(start))
    opt = ConjugateGradient(
        max_iterations=max_iter + 1,  # pymanopt counts the start as iteration 1
        min_gradient_norm=tol * g0,
        max_time=max_time,
        verbosity=0,
        log_verbosity=1 if record else 0,
    )
    out = opt.run(prob, initial_point=start)
    elapsed = time.perf_counter() - t0
    u, s, vt = out.point
    x = FixedRankPoint(u, s, np.ascontiguousarray(vt.T))
    err = float(problem.relative_error(x))
    stop = _stop_label(out.stopping_criterion)
    res = BaselineResult(
        iterations=int(out.iterations) - 1,
        time=elapsed,
        rel_error=err,
        stop=stop,
        converged=stop == "gradient",
        grad_norm=float(out.gradient_norm) if out.gradient_norm is not None else math.nan,
    )
    if record and out.log is not None and out.log.get("iterations"):
        log = out.log["iterations"]
        for tw, pt in zip(log["time"], log["point"], strict=True):
            uu, ss, vv = pt
            res.trace_time.append(tw - wall0)
            res.trace_error.append(
                float(problem.relative_error(FixedRankPoint(uu, ss, np.ascontiguousarray(vv.T))))
            )
    return res
