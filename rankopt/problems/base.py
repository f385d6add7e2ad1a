r"""The problem protocol the solvers call, the data protocol, and a generic problem.

A problem is a smooth cost ``f`` on ``R^{m x n}`` restricted to the fixed-rank manifold. It
supplies the cost at a :class:`~rankopt.FixedRankPoint`, the Euclidean gradient as an *ambient*
matrix (dense array, scipy / torch sparse matrix, :class:`~rankopt.LowRankMatrix`, or a tuple
of those meaning their sum, which :class:`~rankopt.FixedRankManifold` accepts everywhere), and
optionally the Euclidean Hessian applied to an ambient direction, an exact line-search step,
a spectral initial point and the error to a known truth: the methods of :class:`Problem`.

Least-squares problems may add two hooks for Gauss-Newton (:class:`rankopt.solvers.RGN` looks
them up and falls back to ``ehess`` and no preconditioner without them):
``gn_operator(manifold, x)``, the operator ``P_x A^* A P_x (+ lam)`` on the tangent space at
``x`` (or None), and ``gn_preconditioner(manifold, x)``, an SPD approximation of its inverse.

Problems fitted to observations follow the *data protocol* :class:`DataProblem` (and, when the
observations are entries of the matrix, :class:`EntryProblem`): the noise-aware solving of
:mod:`rankopt.solvers.noise` counts, splits and holds out their observations. Both are
``typing.Protocol`` classes checked with ``isinstance`` (``runtime_checkable``: every member is
present); :class:`~rankopt.problems.MatrixCompletion` and
:class:`~rankopt.problems.MatrixSensing` implement them without inheriting from them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._backend import Backend, backend_like, backend_name_of, make_backend
from ..containers import FixedRankPoint, LowRankMatrix, TangentVector
from ..manifold import FixedRankManifold

__all__ = [
    "Problem",
    "DataProblem",
    "EntryProblem",
    "check_weight_decay",
    "relative_error_lowrank",
    "lowrank_inner",
    "lowrank_sq_norm",
]


def _check_shape(shape: Any) -> tuple[int, int]:
    try:
        m, n = shape
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a pair (m, n), got {shape!r}") from None
    for name, v in (("m", m), ("n", n)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"shape must hold two positive integers, got {name}={v!r}")
    return int(m), int(n)


def check_weight_decay(weight_decay: Any) -> float:
    """The ridge weight ``lam`` as a float; ValueError unless finite and ``>= 0``."""
    wd = float(weight_decay)
    if not (wd >= 0.0 and np.isfinite(wd)):
        raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay!r}")
    return wd


def as_lowrank(D: Any) -> Any:
    """A FixedRankPoint becomes its LowRankMatrix; other ambient matrices pass unchanged."""
    return D.to_lowrank() if isinstance(D, FixedRankPoint) else D


def lowrank_inner(be: Backend, X: LowRankMatrix, Y: LowRankMatrix) -> Any:
    r"""``<A1 B1^T, A2 B2^T>_F = sum((A1^T A2) * (B1^T B2))``: O((m+n) k1 k2), 0-d array."""
    return be.xp.sum((X.A.T @ Y.A) * (X.B.T @ Y.B))


def lowrank_sq_norm(be: Backend, X: LowRankMatrix) -> Any:
    r"""``||A B^T||_F^2 = sum((A^T A) * (B^T B))``: O((m+n) k^2), 0-d array.

    Fine for cost values; for small differences of nearby matrices use
    :meth:`LowRankMatrix.fro_norm` (QR based, no cancellation).
    """
    return lowrank_inner(be, X, X)


def relative_error_lowrank(x: FixedRankPoint, truth: FixedRankPoint) -> float:
    r"""``||X - X_true||_F / ||X_true||_F`` through the factors.

    ``X - X_true = [U s, -U_t s_t] [V, V_t]^T`` has rank <= r + r_t; its norm comes from QR of
    both factors (:meth:`LowRankMatrix.fro_norm`), accurate to ``eps ||X||`` (no
    cancellation, so errors down to ~1e-15 are resolved). O((m+n) (r + r_t)^2). Never dense.
    """
    diff = x.to_lowrank() - truth.to_lowrank()
    be = backend_like(truth.s)
    # ||X_true||_F = ||s_true|| for a point (orthonormal factors)
    return diff.fro_norm() / be.to_float(be.xp.sqrt(be.sum_sq(truth.s)))


class Problem:
    r"""Base class of rankopt problems, and a generic problem from user callables.

    Parameters
    ----------
    cost : callable(FixedRankPoint) -> float
    egrad : callable(FixedRankPoint) -> ambient matrix
        Euclidean gradient of the cost extended to ``R^{m x n}`` (dense, sparse,
        ``LowRankMatrix`` or a tuple of those meaning their sum).
    ehess : callable(FixedRankPoint, ambient D) -> ambient matrix, optional
        Euclidean Hessian applied to an ambient direction ``D`` (solvers pass the
        ``LowRankMatrix`` that ``manifold.embed(x, xi)`` returns).
    shape : (int, int)
    backend : {"numpy", "torch", "cupy"}
    dtype, device : optional, as for :class:`~rankopt.FixedRankManifold`
    cost_and_egrad : callable(FixedRankPoint) -> (float, ambient), optional
        Shared evaluation (default: ``cost`` then ``egrad``).
    truth : FixedRankPoint, optional
        Known solution, enabling :meth:`relative_error`.

    Attributes
    ----------
    shape : (int, int)
    backend : str
        Name of the array library of the arrays the problem holds.
    least_squares : bool
        True when ``f(X) = 0.5 ||A(X) - b||^2 (+ 0.5 lam ||X||_F^2)`` for a linear ``A``: then
        :meth:`ehess` is the Gauss-Newton operator ``A^* A (+ lam I)`` exactly and is
        independent of ``x``. False for a generic problem.
    has_hessian : bool
        Whether :meth:`ehess` is available.
    truth : FixedRankPoint or None
    """

    least_squares: bool = False

    def __init__(
        self,
        cost: Callable[[FixedRankPoint], Any] | None = None,
        egrad: Callable[[FixedRankPoint], Any] | None = None,
        ehess: Callable[[FixedRankPoint, Any], Any] | None = None,
        *,
        shape: tuple[int, int] | None = None,
        backend: str = "numpy",
        dtype: Any = None,
        device: Any = None,
        cost_and_egrad: Callable[[FixedRankPoint], tuple[float, Any]] | None = None,
        truth: FixedRankPoint | None = None,
    ) -> None:
        if type(self) is Problem:
            if cost is None or not callable(cost):
                raise ValueError("Problem needs a callable cost(x)")
            if egrad is None or not callable(egrad):
                raise ValueError("Problem needs a callable egrad(x) (the Euclidean gradient)")
            if ehess is not None and not callable(ehess):
                raise ValueError("ehess must be callable(x, D) or None")
            if shape is None:
                raise ValueError("Problem needs shape=(m, n)")
        self._cost_fn, self._egrad_fn, self._ehess_fn = cost, egrad, ehess
        self._cost_and_egrad_fn = cost_and_egrad
        self._init_common(shape, backend, dtype, device, truth)

    def _init_common(
        self, shape: Any, backend: str, dtype: Any, device: Any, truth: FixedRankPoint | None
    ) -> None:
        self.shape = _check_shape(shape)
        self._be = make_backend(backend, dtype, device)
        self.backend = self._be.name
        if truth is not None:
            if not isinstance(truth, FixedRankPoint):
                raise ValueError(f"truth must be a FixedRankPoint, got {type(truth).__name__}")
            if truth.shape != self.shape:
                raise ValueError(f"truth has shape {truth.shape}, expected {self.shape}")
        self.truth = truth

    # ------------------------------------------------------------- properties
    @property
    def dtype(self) -> Any:
        """Working dtype of the problem's arrays."""
        return self._be.dtype

    @property
    def device(self) -> Any:
        return self._be.device

    @property
    def has_hessian(self) -> bool:
        return self._ehess_fn is not None

    def __repr__(self) -> str:
        m, n = self.shape
        return f"{type(self).__name__}(shape=({m}, {n}), backend={self.backend!r})"

    # ------------------------------------------------------------- protocol
    def cost(self, x: FixedRankPoint) -> float:
        """``f(X)`` as a Python float."""
        return float(self._cost_fn(x))

    def egrad(self, x: FixedRankPoint) -> Any:
        """Euclidean gradient ``nabla f(X)`` as an ambient matrix (or a tuple: their sum)."""
        return self._egrad_fn(x)

    def cost_and_egrad(self, x: FixedRankPoint) -> tuple[float, Any]:
        """``(f(X), nabla f(X))``, sharing work where the problem can (solvers call this)."""
        if self._cost_and_egrad_fn is not None:
            f, g = self._cost_and_egrad_fn(x)
            return float(f), g
        return self.cost(x), self.egrad(x)

    def ehess(self, x: FixedRankPoint, D: Any) -> Any:
        """Euclidean Hessian at ``X`` applied to the ambient direction ``D``."""
        if self._ehess_fn is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no Hessian: pass ehess=... to Problem (check has_hessian)"
            )
        return self._ehess_fn(x, D)

    def exact_step(self, x: FixedRankPoint, D: Any) -> float | None:
        """``argmin_t f(X + t D)`` when the cost is quadratic in ``t``; None otherwise."""
        return None

    def spectral_init(self, rank: int, seed: Any = None) -> FixedRankPoint | None:
        """A spectral initial point of the given rank, or None when the problem has none."""
        return None

    def relative_error(self, x: FixedRankPoint) -> float | None:
        """``||X - X_true||_F / ||X_true||_F`` when the truth is known, else None.

        Via the factors (:func:`relative_error_lowrank`), O((m+n) r^2); never dense.
        """
        if self.truth is None:
            return None
        truth = self.truth
        if x.U.dtype != truth.U.dtype or backend_name_of(x.U) != backend_name_of(truth.U):
            be = backend_like(x.U)  # compare in the point's backend and dtype
            truth = FixedRankPoint(be.asarray(truth.U), be.asarray(truth.s), be.asarray(truth.V))
        return relative_error_lowrank(self._as_point(x), truth)

    def manifold(self, rank: int, metric: Any = None) -> FixedRankManifold:
        """A :class:`FixedRankManifold` matching the problem's shape, backend, dtype and device."""
        m, n = self.shape
        be = self._be
        return FixedRankManifold(m, n, rank, be.name, be.dtype, be.device, metric)

    # ------------------------------------------------------------- helpers
    def _as_point(self, x: Any) -> FixedRankPoint:
        if not isinstance(x, FixedRankPoint):
            raise ValueError(f"expected a FixedRankPoint, got {type(x).__name__}")
        if x.shape != self.shape:
            raise ValueError(f"point has shape {x.shape}, expected {self.shape}")
        return x

    def _tangent_or_ambient(self, x: FixedRankPoint, D: Any) -> Any:
        """Accept a TangentVector at x as a direction too (its embedding)."""
        if isinstance(D, TangentVector):
            return self.manifold(x.rank).embed(x, D)
        return as_lowrank(D)


@runtime_checkable
class DataProblem(Protocol):
    r"""The data protocol: ``f(X) = 1/2 ||A(X) - b||^2 (+ lam/2 ||X||_F^2)`` with ``N``
    observations ``b`` that can be counted, read and split.

    :mod:`rankopt.solvers.noise` uses it to warn about under-determined fits, estimate the noise
    level from the residual and choose the rank (and ridge) on held-out observations. A problem
    is a data problem for the solvers when ``isinstance(problem, DataProblem)`` (all members
    present) and ``problem.least_squares`` is true.

    Attributes
    ----------
    shape : (int, int)
    least_squares : bool
        True for the least-squares cost above.
    """

    shape: tuple[int, int]
    least_squares: bool

    @property
    def num_observations(self) -> int:
        """``N``, the number of observations (entries, measurements)."""
        ...

    def observed_values(self) -> Any:
        """The observations ``b`` (length ``N``), in the problem's order and backend."""
        ...

    def residual(self, x: FixedRankPoint) -> Any:
        """``A(X) - b`` at a point (length ``N``, a fresh array)."""
        ...

    def subset(self, index: Any, weight_decay: float | None = None) -> DataProblem:
        """The same problem on the observations ``index`` (NumPy integer positions), with its
        own ``weight_decay`` (default: this problem's)."""
        ...


@runtime_checkable
class EntryProblem(DataProblem, Protocol):
    r"""A data problem whose observations are entries of the matrix (completion,
    ``A = P_Omega``): the sampling rate ``N / (m n)`` and the counts per row and column mean
    something (ridge scale, noise level of a fitted component, undetermined rows).

    Attributes
    ----------
    nnz : int
        ``N = |Omega|``.
    """

    nnz: int

    def observation_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Observations per row (length m) and per column (length n), NumPy int arrays."""
        ...

    def underdetermined(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and columns with fewer than ``rank`` observations (sorted index arrays)."""
        ...
