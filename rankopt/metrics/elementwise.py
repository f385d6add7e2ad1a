r"""The elementwise-diagonal metric (an m x n weight per matrix: small layers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..containers import TangentVector
from .base import Metric, check_cg, pcg_solve

__all__ = ["ElementwiseDiagonal", "elementwise_weights"]


def elementwise_weights(v: Any, eps: float, xp: Any) -> Any:
    r"""The weights ``D = sqrt(v + eps^2 mu)`` of the elementwise Adam metric from a second moment.

    ``v`` (..., m, n) is an (bias-corrected) elementwise mean square of the gradients and
    ``mu`` its mean over each matrix, so ``eps`` is relative (a fraction of the RMS gradient),
    exactly as in the ``"adafactor"`` factoring of :func:`adaptive_diagonals`: the factored
    weights ``D_L,i D_R,j`` approximate these ``D_ij``. A matrix with ``v = 0`` gets ``D = eps``
    (Euclidean up to scale). O(m n).
    """
    mu = xp.mean(v, axis=(-2, -1), keepdims=True)
    mu = xp.where(mu > 0, mu, 1.0)
    return xp.sqrt(v + (eps * eps) * mu)


@dataclass(frozen=True, repr=False)
class ElementwiseDiagonal(Metric):
    r"""``g_x(xi, eta) = <xi, D * eta>_F`` restricted to ``T_x``: one positive weight per entry.

    ``G_x xi = P_x(D * xi)`` (``*`` elementwise, ``D`` of shape ``(..., m, n)``): the metric of
    elementwise Adam (``D = sqrt(v)``, see :func:`elementwise_weights`) restricted to the
    manifold, of which :class:`KroneckerDiagonal` with Adafactor-factored weights is the
    O(m + n)-memory approximation (``D_ij ~ D_L,i D_R,j``). For layers small enough to afford
    m x n weights.

    There is no closed form for ``G_x^{-1}``: ``solve`` runs preconditioned conjugate gradients
    (:func:`pcg`) with the preconditioner ``P_x(D^{-1} * eta)``, each iteration forming the
    ambient m x n matrix of a tangent vector: O(m n r) per iteration.

    Parameters
    ----------
    weights : array (..., m, n), positive
    cg_tol : float or None
        Relative residual tolerance of the solve (``None``: exactly ``cg_maxiter`` iterations).
    cg_maxiter : int
    """

    weights: Any = None
    cg_tol: float | None = 1e-12
    cg_maxiter: int = 100

    def __post_init__(self):
        if self.weights is None:
            raise ValueError("ElementwiseDiagonal needs weights of shape (..., m, n)")
        check_cg(self.cg_tol, self.cg_maxiter)

    def _scaled(self, manifold, x, xi: TangentVector, inverse: bool) -> TangentVector:
        g = manifold.geometry
        E = g.embed(x, xi).to_dense()
        E = E / self.weights if inverse else E * self.weights
        return g.project(x, E)

    def apply(self, manifold, x, xi):
        return self._scaled(manifold, x, xi, False)

    def precondition(self, manifold, x, eta) -> TangentVector:
        """``P_x(D^{-1} * eta)``, an SPD approximation of ``G_x^{-1}``. O(m n r)."""
        return self._scaled(manifold, x, eta, True)

    def solve(self, manifold, x, eta):
        return pcg_solve(self, manifold, x, eta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cg_tol={self.cg_tol}, cg_maxiter={self.cg_maxiter})"
