r"""Riemannian metrics on the fixed-rank manifold.

A metric is a field of inner products ``g_x(xi, eta) = <xi, G_x eta>`` on the tangent spaces,
with ``G_x`` a self-adjoint positive-definite operator on ``T_x`` (Euclidean pairing of the
embedding). Each metric provides

* ``inner(manifold, x, xi, eta)``: ``g_x(xi, eta)`` as an array of shape ``(...)``;
* ``apply(manifold, x, xi)``: ``G_x xi``;
* ``solve(manifold, x, eta)``: ``G_x^{-1} eta``.

The Riemannian gradient of ``f`` is then ``G_x^{-1} P_x(egrad)``: it is the tangent vector with
``g_x(grad f, eta) = Df(x)[eta]`` for every tangent ``eta`` (checked by
``rankopt.diagnostics.check_gradient`` for every metric here).

A metric that changes during optimization (AdaGrad, Adam) is an immutable value: ``update``
returns a new metric, so within a step it is frozen.

Kronecker-diagonal metrics (``Preconditioned``, ``AdaGrad``, ``Adam``) use
``G_x xi = P_x(D_L xi D_R)`` with positive diagonal ``D_L`` (m) and ``D_R`` (n): the ambient
weighted Frobenius metric ``<xi, D_L eta D_R>`` restricted to the tangent space. Both applying
``G_x`` and solving with it cost O((m+n) r^2 + r^3): the inverse has a closed form (see
:class:`KroneckerDiagonal`), so the Riemannian gradient of these metrics is exact and needs no
iteration. ``solver="pcg"`` solves the same system by preconditioned conjugate gradients (kept
to cross-check the closed form), ``structure="block"`` is the cheaper block-diagonal metric, and
``exact=False`` applies only ``P_x(D_L^{-1} . D_R^{-1})`` (a descent direction, not the
Riemannian gradient of any fixed metric). ``benchmarks/optimizer_step.py`` compares them.

Every metric accepts stacks of points (leading dimensions ``(...)``) and then returns inner
products of shape ``(...)``.
"""

from .adaptive import (
    ADAPTIVE_EPS,
    ADAPTIVE_FACTORING,
    FACTORINGS,
    AdaGrad,
    Adam,
    adaptive_diagonals,
    tangent_row_col_sq,
)
from .base import SOLVERS, STRUCTURES, BlockScaled, Euclidean, Metric, pcg
from .elementwise import ElementwiseDiagonal, elementwise_weights
from .kronecker import KroneckerDiagonal, Preconditioned

__all__ = [
    "Metric",
    "Euclidean",
    "BlockScaled",
    "Preconditioned",
    "KroneckerDiagonal",
    "AdaGrad",
    "Adam",
    "ElementwiseDiagonal",
    "adaptive_diagonals",
    "elementwise_weights",
    "tangent_row_col_sq",
    "pcg",
    "ADAPTIVE_EPS",
    "ADAPTIVE_FACTORING",
    "FACTORINGS",
    "STRUCTURES",
    "SOLVERS",
]
