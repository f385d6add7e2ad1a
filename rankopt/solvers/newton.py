r"""Second-order solver: Riemannian Newton-CG / Gauss-Newton with line search.

Each iteration solves the Newton equation on the tangent space approximately by truncated
conjugate gradients (Steihaug-Toint stopping on negative curvature),

    H_x xi = -grad f(x),   with ||H xi + grad|| <= eta_k ||grad||,

then searches along ``xi`` (exact step for quadratic costs when available, Armijo backtracking
on the true cost always). ``H`` is

* ``"gauss-newton"``: ``P_x A^* A P_x`` for least-squares costs ``0.5 ||A(X) - b||^2``
  (the Euclidean Hessian projected, without the curvature terms). It is positive
  semidefinite and independent of the singular values of X, which makes the method robust to
  the condition number of the target; with zero residual (exact recovery) the curvature
  terms vanish at the solution and convergence is quadratic. This is Riemannian Gauss-Newton
  as analyzed for low-rank recovery by e.g. Luo, Huang, Li, Zhang, "Recursive importance
  sketching for rank constrained least squares" (RISRO, 2023) and Bian, Cai, Zhang (2023).
* ``"exact"``: the full Riemannian Hessian (curvature terms included).

Cost per CG iteration: one Euclidean Hessian-vector product on a rank-2r ambient direction
(completion: sampling at Omega, O(|Omega| r)) and one projection (O(|Omega| r + (m+n) r^2)).
Forcing term ``eta_k = min(eta_max, sqrt(||grad_k|| / ||grad_0||))`` gives superlinear
convergence (Dembo, Eisenstat, Steihaug 1982), floored at ``gstop / (2 ||grad_k||)`` so that the
last inner solve is no more accurate than the stopping test needs. The Euclidean metric is used
inside CG; a problem may offer ``gn_preconditioner(manifold, x)``, an SPD approximation of the
inverse Gauss-Newton operator used to precondition CG (``MatrixCompletion``: block-Jacobi
with the per-row and per-column Gram matrices, or the observation counts), and
``gn_operator(manifold, x)``, its own (faster) Gauss-Newton operator on the tangent space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..containers import TangentVector
from .base import Solver, euclidean_inner
from .gradient import armijo

__all__ = ["RGN", "truncated_cg"]


def truncated_cg(
    apply_H, g: TangentVector, manifold, rtol: float, maxiter: int, apply_P=None, info=None
):
    """Solve ``H xi = -g`` by (preconditioned) CG from 0.

    Stops at ``||r|| <= rtol ||g||`` (Euclidean residual norm) or on negative curvature.
    ``apply_P`` is an optional SPD preconditioner on the tangent space (approximating
    ``H^{-1}``). Returns ``(xi, iterations, stop)`` with ``stop`` in {"tol", "maxiter",
    "negative-curvature"}; on negative curvature at the first iteration the (preconditioned)
    steepest-descent direction is returned.

    ``info``, a dict, receives ``"xHx"`` = ``<xi, H xi>`` when it is known without another
    product: from ``r = -g - H xi``, ``<xi, H xi> = -<xi, g> - <xi, r>`` (two inner products;
    not after negative curvature at the first iteration).
    """
    xi = g * 0.0
    r = g * -1.0  # residual of H xi = -g at xi = 0
    z = r if apply_P is None else apply_P(r)
    p = z
    rz = euclidean_inner(manifold, r, z)
    stop_at = rtol * rtol * euclidean_inner(manifold, r, r)
    stop, k = "maxiter", maxiter
    for it in range(maxiter):
        Hp = apply_H(p)
        pHp = euclidean_inner(manifold, p, Hp)
        if not pHp > 0:
            if it == 0:
                return z, 0, "negative-curvature"
            stop, k = "negative-curvature", it
            break
        alpha = rz / pHp
        xi = xi.axpy(alpha, p)
        r = r.axpy(-alpha, Hp)
        if euclidean_inner(manifold, r, r) <= stop_at:
            stop, k = "tol", it + 1
            break
        z = r if apply_P is None else apply_P(r)
        rz_new = euclidean_inner(manifold, r, z)
        p = z.axpy(rz_new / rz, p)
        rz = rz_new
    if info is not None:
        info["xHx"] = -euclidean_inner(manifold, xi, g) - euclidean_inner(manifold, xi, r)
    return xi, k, stop


@dataclass
class _NewtonState:
    g0: float | None = None
    cg_iters: int = 0
    cg_total: int = 0


class RGN(Solver):
    """Riemannian Newton-CG; Gauss-Newton for least-squares problems (``hessian="auto"``).

    Parameters
    ----------
    hessian : {"auto", "gauss-newton", "exact"}
        ``"auto"``: Gauss-Newton when ``problem.least_squares`` else the exact Hessian.
    cg_maxiter : int
        Most inner CG iterations per outer iteration.
    eta_max : float
        Largest forcing term (relative residual of the inner solve).
    **kw : see :class:`rankopt.solvers.base.Solver`
    """

    name = "RGN"

    def __init__(
        self, *, hessian: str = "auto", cg_maxiter: int = 100, eta_max: float = 0.3, **kw: Any
    ):
        super().__init__(**kw)
        if hessian not in ("auto", "gauss-newton", "exact"):
            raise ValueError(f"hessian must be 'auto', 'gauss-newton' or 'exact', got {hessian!r}")
        self.hessian, self.cg_maxiter, self.eta_max = hessian, cg_maxiter, eta_max

    def init(self, problem, manifold, x):
        return _NewtonState()

    def _is_gn(self, problem) -> bool:
        return self.hessian == "gauss-newton" or (
            self.hessian == "auto" and getattr(problem, "least_squares", False)
        )

    def _operator(self, problem, manifold, x, Z):
        if self._is_gn(problem):
            fast = getattr(problem, "gn_operator", None)
            op = fast(manifold, x) if fast is not None else None
            if op is not None:  # the problem's own P_x A^* A P_x (e.g. fused numba passes)
                return op
            return lambda v: manifold.geometry.project(x, problem.ehess(x, manifold.embed(x, v)))
        g = manifold.geometry
        return lambda v: g.hessian_embedded(x, Z, problem.ehess(x, manifold.embed(x, v)), v)

    def step(self, problem, manifold, x, f, Z, g, st: _NewtonState):
        gn = math.sqrt(max(euclidean_inner(manifold, g, g), 0.0))
        if st.g0 is None:
            st.g0 = gn
        eta = min(self.eta_max, math.sqrt(gn / st.g0)) if st.g0 > 0 else self.eta_max
        # never solve more accurately than the stopping test needs (no over-solving): with
        # ||grad_next|| ~ eta ||grad||, eta = gstop / (2 ||grad||) already reaches gstop
        gstop = max(self.gtol, self.tol * st.g0)
        if gn > 0:
            eta = min(self.eta_max, max(eta, 0.5 * gstop / gn))
        gn_mode = self._is_gn(problem)
        make_P = getattr(problem, "gn_preconditioner", None) if gn_mode else None
        cg_info: dict = {}
        xi, k, _ = truncated_cg(
            self._operator(problem, manifold, x, Z),
            g,
            manifold,
            eta,
            self.cg_maxiter,
            make_P(manifold, x) if make_P is not None else None,
            cg_info,
        )
        st.cg_iters, st.cg_total = k, st.cg_total + k
        slope = euclidean_inner(manifold, g, xi)
        if not slope < 0:
            xi, slope = -g, -gn * gn
            cg_info.pop("xHx", None)
        xHx = cg_info.get("xHx")
        if gn_mode and getattr(problem, "least_squares", False) and xHx is not None and xHx > 0:
            # f(X + t D) is quadratic in t along the ambient line D = embed(xi) (tangent):
            # f'(0) = <grad, xi> and f''(0) = ||A(D)||^2 (+ lam ||D||^2) = <xi, H xi>, which CG
            # already knows: the exact step without another pass over the data
            t0 = -slope / xHx
        else:
            t0 = problem.exact_step(x, manifold.embed(x, xi))
        t0 = float(t0) if t0 is not None and math.isfinite(t0) and t0 > 0 else 1.0
        t, x_new, _ = armijo(problem, manifold, x, f, slope, xi, t0)
        return x_new, st, t
