r"""Use rankopt's fixed-rank geometry from Pymanopt's optimizers and diagnostics.

:class:`FixedRank` is a ``pymanopt.manifolds.manifold.Manifold`` backed by a
:class:`rankopt.FixedRankManifold` (kept as ``.manifold``). Pymanopt's optimizers only ever
call manifold methods and the ``+``, ``-``, scalar ``*`` and ``/`` operators of tangent
vectors, so they run unchanged on rankopt's points and tangent vectors:

* points are :class:`rankopt.FixedRankPoint` (``point_layout = 1``): a cost takes one point;
* a Euclidean gradient is an ambient m x n matrix: a dense array, a ``scipy.sparse`` (or torch
  sparse) matrix, a :class:`rankopt.LowRankMatrix`, or a tuple of those standing for their sum;
* a Euclidean Hessian takes ``(point, direction)`` where ``direction`` is what
  :meth:`FixedRank.embedding` returns (a ``LowRankMatrix`` ``[U M + Up, U] [V, Vp]^T`` of
  rank <= 2r) and returns an ambient matrix as above;
* tangent vectors are :class:`rankopt.TangentVector`; inner products and norms are Python floats.

Unlike Pymanopt's ``FixedRankEmbedded`` this class is not a ``RiemannianSubmanifold``: any
rankopt metric works (the Riemannian gradient is ``G_x^{-1} P_x(egrad)``), the Euclidean
gradient is taken in the ambient space, so no ``1/(s_j^2 - s_i^2)`` factor appears (equal
singular values are harmless, cf. Pymanopt issue #34), and Pymanopt's ``TrustRegions`` works.

For code written for Pymanopt's ``FixedRankEmbedded`` (costs of ``(u, s, vt)`` and gradients
with respect to the factors), :func:`from_factor_functions` wraps the cost and the factor
gradient, and :func:`factor_gradient` converts one factor gradient; points unpack as
``u, s, vt = point``.

Pymanopt is an optional dependency: ``pip install -e '.[pymanopt]'``. ``import rankopt``
never imports it; importing this module does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

try:  # absolute import: this is the real Pymanopt package, not rankopt.pymanopt
    import pymanopt
    import pymanopt.function
    from pymanopt.manifolds.manifold import Manifold
except ImportError as _err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "rankopt.pymanopt needs Pymanopt 2.x, which is not installed: pip install -e '.[pymanopt]'"
    ) from _err

from ._backend import as_rng, backend_name_of
from .containers import FixedRankPoint, LowRankMatrix, TangentVector
from .manifold import FixedRankManifold

__all__ = ["FixedRank", "function", "to_pymanopt", "factor_gradient", "from_factor_functions"]

if int(str(getattr(pymanopt, "__version__", "0")).split(".")[0]) < 2:  # pragma: no cover
    raise ImportError(
        f"rankopt.pymanopt needs Pymanopt >= 2 (found {pymanopt.__version__}): "
        "pip install -e '.[pymanopt]'"
    )


class FixedRank(Manifold):
    r"""Pymanopt manifold of m x n real matrices of rank r, backed by rankopt.

    Parameters
    ----------
    m, n : int
        Matrix shape.
    r : int
        Rank, ``1 <= r <= min(m, n)``.
    metric : rankopt.metrics.Metric, optional
        Riemannian metric (default: the embedded Euclidean one). Any metric of
        :mod:`rankopt.metrics` works, e.g. ``Preconditioned(core_weight=0.5)`` or
        ``AdaGrad(row_stats=..., col_stats=...)``.
    backend : {"numpy", "torch", "cupy"}
    dtype : None, str or dtype
        ``float64`` (default) or ``float32``.
    device : None or device
        Torch / CuPy device.
    seed : None, int or numpy.random.Generator
        Seed of the generator used by :meth:`random_point` and :meth:`random_tangent_vector`
        when Pymanopt calls them without a seed (no global random state is touched).
    validate : bool
        Passed to :class:`rankopt.FixedRankManifold` (finiteness and orthonormality checks).

    Attributes
    ----------
    manifold : rankopt.FixedRankManifold
        The rankopt manifold doing the work.

    Notes
    -----
    Every method costs what the corresponding :class:`rankopt.FixedRankManifold` method costs:
    O((m+n) r^2 + r^3) for retractions and transports, O((m+n) r) for inner products under
    the Euclidean metric, plus O((m+n) r^2 + r^3) for the Riemannian gradient under the
    Kronecker-diagonal metrics (a closed-form solve; ``solver="pcg"``: O((m+n) r^2) per PCG
    iteration) and O(m n r) per PCG iteration under ``ElementwiseDiagonal``. ``exp``, ``log``, ``dist`` and ``pair_mean``
    are not available (no closed forms); gradient-based and trust-region optimizers do not
    need them, the derivative-free ones (Nelder-Mead, particle swarm) do.
    """

    def __init__(
        self,
        m: int,
        n: int,
        r: int,
        metric: Any = None,
        backend: str = "numpy",
        dtype: Any = None,
        device: Any = None,
        *,
        seed: Any = None,
        validate: bool = True,
    ) -> None:
        manifold = FixedRankManifold(
            m, n, r, backend=backend, dtype=dtype, device=device, metric=metric, validate=validate
        )
        self._setup(manifold, seed)

    @classmethod
    def from_manifold(cls, manifold: FixedRankManifold, seed: Any = None) -> FixedRank:
        """Wrap an existing :class:`rankopt.FixedRankManifold` (shape, backend, metric kept)."""
        if not isinstance(manifold, FixedRankManifold):
            raise ValueError(f"expected a rankopt.FixedRankManifold, got {type(manifold).__name__}")
        obj = cls.__new__(cls)
        cls._setup(obj, manifold, seed)
        return obj

    def _setup(self, manifold: FixedRankManifold, seed: Any) -> None:
        self.manifold = manifold
        self._rng = as_rng(seed)
        be = manifold.backend
        name = (
            f"rankopt fixed-rank manifold of {manifold.m}x{manifold.n} matrices of rank "
            f"{manifold.r} (metric {manifold.metric!r}, backend {be.name}, {be.dtype})"
        )
        super().__init__(name, manifold.dim, point_layout=1)

    def __repr__(self) -> str:
        M = self.manifold
        return (
            f"FixedRank(m={M.m}, n={M.n}, r={M.r}, metric={M.metric!r}, backend={M.backend.name!r})"
        )

    # ------------------------------------------------------------ properties
    @property
    def metric(self) -> Any:
        """The Riemannian metric (a :mod:`rankopt.metrics` object)."""
        return self.manifold.metric

    @property
    def typical_dist(self) -> float:
        """``sqrt((m + n - r) r)``; ``TrustRegions`` uses it as its largest radius."""
        return self.manifold.typical_dist

    # --------------------------------------------------- tangent-space basics
    def inner_product(
        self,
        point: FixedRankPoint,
        tangent_vector_a: TangentVector,
        tangent_vector_b: TangentVector,
    ) -> float:
        """``g_x(a, b)`` under the metric, as a Python float."""
        return self.manifold.inner_product(point, tangent_vector_a, tangent_vector_b)

    def norm(self, point: FixedRankPoint, tangent_vector: TangentVector) -> float:
        """``sqrt(g_x(v, v))``, as a Python float."""
        return self.manifold.norm(point, tangent_vector)

    def projection(self, point: FixedRankPoint, vector: Any) -> TangentVector:
        """Orthogonal (Frobenius) projection of an ambient matrix onto the tangent space.

        ``vector`` is dense, sparse, a ``LowRankMatrix`` or a tuple of those (their sum).
        O(mnr) dense, O(nnz r + (m+n) r^2) sparse, O((m+n) k r) for rank-k factored input.
        """
        if isinstance(vector, TangentVector):
            raise ValueError(
                "projection takes an ambient matrix, got a TangentVector; use "
                "to_tangent_space(point, v) for tangent vectors, or embedding(point, v) first"
            )
        return self.manifold.projection(point, vector)

    def to_tangent_space(self, point: FixedRankPoint, vector: Any) -> TangentVector:
        """Re-tangentialize: ``TangentVector`` -> re-impose ``U^T Up = 0``, ``V^T Vp = 0``.

        Pymanopt's ``TrustRegions`` calls this on its tCG directions. An ambient matrix is
        projected as in :meth:`projection`. O((m+n) r^2) for a tangent vector.
        """
        if isinstance(vector, TangentVector):
            self.manifold.check_tangent(point, vector)
            return self.manifold.project_tangent(point, vector)
        return self.manifold.projection(point, vector)

    def zero_vector(self, point: FixedRankPoint) -> TangentVector:
        return self.manifold.zero_vector(point)

    def embedding(self, point: FixedRankPoint, tangent_vector: TangentVector) -> LowRankMatrix:
        """Ambient form ``[U M + Up, U] [V, Vp]^T`` of a tangent vector (a ``LowRankMatrix``).

        This is the direction a Euclidean Hessian receives from Pymanopt's ``Problem``.
        """
        self.manifold.check_tangent(point, tangent_vector)
        return self.manifold.embed(point, tangent_vector)

    # --------------------------------------------------- gradient and Hessian
    def euclidean_to_riemannian_gradient(
        self, point: FixedRankPoint, euclidean_gradient: Any
    ) -> TangentVector:
        """``G_x^{-1} P_x(egrad)``: the tangent vector ``g`` with ``g_x(g, v) = <egrad, v>``."""
        return self.manifold.euclidean_to_riemannian_gradient(point, euclidean_gradient)

    def euclidean_to_riemannian_hessian(
        self,
        point: FixedRankPoint,
        euclidean_gradient: Any,
        euclidean_hessian: Any,
        tangent_vector: TangentVector,
    ) -> TangentVector:
        """Riemannian Hessian along ``tangent_vector`` (see
        :meth:`rankopt.FixedRankManifold.euclidean_to_riemannian_hessian`).

        Embedded metric: ``P_x(ehess) +`` curvature terms with ``diag(s)^{-1}`` (no
        ``1/(s_i^2 - s_j^2)``). Other metrics: ``G_x^{-1}`` of that, the Hessian of the pullback
        ``f o R_x`` at 0, self-adjoint under the metric (what ``TrustRegions`` and the quadratic
        model of ``check_directional_derivative`` need).
        """
        return self.manifold.euclidean_to_riemannian_hessian(
            point, euclidean_gradient, euclidean_hessian, tangent_vector
        )

    # ------------------------------------------------------- moving around
    def retraction(self, point: FixedRankPoint, tangent_vector: TangentVector) -> FixedRankPoint:
        """Metric-projection retraction ``H_r(X + xi)`` (QR of ``[U, Up]``, 2r x 2r SVD)."""
        return self.manifold.retraction(point, tangent_vector)

    def transport(
        self, point_a: FixedRankPoint, point_b: FixedRankPoint, tangent_vector_a: TangentVector
    ) -> TangentVector:
        """Vector transport by projection ``P_b(embed_a(v))``. O((m+n) r^2)."""
        return self.manifold.transport(point_a, point_b, tangent_vector_a)

    def exp(self, point: Any, tangent_vector: Any) -> Any:
        raise NotImplementedError(
            "the fixed-rank manifold has no closed-form exponential map; use retraction() "
            "(Pymanopt's check_directional_derivative falls back to it by itself)"
        )

    def log(self, point_a: Any, point_b: Any) -> Any:
        raise NotImplementedError(
            "the fixed-rank manifold has no closed-form logarithmic map; derivative-free "
            "optimizers (NelderMead, ParticleSwarm) are not supported on FixedRank"
        )

    def dist(self, point_a: Any, point_b: Any) -> Any:
        raise NotImplementedError(
            "the geodesic distance on the fixed-rank manifold has no closed form; "
            "FixedRank.manifold.ambient_distance(a, b) gives the chord ||X - Y||_F (a lower bound)"
        )

    def pair_mean(self, point_a: Any, point_b: Any) -> Any:
        raise NotImplementedError(
            "the fixed-rank manifold has no closed-form geodesic midpoint (no exp/log)"
        )

    # ------------------------------------------------------------ random
    def random_point(self, seed: Any = None) -> FixedRankPoint:
        """A random point (see :meth:`rankopt.FixedRankManifold.random_point`).

        Without ``seed`` the manifold's own generator (``seed`` of the constructor) is used.
        """
        return self.manifold.random_point(self._rng if seed is None else seed)

    def random_tangent_vector(self, point: FixedRankPoint, seed: Any = None) -> TangentVector:
        """A random tangent vector of unit norm under the metric."""
        return self.manifold.random_tangent_vector(point, self._rng if seed is None else seed)

    # ------------------------------------------------------------ helpers
    def from_matrix(self, A: Any) -> FixedRankPoint:
        """Truncated SVD of a dense array or ``LowRankMatrix`` (a starting point)."""
        return self.manifold.from_matrix(A)

    def to_dense(self, point: FixedRankPoint) -> Any:
        """The m x n matrix of a point (small problems only)."""
        return self.manifold.to_dense(point)


def to_pymanopt(problem: Any, rank: int, metric: Any = None, *, seed: Any = None) -> Any:
    """A ``pymanopt.Problem`` on :class:`FixedRank` from a :mod:`rankopt.problems` problem.

    Parameters
    ----------
    problem : rankopt.problems.Problem (or any object with the same protocol)
        Needs ``shape``, ``cost(x)``, ``egrad(x)``; ``ehess(x, D)`` is used when
        ``problem.has_hessian`` is true (then ``TrustRegions`` can run). ``backend``,
        ``dtype`` and ``device`` (when present) choose the manifold's arrays.
    rank : int
    metric : rankopt.metrics.Metric, optional
    seed : None, int or numpy.random.Generator
        For the manifold's random points (see :class:`FixedRank`).

    Returns
    -------
    pymanopt.Problem
        Its ``manifold`` is the new :class:`FixedRank`.
    """
    for attr in ("shape", "cost", "egrad"):
        if not hasattr(problem, attr):
            raise ValueError(
                f"expected a rankopt problem with a {attr!r} attribute, got {type(problem).__name__}"
            )
    m, n = problem.shape
    pm = FixedRank(
        m,
        n,
        rank,
        metric=metric,
        backend=getattr(problem, "backend", "numpy"),
        dtype=getattr(problem, "dtype", None),
        device=getattr(problem, "device", None),
        seed=seed,
    )
    dec = function(pm)

    def cost(x: FixedRankPoint) -> Any:
        return problem.cost(x)

    def egrad(x: FixedRankPoint) -> Any:
        return problem.egrad(x)

    kwargs = {"euclidean_gradient": dec(egrad)}
    if getattr(problem, "has_hessian", False):

        def ehess(x: FixedRankPoint, D: Any) -> Any:
            return problem.ehess(x, D)

        kwargs["euclidean_hessian"] = dec(ehess)
    return pymanopt.Problem(pm, dec(cost), **kwargs)


def _as_python_scalar(value: Any) -> Any:
    """0-d arrays and NumPy scalars -> Python float; anything else unchanged."""
    if isinstance(value, (bool, np.bool_)):
        return value
    if isinstance(value, (int, float, np.number)):
        return float(value)
    if backend_name_of(value) is not None and len(getattr(value, "shape", (None,))) == 0:
        return float(value)
    return value


def function(manifold: FixedRank) -> Callable[[Callable[..., Any]], Any]:
    """Decorator for cost, Euclidean gradient and Hessian callables on rankopt points.

    It is ``pymanopt.function.numpy(manifold)`` (points and directions are passed through
    unchanged, whatever the backend) plus one conversion: a 0-d result (a NumPy scalar, a
    0-d torch or CuPy array) is returned as a Python float, so the costs Pymanopt compares,
    prints and stores are plain floats also on the torch and CuPy backends. Gradients and
    Hessians (ambient matrices) are returned unchanged.

    Pymanopt's autodiff decorators (``pymanopt.function.pytorch``, ``autograd``, ``jax``,
    ``tensorflow``) expect points made of arrays and cannot be used with :class:`FixedRank`:
    write the Euclidean gradient (and Hessian) by hand.

    Examples
    --------
    >>> pm = FixedRank(5, 4, 2, backend="torch")               # doctest: +SKIP
    >>> @function(pm)                                           # doctest: +SKIP
    ... def cost(x):
    ...     return 0.5 * (x.s ** 2).sum()                       # a torch 0-d tensor
    """
    if not isinstance(manifold, FixedRank):
        raise ValueError(
            f"rankopt.pymanopt.function needs a rankopt.pymanopt.FixedRank, got {type(manifold).__name__}"
        )
    decorate = pymanopt.function.numpy(manifold)

    def inner(f: Callable[..., Any]) -> Any:
        if not callable(f):
            raise ValueError(f"expected a callable, got {type(f).__name__}")

        @functools.wraps(f)
        def wrapper(*args: Any) -> Any:
            return _as_python_scalar(f(*args))

        return decorate(wrapper)

    return inner


# ----------------------------------------------------------------- factor-style costs
def factor_gradient(x: FixedRankPoint, gu: Any, gs: Any, gvt: Any) -> LowRankMatrix:
    r"""The tangent part ``P_X(G)`` of the Euclidean gradient, from gradients w.r.t. the factors.

    Pymanopt's ``FixedRankEmbedded`` takes ``(gu, gs, gvt)``, the partial derivatives of a cost
    ``F(u, s, vt) = f(u diag(s) vt)`` with respect to the factors. With ``G = grad f(X)`` and
    ``S = diag(s)`` the chain rule gives ``gu = G V S``, ``gs = diag(U^T G V)`` and
    ``gvt = S U^T G``, so the three blocks of the tangent projection
    ``P_X(G) = U M V^T + Up V^T + U Vp^T`` follow with ``1/s_i`` only:

    * ``M = U^T G V = (U^T gu) S^{-1} = S^{-1} (gvt V)`` (the mean of both is used; they agree
      when ``F`` depends on the factors only through ``X``, and ``diag(M) = gs``),
    * ``Up = (I - U U^T) G V = (I - U U^T) gu S^{-1}``,
    * ``Vp = (I - V V^T) G^T U = (I - V V^T) gvt^T S^{-1}``.

    Pymanopt's conversion writes the off-diagonal part of ``M`` through the antisymmetric parts
    of ``U^T gu`` and ``gvt V`` divided by ``s_j^2 - s_i^2`` (which reduces to the same ``M``
    for such costs, and is NaN at equal singular values, its issue #34); here no such term
    appears and equal singular values are harmless.

    What factor gradients cannot give is the *normal* part ``(I - U U^T) G (I - V V^T)``:
    ``gu`` and ``gvt`` only see ``G V`` and ``U^T G``. The result is therefore exact for every
    first-order use (Riemannian gradient under any metric, line searches, RGD, RCG, RAdamW,
    Pymanopt's SteepestDescent and ConjugateGradient), but not for what needs the normal part:
    the curvature terms of the Riemannian Hessian (``(I - U U^T) G Vp S^{-1}``, needed by
    trust regions and Newton) and the rank-increasing step of the rank-adaptive solvers.

    Parameters
    ----------
    x : FixedRankPoint
        The point ``(U, s, V)`` (``vt = V^T``).
    gu : array (m, r)
    gs : array (r,)
        Accepted for the signature's sake and used in no formula (it equals ``diag(M)``).
    gvt : array (r, n)

    Returns
    -------
    LowRankMatrix
        ``[U M + Up, U] [V, Vp]^T`` (rank <= 2r): an ambient matrix whose projection is
        ``P_X(G)``; pass it wherever rankopt takes a Euclidean gradient. O((m + n) r^2).
    """
    U, s, V = x.U, x.s, x.V
    r = int(s.shape[0])
    for name, arr, shape in (("gu", gu, U.shape), ("gvt", gvt, (r, V.shape[0]))):
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
    if tuple(gs.shape) != (r,):
        raise ValueError(f"gs has shape {tuple(gs.shape)}, expected ({r},)")
    inv_s = 1.0 / s
    gv = gvt.T  # (n, r) = G^T U S
    utgu = U.T @ gu  # M S
    vtgv = V.T @ gv  # M^T S
    M = 0.5 * (utgu * inv_s[None, :] + (vtgv * inv_s[None, :]).T)
    Up = (gu - U @ utgu) * inv_s[None, :]
    Vp = (gv - V @ vtgv) * inv_s[None, :]
    be_concat = _concat_like(U)
    return LowRankMatrix(be_concat([U @ M + Up, U]), be_concat([V, Vp]))


def _concat_like(a: Any) -> Callable[[list], Any]:
    from ._backend import backend_like

    be = backend_like(a)
    return lambda parts: be.concat(parts, axis=1)


def from_factor_functions(
    cost: Callable[..., Any], euclidean_gradient: Callable[..., Any] | None = None
) -> tuple[Callable[[FixedRankPoint], Any], Callable[[FixedRankPoint], Any] | None]:
    r"""Wrap a Pymanopt-style cost ``cost(u, s, vt)`` and factor gradient for rankopt.

    Parameters
    ----------
    cost : callable(u, s, vt) -> float
        As written for Pymanopt's ``FixedRankEmbedded`` (``u`` m x r, ``s`` (r,), ``vt`` r x n).
    euclidean_gradient : callable(u, s, vt) -> (gu, gs, gvt), optional
        Its gradient with respect to the three factors (what ``FixedRankEmbedded`` takes).

    Returns
    -------
    (cost_x, egrad_x)
        ``cost_x(point)`` and ``egrad_x(point)`` on :class:`rankopt.FixedRankPoint` s:
        ``egrad_x`` returns :func:`factor_gradient` of the factor gradient, a
        ``LowRankMatrix`` usable by :class:`FixedRank` (decorate both with
        :func:`function`), by ``rankopt.problems.Problem(cost_x, egrad_x, shape=(m, n))``
        and by rankopt's first-order solvers (``method="rcg"``, ``"rgd"``, ``"radamw"``, ...).
        Not by trust regions, Newton, Gauss-Newton or the rank-adaptive methods ("auto"):
        see :func:`factor_gradient` for why factor gradients cannot feed them.
    """
    if not callable(cost):
        raise ValueError(f"cost must be callable(u, s, vt), got {type(cost).__name__}")
    if euclidean_gradient is not None and not callable(euclidean_gradient):
        raise ValueError("euclidean_gradient must be callable(u, s, vt) -> (gu, gs, gvt)")

    def cost_x(x: FixedRankPoint) -> Any:
        u, s, vt = x
        return cost(u, s, vt)

    if euclidean_gradient is None:
        return cost_x, None

    def egrad_x(x: FixedRankPoint) -> LowRankMatrix:
        u, s, vt = x
        parts = euclidean_gradient(u, s, vt)
        if not (isinstance(parts, (tuple, list)) and len(parts) == 3):
            raise ValueError(
                "euclidean_gradient(u, s, vt) must return the three factor gradients "
                f"(gu, gs, gvt), got {type(parts).__name__}"
            )
        return factor_gradient(x, *parts)

    return cost_x, egrad_x
