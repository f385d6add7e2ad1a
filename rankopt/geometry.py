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

__all__ = ["Geometry", "check_rank_bounds", "truncation_rank"]


def _t(a: Any) -> Any:
    """Transpose of the last two axes (a view): the array API's ``.mT`` (torch, NumPy >= 2;
    0.7 vs 1.0 us per call in torch), ``swapaxes`` where an array has no ``.mT``."""
    try:
        return a.mT
    except AttributeError:
        return a.swapaxes(-1, -2)


def _per_item(a: Any) -> Any:
    """A per-item value ``(...)`` shaped ``(..., 1)`` to broadcast over a row of each item."""
    return a[..., None]


def truncation_rank(s: np.ndarray, rank_tol: float) -> int:
    """Smallest ``j >= 1`` with ``||s_{j:}||_2 <= rank_tol ||s||_2`` (``len(s)`` if none smaller).

    ``s`` are singular values in descending order (a NumPy array), scaled by their largest
    before squaring (no overflow for values near 1e300, no underflow near 1e-300). O(len(s)).
    """
    top = float(np.max(np.abs(s))) if len(s) else 0.0
    s = s / top if 0.0 < top < np.inf else s
    tails = np.sqrt(np.cumsum((s**2)[::-1])[::-1])  # tails[k] = ||s_{k:}||
    return next((k for k in range(1, len(s)) if tails[k] <= rank_tol * tails[0]), len(s))


def check_rank_bounds(max_rank: int | None, min_rank: int) -> None:
    """Raise ``ValueError`` unless ``min_rank`` is an integer >= 1 and ``max_rank`` is None or
    an integer with ``min_rank <= max_rank``. O(1), no array is read."""
    for name, v in (("max_rank", max_rank), ("min_rank", min_rank)):
        if name == "max_rank" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            none = " (or None: no cap)" if name == "max_rank" else ""
            raise ValueError(f"{name} must be an integer >= 1{none}, got {v!r}")
    if max_rank is not None and min_rank > max_rank:
        raise ValueError(f"min_rank={min_rank} exceeds max_rank={max_rank}")


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
        addmm = self.backend.addmm if isinstance(Z, LowRankMatrix) else self.backend.addmm_
        ZV = self.matmul(Z, x.V)  # new arrays (a sparse or dense product): updated in place
        ZtU = self.rmatmul(Z, x.U)
        M = self.backend.mm(_t(x.U), ZV)
        return TangentVector(M, addmm(ZV, x.U, M, -1.0), addmm(ZtU, x.V, _t(M), -1.0))

    def project_tangent(self, x: FixedRankPoint, xi: TangentVector) -> TangentVector:
        """Re-impose ``U^T Up = 0``, ``V^T Vp = 0`` on a nearly tangent vector. O((m+n) r^2)."""
        U, V, addmm, mm = x.U, x.V, self.backend.addmm, self.backend.mm
        return TangentVector(
            xi.M, addmm(xi.Up, U, mm(_t(U), xi.Up), -1.0), addmm(xi.Vp, V, mm(_t(V), xi.Vp), -1.0)
        )

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
        be = self.backend
        mm, dot = be.mm, be.rowdot
        U, V = x.U, x.V
        A = be.addmm(xi.Up, U, xi.M)
        B = be.addmm(xi.Vp, V, _t(xi.M))
        rows = dot(A, A, mm(U, mm(_t(xi.Vp), xi.Vp)), U)
        cols = dot(B, B, mm(V, mm(_t(xi.Up), xi.Up)), V)
        # exact arithmetic gives >= 0; clip rounding below zero
        return be.xp.clip(rows, 0.0, None), be.xp.clip(cols, 0.0, None)

    # ------------------------------------------------------------- transport
    def transport(
        self,
        x: FixedRankPoint,
        y: FixedRankPoint,
        xi: TangentVector,
        UtUy: Any = None,
        VtVy: Any = None,
    ) -> TangentVector:
        r"""Vector transport by projection, ``P_y(xi)`` for ``xi`` tangent at ``x``.

        With ``a = V^T V_y``, ``b = Vp^T V_y``, ``c = U^T U_y``, ``d = Up^T U_y`` (r x r):
        ``xi V_y = U (M a + b) + Up a``, ``xi^T U_y = V (M^T c + d) + Vp c``,
        ``M_y = c^T (M a + b) + d^T a``. Ten products of size (m or n) x r x r, i.e.
        O((m+n) r^2); works between points of different ranks (rank-adaptive rules).
        ``UtUy = U^T U_y`` and ``VtVy = V^T V_y``, when the caller knows them (a retraction
        does, see :meth:`retract_transport`), save two of the products.
        """
        mm = self.backend.mm
        U, V, addmm_ = x.U, x.V, self.backend.addmm_
        a = mm(_t(V), y.V) if VtVy is None else VtVy
        c = mm(_t(U), y.U) if UtUy is None else UtUy
        b, d = mm(_t(xi.Vp), y.V), mm(_t(xi.Up), y.U)
        Ma_b = mm(xi.M, a) + b
        ZV = addmm_(mm(xi.Up, a), U, Ma_b)  # xi V_y
        ZtU = addmm_(mm(xi.Vp, c), V, mm(_t(xi.M), c) + d)  # xi^T U_y
        My = mm(_t(c), Ma_b) + mm(_t(d), a)
        return TangentVector(My, addmm_(ZV, y.U, My, -1.0), addmm_(ZtU, y.V, _t(My), -1.0))

    # ------------------------------------------------------------- retraction
    def _omega(self, m: int, r: int) -> Any:
        """A fixed m x r Gaussian matrix with unit-norm columns, cached per shape: see
        :meth:`_complement_qr`. Its seed is its own (the bytes of "RANKOPT"), so that it does not
        coincide with a random point drawn from a small seed (``random_point(0)`` orthonormalizes
        ``default_rng(0).standard_normal((m, r))``: that matrix lies in the span of ``U``)."""
        key = (m, r)
        cache = self.__dict__.setdefault("_omegas", {})
        if key not in cache:
            g = np.random.default_rng(int.from_bytes(b"RANKOPT", "big")).standard_normal((m, r))
            cache[key] = self.backend.asarray(g / np.linalg.norm(g, axis=0))
        return cache[key]

    def _complement_qr(self, F: Any, P: Any) -> tuple[Any, Any]:
        r"""``Q R = P + tau Omega`` with ``Q`` orthonormal and orthogonal to ``F`` (``P`` nearly in
        ``F^perp``).

        ``P + tau Omega`` (``Omega`` a fixed Gaussian matrix with unit-norm columns) is
        re-orthogonalized against ``F`` and factored by Householder QR. The perturbation makes
        ``P`` of full rank, so that ``Q`` is orthogonal to ``F`` even where ``P`` is rank-deficient
        (there Householder QR alone returns coordinate vectors, which are not). ``tau = 128 eps
        (||P||_F + tiny)``: well above the rounding of the re-orthogonalization (about eps ||P||,
        so the completed directions are orthogonal to ``F`` to about 1/128: 2e-3 measured over 20
        seeds, which the retraction's Newton-Schulz step squares) and at rounding level of the
        step (``X + t xi`` moves by about 128 eps ``t ||xi||``, so a full-rank retraction stays
        exact to 100 eps ``||X||``: larger ``tau`` breaks that); ``tiny`` (1e-280 in float64, 1e-25
        in float32) keeps it above the subnormal range, where numbers carry too few digits.
        O(m r^2): four passes over m x r arrays plus the QR.
        """
        be = self.backend
        tiny = 1e-25 if be.is_float32 else 1e-280
        tau = (be.frobenius(P) + tiny) * (128.0 * be.eps)
        P = be.axpy(tau, self._omega(*P.shape[-2:]), P)  # a new array: updated in place
        return be.qr(be.addmm_(P, F, be.mm(_t(F), P), -1.0))

    def sum_svd(self, x: FixedRankPoint, xi: TangentVector, t: Any = 1.0) -> tuple[Any, ...]:
        r"""The SVD of ``X + t xi`` in factored form, ``(U, Qu, A, s2, B, V, Qv)``.

        ``X + t xi = [U, Qu] K [V, Qv]^T`` with ``Up = Qu Ru``, ``Vp = Qv Rv`` (Householder QR of
        ``Up`` and ``Vp`` re-orthogonalized against ``U``, ``V``, see :meth:`_complement_qr`) and
        the 2r x 2r core ``K = [[diag(s) + t M, t Rv^T], [t Ru, 0]] = A diag(s2) B^T``, so the
        left singular vectors of ``X + t xi`` are ``[U, Qu] A`` (:meth:`combine`), the right
        ones ``[V, Qv] B``, with ``s2`` descending. ``t`` is a number or per-item values
        ``(...)``: the step size costs nothing (it scales r x r blocks only). Cost
        O((m+n) r^2 + r^3); the QR of the m x r block alone is a quarter of the QR of
        ``[U, Up]`` (Manopt's variant of Dec. 2019).
        """
        be = self.backend
        U, V = x.U, x.V
        qu, ru = self._complement_qr(U, xi.Up)
        qv, rv = self._complement_qr(V, xi.Vp)
        tt = t[..., None, None] if getattr(t, "ndim", 0) > 0 else t
        top = be.concat([be.diag(x.s) + tt * xi.M, tt * _t(rv)], -1)
        bottom = be.concat([tt * ru, be.xp.zeros_like(ru)], -1)
        A, s2, Bh = be.svd(be.concat([top, bottom], -2))
        return U, qu, A, s2, _t(Bh), V, qv

    def orthogonalize(
        self, x: FixedRankPoint, xi: TangentVector, tol: float, ns_steps: int = 0
    ) -> TangentVector:
        r"""``P_x(polar(xi))``: the tangent part of the orthogonal polar factor of ``xi``.

        ``xi = [U, Qu] K [V, Qv]^T`` with ``Up = Qu Ru``, ``Vp = Qv Rv`` (QR as in
        :meth:`sum_svd`) and the 2r x 2r core ``K = [[M, Rv^T], [Ru, 0]]``; a spectral function
        of ``xi`` is ``[U, Qu] f(K) [V, Qv]^T``, whatever signs and rotations the QR and SVD
        choose. With ``ns_steps = 0``, ``f(K) = A diag(k) B^T`` from the SVD ``K = A diag(s)
        B^T``, ``k_i = 1`` where ``s_i > max(tol, 64 eps) s_1`` and 0 else: the exact polar
        factor (the matrix sign) on the kept directions, those at rounding level dropped, not
        lifted to unit length (Bogachev et al. 2025, arXiv 2507.12142, "OrthoLR"). It jumps
        where a singular value crosses the cut-off and amplifies changes by up to ``s_1 / s_i``
        near small kept ones. With ``ns_steps > 0``, ``f`` is Muon's quintic Newton-Schulz
        iteration ``X <- a X + (b X X^T + c (X X^T)^2) X``, ``(a, b, c) = (3.4445, -4.7750,
        2.0315)`` (Jordan et al. 2024) from ``X = K / ||K||_F``, applied ``ns_steps`` times: a
        polynomial, hence smooth (gain at most ``a^ns_steps``), with singular values mapped
        into about [0.7, 1.2]; ``tol`` is then unused. On the core this equals the iteration on
        the m x n matrix ``xi``. The result's projection is ``M = F_11``, ``Up = Qu F_21``,
        ``Vp = Qv F_12^T`` (the paper's "ProjectLR"). Cost O((m+n) r^2 + r^3); ``xi = 0``
        gives 0.
        """
        be = self.backend
        r = x.rank
        qu, ru = self._complement_qr(x.U, xi.Up)
        qv, rv = self._complement_qr(x.V, xi.Vp)
        top = be.concat([xi.M, _t(rv)], -1)
        K = be.concat([top, be.concat([ru, be.xp.zeros_like(ru)], -1)], -2)
        # ||xi||_F from its parts: K also holds the QR's rounding-level completion (nonzero for
        # xi = 0, which must give 0, not a unit step along that completion)
        norm = be.xp.sqrt(self.inner(xi, xi))
        F = self._newton_schulz(K, norm, ns_steps) if ns_steps > 0 else self._polar(K, norm, tol)
        mm = be.mm
        return TangentVector(F[..., :r, :r], mm(qu, F[..., r:, :r]), mm(qv, _t(F[..., :r, r:])))

    def _polar(self, K: Any, norm: Any, tol: float) -> Any:
        """``A diag(k) B^T`` with ``k_i = [s_i > max(tol, 64 eps) s_1]``, 0 where ``norm = 0``."""
        be = self.backend
        A, s, Bh = be.svd(K)
        nonzero = _per_item(norm > 0)
        keep = be.xp.astype((s > max(float(tol), 64.0 * be.eps) * s[..., :1]) & nonzero, s.dtype)
        return be.mm(A * keep[..., None, :], Bh)

    def _newton_schulz(self, K: Any, norm: Any, steps: int) -> Any:
        """Muon's quintic Newton-Schulz iteration on ``K / norm`` (0 where ``norm = 0``)."""
        be = self.backend
        xp = be.xp
        norm = _per_item(norm)[..., None]
        X = K * xp.where(norm > 0, 1.0 / xp.where(norm > 0, norm, xp.ones_like(norm)), 0.0 * norm)
        a, b, c = 3.4445, -4.7750, 2.0315
        for _ in range(steps):
            A = be.mm(X, _t(X))
            X = a * X + be.mm(b * A + c * be.mm(A, A), X)
        return X

    def combine(self, U: Any, Q: Any, A: Any, j: int) -> tuple[Any, Any]:
        r"""``(W, U^T W)`` for the orthonormal ``W = [U, Q] A[:, :j] N``.

        ``[U, Q]`` is orthonormal to working precision and ``A`` orthogonal, so ``[U, Q] A`` is
        too; ``N = (3 I - G) / 2`` with ``G = A^T H A``, ``H = [[U^T U, U^T Q], [Q^T U, I]]``, is one
        Newton-Schulz step, which squares the (rounding-level) deviation from orthonormality, so
        the factors do not drift over many steps. The Grams ``U^T U``, ``U^T Q`` also give
        ``U^T W`` without a pass over W (for a transport). O(m r j): four passes over m x r arrays.
        """
        be = self.backend
        mm = be.mm
        r = U.shape[-1]
        Ut = _t(U)
        HUU, HUQ = mm(Ut, U), mm(Ut, Q)
        A1, A2 = A[..., :r, :j], A[..., r:, :j]
        HA1 = mm(HUU, A1) + mm(HUQ, A2)  # U^T [U, Q] A
        G = mm(_t(A1), HA1) + mm(_t(A2), mm(_t(HUQ), A1) + A2)
        N = -0.5 * G
        N += 1.5 * be.eye(j)
        W = be.addmm_(mm(U, mm(A1, N)), Q, mm(A2, N))
        return W, mm(HA1, N)

    def retract(self, x: FixedRankPoint, xi: TangentVector, t: Any = 1.0) -> FixedRankPoint:
        r"""Metric-projection retraction ``R_x(t xi) = H_r(X + t xi)`` (best rank-r approximation).

        The top r triplets of :meth:`sum_svd`. Second order. Cost O((m+n) r^2 + r^3); never
        forms X. ``t``: a number or per-item step sizes ``(...)``.
        """
        return self.retract_transport(x, xi, t)[0]

    def retract_transport(
        self, x: FixedRankPoint, xi: TangentVector, t: Any = 1.0, vectors: tuple = ()
    ) -> tuple[FixedRankPoint, list[TangentVector]]:
        r"""``y = R_x(t xi)`` and the ``vectors`` (tangent at x) transported to y by projection.

        Equal to :meth:`retract` and :meth:`transport`, with the products ``U^T U_y``, ``V^T V_y``
        taken from the retraction's own Grams (two passes saved per vector).
        """
        U, qu, A, s2, B, V, qv = self.sum_svd(x, xi, t)
        r = x.rank
        Uy, UtUy = self.combine(U, qu, A, r)
        Vy, VtVy = self.combine(V, qv, B, r)
        y = FixedRankPoint(Uy, s2[..., :r], Vy)
        return y, [self.transport(x, y, v, UtUy, VtVy) for v in vectors]

    def retract_adaptive(
        self,
        x: FixedRankPoint,
        xi: TangentVector,
        rank_tol: float,
        max_rank: int | None = None,
        min_rank: int = 1,
        t: Any = 1.0,
    ) -> FixedRankPoint | list[FixedRankPoint]:
        r"""Rank-adaptive retraction: ``X + t xi`` truncated at a relative tolerance.

        The new rank is the smallest ``j`` with ``||s_{j+1:}||_2 <= rank_tol ||s||_2`` of the
        singular values of ``X + t xi`` (:meth:`sum_svd`, up to 2r of them), clipped to
        ``[min_rank, max_rank]`` and never keeping exact zeros. For a stack, each item gets its
        own rank and the result is a list of points (one per item, in C order of the stack
        dimensions). Reads the singular values on the host (one synchronization on GPUs).
        ``max_rank``, ``min_rank``: integers >= 1 (``max_rank`` None: no cap), ``min_rank <=
        max_rank`` (else ``ValueError``, :func:`check_rank_bounds`).
        """
        check_rank_bounds(max_rank, min_rank)
        U, qu, A, s2, B, V, qv = self.sum_svd(x, xi, t)
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
                    self.combine(U[k], qu[k], A[k], j)[0],
                    s2[k][..., :j],
                    self.combine(V[k], qv[k], B[k], j)[0],
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
        mm = self.backend.mm
        h = self.project(x, hess_xi)
        U, V, s = x.U, x.V, x.s[..., None, :]
        t1 = self.matmul(Z, xi.Vp)
        t1 = (t1 - mm(U, mm(_t(U), t1))) / s
        t2 = self.rmatmul(Z, xi.Up)
        t2 = (t2 - mm(V, mm(_t(V), t2))) / s
        return TangentVector(h.M, h.Up + t1, h.Vp + t2)
