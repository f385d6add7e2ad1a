r"""The embedded manifold of m x n matrices of fixed rank r.

A point is ``X = U diag(s) V^T`` (:class:`FixedRankPoint`), a tangent vector at X is
``xi = U M V^T + Up V^T + U Vp^T`` with ``U^T Up = 0`` and ``V^T Vp = 0``
(:class:`TangentVector`); the tangent space has dimension ``(m + n - r) r``.

References: B. Vandereycken, "Low-rank matrix completion by Riemannian optimization",
SIAM J. Optim. 23(2), 2013; N. Boumal et al., Manopt ``fixedrankembeddedfactory``
(stable retraction of December 2019).

Costs below use ``k`` for the rank of a factored ambient matrix and ``nnz`` for a sparse one.
Nothing here forms an m x n matrix unless the input already is one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._backend import Backend, as_rng, backend_name_of, make_backend
from .containers import FixedRankPoint, LowRankMatrix, TangentVector


def truncation_rank(s: np.ndarray, rank_tol: float) -> int:
    """Smallest ``j >= 1`` with ``||s_{j:}||_2 <= rank_tol ||s||_2`` (``len(s)`` if none smaller).

    ``s`` are singular values in descending order (a NumPy array). O(len(s)).
    """
    tails = np.sqrt(np.cumsum((s**2)[::-1])[::-1])  # tails[k] = ||s_{k:}||
    return next((k for k in range(1, len(s)) if tails[k] <= rank_tol * tails[0]), len(s))


class FixedRankManifold:
    r"""Manifold of m x n real matrices of rank r, embedded in R^{m x n}.

    Parameters
    ----------
    m, n : int
        Matrix shape.
    r : int
        Rank, ``1 <= r <= min(m, n)``.
    backend : {"numpy", "torch", "cupy"}
        Array library of every array the manifold makes and accepts.
    dtype : None, str or dtype
        ``float64`` (default) or ``float32``.
    device : None or device
        Torch / CuPy device (CPU for torch by default).
    metric : rankopt.metrics.Metric, optional
        Riemannian metric; the embedded Euclidean one by default.
    validate : bool
        Check finiteness of inputs and orthonormality of points (O((m+n) r^2) each, and a
        device synchronization on GPUs). Shapes and backends are always checked.
    """

    def __init__(
        self,
        m: int,
        n: int,
        r: int,
        backend: str = "numpy",
        dtype: Any = None,
        device: Any = None,
        metric: Any = None,
        validate: bool = True,
    ) -> None:
        for name, v in (("m", m), ("n", n), ("r", r)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if m < 1 or n < 1:
            raise ValueError(f"matrix shape must be positive, got m={m}, n={n}")
        if r < 1 or r > min(m, n):
            raise ValueError(f"rank r={r} must satisfy 1 <= r <= min(m, n) = {min(m, n)}")
        self.m, self.n, self.r = int(m), int(n), int(r)
        self.backend: Backend = make_backend(backend, dtype, device)
        if metric is None:
            from .metrics import Euclidean

            metric = Euclidean()
        self.metric = metric
        self.validate = bool(validate)

    # ------------------------------------------------------------------ basics
    def __repr__(self) -> str:
        be = self.backend
        return (
            f"FixedRankManifold(m={self.m}, n={self.n}, r={self.r}, backend={be.name!r}, "
            f"dtype={be.dtype}, device={be.device}, metric={self.metric!r})"
        )

    @property
    def dim(self) -> int:
        """Dimension ``(m + n - r) r``."""
        return (self.m + self.n - self.r) * self.r

    @property
    def typical_dist(self) -> float:
        return math.sqrt(self.dim)

    def with_metric(self, metric: Any) -> FixedRankManifold:
        """The same manifold (shape, backend) under another metric."""
        be = self.backend
        return FixedRankManifold(
            self.m, self.n, self.r, be.name, be.dtype, be.device, metric, self.validate
        )

    def with_rank(self, r: int) -> FixedRankManifold:
        """The same manifold at another rank (rank-adaptive methods)."""
        be = self.backend
        return FixedRankManifold(
            self.m, self.n, r, be.name, be.dtype, be.device, self.metric, self.validate
        )

    # ------------------------------------------------------------------ checks
    def _check_array(self, a: Any, what: str, shape: tuple[int, ...] | None = None) -> None:
        be = self.backend
        name = backend_name_of(a)
        if name != be.name:
            raise ValueError(
                f"{what} is a {name or type(a).__name__} array but the manifold uses backend "
                f"{be.name!r}; mixing backends is not supported (convert it first)"
            )
        if not be.same_device(a):
            raise ValueError(
                f"{what} is on device {be.device_of(a)} but the manifold is on {be.device}"
            )
        if shape is not None and tuple(a.shape) != shape:
            raise ValueError(f"{what} has shape {tuple(a.shape)}, expected {shape}")

    def _check_finite(self, arrays: tuple[Any, ...], what: str) -> None:
        if self.validate and not all(self.backend.all_finite(a) for a in arrays):
            raise ValueError(f"{what} contains non-finite values (nan or inf)")

    def check_point(self, x: FixedRankPoint, orthonormal: bool | None = None) -> None:
        """Raise ``ValueError`` unless ``x`` is a valid point of this manifold.

        Shapes and backend are always checked; finiteness, positivity of ``s`` and
        orthonormality of ``U``, ``V`` (O((m+n) r^2)) when ``validate`` (or ``orthonormal``) is on.
        """
        if not isinstance(x, FixedRankPoint):
            raise ValueError(f"expected a FixedRankPoint, got {type(x).__name__}")
        r = int(x.s.shape[0]) if len(x.s.shape) == 1 else -1
        if r != self.r:
            raise ValueError(
                f"point has rank {r} (s of shape {tuple(x.s.shape)}), expected {self.r}"
            )
        self._check_array(x.U, "point factor U", (self.m, self.r))
        self._check_array(x.s, "point singular values s", (self.r,))
        self._check_array(x.V, "point factor V", (self.n, self.r))
        if orthonormal is None:
            orthonormal = self.validate
        if not orthonormal:
            return
        be, xp = self.backend, self.backend.xp
        self._check_finite((x.U, x.s, x.V), "point")
        if not bool(xp.all(x.s > 0)):
            raise ValueError("point has non-positive singular values s; a rank-r point needs s > 0")
        tol = 100.0 * math.sqrt(be.eps) if be.is_float32 else 1e-8 * max(10.0, self.r)
        eye = be.eye(self.r)
        for f, name in ((x.U, "U"), (x.V, "V")):
            err = be.to_float(xp.max(xp.abs(f.T @ f - eye)))
            if err > tol:
                raise ValueError(
                    f"point factor {name} is not orthonormal (max |{name}^T {name} - I| = {err:.2e}); "
                    "build points with from_matrix() or random_point()"
                )

    def check_tangent(self, x: FixedRankPoint, xi: TangentVector, tangency: bool = False) -> None:
        """Raise ``ValueError`` on a malformed tangent vector (shapes, backend, finiteness).

        With ``tangency=True`` also require ``U^T Up = 0`` and ``V^T Vp = 0`` (O((m+n) r^2)).
        """
        if not isinstance(xi, TangentVector):
            raise ValueError(f"expected a TangentVector, got {type(xi).__name__}")
        self._check_array(xi.M, "tangent component M", (self.r, self.r))
        self._check_array(xi.Up, "tangent component Up", (self.m, self.r))
        self._check_array(xi.Vp, "tangent component Vp", (self.n, self.r))
        self._check_finite((xi.M, xi.Up, xi.Vp), "tangent vector")
        if tangency:
            be, xp = self.backend, self.backend.xp
            scale = max(1.0, be.to_float(xp.sqrt(be.sum_sq(xi.Up) + be.sum_sq(xi.Vp))))
            err = max(
                be.to_float(xp.max(xp.abs(x.U.T @ xi.Up))),
                be.to_float(xp.max(xp.abs(x.V.T @ xi.Vp))),
            )
            if err > 1e3 * be.eps * scale * max(self.m, self.n):
                raise ValueError(f"vector is not tangent: max |U^T Up|, |V^T Vp| = {err:.2e}")

    def _check_ambient(self, Z: Any) -> Any:
        """Validate an ambient matrix; returns it cast to the manifold dtype."""
        be = self.backend
        shape = (self.m, self.n)
        if isinstance(Z, (tuple, list)):
            if len(Z) == 0:
                raise ValueError("an ambient sum (tuple of matrices) needs at least one term")
            return tuple(self._check_ambient(t) for t in Z)
        if isinstance(Z, FixedRankPoint):
            Z = Z.to_lowrank()
        if isinstance(Z, LowRankMatrix):
            if Z.shape != shape:
                raise ValueError(f"ambient matrix has shape {Z.shape}, expected {shape}")
            self._check_array(Z.A, "LowRankMatrix factor A")
            self._check_array(Z.B, "LowRankMatrix factor B")
            self._check_finite((Z.A, Z.B), "ambient matrix")
            if Z.A.dtype != be.dtype or Z.B.dtype != be.dtype:
                Z = LowRankMatrix(be.asarray(Z.A), be.asarray(Z.B))
            return Z
        if be.is_sparse(Z):
            if tuple(Z.shape) != shape:
                raise ValueError(f"ambient matrix has shape {tuple(Z.shape)}, expected {shape}")
            self._check_array(Z, "sparse ambient matrix")
            self._check_finite((be.sparse_values(Z),), "ambient matrix")
            return be.sparse_to_dtype(Z)
        if backend_name_of(Z) is None:
            raise ValueError(
                "expected an ambient matrix (dense array, sparse matrix, LowRankMatrix, or a tuple "
                f"of those meaning their sum), got {type(Z).__name__}"
            )
        self._check_array(Z, "ambient matrix", shape)
        self._check_finite((Z,), "ambient matrix")
        if Z.dtype != be.dtype:
            Z = be.asarray(Z)
        return Z

    # --------------------------------------------------------- ambient products
    def _matmul(self, Z: Any, B: Any) -> Any:
        """``Z @ B`` for a dense, sparse or factored Z (validated). O(mnk), O(nnz k), O((m+n)k^2).

        A tuple of such matrices stands for their sum (e.g. a sparse data term plus a low-rank
        regularization term).
        """
        if isinstance(Z, tuple):
            out = self._matmul(Z[0], B)
            for t in Z[1:]:
                out = out + self._matmul(t, B)
            return out
        if isinstance(Z, LowRankMatrix):
            return Z.A @ (Z.B.T @ B)
        if self.backend.is_sparse(Z):
            return self.backend.matmul_sparse(Z, B)
        return Z @ B

    def _rmatmul(self, Z: Any, A: Any) -> Any:
        """``Z^T @ A`` without transposing Z in memory (tuples: sum of terms)."""
        if isinstance(Z, tuple):
            out = self._rmatmul(Z[0], A)
            for t in Z[1:]:
                out = out + self._rmatmul(t, A)
            return out
        if isinstance(Z, LowRankMatrix):
            return Z.B @ (Z.A.T @ A)
        if self.backend.is_sparse(Z):
            return self.backend.rmatmul_sparse(Z, A)
        return Z.T @ A

    # ------------------------------------------------------------------- points
    def random_point(self, seed: Any = None) -> FixedRankPoint:
        """A random point: Haar-like orthonormal factors, s uniform in [1, 2], descending.

        ``seed`` is an int, ``None`` or a ``numpy.random.Generator``; the same seed gives the
        same point on every backend.
        """
        rng = as_rng(seed)
        U, _ = np.linalg.qr(rng.standard_normal((self.m, self.r)))
        V, _ = np.linalg.qr(rng.standard_normal((self.n, self.r)))
        s = np.sort(rng.uniform(1.0, 2.0, self.r))[::-1].copy()
        be = self.backend
        return FixedRankPoint(be.asarray(U), be.asarray(s), be.asarray(V))

    def from_matrix(self, A: Any) -> FixedRankPoint:
        """Best rank-r approximation (truncated SVD) of a dense array or a ``LowRankMatrix``.

        Dense: O(mn min(m, n)). Factored ``A B^T`` of rank k: QR of both factors and an SVD of
        the k x k core, O((m+n) k^2 + k^3). Raises ``ValueError`` if the result would have a
        zero singular value (the matrix has rank < r).
        """
        be = self.backend
        if isinstance(A, LowRankMatrix):
            A = self._check_ambient(A)
            qa, ra = be.qr(A.A)
            qb, rb = be.qr(A.B)
            uc, s, vch = be.svd(ra @ rb.T)
            U, V = qa @ uc[:, : self.r], qb @ vch[: self.r].T
            s = s[: self.r]
        else:
            if be.is_sparse(A):
                raise ValueError(
                    "from_matrix takes a dense array or a LowRankMatrix, not a sparse matrix"
                )
            A = self._check_ambient(A)
            u, s, vh = be.svd(A)
            U, s, V = u[:, : self.r], s[: self.r], vh[: self.r].T
        s_r = be.to_float(s[self.r - 1]) if s.shape[0] >= self.r else 0.0
        s_1 = be.to_float(s[0]) if s.shape[0] else 0.0
        if not s_r > be.eps * max(self.m, self.n) * s_1:
            raise ValueError(
                f"matrix has numerical rank < {self.r} (its r-th singular value {s_r:.2e} is at "
                f"round-off level of the largest, {s_1:.2e}): not a point of rank {self.r}"
            )
        return FixedRankPoint(U, s, V)

    def to_dense(self, x: FixedRankPoint) -> Any:
        """The m x n array ``U diag(s) V^T`` (small problems and tests only)."""
        self.check_point(x, orthonormal=False)
        return x.to_dense()

    # ---------------------------------------------------------- tangent space
    def zero_vector(self, x: FixedRankPoint) -> TangentVector:
        be = self.backend
        return TangentVector(
            be.zeros((self.r, self.r)), be.zeros((self.m, self.r)), be.zeros((self.n, self.r))
        )

    def projection(self, x: FixedRankPoint, Z: Any) -> TangentVector:
        r"""Orthogonal projection of an ambient matrix onto the tangent space at x.

        ``M = U^T Z V``, ``Up = Z V - U M``, ``Vp = Z^T U - V M^T``; equivalently
        ``P(Z) = U U^T Z + Z V V^T - U U^T Z V V^T``. Only ``Z V`` and ``Z^T U`` are formed:
        O(mnr) dense, O(nnz r + (m+n) r^2) sparse, O((m+n) k r) for a rank-k ``LowRankMatrix``.
        """
        self.check_point(x)
        Z = self._check_ambient(Z)
        return self._project(x, Z)

    to_tangent_space = projection

    def _project(self, x: FixedRankPoint, Z: Any) -> TangentVector:
        ZV = self._matmul(Z, x.V)
        ZtU = self._rmatmul(Z, x.U)
        M = x.U.T @ ZV
        return TangentVector(M, ZV - x.U @ M, ZtU - x.V @ M.T)

    def project_tangent(self, x: FixedRankPoint, xi: TangentVector) -> TangentVector:
        """Re-impose ``U^T Up = 0``, ``V^T Vp = 0`` on a nearly tangent vector. O((m+n) r^2)."""
        return TangentVector(xi.M, xi.Up - x.U @ (x.U.T @ xi.Up), xi.Vp - x.V @ (x.V.T @ xi.Vp))

    def embed(self, x: FixedRankPoint, xi: TangentVector) -> LowRankMatrix:
        """The ambient matrix of a tangent vector, ``[U M + Up, U] [V, Vp]^T`` (rank <= 2r)."""
        be = self.backend
        return LowRankMatrix(be.concat([x.U @ xi.M + xi.Up, x.U], 1), be.concat([x.V, xi.Vp], 1))

    def random_tangent_vector(self, x: FixedRankPoint, seed: Any = None) -> TangentVector:
        """A random tangent vector of unit norm (under the manifold's metric)."""
        rng = as_rng(seed)
        be = self.backend
        xi = self.project_tangent(
            x,
            TangentVector(
                be.randn(rng, (self.r, self.r)),
                be.randn(rng, (self.m, self.r)),
                be.randn(rng, (self.n, self.r)),
            ),
        )
        return xi / self.norm(x, xi)

    def inner_product(self, x: FixedRankPoint, xi: TangentVector, eta: TangentVector) -> float:
        """``g_x(xi, eta)`` under the manifold's metric, as a Python float."""
        return self.backend.to_float(self.metric.inner(self, x, xi, eta))

    def norm(self, x: FixedRankPoint, xi: TangentVector) -> float:
        return math.sqrt(max(self.inner_product(x, xi, xi), 0.0))

    def euclidean_inner(self, xi: TangentVector, eta: TangentVector) -> Any:
        """Embedded (Frobenius) inner product of two tangent vectors at the same point, 0-d array.

        The three components are mutually orthogonal in R^{m x n}, so this is
        ``<M1, M2> + <Up1, Up2> + <Vp1, Vp2>``: O((m+n) r).
        """
        be = self.backend
        return be.vdot(xi.M, eta.M) + be.vdot(xi.Up, eta.Up) + be.vdot(xi.Vp, eta.Vp)

    # ----------------------------------------------------- gradient / hessian
    def euclidean_to_riemannian_gradient(self, x: FixedRankPoint, Z: Any) -> TangentVector:
        r"""Riemannian gradient from the Euclidean gradient ``Z`` (ambient), under the metric.

        Embedded metric: ``P_x(Z)``. Other metrics: the tangent vector ``g`` with
        ``g_x(g, eta) = <Z, eta>`` for all tangent ``eta``, i.e. ``G_x^{-1} P_x(Z)``.
        """
        xi = self.projection(x, Z)
        return self.metric.solve(self, x, xi)

    egrad2rgrad = euclidean_to_riemannian_gradient

    def euclidean_to_riemannian_hessian(
        self, x: FixedRankPoint, Z: Any, hess_xi: Any, xi: TangentVector
    ) -> TangentVector:
        r"""Riemannian Hessian applied to ``xi`` from Euclidean gradient ``Z`` and ``hess_xi``.

        Embedded metric (Vandereycken 2013, Prop. 2.3; Manopt ``ehess2rhess``):
        ``P_x(hess_xi)`` plus the curvature terms ``(I - U U^T) Z Vp diag(s)^{-1}`` added to
        ``Up`` and ``(I - V V^T) Z^T Up diag(s)^{-1}`` added to ``Vp``. Cost: one projection
        plus ``Z Vp`` and ``Z^T Up``; no ``1/(s_i^2 - s_j^2)`` appears, so equal singular
        values are harmless (tiny ``s`` amplify curvature, as they must).

        Other metrics: ``G_x^{-1}`` applied to the above, which is the Hessian of the pullback
        ``f o R_x`` at 0 (it equals the Levi-Civita Hessian at critical points and is what
        second-order methods with this retraction need).
        """
        self.check_point(x)
        Z = self._check_ambient(Z)
        hess_xi = self._check_ambient(hess_xi)
        self.check_tangent(x, xi)
        h = self._hessian_embedded(x, Z, hess_xi, xi)
        return self.metric.solve(self, x, h)

    def _hessian_embedded(
        self, x: FixedRankPoint, Z: Any, hess_xi: Any, xi: TangentVector
    ) -> TangentVector:
        h = self._project(x, hess_xi)
        t1 = self._matmul(Z, xi.Vp)
        t1 = (t1 - x.U @ (x.U.T @ t1)) / x.s[None, :]
        t2 = self._rmatmul(Z, xi.Up)
        t2 = (t2 - x.V @ (x.V.T @ t2)) / x.s[None, :]
        return TangentVector(h.M, h.Up + t1, h.Vp + t2)

    # ------------------------------------------------------ retraction etc.
    def retraction(self, x: FixedRankPoint, xi: TangentVector) -> FixedRankPoint:
        r"""Metric-projection retraction ``R_x(xi) = H_r(X + xi)`` (best rank-r approximation).

        Stable variant (Manopt, Dec 2019): ``X + xi = [U, Up] K [V, Vp]^T`` with
        ``K = [[diag(s) + M, I], [I, 0]]``. QR ``[U, Up] = Q_u R_u``, ``[V, Vp] = Q_v R_v``,
        SVD of the 2r x 2r core ``R_u K R_v^T``, keep the top r. Second order. Cost
        O((m+n) r^2 + r^3); never forms X.
        """
        self.check_point(x)
        self.check_tangent(x, xi)
        return self._retract(x, xi)

    retr = retraction

    def _retract(self, x: FixedRankPoint, xi: TangentVector) -> FixedRankPoint:
        qu, uc, s, vch, qv = self._sum_svd(x, xi)
        r = self.r
        return FixedRankPoint(qu @ uc[:, :r], s[:r], qv @ vch[:r].T)

    def _sum_svd(self, x: FixedRankPoint, xi: TangentVector):
        """SVD of ``X + xi`` through QR of ``[U, Up]``, ``[V, Vp]`` and the 2r x 2r core."""
        be, r = self.backend, int(x.s.shape[0])
        qu, ru = be.qr(be.concat([x.U, xi.Up], 1))
        qv, rv = be.qr(be.concat([x.V, xi.Vp], 1))
        eye, zero = be.eye(r), be.zeros((r, r))
        K = be.concat([be.concat([be.diag(x.s) + xi.M, eye], 1), be.concat([eye, zero], 1)], 0)
        uc, s, vch = be.svd(ru @ K @ rv.T)
        return qu, uc, s, vch, qv

    def retraction_adaptive(
        self,
        x: FixedRankPoint,
        xi: TangentVector,
        rank_tol: float,
        max_rank: int | None = None,
        min_rank: int = 1,
    ) -> FixedRankPoint:
        r"""Rank-adaptive retraction: ``X + xi`` truncated at a relative tolerance.

        Same QR + 2r x 2r core SVD as :meth:`retraction`, but the new rank is the smallest ``j``
        with ``||s_{j+1:}||_2 <= rank_tol ||s||_2`` (clipped to ``[min_rank, max_rank]``), so the
        rank can grow up to 2r or shrink. This is the truncation step of the augmented BUG
        integrator (Ceruti, Kusch, Lubich 2022; GeoLoRA) with the tangent projection of the
        gradient. Returns a point whose rank may differ from ``self.r``: use
        :meth:`with_rank` for a manifold that matches it. Cost O((m+n) r^2 + r^3).
        """
        self.check_point(x)
        self.check_tangent(x, xi)
        if not rank_tol >= 0:
            raise ValueError(f"rank_tol must be >= 0, got {rank_tol}")
        qu, uc, s, vch, qv = self._sum_svd(x, xi)
        sv = self.backend.to_numpy(s).astype(np.float64)
        j = truncation_rank(sv, rank_tol)
        hi = min(len(sv), max_rank if max_rank is not None else len(sv), self.m, self.n)
        j = int(min(max(j, min_rank), hi))
        while j > 1 and not sv[j - 1] > 0:  # never keep exact zeros: they are off the manifold
            j -= 1
        return FixedRankPoint(qu @ uc[:, :j], s[:j], qv @ vch[:j].T)

    def transport(self, x: FixedRankPoint, y: FixedRankPoint, xi: TangentVector) -> TangentVector:
        """Vector transport by projection: ``P_y(embed_x(xi))``. O((m+n) r^2)."""
        self.check_point(y)
        self.check_tangent(x, xi)
        return self._transport(x, y, xi)

    def _transport(self, x: FixedRankPoint, y: FixedRankPoint, xi: TangentVector) -> TangentVector:
        return self._project(y, self.embed(x, xi))

    def ambient_distance(self, x: FixedRankPoint, y: FixedRankPoint) -> float:
        """``||X - Y||_F``: the chord length, a lower bound on the geodesic distance. O((m+n) r^2)."""
        return (x.to_lowrank() - y.to_lowrank()).fro_norm()
