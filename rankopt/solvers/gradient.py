r"""First-order solvers with line search: Riemannian gradient descent and conjugate gradients.

References: Absil, Mahony, Sepulchre, *Optimization Algorithms on Matrix Manifolds* (2008),
ch. 4 and 8; Vandereycken (2013) for the exact line search on completion; Barzilai & Borwein
(1988); Sato (2021), *Riemannian Optimization and Its Applications*, for Riemannian CG.
One iteration costs one gradient (O(|Omega| r) for completion), one projection and one
retraction (O((m+n) r^2 + r^3)), plus one cost evaluation per backtracking step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..containers import TangentVector
from .base import Solver, euclidean_inner

__all__ = ["RGD", "RCG", "armijo"]


def armijo(
    problem,
    manifold,
    x,
    f: float,
    slope: float,
    direction: TangentVector,
    t0: float,
    *,
    c: float = 1e-4,
    shrink: float = 0.5,
    max_backtracks: int = 40,
):
    """Backtracking: largest ``t = t0 shrink^k`` with ``f(R_x(t d)) <= f + c t slope``.

    ``slope = Df(x)[d] < 0``. Returns ``(t, x_new, f_new)``; ``t = 0`` (and ``x``) if no step
    of the allowed sizes decreases the cost.
    """
    t = t0
    for _ in range(max_backtracks):
        x_new = manifold.geometry.retract(x, direction * t)
        f_new = float(problem.cost(x_new))
        if math.isfinite(f_new) and f_new <= f + c * t * slope:
            return t, x_new, f_new
        t *= shrink
    return 0.0, x, f


@dataclass
class _LSState:
    t_prev: float | None = None
    x_prev: Any = None
    g_prev: TangentVector | None = None
    d_prev: TangentVector | None = None  # previous search direction (CG) / step vector (BB)
    rg_prev: TangentVector | None = None
    since_restart: int = 0


class _LineSearchSolver(Solver):
    def __init__(self, *, step: str = "auto", c: float = 1e-4, **kw: Any) -> None:
        super().__init__(**kw)
        if step not in ("auto", "exact", "armijo", "bb"):
            raise ValueError(f"step must be 'auto', 'exact', 'armijo' or 'bb', got {step!r}")
        self.step_rule, self.c = step, c

    def init(self, problem, manifold, x):
        return _LSState()

    def _initial_step(self, problem, manifold, x, d, slope, st: _LSState, g) -> float:
        rule = self.step_rule
        if rule in ("auto", "exact"):
            t = problem.exact_step(x, manifold.embed(x, d))
            if t is not None and math.isfinite(t) and t > 0:
                return float(t)
            if rule == "exact":
                raise ValueError(
                    f"{type(problem).__name__} offers no exact step; use step='armijo'"
                )
        if rule == "bb" and st.x_prev is not None and st.d_prev is not None:
            s = manifold.geometry.transport(st.x_prev, x, st.d_prev)
            y = g - manifold.geometry.transport(st.x_prev, x, st.g_prev)
            sy = euclidean_inner(manifold, s, y)
            if sy > 0:  # BB2 step <s, y> / <y, y> for the direction -grad
                return sy / max(euclidean_inner(manifold, y, y), 1e-300)
        if st.t_prev is not None:
            return 2.0 * st.t_prev
        return 1.0 / max(math.sqrt(max(-slope, 0.0)), 1e-300)

    def _line_search(self, problem, manifold, x, f, d, g, st: _LSState):
        slope = euclidean_inner(manifold, g, d)  # Df(x)[d] = <P Z, d>
        t0 = self._initial_step(problem, manifold, x, d, slope, st, g)
        return armijo(problem, manifold, x, f, slope, d, t0, c=self.c), slope


class RGD(_LineSearchSolver):
    """Riemannian gradient descent with line search.

    Parameters
    ----------
    step : {"auto", "exact", "armijo", "bb"}
        Initial step of the backtracking search: the exact minimizer along ``X + t d`` when the
        problem offers one (``"auto"`` uses it when available), Barzilai-Borwein, or twice the
        previous step; Armijo backtracking always guards descent.
    **kw
        The loop's options, see :class:`rankopt.solvers.base.Solver`; with ``metric=`` (a
        :mod:`rankopt.metrics` metric) it descends along ``-G_x^{-1} P_x(egrad)``
        (preconditioned RGD).
    """

    name = "RGD"

    def step(self, problem, manifold, x, f, Z, g, st: _LSState):
        d = -self.rgrad(manifold, x, g)
        (t, x_new, _), _ = self._line_search(problem, manifold, x, f, d, g, st)
        if t > 0:
            st.t_prev, st.x_prev, st.g_prev, st.d_prev = t, x, g, d * t
        return x_new, st, t


class RCG(_LineSearchSolver):
    """Riemannian nonlinear conjugate gradients.

    ``d_k = -grad_k + beta_k T(d_{k-1})`` with ``beta`` Polak-Ribiere+ (default) or
    Hestenes-Stiefel+ under the solver's metric, restarted with ``-grad`` every ``restart``
    iterations or when ``d_k`` is not a descent direction. Transport by projection.

    Parameters
    ----------
    beta : {"PR+", "HS+"}
    restart : int
    """

    name = "RCG"

    def __init__(self, *, beta: str = "PR+", restart: int = 50, **kw: Any) -> None:
        super().__init__(**kw)
        if beta not in ("PR+", "HS+"):
            raise ValueError(f"beta must be 'PR+' or 'HS+', got {beta!r}")
        self.beta, self.restart = beta, restart

    def step(self, problem, manifold, x, f, Z, g, st: _LSState):
        rg = self.rgrad(manifold, x, g)
        d = -rg
        if st.d_prev is not None and st.since_restart < self.restart:
            dT = manifold.geometry.transport(st.x_prev, x, st.d_prev)
            rgT = manifold.geometry.transport(st.x_prev, x, st.rg_prev)
            y = rg - rgT
            # g(grad, y) = <P Z, y>: the metric's inner product through the Euclidean pairing
            num = euclidean_inner(manifold, g, y)
            if self.beta == "PR+":
                den = euclidean_inner(manifold, st.g_prev, st.rg_prev)
            else:
                den = manifold.backend.to_float(manifold.metric.inner(manifold, x, dT, y))
            beta = max(0.0, num / den) if den != 0 else 0.0
            cand = d.axpy(beta, dT)
            if euclidean_inner(manifold, g, cand) < 0:
                d = cand
                st.since_restart += 1
            else:
                st.since_restart = 0
        else:
            st.since_restart = 0
        (t, x_new, _), _ = self._line_search(problem, manifold, x, f, d, g, st)
        if t == 0.0 and st.since_restart > 0:  # fall back to steepest descent once
            d = -rg
            st.since_restart = 0
            (t, x_new, _), _ = self._line_search(problem, manifold, x, f, d, g, st)
        if t > 0:
            st.t_prev, st.x_prev, st.g_prev, st.rg_prev, st.d_prev = t, x, g, rg, d
        return x_new, st, t
