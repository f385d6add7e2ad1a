r"""The metric protocol, the Euclidean metric, block scalings, and the PCG solve of a metric
(:func:`pcg`) shared by the metrics without a closed-form inverse."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..containers import TangentVector

__all__ = [
    "Metric",
    "Euclidean",
    "BlockScaled",
    "STRUCTURES",
    "SOLVERS",
    "check_cg",
    "pcg_solve",
    "pcg",
]


class Metric:
    """Base class: the embedded Euclidean metric (``G_x`` = identity).

    Every method accepts one point or a stack of points (leading dimensions ``(...)``);
    ``inner`` then returns an array of shape ``(...)``.
    """

    def inner(self, manifold, x, xi: TangentVector, eta: TangentVector) -> Any:
        return manifold.geometry.inner(xi, self.apply(manifold, x, eta))

    def apply(self, manifold, x, xi: TangentVector) -> TangentVector:
        return xi

    def solve(self, manifold, x, eta: TangentVector) -> TangentVector:
        return eta

    def riemannian_gradient(self, manifold, x, Z: Any) -> TangentVector:
        """``G_x^{-1} P_x(Z)``."""
        return self.solve(manifold, x, manifold.projection(x, Z))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Euclidean(Metric):
    r"""The metric inherited from the embedding: ``g_x(xi, eta) = tr(xi^T eta)``.

    ``<xi, eta> = <M1, M2> + <Up1, Up2> + <Vp1, Vp2>`` (the three parts are orthogonal):
    O((m+n) r). Riemannian gradient = tangent projection of the Euclidean gradient.
    """

    def inner(self, manifold, x, xi, eta):
        return manifold.geometry.inner(xi, eta)


@dataclass(frozen=True, repr=False)
class BlockScaled(Metric):
    r"""``g(xi, eta) = c <M1, M2> + <Up1, Up2> + <Vp1, Vp2>`` with a core weight ``c > 0``.

    With ``c = 1/2`` the Riemannian gradient is ``P(Z) + U U^T Z V V^T``, the ambient step of
    ScaledGD (Tong, Ma, Chi, JMLR 2021) and of Riemannian preconditioned LoRA
    (Zhang & Pilanci, ICML 2024) with balanced factors ``L = U S^{1/2}``, ``R = V S^{1/2}``:
    ``G R (R^T R)^{-1} R^T + L (L^T L)^{-1} L^T G``. Inverse in closed form, O((m+n) r).
    """

    core_weight: float = 0.5

    def __post_init__(self):
        if not self.core_weight > 0 or not math.isfinite(self.core_weight):
            raise ValueError(f"core_weight must be positive and finite, got {self.core_weight}")

    def apply(self, manifold, x, xi):
        return TangentVector(self.core_weight * xi.M, xi.Up, xi.Vp)

    def solve(self, manifold, x, eta):
        return TangentVector(eta.M / self.core_weight, eta.Up, eta.Vp)


STRUCTURES = ("full", "block")
SOLVERS = ("direct", "pcg")


def check_cg(cg_tol: Any, cg_maxiter: Any) -> None:
    """The PCG settings of a metric: ``cg_maxiter`` an integer >= 1, ``cg_tol`` >= 0 or None."""
    if isinstance(cg_maxiter, bool) or not int(cg_maxiter) >= 1:
        raise ValueError(f"cg_maxiter must be an integer >= 1, got {cg_maxiter!r}")
    if cg_tol is not None and not cg_tol >= 0:
        raise ValueError(f"cg_tol must be >= 0 or None, got {cg_tol!r}")


def pcg_solve(metric: Any, manifold: Any, x: Any, eta: TangentVector) -> TangentVector:
    """``G_x^{-1} eta`` by :func:`pcg` on the metric's ``apply``, preconditioned by its
    ``precondition``, to its ``cg_tol`` within ``cg_maxiter`` iterations."""
    return pcg(
        lambda v: metric.apply(manifold, x, v),
        lambda v: metric.precondition(manifold, x, v),
        eta,
        manifold.geometry,
        tol=metric.cg_tol,
        maxiter=int(metric.cg_maxiter),
    )


def pcg(
    apply_A, apply_P, b: TangentVector, geometry, tol: float | None, maxiter: int
) -> TangentVector:
    r"""Preconditioned conjugate gradients for ``A x = b`` on tangent spaces (one or a stack).

    ``A`` and ``P`` are SPD with respect to the Euclidean inner product of ``T_x``. Each item of
    a stack has its own step sizes and stops (takes zero steps) once ``||r|| <= tol ||b||``, so
    a stack gives what each item would alone; the loop ends when every item has stopped (one
    convergence test per stack and iteration, one host read), or after exactly ``maxiter``
    iterations with ``tol=None`` (then nothing is read back to the host). Cost per iteration: one ``A`` and one ``P`` application plus
    O((m+n) r).
    """
    be = geometry.backend
    xp, inner = be.xp, geometry.inner
    x = b * 0.0
    r = b
    z = apply_P(r)
    p = z
    rz = inner(r, z)
    active = True  # items still iterating (an item stops at its own tolerance, as alone)
    if tol is not None:
        bb = inner(b, b)
        bound = tol * tol * bb
        active = inner(r, r) > bound
        if not bool(xp.any(active)):
            return x
    for _ in range(maxiter):
        Ap = apply_A(p)
        pAp = inner(p, Ap)
        ok = (pAp > 0) & active
        alpha = xp.where(ok, rz / xp.where(ok, pAp, 1.0), 0.0)
        x = x.axpy(alpha, p)
        r = r.axpy(-alpha, Ap)
        if tol is not None:
            active = active & (inner(r, r) > bound)
            if not bool(xp.any(active)):
                break
        z = apply_P(r)
        rz_new = inner(r, z)
        ok = (rz != 0) & active
        beta = xp.where(ok, rz_new / xp.where(ok, rz, 1.0), 0.0)
        rz = rz_new
        p = z.axpy(beta, p)
    return x
