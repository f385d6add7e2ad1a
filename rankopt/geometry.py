r"""The geometry of the fixed-rank manifold as unchecked, stack-aware operations (the fast path).

:class:`Geometry` holds only a :class:`~rankopt._backend.Backend`; shapes come from the arrays.
Every operation accepts one matrix or a *stack* of same-shape matrices: points
``U: (..., m, r)``, ``s: (..., r)``, ``V: (..., n, r)``, tangent vectors
``M: (..., r, r)``, ``Up: (..., m, r)``, ``Vp: (..., n, r)`` and ambient matrices
``(..., m, n)`` or :class:`~rankopt.LowRankMatrix` stacks (sparse ambient matrices: one matrix
only). One code path serves both: a single matrix is the stack with no leading dimension.
Inner products return arrays of shape ``(...)``.

Nothing here validates its input: :class:`~rankopt.FixedRankManifold` checks shapes, backends
and finiteness, then calls these functions; update rules, metrics and solvers call them
directly on data they produced themselves (``manifold.geometry``).

Notation: ``X = U diag(s) V^T``, tangent ``xi = U M V^T + Up V^T + U Vp^T`` with ``U^T Up = 0``,
``V^T Vp = 0`` (Vandereycken 2013). Costs count the flops of one matrix of the stack; ``k`` is the
rank of a factored ambient matrix and ``nnz`` the number of stored entries of a sparse one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._backend import Backend
from .containers import FixedRankPoint, LowRankMatrix, TangentVector

__all__ = ["Geometry", "truncation_rank"]


def _t(a: Any) -> Any:
    """Transpose of the last two axes (a view)."""
    return a.swapaxes(-1, -2)


def truncation_rank(s: np.ndarray, rank_tol: float) -> int:
    """Smallest ``j >= 1`` with ``||s_{j:}||_2 <= rank_tol ||s||_2`` (``len(s)`` if none smaller).

    ``s`` are singular values in descending order (a NumPy array). O(len(s)).
    """
    tails = np.sqrt(np.cumsum((s**2)[::-1])[::-1])  # tails[k] = ||s_{k:}||
    return next((k for k in range(1, len(s)) if tails[k] <= rank_tol * tails[0]), len(s))


class Geometry:
    """Unchecked operations of the fixed-rank manifold on one matrix or a stack of them.

    Parameters
    ----------
    backend : rankopt._backend.Backend
        The array library, dtype and device of every array given to and made by these
        operations (``FixedRankManifold.geometry`` is the one to use).
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    # ------------------------------------------------------------- ambient products
    def matmul(self, Z: Any, B: Any) -> Any:
        """``Z @ B`` for a dense, sparse or factored ``Z``; a tuple of those means their sum.

        O(mnk') dense, O(nnz k') sparse, O((m+n) k k') factored, for ``B`` with k' columns.
        """
        if isinstance(Z, tuple):
            out = self.matmul(Z[0], B)
            for t in Z[1:]:
                out = out + self.matmul(t, B)
            return out
        if isinstance(Z, LowRankMatrix):
            return Z.A @ (_t(Z.B) @ B)
        if self.backend.is_sparse(Z):
            return self.backend.matmul_sparse(Z, B)
        return Z @ B

    def rmatmul(self, Z: Any, A: Any) -> Any:
        """``Z^T @ A`` without transposing ``Z`` in memory (tuples: sum of terms)."""
        if isinstance(Z, tuple):
            out = self.rmatmul(Z[0], A)
            for t in Z[1:]:
                out = out + self.rmatmul(t, A)
            return out
        if isinstance(Z, LowRankMatrix):
            return Z.B @ (_t(Z.A) @ A)
        if self.backend.is_sparse(Z):
            return self.backend.rmatmul_sparse(Z, A)
        return _t(Z) @ A

    # ------------------------------------------------------------- tangent spaces
    def project(self, x: FixedRankPoint, Z: Any) -> TangentVector:
        r"""Orthogonal projection ``P_x(Z)``: ``M = U^T Z V``, ``Up = Z V - U M``,
        ``Vp = Z^T U - V M^T``. Only ``Z V`` and ``Z^T U`` are formed; O(mnr) dense,
        O(nnz r + (m+n) r^2) sparse, O((m+n) k r) factored."""
        ZV = self.matmul(Z, x.V)
        ZtU = self.rmatmul(Z, x.U)
        M = _t(x.U) @ ZV
        return TangentVector(M, ZV - x.U @ M, ZtU - x.V @ _t(M))

    def project_tangent(self, x: FixedRankPoint, xi: TangentVector) -> TangentVector:
        """Re-impose ``U^T Up = 0``, ``V^T Vp = 0`` on a nearly tangent vector. O((m+n) r^2)."""
        U, V = x.U, x.V
        return TangentVector(xi.M, xi.Up - U @ (_t(U) @ xi.Up), xi.Vp - V @ (_t(V) @ xi.Vp))

    def embed(self, x: FixedRankPoint, xi: TangentVector) -> LowRankMatrix:
        """The ambient matrix of ``xi`` as ``[U M + Up, U] [V, Vp]^T`` (rank <= 2r). O(m r^2)."""
        be = self.backend
        return LowRankMatrix(be.concat([x.U @ xi.M + xi.Up, x.U], -1), be.concat([x.V, xi.Vp], -1))

    def inner(self, xi: TangentVector, eta: TangentVector) -> Any:
        """Embedded (Frobenius) inner product, shape ``(...)``: ``<M1,M2> + <Up1,Up2> + <Vp1,Vp2>``
        (the three parts are mutually orthogonal in R^{m x n}). O((m+n) r)."""
        vdot = self.backend.vdot
        return vdot(xi.M, eta.M) + vdot(xi.Up, eta.Up) + vdot(xi.Vp, eta.Vp)

    def zero_vector(self, x: FixedRankPoint) -> TangentVector:
        """The zero tangent vector at ``x`` (same stack shape)."""
        xp = self.backend.xp
        return TangentVector(
            xp.zeros_like(x.U[..., : x.rank, :]), xp.zeros_like(x.U), xp.zeros_like(x.V)
        )

    def point_as_tangent(self, x: FixedRankPoint) -> TangentVector:
        """``X`` itself as a tangent vector at ``X``: ``M = diag(s)``, ``Up = Vp = 0``.

        ``X`` lies in its own tangent space, so ``R_X(-c X) = (1 - c) X`` exactly: decoupled
        weight decay is a tangent step.
        """
        xp = self.backend.xp
        return TangentVector(self.backend.diag(x.s), xp.zeros_like(x.U), xp.zeros_like(x.V))

    def row_col_sq(self, x: FixedRankPoint, xi: TangentVector) -> tuple[Any, Any]:
        r"""Row and column squared norms of the ambient matrix of ``xi``, shapes ``(..., m)``, ``(..., n)``.

        ``||xi_{i,:}||^2 = ||(U M + Up)_i||^2 + U_i (Vp^T Vp) U_i^T`` and
        ``||xi_{:,j}||^2 = ||(V M^T + Vp)_j||^2 + V_j (Up^T Up) V_j^T`` (the cross terms vanish
        because ``V^T Vp = 0``, ``U^T Up = 0``). O((m+n) r^2); no m x n matrix is formed.
        """
        xp = self.backend.xp
        U, V = x.U, x.V
        A = U @ xi.M + xi.Up
        B = V @ _t(xi.M) + xi.Vp
        rows = xp.sum(A * A, axis=-1) + xp.sum((U @ (_t(xi.Vp) @ xi.Vp)) * U, axis=-1)
        cols = xp.sum(B * B, axis=-1) + xp.sum((V @ (_t(xi.Up) @ xi.Up)) * V, axis=-1)
        # exact arithmetic gives >= 0; clip rounding below zero
        return xp.clip(rows, 0.0, None), xp.clip(cols, 0.0, None)

    # ------------------------------------------------------------- transport
    def transport(self, x: FixedRankPoint, y: FixedRankPoint, xi: TangentVector) -> TangentVector:
        r"""Vector transport by projection, ``P_y(xi)`` for ``xi`` tangent at ``x``.

        With ``a = V^T V_y``, ``b = Vp^T V_y``, ``c = U^T U_y``, ``d = Up^T U_y`` (r x r):
        ``xi V_y = U (M a + b) + Up a``, ``xi^T U_y = V (M^T c + d) + Vp c``,
        ``M_y = c^T (M a + b) + d^T a``. Ten products of size (m or n) x r x r, i.e.
        O((m+n) r^2); works between points of different ranks (rank-adaptive rules).
        """
        U, V = x.U, x.V
        a, b = _t(V) @ y.V, _t(xi.Vp) @ y.V
        c, d = _t(U) @ y.U, _t(xi.Up) @ y.U
        Ma_b = xi.M @ a + b
        ZV = U @ Ma_b + xi.Up @ a
        ZtU = V @ (_t(xi.M) @ c + d) + xi.Vp @ c
        My = _t(c) @ Ma_b + _t(d) @ a
        return TangentVector(My, ZV - y.U @ My, ZtU - y.V @ _t(My))

    # ------------------------------------------------------------- retraction
    def sum_svd(self, x: FixedRankPoint, xi: TangentVector) -> tuple[Any, ...]:
        r"""The SVD of ``X + xi`` in factored form, ``(U, Qu, A, s2, B, V, Qv)``.

        ``X + xi = [U, Qu] K [V, Qv]^T`` with ``Up = Qu Ru``, ``Vp = Qv Rv`` (Householder QR of
        ``Up`` and ``Vp`` after one re-orthogonalization against ``U``, ``V``) and the 2r x 2r core
        ``K = [[diag(s) + M, Rv^T], [Ru, 0]] = A diag(s2) B^T``, so the left singular vectors of
        ``X + xi`` are ``[U, Qu] A`` (:meth:`combine`), the right ones ``[V, Qv] B``, with ``s2``
        descending. Cost O((m+n) r^2 + r^3): the QR of the m x r block alone is a quarter of the
        QR of ``[U, Up]`` (Manopt's variant of Dec. 2019), and the re-orthogonalization gives the
        same stability (``[U, Qu]`` orthonormal to working precision; ``tests/test_geometry.py``).
        """
        be = self.backend
        U, V = x.U, x.V
        Up = xi.Up - U @ (_t(U) @ xi.Up)
        Vp = xi.Vp - V @ (_t(V) @ xi.Vp)
        qu, ru = be.qr(Up)
        qv, rv = be.qr(Vp)
        top = be.concat([be.diag(x.s) + xi.M, _t(rv)], -1)
        bottom = be.concat([ru, be.xp.zeros_like(ru)], -1)
        A, s2, Bh = be.svd(be.concat([top, bottom], -2))
        return U, qu, A, s2, _t(Bh), V, qv

    def combine(self, U: Any, Q: Any, A: Any, j: int) -> Any:
        """Orthonormal ``[U, Q] A[:, :j]``: 2 products of size m x r x j, then a sign-fixed QR.

        ``[U, Q]`` is orthonormal to working precision and ``A`` orthogonal, so the QR changes
        the product only at rounding level; it keeps the factors orthonormal over many steps
        (no drift) and completes the basis where ``X + xi`` has rank below ``j`` (columns of
        zero singular value, e.g. an adapter's first step). O(m j^2).
        """
        r = U.shape[-1]
        W = U @ A[..., :r, :j] + Q @ A[..., r:, :j]
        q, R = self.backend.qr(W)
        d = self.backend.diagonal(R)
        one = self.backend.xp.ones_like(d)
        return q * self.backend.xp.where(d < 0, -one, one)[..., None, :]

    def retract(self, x: FixedRankPoint, xi: TangentVector) -> FixedRankPoint:
        r"""Metric-projection retraction ``R_x(xi) = H_r(X + xi)`` (best rank-r approximation).

        The top r triplets of :meth:`sum_svd`. Second order. Cost O((m+n) r^2 + r^3); never
        forms X.
        """
        U, qu, A, s2, B, V, qv = self.sum_svd(x, xi)
        r = x.rank
        return FixedRankPoint(self.combine(U, qu, A, r), s2[..., :r], self.combine(V, qv, B, r))

    def retract_adaptive(
        self,
        x: FixedRankPoint,
        xi: TangentVector,
        rank_tol: float,
        max_rank: int | None = None,
        min_rank: int = 1,
    ) -> FixedRankPoint | list[FixedRankPoint]:
        r"""Rank-adaptive retraction: ``X + xi`` truncated at a relative tolerance.

        The new rank is the smallest ``j`` with ``||s_{j+1:}||_2 <= rank_tol ||s||_2`` of the
        singular values of ``X + xi`` (:meth:`sum_svd`, up to 2r of them), clipped to
        ``[min_rank, max_rank]`` and never keeping exact zeros. For a stack, each item gets its
        own rank and the result is a list of points (one per item, in C order of the stack
        dimensions). Reads the singular values on the host (one synchronization on GPUs).
        """
        U, qu, A, s2, B, V, qv = self.sum_svd(x, xi)
        sv = self.backend.to_numpy(s2).astype(np.float64)
        batch = x.batch_shape
        points = []
        for i, row in enumerate(sv.reshape(-1, sv.shape[-1])):
            j = truncation_rank(row, rank_tol)
            hi = min(len(row), max_rank if max_rank is not None else len(row), *x.shape)
            j = int(min(max(j, min_rank), hi))
            while j > 1 and not row[j - 1] > 0:  # exact zeros are off the manifold
                j -= 1
            k = np.unravel_index(i, batch) if batch else ()
            points.append(
                FixedRankPoint(
                    self.combine(U[k], qu[k], A[k], j),
                    s2[k][..., :j],
                    self.combine(V[k], qv[k], B[k], j),
                )
            )
        return points if batch else points[0]

    # ------------------------------------------------------------- second order
    def hessian_embedded(
        self, x: FixedRankPoint, Z: Any, hess_xi: Any, xi: TangentVector
    ) -> TangentVector:
        r"""Riemannian Hessian of the embedded metric applied to ``xi`` (Vandereycken 2013).

        ``P_x(hess_xi)`` plus ``(I - U U^T) Z Vp diag(s)^{-1}`` on ``Up`` and
        ``(I - V V^T) Z^T Up diag(s)^{-1}`` on ``Vp``. O(one projection + Z Vp + Z^T Up).
        """
        h = self.project(x, hess_xi)
        U, V, s = x.U, x.V, x.s[..., None, :]
        t1 = self.matmul(Z, xi.Vp)
        t1 = (t1 - U @ (_t(U) @ t1)) / s
        t2 = self.rmatmul(Z, xi.Up)
        t2 = (t2 - V @ (_t(V) @ t2)) / s
        return TangentVector(h.M, h.Up + t1, h.Vp + t2)
