r"""The embedded manifold of m x n matrices of fixed rank r.

A point is ``X = U diag(s) V^T`` (:class:`FixedRankPoint`), a tangent vector at X is
``xi = U M V^T + Up V^T + U Vp^T`` with ``U^T Up = 0`` and ``V^T Vp = 0``
(:class:`TangentVector`); the tangent space has dimension ``(m + n - r) r``.

References: B. Vandereycken, "Low-rank matrix completion by Riemannian optimization",
SIAM J. Optim. 23(2), 2013; N. Boumal et al., Manopt ``fixedrankembeddedfactory``
(stable retraction of December 2019).

Costs below use ``k`` for the rank of a factored ambient matrix and ``nnz`` for a sparse one.
Nothing here forms an m x n matrix unless the input already is one.

Stacks: every operation also accepts a stack of same-shape matrices (points with factors
``U: (..., m, r)``, ``s: (..., r)``, ``V: (..., n, r)``, tangent vectors and dense or factored
ambient matrices with the same leading dimensions); inner products and norms then return arrays
of shape ``(...)``. The methods here validate their input and call :class:`rankopt.geometry.Geometry`
(``manifold.geometry``), the unchecked fast path that update rules and solvers use directly.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import numpy as np

from ._backend import Backend, as_rng, backend_name_of, make_backend
from .containers import FixedRankPoint, LowRankMatrix, TangentVector
from .geometry import Geometry, check_rank_bounds, truncation_rank

__all__ = ["FixedRankManifold", "check_metric", "truncation_rank"]

_METRIC_NAMES = {
    "euclidean": "Euclidean()",
    "preconditioned": "Preconditioned(core_weight=0.5)",
    "blockscaled": "Preconditioned(core_weight=0.5)",
    "kroneckerdiagonal": "KroneckerDiagonal(left, right)",
    "adagrad": "AdaGrad()",
    "adam": "Adam()",
    "elementwise": "ElementwiseDiagonal(weights)",
    "elementwisediagonal": "ElementwiseDiagonal(weights)",
}


def check_metric(metric: Any) -> Any:
    """Return ``metric`` (the default :class:`~rankopt.metrics.Euclidean` for ``None``), or raise.

    Parameters
    ----------
    metric : rankopt.metrics.Metric or None
        A metric *object* (an instance, e.g. ``rankopt.metrics.Euclidean()``,
        ``Preconditioned(...)``, ``AdaGrad(...)``, ``Adam(...)``), or any object with the
        methods ``inner``, ``apply`` and ``solve`` of :class:`~rankopt.metrics.Metric`.

    Returns
    -------
    rankopt.metrics.Metric

    Raises
    ------
    TypeError
        For a metric name (a string), a metric class instead of an instance, or any other
        object without the metric methods; the message names the metric objects to use.
    """
    from . import metrics

    if metric is None:
        return metrics.Euclidean()
    allowed = (
        "pass a metric object: rankopt.metrics.Euclidean() (the default), "
        "Preconditioned(core_weight=...), AdaGrad(...), Adam(...), KroneckerDiagonal(left, right) "
        "or ElementwiseDiagonal(weights), or None"
    )
    if isinstance(metric, str):
        key = metric.lower().replace("-", "").replace("_", "").replace(" ", "")
        hint = (
            f" (did you mean rankopt.metrics.{_METRIC_NAMES[key]}?)" if key in _METRIC_NAMES else ""
        )
        raise TypeError(
            f"metric must be a metric object, not the string {metric!r}{hint}; {allowed}"
        )
    if isinstance(metric, type):
        raise TypeError(
            f"metric must be a metric object, not the class {metric.__name__}: instantiate it "
            f"(metric={metric.__name__}(...)); {allowed}"
        )
    missing = [a for a in ("inner", "apply", "solve") if not callable(getattr(metric, a, None))]
    if missing:
        name = getattr(metric, "__name__", type(metric).__name__)
        call = f": call it, metric={name}(...)" if callable(metric) else ""
        raise TypeError(
            f"metric must be a metric object, got {name} (no {', '.join(missing)} method){call}; "
            f"{allowed}"
        )
    return metric


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
        Riemannian metric, a metric object (``rankopt.metrics.Euclidean()``,
        ``Preconditioned(...)``, ``AdaGrad(...)``, ``Adam(...)``, ...); the embedded Euclidean
        one by default. Names (strings) and classes raise ``TypeError`` (:func:`check_metric`).
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
        self.metric = check_metric(metric)
        self.backend: Backend = make_backend(backend, dtype, device)
        self.validate = bool(validate)
        self.geometry = Geometry(self.backend)
        """The unchecked, stack-aware fast path (:class:`rankopt.geometry.Geometry`)."""

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
    def _check_array(
        self, a: Any, what: str, shape: tuple[int, ...] | None = None, batch: Any = None
    ) -> None:
        """Backend, device and shape of ``a``: ``batch + shape`` (``batch=None``: any leading dims)."""
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
        if be.is_complex(a):
            raise ValueError(
                f"{what} is complex ({a.dtype}); rankopt works with real matrices only: pass "
                "the real part (A.real) if that is what you mean"
            )
        if shape is None:
            return
        got = tuple(a.shape)
        lead = got[: len(got) - len(shape)] if len(got) >= len(shape) else None
        if lead is None or got[len(lead) :] != shape or (batch is not None and lead != batch):
            if batch is None:
                want = f"{shape} (or a stack (..., {', '.join(map(str, shape))}))"
            else:
                want = str(tuple(batch) + shape)
            raise ValueError(f"{what} has shape {got}, expected {want}")

    def _check_finite(self, arrays: tuple[Any, ...], what: str) -> None:
        if self.validate and not all(self.backend.all_finite(a) for a in arrays):
            raise ValueError(f"{what} contains non-finite values (nan or inf)")

    def check_point(self, x: FixedRankPoint, orthonormal: bool | None = None) -> None:
        """Raise ``ValueError`` unless ``x`` is a valid point (or stack of points) of this manifold.

        Shapes and backend are always checked. When ``validate`` is on: ``s`` finite and
        positive (O(r)), and, unless ``orthonormal=False``, finiteness of ``U``, ``V`` and their
        orthonormality (O((m+n) r^2)). ``orthonormal=True`` runs every check even without
        ``validate``.
        """
        if not isinstance(x, FixedRankPoint):
            raise ValueError(f"expected a FixedRankPoint, got {type(x).__name__}")
        r = int(x.s.shape[-1]) if len(x.s.shape) >= 1 else -1
        if r != self.r:
            raise ValueError(
                f"point has rank {r} (s of shape {tuple(x.s.shape)}), expected {self.r}"
            )
        self._check_array(x.U, "point factor U", (self.m, self.r))
        batch = tuple(x.U.shape[:-2])
        self._check_array(x.s, "point singular values s", (self.r,), batch)
        self._check_array(x.V, "point factor V", (self.n, self.r), batch)
        if orthonormal is None:
            orthonormal = self.validate
        if not (orthonormal or self.validate):
            return
        be, xp = self.backend, self.backend.xp
        if not bool(xp.all((x.s > 0) & (x.s < math.inf))):  # O(r): one reduction over s
            if not be.all_finite(x.s):
                raise ValueError(
                    "point contains non-finite values (nan or inf) in its singular values s "
                    f"(min {self._min(x.s)}, max {self._max(x.s)}); a rank-r point needs 0 < s < inf"
                )
            raise ValueError(
                f"point has non-positive singular values s (min {self._min(x.s)}); a rank-r point "
                "needs s > 0"
            )
        if not orthonormal:
            return
        self._check_finite((x.U, x.V), "point")
        tol = 100.0 * math.sqrt(be.eps) if be.is_float32 else 1e-8 * max(10.0, self.r)
        eye = be.eye(self.r)
        for f, name in ((x.U, "U"), (x.V, "V")):
            err = be.to_float(xp.max(xp.abs(f.swapaxes(-1, -2) @ f - eye)))
            if err > tol:
                raise ValueError(
                    f"point factor {name} is not orthonormal (max |{name}^T {name} - I| = {err:.2e}); "
                    "build points with from_matrix() or random_point()"
                )

    def _min(self, a: Any) -> float:
        return self.backend.to_float(self.backend.xp.min(a))

    def _max(self, a: Any) -> float:
        return self.backend.to_float(self.backend.xp.max(a))

    def check_tangent(self, x: FixedRankPoint, xi: TangentVector, tangency: bool = False) -> None:
        """Raise ``ValueError`` on a malformed tangent vector (shapes, backend, finiteness).

        The vector must have the point's stack shape. With ``tangency=True`` also require
        ``U^T Up = 0`` and ``V^T Vp = 0`` (O((m+n) r^2)).
        """
        if not isinstance(xi, TangentVector):
            raise ValueError(f"expected a TangentVector, got {type(xi).__name__}")
        batch = x.batch_shape
        self._check_array(xi.M, "tangent component M", (self.r, self.r), batch)
        self._check_array(xi.Up, "tangent component Up", (self.m, self.r), batch)
        self._check_array(xi.Vp, "tangent component Vp", (self.n, self.r), batch)
        self._check_finite((xi.M, xi.Up, xi.Vp), "tangent vector")
        if tangency:
            be, xp = self.backend, self.backend.xp
            scale = max(1.0, be.to_float(xp.max(xp.sqrt(be.sum_sq(xi.Up) + be.sum_sq(xi.Vp)))))
            err = max(
                be.to_float(xp.max(xp.abs(x.U.swapaxes(-1, -2) @ xi.Up))),
                be.to_float(xp.max(xp.abs(x.V.swapaxes(-1, -2) @ xi.Vp))),
            )
            if err > 1e3 * be.eps * scale * max(self.m, self.n):
                raise ValueError(f"vector is not tangent: max |U^T Up|, |V^T Vp| = {err:.2e}")

    def _check_ambient(self, Z: Any, batch: tuple[int, ...] | None = None) -> Any:
        """Validate an ambient matrix (stack shape ``batch``); returns it in the manifold dtype."""
        be = self.backend
        shape = (self.m, self.n)
        if isinstance(Z, (tuple, list)):
            if len(Z) == 0:
                raise ValueError("an ambient sum (tuple of matrices) needs at least one term")
            return tuple(self._check_ambient(t, batch) for t in Z)
        if isinstance(Z, FixedRankPoint):
            Z = Z.to_lowrank()
        if isinstance(Z, LowRankMatrix):
            if Z.shape != shape or (batch is not None and Z.batch_shape != tuple(batch)):
                raise ValueError(
                    f"ambient matrix has shape {Z.batch_shape + Z.shape}, expected "
                    f"{(tuple(batch) if batch is not None else ()) + shape}"
                )
            self._check_array(Z.A, "LowRankMatrix factor A")
            self._check_array(Z.B, "LowRankMatrix factor B")
            self._check_finite((Z.A, Z.B), "ambient matrix")
            if Z.A.dtype != be.dtype or Z.B.dtype != be.dtype:
                Z = LowRankMatrix(be.asarray(Z.A), be.asarray(Z.B))
            return Z
        if be.is_sparse(Z):
            if tuple(Z.shape) != shape:
                raise ValueError(f"ambient matrix has shape {tuple(Z.shape)}, expected {shape}")
            if batch:
                raise ValueError("sparse ambient matrices apply to one point, not to a stack")
            self._check_array(Z, "sparse ambient matrix")
            self._check_finite((be.sparse_values(Z),), "ambient matrix")
            return be.sparse_to_dtype(Z)
        if backend_name_of(Z) is None:
            raise ValueError(
                "expected an ambient matrix (dense array, sparse matrix, LowRankMatrix, or a tuple "
                f"of those meaning their sum), got {type(Z).__name__}"
            )
        self._check_array(Z, "ambient matrix", shape, batch)
        self._check_finite((Z,), "ambient matrix")
        if Z.dtype != be.dtype:
            Z = be.asarray(Z)
        return Z

    # ------------------------------------------------------------------- points
    def random_point(self, seed: Any = None, batch_shape: tuple[int, ...] = ()) -> FixedRankPoint:
        """A random point: Haar-like orthonormal factors, s uniform in [1, 2], descending.

        ``seed`` is an int, ``None`` or a ``numpy.random.Generator``; the same seed gives the
        same point on every backend. ``batch_shape`` draws a stack of independent points.
        """
        rng = as_rng(seed)
        batch = tuple(int(b) for b in batch_shape)
        U, _ = np.linalg.qr(rng.standard_normal((*batch, self.m, self.r)))
        V, _ = np.linalg.qr(rng.standard_normal((*batch, self.n, self.r)))
        s = np.sort(rng.uniform(1.0, 2.0, (*batch, self.r)), axis=-1)[..., ::-1].copy()
        be = self.backend
        return FixedRankPoint(be.asarray(U), be.asarray(s), be.asarray(V))

    def from_matrix(self, A: Any) -> FixedRankPoint:
        """Best rank-r approximation (truncated SVD) of a dense array or a ``LowRankMatrix``.

        Dense ``(..., m, n)``: O(mn min(m, n)). Factored ``A B^T`` of rank k: QR of both factors
        and an SVD of the k x k core, O((m+n) k^2 + k^3). Raises ``ValueError`` if the result
        would have a zero singular value (the matrix has rank < r).
        """
        be, r = self.backend, self.r
        if isinstance(A, LowRankMatrix):
            A = self._check_ambient(A)
            qa, ra = be.qr(A.A)
            qb, rb = be.qr(A.B)
            uc, s, vch = be.svd(ra @ rb.swapaxes(-1, -2))
            U, V = qa @ uc[..., :r], qb @ vch[..., :r, :].swapaxes(-1, -2)
            s = s[..., :r]
        else:
            if be.is_sparse(A):
                raise ValueError(
                    "from_matrix takes a dense array or a LowRankMatrix, not a sparse matrix"
                )
            A = self._check_ambient(A)
            u, s_all, vh = be.svd(A)
            U, s, V = u[..., :r], s_all[..., :r], vh[..., :r, :].swapaxes(-1, -2)
        sv = be.to_numpy(s).reshape(-1, s.shape[-1]) if s.shape[-1] else np.zeros((1, 0))
        s_r = float(sv[:, -1].min()) if sv.shape[1] >= r else 0.0
        s_1 = float(sv[:, 0].max()) if sv.shape[1] else 0.0
        if not s_r > be.eps * max(self.m, self.n) * s_1:
            raise ValueError(
                f"matrix has numerical rank < {r} (its r-th singular value {s_r:.2e} is at "
                f"round-off level of the largest, {s_1:.2e}): not a point of rank {r}"
            )
        return FixedRankPoint(U, s, V)

    def to_dense(self, x: FixedRankPoint) -> Any:
        """The ``(..., m, n)`` array ``U diag(s) V^T`` (small problems and tests only)."""
        self.check_point(x, orthonormal=False)
        return x.to_dense()

    # ---------------------------------------------------------- tangent space
    def zero_vector(self, x: FixedRankPoint) -> TangentVector:
        """The zero tangent vector at ``x`` (same stack shape)."""
        self.check_point(x, orthonormal=False)
        return self.geometry.zero_vector(x)

    def projection(self, x: FixedRankPoint, Z: Any) -> TangentVector:
        r"""Orthogonal projection of an ambient matrix onto the tangent space at x.

        ``M = U^T Z V``, ``Up = Z V - U M``, ``Vp = Z^T U - V M^T``; equivalently
        ``P(Z) = U U^T Z + Z V V^T - U U^T Z V V^T``. Only ``Z V`` and ``Z^T U`` are formed:
        O(mnr) dense, O(nnz r + (m+n) r^2) sparse, O((m+n) k r) for a rank-k ``LowRankMatrix``.
        """
        self.check_point(x)
        Z = self._check_ambient(Z, x.batch_shape)
        return self.geometry.project(x, Z)

    to_tangent_space = projection

    def project_tangent(self, x: FixedRankPoint, xi: TangentVector) -> TangentVector:
        """Re-impose ``U^T Up = 0``, ``V^T Vp = 0`` on a nearly tangent vector. O((m+n) r^2)."""
        self.check_point(x, orthonormal=False)
        self.check_tangent(x, xi)
        return self.geometry.project_tangent(x, xi)

    def embed(self, x: FixedRankPoint, xi: TangentVector) -> LowRankMatrix:
        """The ambient matrix of a tangent vector, ``[U M + Up, U] [V, Vp]^T`` (rank <= 2r)."""
        self.check_point(x, orthonormal=False)
        self.check_tangent(x, xi)
        return self.geometry.embed(x, xi)

    def random_tangent_vector(self, x: FixedRankPoint, seed: Any = None) -> TangentVector:
        """A random tangent vector of unit norm (under the manifold's metric; per item of a stack)."""
        rng = as_rng(seed)
        be, b = self.backend, x.batch_shape
        raw = TangentVector(
            be.randn(rng, (*b, self.r, self.r)),
            be.randn(rng, (*b, self.m, self.r)),
            be.randn(rng, (*b, self.n, self.r)),
        )
        xi = self.project_tangent(x, raw)
        return xi / self.backend.xp.sqrt(self.metric.inner(self, x, xi, xi))

    def inner_product(self, x: FixedRankPoint, xi: TangentVector, eta: TangentVector) -> Any:
        """``g_x(xi, eta)`` under the manifold's metric: a float, or an array ``(...)`` for stacks."""
        out = self.metric.inner(self, x, xi, eta)
        return self.backend.to_float(out) if not x.batch_shape else out

    def norm(self, x: FixedRankPoint, xi: TangentVector) -> Any:
        """``sqrt(g_x(xi, xi))``: a float, or an array ``(...)`` for stacks."""
        g = self.inner_product(x, xi, xi)
        if not x.batch_shape:
            return math.sqrt(max(g, 0.0))
        xp = self.backend.xp
        return xp.sqrt(xp.clip(g, 0.0, None))

    def euclidean_inner(self, xi: TangentVector, eta: TangentVector) -> Any:
        """Embedded (Frobenius) inner product of tangent vectors at the same point, shape ``(...)``.

        The three components are mutually orthogonal in R^{m x n}, so this is
        ``<M1, M2> + <Up1, Up2> + <Vp1, Vp2>``: O((m+n) r).
        """
        return self.geometry.inner(xi, eta)

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
        Z = self._check_ambient(Z, x.batch_shape)
        hess_xi = self._check_ambient(hess_xi, x.batch_shape)
        self.check_tangent(x, xi)
        h = self.geometry.hessian_embedded(x, Z, hess_xi, xi)
        return self.metric.solve(self, x, h)

    # ------------------------------------------------------ retraction etc.
    def retraction(self, x: FixedRankPoint, xi: TangentVector) -> FixedRankPoint:
        r"""Metric-projection retraction ``R_x(xi) = H_r(X + xi)`` (best rank-r approximation).

        ``X + xi = [U, Up] K [V, Vp]^T`` with ``K = [[diag(s) + M, I], [I, 0]]``; QR of ``Up``
        and ``Vp`` (re-orthogonalized against ``U``, ``V``), SVD of the 2r x 2r core, keep the
        top r (:meth:`rankopt.geometry.Geometry.sum_svd`). Second order. Cost
        O((m+n) r^2 + r^3); never forms X.
        """
        self.check_point(x)
        self.check_tangent(x, xi)
        return self.geometry.retract(x, xi)

    retr = retraction

    def retraction_adaptive(
        self,
        x: FixedRankPoint,
        xi: TangentVector,
        rank_tol: float,
        max_rank: int | None = None,
        min_rank: int = 1,
    ) -> FixedRankPoint | list[FixedRankPoint]:
        r"""Rank-adaptive retraction: ``X + xi`` truncated at a relative tolerance.

        Same QR + 2r x 2r core SVD as :meth:`retraction`, but the new rank is the smallest ``j``
        with ``||s_{j+1:}||_2 <= rank_tol ||s||_2`` (clipped to ``[min_rank, max_rank]``), so the
        rank can grow up to 2r or shrink. Returns a point whose rank may differ from ``self.r``
        (use :meth:`with_rank` for a manifold that matches it); for a stack, a list of points,
        one per item, each with its own rank. Cost O((m+n) r^2 + r^3).

        ``rank_tol`` is a real number >= 0; ``max_rank`` (None: no cap beyond ``2r`` and
        ``min(m, n)``) and ``min_rank`` are integers >= 1 with ``min_rank <= max_rank``: other
        values raise ``ValueError`` naming the argument.
        """
        check_rank_bounds(max_rank, min_rank)
        if isinstance(rank_tol, bool) or not isinstance(rank_tol, Real) or not rank_tol >= 0:
            raise ValueError(f"rank_tol must be a real number >= 0, got {rank_tol!r}")
        self.check_point(x)
        self.check_tangent(x, xi)
        return self.geometry.retract_adaptive(x, xi, rank_tol, max_rank, min_rank)

    def transport(self, x: FixedRankPoint, y: FixedRankPoint, xi: TangentVector) -> TangentVector:
        """Vector transport by projection: ``P_y(embed_x(xi))``. O((m+n) r^2)."""
        self.check_point(y)
        self.check_tangent(x, xi)
        return self.geometry.transport(x, y, xi)

    def ambient_distance(self, x: FixedRankPoint, y: FixedRankPoint) -> Any:
        """``||X - Y||_F``: the chord length, a lower bound on the geodesic distance. O((m+n) r^2)."""
        return (x.to_lowrank() - y.to_lowrank()).fro_norm()
