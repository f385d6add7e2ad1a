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

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .containers import LowRankMatrix, TangentVector

__all__ = ["Metric", "Euclidean", "Preconditioned", "KroneckerDiagonal", "AdaGrad", "Adam"]


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


def _check_cg(cg_tol: Any, cg_maxiter: Any) -> None:
    """The PCG settings of a metric: ``cg_maxiter`` an integer >= 1, ``cg_tol`` >= 0 or None."""
    if isinstance(cg_maxiter, bool) or not int(cg_maxiter) >= 1:
        raise ValueError(f"cg_maxiter must be an integer >= 1, got {cg_maxiter!r}")
    if cg_tol is not None and not cg_tol >= 0:
        raise ValueError(f"cg_tol must be >= 0 or None, got {cg_tol!r}")


def _pcg_solve(metric: Any, manifold: Any, x: Any, eta: TangentVector) -> TangentVector:
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


@dataclass(frozen=True, repr=False)
class KroneckerDiagonal(Metric):
    r"""A metric from positive row and column weights ``D_L = diag(left)``, ``D_R = diag(right)``.

    ``structure="full"`` (default): ``g_x(xi, eta) = <xi, D_L eta D_R>_F`` restricted to ``T_x``;
    ``G_x = P_x(D_L . D_R)``.

    Its inverse in closed form (``solver="direct"``). Write tangent vectors as
    ``xi = Up V^T + U W^T`` with ``Up`` orthogonal to ``U`` and ``W = V M^T + Vp`` free
    (n x r); the gradient pairs as ``<eta, xi> = <eta_Up, Up> + <eta_W, W>`` with
    ``eta_W = eta^T U``. With ``A_L = U^T D_L U``, ``A_R = V^T D_R V``, ``G_x xi = eta`` reads::

        (I - U U^T) D_L (Up A_R + U W^T D_R V) = eta_Up
        D_R (W A_L + V Up^T D_L U)             = eta_W

    Eliminating ``W`` leaves ``S_L Up A_R = eta_Up - (I - U U^T) D_L U A_L^{-1} eta_W^T V`` with
    the Schur complement ``S_L = D_L - D_L U A_L^{-1} U^T D_L``, which maps the complement of
    ``U`` onto itself and is inverted there by ``Y -> (I - U U^T) D_L^{-1} Y``. So::

        Y  = (eta_Up - (I - U U^T) D_L U A_L^{-1} eta_W^T V) A_R^{-1}
        Up = (I - U U^T) D_L^{-1} Y
        W  = (D_R^{-1} eta_W - V Up^T D_L U) A_L^{-1},  M = W^T V,  Vp = W - V M^T

    Fourteen products of size (m or n) x r x r and two r x r inverses: O((m+n) r^2 + r^3), no
    iteration, no host synchronization; exact (``tests/test_geometry.py`` checks it against PCG
    and by finite differences). ``solver="pcg"`` solves the same system iteratively with the
    preconditioner ``P_x(D_L^{-1} . D_R^{-1})`` (:func:`pcg`).

    ``structure="block"``: the block-diagonal part of the full metric in the coordinates
    ``(M, Up, Vp)`` of ``xi = U M V^T + Up V^T + U Vp^T``::

        g(xi, eta) = <M1, A_L M2 A_R> + <Up1, D_L Up2 A_R> + <Vp1, D_R Vp2 A_L>

    (the cross terms dropped; equal to the full metric when ``D_L``, ``D_R`` are constant), with
    inverse ``M = A_L^{-1} eta_M A_R^{-1}``, ``Up = H_L eta_Up A_R^{-1}``,
    ``Vp = H_R eta_Vp A_L^{-1}``, ``H_L = D_L^{-1} - D_L^{-1} U (U^T D_L^{-1} U)^{-1} U^T D_L^{-1}``.
    A metric in its own right (FD-checked), but a poor approximation when the weights vary
    along the spans of ``U`` or ``V`` (measured in ``benchmarks/optimizer_step.py``).

    Parameters
    ----------
    left : array (..., m) or None
        Diagonal of ``D_L`` (positive); None means ones.
    right : array (..., n) or None
        Diagonal of ``D_R``; None means ones.
    exact : bool
        ``structure="full"`` only: the Riemannian gradient (True) or only the preconditioner
        ``P_x(D_L^{-1} Z D_R^{-1})`` (False), a descent direction that is not the Riemannian
        gradient of any fixed metric.
    cg_tol : float or None
        ``solver="pcg"``: relative residual tolerance (the worst item of a stack decides);
        ``None`` runs exactly ``cg_maxiter`` iterations with no convergence test (no device
        synchronization on GPUs).
    cg_maxiter : int
        ``solver="pcg"``: most iterations (at least 1).
    structure : {"full", "block"}
    solver : {"direct", "pcg"}
        How the full metric is inverted.
    """

    left: Any = None
    right: Any = None
    exact: bool = True
    cg_tol: float | None = 1e-12
    cg_maxiter: int = 50
    structure: str = "full"
    solver: str = "direct"

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {self.structure!r}")
        if self.structure == "block" and not self.exact:
            raise ValueError("exact=False (precondition only) applies to structure='full' only")
        _check_cg(self.cg_tol, self.cg_maxiter)

    # -- the full (restricted ambient) operator --------------------------------------------
    def _scaled(self, manifold, x, xi, power: float) -> TangentVector:
        """``P_x(D_L^p xi D_R^p)`` for a tangent xi, through its rank-2r embedding."""
        g = manifold.geometry
        e = g.embed(x, xi)
        A, B = e.A, e.B
        if self.left is not None:
            A = A * (self.left if power == 1 else self.left**power)[..., :, None]
        if self.right is not None:
            B = B * (self.right if power == 1 else self.right**power)[..., :, None]
        return g.project(x, LowRankMatrix(A, B))

    def precondition(self, manifold, x, eta) -> TangentVector:
        """``P_x(D_L^{-1} eta D_R^{-1})``: SPD approximation of the full ``G_x^{-1}``. O((m+n) r^2)."""
        return self._scaled(manifold, x, eta, -1.0)

    def _direct_solve(self, manifold, x, eta):
        r"""Exact ``G_x^{-1} eta`` of the full metric in closed form (see the class docstring).

        Arranged to touch m x r and n x r arrays as few times as possible: ``eta_W^T V = M``
        exactly, ``(I - U U^T) D_L^{-1} Y`` with ``Y = eta_Up A_R^{-1} + U A_L C A_R^{-1}``
        (``C = A_L^{-1} M``, so ``L = A_L C A_R^{-1} = M A_R^{-1}``), and
        ``K = Up^T D_L U = L^T - (U^T D_L^{-1} Y)^T A_L`` from r x r quantities only. 15 passes
        over m x r / n x r arrays.
        """
        be = manifold.backend
        mm, inv = be.mm, be.xp.linalg.inv
        dl, dr = self._weights(manifold, x)
        U, V = x.U, x.V
        Ut, Vt = U.swapaxes(-1, -2), V.swapaxes(-1, -2)
        AL = mm(Ut, dl * U)
        AR = mm(Vt, dr * V)
        if AL.shape == AR.shape:  # one batched inverse for both sides (r x r each)
            ALi, ARi = be.xp.unstack(inv(be.xp.stack([AL, AR])))
        else:  # pragma: no cover - AL and AR are both r x r
            ALi, ARi = inv(AL), inv(AR)
        L = mm(eta.M, ARi)  # A_L C A_R^{-1} with C = A_L^{-1} M
        Z = be.addmm_(mm(eta.Up, ARi), U, L)
        Z /= dl  # D_L^{-1} Y
        UtZ = mm(Ut, Z)
        Up = be.addmm_(Z, U, UtZ, -1.0)  # (I - U U^T) D_L^{-1} Y
        K = L.swapaxes(-1, -2) - mm(UtZ.swapaxes(-1, -2), AL)  # Up^T D_L U
        Q = be.addmm(eta.Vp, V, eta.M.swapaxes(-1, -2))  # eta_W = eta^T U = V M^T + Vp
        Q /= dr
        G = mm(Vt, Q)
        Mt = mm(G - K, ALi)  # V^T W with W = (D_R^{-1} eta_W - V K) A_L^{-1}
        Vp = mm(be.addmm_(Q, V, G, -1.0), ALi)  # (I - V V^T) W
        return TangentVector(Mt.swapaxes(-1, -2), Up, Vp)

    # -- the block-diagonal operator ---------------------------------------------------------
    def _weights(self, manifold, x):
        xp = manifold.backend.xp
        one = xp.ones_like
        dl = self.left if self.left is not None else one(x.U[..., 0])
        dr = self.right if self.right is not None else one(x.V[..., 0])
        return dl[..., :, None], dr[..., :, None]

    @staticmethod
    def _gram(mm, F, w):
        """``F^T diag(w) F`` (r x r) for ``w`` of shape ``(..., m, 1)``."""
        return mm(F.swapaxes(-1, -2), w * F)

    def _block_apply(self, manifold, x, xi):
        mm = manifold.backend.mm
        dl, dr = self._weights(manifold, x)
        U, V = x.U, x.V
        AL, AR = self._gram(mm, U, dl), self._gram(mm, V, dr)
        Up, Vp = dl * xi.Up, dr * xi.Vp
        Up = Up - mm(U, mm(U.swapaxes(-1, -2), Up))
        Vp = Vp - mm(V, mm(V.swapaxes(-1, -2), Vp))
        return TangentVector(mm(mm(AL, xi.M), AR), mm(Up, AR), mm(Vp, AL))

    def _block_solve(self, manifold, x, eta):
        mm, inv = manifold.backend.mm, manifold.backend.xp.linalg.inv
        dl, dr = self._weights(manifold, x)
        U, V = x.U, x.V
        ALi, ARi = inv(self._gram(mm, U, dl)), inv(self._gram(mm, V, dr))

        def h(F, d, Y):  # H Y = D^-1 Y - D^-1 F (F^T D^-1 F)^-1 F^T D^-1 Y
            Fd, Yd = F / d, Y / d
            Ft = F.swapaxes(-1, -2)
            return Yd - mm(Fd, mm(inv(mm(Ft, Fd)), mm(Ft, Yd)))

        M = mm(mm(ALi, eta.M), ARi)
        return TangentVector(M, h(U, dl, mm(eta.Up, ARi)), h(V, dr, mm(eta.Vp, ALi)))

    # -- the metric --------------------------------------------------------------------------
    def apply(self, manifold, x, xi):
        if self.structure == "block":
            return self._block_apply(manifold, x, xi)
        return self._scaled(manifold, x, xi, 1.0)

    def solve(self, manifold, x, eta):
        if self.structure == "block":
            return self._block_solve(manifold, x, eta)
        if not self.exact:
            return self.precondition(manifold, x, eta)
        if self.solver == "direct":
            return self._direct_solve(manifold, x, eta)
        return _pcg_solve(self, manifold, x, eta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(structure={self.structure!r}, exact={self.exact})"


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

    See :meth:`rankopt.geometry.Geometry.row_col_sq`: O((m+n) r^2), no m x n matrix is formed.
    These are the statistics of RASA (Kasai, Jawanpuria, Mishra, ICML 2019) and, restricted to
    the tangent space, of the RAdaGrad code's ``diag(G G^T)``, ``diag(G^T G)``.
    """
    return manifold.geometry.row_col_sq(x, g)


FACTORINGS = ("adafactor", "quartic")
#: defaults of the adaptive metrics and of the rules built on them (RAdaGrad, RAdamW), chosen
#: by ``benchmarks/optimizer_step.py`` and ``benchmarks/optimizers.py`` (see docs/optimizers.md)
ADAPTIVE_FACTORING = "adafactor"
ADAPTIVE_EPS = 1e-3


def adaptive_diagonals(
    row_ms: Any, col_ms: Any, eps: float, factoring: str, xp: Any
) -> tuple[Any, Any]:
    r"""The weights ``(D_L, D_R)`` of an adaptive metric from row/column mean squares.

    ``row_ms`` (..., m) and ``col_ms`` (..., n) are (bias-corrected) mean squares of the rows and
    columns of the gradients, ``v_L,i = mean_j v_ij`` and ``v_R,j = mean_i v_ij`` of a second
    moment ``v`` (m x n, never formed). The metric ``<xi, D_L eta D_R>`` then scales a gradient
    ``G`` roughly as ``G_ij / (D_L,i D_R,j)``:

    * ``"adafactor"``: the factored second moment of Adafactor (Shazeer & Stern, ICML 2018),
      ``v_ij ~ v_L,i v_R,j / mean(v)``, so ``G / sqrt(v_ij)`` needs a square root per side:
      ``D_L = sqrt(v_L + eps^2 mu) / mu^{1/4}``, ``D_R`` likewise, with ``mu = mean(v_L)`` the
      overall mean square. ``eps`` is relative (a fraction of the RMS gradient): the direction
      does not depend on the scale of the data, and no weight falls below ``eps`` times the
      typical one, which bounds how much rows or columns with vanishing statistics are amplified.
    * ``"quartic"``: ``D = (sqrt(v) + eps)^{1/2}`` per side, i.e. ``G / (v_L^{1/4} v_R^{1/4})``
      (a diagonal Shampoo-like ``L^{-1/4} G R^{-1/4}``, rankopt's default before 2026-11);
      ``eps`` is absolute here. Measured worse on ill-conditioned problems
      (``benchmarks/optimizers.py``).

    Shapes ``(..., m)``, ``(..., n)`` (stacks); O(m + n).
    """
    if factoring == "quartic":
        return (xp.sqrt(row_ms) + eps) ** 0.5, (xp.sqrt(col_ms) + eps) ** 0.5
    if factoring != "adafactor":
        raise ValueError(f"factoring must be one of {FACTORINGS}, got {factoring!r}")
    mu = xp.mean(row_ms, axis=-1, keepdims=True)
    mu = xp.where(mu > 0, mu, 1.0)
    q = mu**0.25
    floor = (eps * eps) * mu
    return xp.sqrt(row_ms + floor) / q, xp.sqrt(col_ms + floor) / q


@dataclass(frozen=True, repr=False)
class AdaGrad(KroneckerDiagonal):
    r"""Metric adapted from AdaGrad: Kronecker-diagonal, from row/column gradient statistics.

    With ``g_t`` the tangent-projected Euclidean gradients seen so far, the statistics are the
    accumulated mean squares of their rows and columns, ``v_L = sum_t rowsq(g_t) / n`` and
    ``v_R = sum_t colsq(g_t) / m`` (O(m + n) memory, see :func:`tangent_row_col_sq`), and the
    weights ``(D_L, D_R) = adaptive_diagonals(v_L, v_R, eps, factoring)``: with the default
    ``factoring="adafactor"``, ``D_L = sqrt(v_L + eps^2 mu) / mu^{1/4}`` and likewise ``D_R``
    (``mu`` the mean of ``v_L``), so that ``D_L,i D_R,j ~ sqrt(v_ij)`` for the factored second
    moment of Adafactor and the Riemannian gradient approximates AdaGrad's ``G / sqrt(v)``.
    ``eps`` is relative (a fraction of the RMS gradient). Before any statistics exist
    (``row_stats=None``) the metric is Euclidean.

    Parameters
    ----------
    eps : float
        Relative floor of the statistics (see :func:`adaptive_diagonals`).
    row_stats, col_stats : arrays (..., m), (..., n) or None
        Accumulated row / column mean squares.
    steps : int
        Number of updates so far.
    factoring : {"adafactor", "quartic"}
        How the weights come from the statistics (:func:`adaptive_diagonals`).
    """

    eps: float = ADAPTIVE_EPS
    row_stats: Any = None
    col_stats: Any = None
    steps: int = 0

    factoring: str = ADAPTIVE_FACTORING

    def __post_init__(self):
        super().__post_init__()
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if (self.row_stats is None) != (self.col_stats is None):
            raise ValueError("give both row_stats and col_stats, or neither")
        if self.row_stats is not None:
            c = self._norm()
            from ._backend import backend_like

            left, right = adaptive_diagonals(
                self.row_stats / c,
                self.col_stats / c,
                self.eps,
                self.factoring,
                backend_like(self.row_stats).xp,
            )
            object.__setattr__(self, "left", left)
            object.__setattr__(self, "right", right)

    def _norm(self) -> float:
        return 1.0

    def _combine(self, old, new):
        return new if old is None else old + new

    def update(self, manifold, x, g: TangentVector) -> AdaGrad:
        """A new metric with the statistics of the tangent gradient ``g`` added."""
        rows, cols = tangent_row_col_sq(manifold, x, g)
        m, n = x.shape
        rows, cols = rows / n, cols / m
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
    ``1 - beta2^t``, then the weights of :class:`AdaGrad` from the corrected statistics.
    """

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


# ---------------------------------------------------------------------------
# Elementwise-diagonal metric (small layers: m x n weights)
# ---------------------------------------------------------------------------


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
        _check_cg(self.cg_tol, self.cg_maxiter)

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
        return _pcg_solve(self, manifold, x, eta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cg_tol={self.cg_tol}, cg_maxiter={self.cg_maxiter})"


__all__ += ["ElementwiseDiagonal", "elementwise_weights"]
