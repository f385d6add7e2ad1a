r"""Riemannian metrics on the fixed-rank manifold.

A metric is a field of inner products ``g_x(xi, eta) = <xi, G_x eta>`` on the tangent spaces,
with ``G_x`` a self-adjoint positive-definite operator on ``T_x`` (Euclidean pairing of the
embedding). Each metric provides

* ``inner(manifold, x, xi, eta)``: ``g_x(xi, eta)`` as a 0-d array;
* ``apply(manifold, x, xi)``: ``G_x xi``;
* ``solve(manifold, x, eta)``: ``G_x^{-1} eta``.

The Riemannian gradient of ``f`` is then ``G_x^{-1} P_x(egrad)``: it is the tangent vector with
``g_x(grad f, eta) = Df(x)[eta]`` for every tangent ``eta`` (checked by
``rankopt.diagnostics.check_gradient`` for every metric here).

A metric that changes during optimization (AdaGrad, Adam) is an immutable value: ``update``
returns a new metric, so within a step it is frozen.

Kronecker-diagonal metrics (``Preconditioned``, ``AdaGrad``, ``Adam``) use
``G_x xi = P_x(D_L xi D_R)`` with positive diagonal ``D_L`` (m) and ``D_R`` (n): the ambient
weighted Frobenius metric ``<xi, D_L eta D_R>`` restricted to the tangent space.
Applying ``G_x`` costs O((m+n) r^2). Its inverse has no closed form on the tangent space: it is
solved by preconditioned conjugate gradients with the preconditioner
``P_x(D_L^{-1} eta D_R^{-1})`` (SPD on ``T_x``), O(k (m+n) r^2) for k iterations (k is small:
the preconditioner is exact when U, V are aligned with the coordinate axes, and the spectrum
of the preconditioned operator lies in ``[1/c, c]`` with ``c`` bounded by how far
``D_L``, ``D_R`` are from constant on the spans of U and V). With ``exact=False`` only the
preconditioner is applied: that is the heuristic of the RAdaGrad/RAdamW authors' code
(precondition the Euclidean gradient, then project): a descent direction, but not the
Riemannian gradient of any fixed metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .containers import LowRankMatrix, TangentVector

__all__ = ["Metric", "Euclidean", "Preconditioned", "KroneckerDiagonal", "AdaGrad", "Adam"]


class Metric:
    """Base class: the embedded Euclidean metric (``G_x`` = identity)."""

    def inner(self, manifold, x, xi: TangentVector, eta: TangentVector) -> Any:
        return manifold.euclidean_inner(xi, self.apply(manifold, x, eta))

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
        return manifold.euclidean_inner(xi, eta)


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


@dataclass(frozen=True, repr=False)
class KroneckerDiagonal(Metric):
    r"""``g_x(xi, eta) = <xi, D_L eta D_R>_F`` restricted to ``T_x``.

    Parameters
    ----------
    left : array (m,) or None
        Diagonal of ``D_L`` (positive); None means ones.
    right : array (n,) or None
        Diagonal of ``D_R``; None means ones.
    exact : bool
        Solve ``G_x g = P_x(Z)`` by PCG (true Riemannian gradient) or apply only the
        preconditioner ``P_x(D_L^{-1} Z D_R^{-1})`` (the papers' heuristic).
    cg_tol : float or None
        Relative residual tolerance of the PCG solve. ``None`` runs exactly ``cg_maxiter``
        iterations with no convergence test (no device synchronization on GPUs).
    cg_maxiter : int
        Most PCG iterations.
    """

    left: Any = None
    right: Any = None
    exact: bool = True
    cg_tol: float | None = 1e-12
    cg_maxiter: int = 50

    # -- the operator ------------------------------------------------------------
    def _scaled(self, manifold, x, xi, power: float) -> TangentVector:
        """``P_x(D_L^p xi D_R^p)`` for a tangent xi, through its rank-2r embedding."""
        e = manifold.embed(x, xi)
        A, B = e.A, e.B
        if self.left is not None:
            A = A * (self.left if power == 1 else self.left**power)[:, None]
        if self.right is not None:
            B = B * (self.right if power == 1 else self.right**power)[:, None]
        return manifold._project(x, LowRankMatrix(A, B))

    def apply(self, manifold, x, xi):
        return self._scaled(manifold, x, xi, 1.0)

    def precondition(self, manifold, x, eta) -> TangentVector:
        """``P_x(D_L^{-1} eta D_R^{-1})``: SPD approximation of ``G_x^{-1}``. O((m+n) r^2)."""
        return self._scaled(manifold, x, eta, -1.0)

    def solve(self, manifold, x, eta):
        if not self.exact:
            return self.precondition(manifold, x, eta)
        return pcg(
            lambda v: self.apply(manifold, x, v),
            lambda v: self.precondition(manifold, x, v),
            eta,
            manifold,
            tol=self.cg_tol,
            maxiter=self.cg_maxiter,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(exact={self.exact})"


def pcg(
    apply_A, apply_P, b: TangentVector, manifold, tol: float | None, maxiter: int
) -> TangentVector:
    r"""Preconditioned conjugate gradients for ``A x = b`` on a tangent space.

    ``A`` and ``P`` are SPD with respect to the Euclidean inner product of ``T_x``.
    Stops when ``||r|| <= tol ||b||`` (``tol=None``: after exactly ``maxiter`` steps).
    Cost per iteration: one ``A`` and one ``P`` application plus O((m+n) r).
    """
    be = manifold.backend
    inner = manifold.euclidean_inner
    x = b * 0.0
    r = b
    z = apply_P(r)
    p = z
    rz = inner(r, z)
    bnorm2 = be.to_float(inner(b, b)) if tol is not None else None
    if bnorm2 is not None and bnorm2 == 0.0:
        return x
    tiny = be.eps * be.eps  # guards 0/0 only once converged to exactly zero residual
    for _ in range(maxiter):
        Ap = apply_A(p)
        alpha = rz / (inner(p, Ap) + tiny)
        x = x.axpy(alpha, p)
        r = r.axpy(-alpha, Ap)
        if tol is not None and be.to_float(inner(r, r)) <= tol * tol * bnorm2:
            break
        z = apply_P(r)
        rz_new = inner(r, z)
        beta = rz_new / (rz + tiny)
        rz = rz_new
        p = z.axpy(beta, p)
    return x


def Preconditioned(
    left: Any = None,
    right: Any = None,
    core_weight: float | None = None,
    exact: bool = True,
    **cg: Any,
) -> Metric:
    r"""A preconditioned metric.

    * ``Preconditioned(core_weight=0.5)``: the factor-scaled metric behind ScaledGD and
      Riemannian preconditioned LoRA (:class:`BlockScaled`).
    * ``Preconditioned(left=w_row, right=w_col)``: row/column weights as in PRGD
      (Bian, Cai, Zhang, arXiv 2305.02543): ``g(xi, eta) = <xi, diag(w_row) eta diag(w_col)>``
      (:class:`KroneckerDiagonal`).

    Parameters
    ----------
    left, right : arrays of shape (m,), (n,), positive
    core_weight : float
        Weight of the ``M`` block (only without ``left``/``right``).
    exact : bool
        See :class:`KroneckerDiagonal`.
    """
    if left is None and right is None:
        return BlockScaled(0.5 if core_weight is None else float(core_weight))
    if core_weight is not None:
        raise ValueError("core_weight cannot be combined with left/right weights")
    for name, w in (("left", left), ("right", right)):
        if w is not None:
            from ._backend import backend_like

            be = backend_like(w)
            if len(w.shape) != 1:
                raise ValueError(f"{name} weights must be a 1-D array, got shape {tuple(w.shape)}")
            if not be.all_finite(w) or not bool(be.xp.all(w > 0)):
                raise ValueError(f"{name} weights must be positive and finite")
    return KroneckerDiagonal(left=left, right=right, exact=exact, **cg)


# ---------------------------------------------------------------------------
# Adaptive metrics
# ---------------------------------------------------------------------------


def tangent_row_col_sq(manifold, x, g: TangentVector) -> tuple[Any, Any]:
    r"""Row and column squared norms of the ambient matrix of a tangent vector.

    For ``xi = A B^T`` with ``A = [U M + Up, U]``, ``B = [V, Vp]``:
    ``diag(xi xi^T) = rowsum((A (B^T B)) * A)``, likewise for columns. O((m+n) r^2);
    no m x n matrix is formed. These are the statistics of RASA (Kasai, Jawanpuria, Mishra,
    ICML 2019) and, restricted to the tangent space, of the RAdaGrad code's
    ``diag(G G^T)``, ``diag(G^T G)``.
    """
    xp = manifold.backend.xp
    e = manifold.embed(x, g)
    A, B = e.A, e.B
    rows = xp.sum((A @ (B.T @ B)) * A, axis=1)
    cols = xp.sum((B @ (A.T @ A)) * B, axis=1)
    # exact arithmetic gives >= 0; clip rounding below zero
    return xp.clip(rows, 0.0, None), xp.clip(cols, 0.0, None)


@dataclass(frozen=True, repr=False)
class AdaGrad(KroneckerDiagonal):
    r"""Metric adapted from AdaGrad (Kronecker-diagonal, from row/column gradient statistics).

    With ``g_t`` the tangent-projected Euclidean gradients seen so far, the statistics are the
    accumulated mean squares of their rows and columns,
    ``v_L = sum_t rowsq(g_t) / n`` and ``v_R = sum_t colsq(g_t) / m`` (O(m + n) memory), and

    ``D_L = (sqrt(v_L) + eps)^{1/2}``, ``D_R = (sqrt(v_R) + eps)^{1/2}``.

    So the Riemannian gradient approximates ``D_L^{-1} G D_R^{-1}``, the diagonal Shampoo-like
    ``L^{-1/4} G R^{-1/4}`` of the RAdaGrad authors' code (Bian et al., NeurIPS 2025), normalized
    so that for a gradient with entries of equal magnitude it has entries of size ~1, as
    AdaGrad/Adam steps do (the learning rate means the same as for Adam). ``eps`` plays the role
    of Adam's ``eps`` (added to the square root of the second moment); it bounds the metric's
    condition number. Before any statistics exist (``row_stats=None``) the metric is Euclidean.

    Parameters
    ----------
    eps : float
    row_stats, col_stats : arrays (m,), (n,) or None
        Accumulated row / column mean squares.
    steps : int
        Number of updates so far.
    """

    eps: float = 1e-10
    row_stats: Any = None
    col_stats: Any = None
    steps: int = 0

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if (self.row_stats is None) != (self.col_stats is None):
            raise ValueError("give both row_stats and col_stats, or neither")
        if self.row_stats is not None:
            c = self._norm()
            object.__setattr__(self, "left", ((self.row_stats / c) ** 0.5 + self.eps) ** 0.5)
            object.__setattr__(self, "right", ((self.col_stats / c) ** 0.5 + self.eps) ** 0.5)

    def _norm(self) -> float:
        return 1.0

    def _combine(self, old, new):
        return new if old is None else old + new

    def update(self, manifold, x, g: TangentVector) -> AdaGrad:
        """A new metric with the statistics of the tangent gradient ``g`` added."""
        rows, cols = tangent_row_col_sq(manifold, x, g)
        rows, cols = rows / manifold.n, cols / manifold.m
        return replace(
            self,
            row_stats=self._combine(self.row_stats, rows),
            col_stats=self._combine(self.col_stats, cols),
            steps=self.steps + 1,
            left=None,
            right=None,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps}, steps={self.steps}, exact={self.exact})"


@dataclass(frozen=True, repr=False)
class Adam(AdaGrad):
    r"""Metric adapted from Adam: exponential moving averages of the row/column statistics.

    ``v_L <- beta2 v_L + (1 - beta2) rowsq(g) / n``, ``v_R`` likewise, bias-corrected by
    ``1 - beta2^t``, then ``D_L = (sqrt(v_L / (1 - beta2^t)) + eps)^{1/2}`` and the same for
    ``D_R`` (see :class:`AdaGrad`).
    """

    eps: float = 1e-8
    beta2: float = 0.999

    def __post_init__(self):
        if not 0.0 <= self.beta2 < 1.0:
            raise ValueError(f"beta2 must lie in [0, 1), got {self.beta2}")
        super().__post_init__()

    def _norm(self) -> float:
        return 1.0 - self.beta2**self.steps if self.steps > 0 else 1.0

    def _combine(self, old, new):
        if old is None:
            return (1.0 - self.beta2) * new
        return self.beta2 * old + (1.0 - self.beta2) * new
