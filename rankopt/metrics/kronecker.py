r"""Kronecker-diagonal metrics ``<xi, D_L eta D_R>`` restricted to the tangent space, with
their closed-form inverse, and the preconditioned metric built from row/column weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..containers import LowRankMatrix, TangentVector
from .base import SOLVERS, STRUCTURES, BlockScaled, Metric, check_cg, pcg_solve

__all__ = ["KroneckerDiagonal", "Preconditioned"]


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
        check_cg(self.cg_tol, self.cg_maxiter)

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
        return pcg_solve(self, manifold, x, eta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(structure={self.structure!r}, exact={self.exact})"


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
            from .._backend import backend_like

            be = backend_like(w)
            if len(w.shape) != 1:
                raise ValueError(f"{name} weights must be a 1-D array, got shape {tuple(w.shape)}")
            if not be.all_finite(w) or not bool(be.xp.all(w > 0)):
                raise ValueError(f"{name} weights must be positive and finite")
    return KroneckerDiagonal(left=left, right=right, exact=exact, **cg)
