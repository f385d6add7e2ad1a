r"""Low-rank matrix sensing from linear measurements.

With a linear operator ``A: R^{m x n} -> R^k`` and data ``b``,

    f(X) = 1/2 ||A(X) - b||^2 + lam/2 ||X||_F^2,

gradient ``A^*(A(X) - b) + lam X``, Hessian (= Gauss-Newton) ``A^* A (D) + lam D``, exact line
search ``t* = -(<A(X) - b, A(D)> + lam <X, D>) / (||A(D)||^2 + lam ||D||^2)``.

Dense measurements ``A(X)_i = <A_i, X>`` are held as a ``(k, m, n)`` array. Evaluating
``A`` on a factored ``X = P Q^T`` (rank ``k_X``) costs ``O(m n k_X)`` to form X plus
``O(k m n)`` for one matrix-vector product with the ``k x mn`` matrix; contracting the
factors with every ``A_i`` instead (``einsum('imn,nr,mr->i')``) costs ``O(k m n k_X)``, never
less, so the dense route is used. The adjoint ``A^*(y) = sum_i y_i A_i`` is a dense m x n
matrix, O(k m n).

Matrix-free operators come in through :meth:`MatrixSensing.from_operator`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .._backend import Backend, backend_like, backend_name_of
from ..containers import FixedRankPoint, LowRankMatrix
from ._svd import top_svd
from .base import Problem, check_weight_decay, lowrank_inner, lowrank_sq_norm

__all__ = ["MatrixSensing"]


def _dense_forward(Aflat: Any, shape: tuple[int, int]) -> Callable[[Any], Any]:
    def forward(D: Any) -> Any:
        X = D.A @ D.B.T if isinstance(D, LowRankMatrix) else D
        return Aflat @ X.reshape(-1)

    return forward


def _dense_adjoint(Aflat: Any, shape: tuple[int, int]) -> Callable[[Any], Any]:
    def adjoint(y: Any) -> Any:
        return (y @ Aflat).reshape(shape)

    return adjoint


class MatrixSensing(Problem):
    r"""Matrix sensing ``min 1/2 ||A(X) - b||^2 (+ lam/2 ||X||_F^2)`` over rank-r X.

    Parameters
    ----------
    A : array (k, m, n) or None
        Measurement matrices, ``A(X)_i = <A_i, X>`` (NumPy or torch; fixes the backend). None
        for a matrix-free operator given as ``operator`` (see :meth:`from_operator`).
    b : array (k,)
        Measurements.
    weight_decay : float
        Ridge weight ``lam >= 0``.
    truth : FixedRankPoint, optional
        Enables :meth:`relative_error`.
    operator : (forward, adjoint), optional
        The matrix-free operator when ``A`` is None, as in :meth:`from_operator`.
    shape : (int, int), optional
        ``(m, n)`` of a matrix-free operator (a dense ``A`` fixes it).
    dtype : optional
        Working dtype of a matrix-free operator (default: that of ``b``).

    Raises
    ------
    ValueError
        If ``A`` is not 3-D, ``b`` does not have ``k`` entries, or either is not finite; if
        ``A`` and ``operator`` (or ``shape``, ``dtype``) are both given, or neither.
    """

    least_squares = True

    def __init__(
        self,
        A: Any,
        b: Any,
        weight_decay: float = 0.0,
        *,
        truth: FixedRankPoint | None = None,
        operator: tuple[Callable[[LowRankMatrix], Any], Callable[[Any], Any]] | None = None,
        shape: tuple[int, int] | None = None,
        dtype: Any = None,
    ) -> None:
        if A is None:
            forward, adjoint = _check_operator(operator)
            backend, dtype, device = _backend_of(b, dtype)
        else:
            if operator is not None or shape is not None or dtype is not None:
                raise ValueError(
                    "operator, shape and dtype describe a matrix-free operator (A=None); "
                    "a dense A fixes them"
                )
            A, be = _dense_measurements(A)
            k, m, n = (int(d) for d in A.shape)
            Aflat = A.reshape(k, m * n)
            forward, adjoint = _dense_forward(Aflat, (m, n)), _dense_adjoint(Aflat, (m, n))
            shape, backend, dtype, device = (m, n), be.name, be.dtype, be.device
        super().__init__(shape=shape, backend=backend, dtype=dtype, device=device, truth=truth)
        self.A = A
        self.b = _measurements(self._be, b)
        self.k = int(self.b.shape[0])
        self.weight_decay = check_weight_decay(weight_decay)
        self._forward, self._adjoint = forward, adjoint
        self._last: tuple[FixedRankPoint, Any] | None = None  # point, residual
        self._check_lengths()

    @classmethod
    def from_operator(
        cls,
        forward: Callable[[LowRankMatrix], Any],
        adjoint: Callable[[Any], Any],
        b: Any,
        shape: tuple[int, int],
        weight_decay: float = 0.0,
        *,
        truth: FixedRankPoint | None = None,
        dtype: Any = None,
    ) -> MatrixSensing:
        r"""Matrix sensing with a matrix-free linear operator.

        Parameters
        ----------
        forward : callable(LowRankMatrix) -> array (k,)
            ``A(D)`` for an ambient matrix given in factored form ``D = D.A @ D.B.T``
            (points are passed as ``x.to_lowrank()``; Hessian and line-search directions as
            the rank <= 2r ``LowRankMatrix`` of ``manifold.embed``). Must be linear in ``D``.
        adjoint : callable(array (k,)) -> ambient matrix
            ``A^*(y)``: a dense m x n array, a sparse matrix, or a ``LowRankMatrix``.
        b : array (k,)
            Measurements; their backend (NumPy or torch) is the problem's.
        shape : (int, int)

        Returns
        -------
        MatrixSensing

        Raises
        ------
        ValueError
            If ``forward`` does not return ``len(b)`` values: it is evaluated once, at
            construction, on the rank-1 zero matrix (O(one forward evaluation)), so that a
            wrong ``b`` fails here rather than at the first cost evaluation.
        """
        return cls(
            None,
            b,
            weight_decay,
            truth=truth,
            operator=(forward, adjoint),
            shape=shape,
            dtype=dtype,
        )

    def _check_lengths(self) -> None:
        """ValueError unless the operator gives one value per measurement: ``A`` holds ``k``
        matrices, or ``forward`` (evaluated once, on the rank-1 zero matrix) returns ``k``."""
        if self.A is not None:
            k = int(self.A.shape[0])
            if self.k != k:
                raise ValueError(
                    f"b has {self.k} measurements but A holds k = {k} measurement matrices "
                    f"(A has shape {tuple(self.A.shape)}): b must have length {k}"
                )
            return
        m, n = self.shape
        zero = LowRankMatrix(self._be.zeros((m, 1)), self._be.zeros((n, 1)))
        y = self._forward(zero)
        if len(getattr(y, "shape", ())) != 1 or int(y.shape[0]) != self.k:
            raise ValueError(
                f"b has {self.k} measurements but the forward operator returns shape "
                f"{tuple(getattr(y, 'shape', ()))} (evaluated on the zero matrix): "
                "b must have one entry per measurement"
            )

    @property
    def has_hessian(self) -> bool:
        return True

    def __repr__(self) -> str:
        m, n = self.shape
        kind = "dense" if self.A is not None else "operator"
        return f"MatrixSensing(shape=({m}, {n}), k={self.k}, {kind}, backend={self.backend!r})"

    # ------------------------------------------------------------------ operator
    def forward(self, D: Any) -> Any:
        """``A(D)`` for a LowRankMatrix, FixedRankPoint or (dense operator only) dense D."""
        if isinstance(D, FixedRankPoint):
            D = D.to_lowrank()
        if not isinstance(D, LowRankMatrix) and self.A is None:
            raise ValueError(
                f"from_operator problems evaluate A on LowRankMatrix inputs, got {type(D).__name__}"
            )
        if tuple(D.shape) != self.shape:
            raise ValueError(f"matrix has shape {tuple(D.shape)}, expected {self.shape}")
        y = self._forward(D)
        if tuple(y.shape) != (self.k,):
            raise ValueError(
                f"forward operator returned shape {tuple(y.shape)}, expected ({self.k},)"
            )
        return y

    def adjoint(self, y: Any) -> Any:
        """``A^*(y)``: ambient m x n matrix (dense, sparse or LowRankMatrix)."""
        return self._adjoint(y)

    # ------------------------------------------------------------------ data protocol
    @property
    def num_observations(self) -> int:
        """``k``, the number of measurements (the data protocol of :mod:`rankopt.solvers.noise`)."""
        return self.k

    def observed_values(self) -> Any:
        """The measurements ``b``."""
        return self.b

    def residual(self, x: FixedRankPoint) -> Any:
        """``A(X) - b`` (a copy). One forward evaluation."""
        return self._res(x) * 1.0

    def subset(self, index: Any, weight_decay: float | None = None) -> MatrixSensing:
        """The same problem on the measurements ``index`` (held-out validation).

        Dense operators keep the rows ``A[index]``; matrix-free ones compose ``forward`` with
        the selection and ``adjoint`` with the scatter of ``y`` into a length-k vector.
        """
        be = self._be
        index = np.asarray(index)
        if index.ndim != 1 or index.dtype.kind not in "iu":
            raise ValueError("index must be a 1-D integer array of measurement positions")
        wd = self.weight_decay if weight_decay is None else weight_decay
        sel = index if be.name == "numpy" else be.xp.asarray(index, device=be.device)
        b = self.b[sel]
        if self.A is not None:
            return MatrixSensing(self.A[sel], b, wd, truth=self.truth)
        k, fwd, adj = self.k, self._forward, self._adjoint

        def forward(D: Any) -> Any:
            return fwd(D)[sel]

        def adjoint(y: Any) -> Any:
            full = be.zeros((k,))
            full[sel] = y
            return adj(full)

        return MatrixSensing.from_operator(
            forward, adjoint, b, self.shape, wd, truth=self.truth, dtype=be.dtype
        )

    def _res(self, x: FixedRankPoint) -> Any:
        x = self._as_point(x)
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        r = self.forward(x) - self.b
        self._last = (x, r)
        return r

    # ------------------------------------------------------------------ protocol
    def _ridge_cost(self, x: FixedRankPoint) -> float:
        if self.weight_decay == 0.0:
            return 0.0
        return 0.5 * self.weight_decay * self._be.to_float(self._be.sum_sq(x.s))

    def cost(self, x: FixedRankPoint) -> float:
        """``f(X)``: one forward evaluation (O(k m n) dense)."""
        r = self._res(x)
        return 0.5 * self._be.to_float(self._be.sum_sq(r)) + self._ridge_cost(x)

    def cost_and_egrad(self, x: FixedRankPoint) -> tuple[float, Any]:
        """``(f(X), A^*(A(X) - b) (+ lam X))``; with ridge the gradient is a tuple (sum)."""
        r = self._res(x)
        f = 0.5 * self._be.to_float(self._be.sum_sq(r)) + self._ridge_cost(x)
        G = self._adjoint(r)
        if self.weight_decay > 0.0:
            G = (G, LowRankMatrix(x.U * (self.weight_decay * x.s)[None, :], x.V))
        return f, G

    def egrad(self, x: FixedRankPoint) -> Any:
        return self.cost_and_egrad(x)[1]

    def _direction(self, x: FixedRankPoint, D: Any) -> Any:
        D = self._tangent_or_ambient(x, D)
        if not isinstance(D, LowRankMatrix) and (self.A is None or backend_name_of(D) is None):
            raise ValueError(
                f"direction must be a LowRankMatrix (or dense array), got {type(D).__name__}"
            )
        return D

    def ehess(self, x: FixedRankPoint, D: Any) -> Any:
        """``A^*(A(D)) (+ lam D)``: exact Hessian, independent of X."""
        D = self._direction(x, D)
        H = self._adjoint(self.forward(D))
        if self.weight_decay == 0.0:
            return H
        return (H, D * self.weight_decay)

    def exact_step(self, x: FixedRankPoint, D: Any) -> float:
        r"""``t* = -(<r, A(D)> + lam <X, D>) / (||A(D)||^2 + lam ||D||^2)``, ``r = A(X) - b``.

        One forward evaluation of D (the residual at X is reused from the last evaluation at
        the same point). Returns 0.0 when the cost is constant along D.
        """
        x = self._as_point(x)
        D = self._direction(x, D)
        be = self._be
        r = self._res(x)
        ad = self.forward(D)
        num = be.to_float(be.vdot(r, ad))
        den = be.to_float(be.sum_sq(ad))
        if self.weight_decay > 0.0:
            Dl = D if isinstance(D, LowRankMatrix) else None
            X = x.to_lowrank()
            if Dl is not None:
                num += self.weight_decay * be.to_float(lowrank_inner(be, X, Dl))
                den += self.weight_decay * be.to_float(lowrank_sq_norm(be, Dl))
            else:
                num += self.weight_decay * be.to_float(be.vdot(X.to_dense(), D))
                den += self.weight_decay * be.to_float(be.sum_sq(D))
        if den == 0.0:
            return 0.0
        return -num / den

    def spectral_init(self, rank: int, seed: Any = None) -> FixedRankPoint:
        r"""``c H_r(A^*(b))``: best rank-``rank`` approximation of ``A^*(b)``, scaled optimally.

        For Gaussian measurements with ``E[A^* A] = s I`` the right scale is ``1/s``; instead of
        assuming it, the scale is the exact line search along the ray,
        ``c = <A(Y), b> / ||A(Y)||^2`` with ``Y = H_r(A^*(b))`` (positive, since
        ``<A(Y), b> = <Y, A^*(b)> = ||Y||_F^2``). Dense ``A^*(b)``: full SVD, O(m n min(m, n));
        sparse: ``svds``; LowRankMatrix: QR + small SVD. ``seed`` is unused (deterministic).

        Raises
        ------
        ValueError
            If ``A^*(b)`` has rank < ``rank``, or the scale is not positive (forward and
            adjoint are then not adjoint to each other).
        """
        m, n = self.shape
        if not isinstance(rank, (int, np.integer)) or not 1 <= rank <= min(m, n):
            raise ValueError(f"rank must be an integer in [1, {min(m, n)}], got {rank!r}")
        M = self.manifold(int(rank))
        Y = self._adjoint(self.b)
        if isinstance(Y, (tuple, list)):
            raise ValueError("spectral_init needs adjoint(b) as one matrix, not a sum")
        if self._be.is_sparse(Y):
            if self.backend != "numpy":
                raise ValueError("spectral_init supports sparse adjoints on the numpy backend only")
            if rank >= min(m, n):
                Y = np.asarray(Y.toarray())
                y0 = M.from_matrix(Y)
            else:
                u, s, v = top_svd(Y, int(rank), 0)  # PROPACK, seed 0
                if not s[-1] > 0:
                    raise ValueError(f"A^*(b) has rank < {rank}")
                y0 = FixedRankPoint(u, s, v.copy())
        else:
            y0 = M.from_matrix(Y)
        be = self._be
        ay = self.forward(y0)
        c = be.to_float(be.vdot(ay, self.b)) / be.to_float(be.sum_sq(ay))
        if not c > 0:
            raise ValueError(
                f"spectral_init found a non-positive scale {c:.3e}: the forward and adjoint "
                "operators do not look adjoint to each other"
            )
        return FixedRankPoint(y0.U, y0.s * c, y0.V)


def _require_real(a: Any, what: str) -> None:
    """``TypeError`` for complex data (casting would drop the imaginary part silently)."""
    arr = a if getattr(a, "dtype", None) is not None else np.asarray(a)
    if Backend.is_complex(arr):
        raise TypeError(
            f"{what} must be real numbers, got dtype {arr.dtype}: rankopt works over the reals"
        )


def _check_operator(operator: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """``(forward, adjoint)`` of a matrix-free problem; ValueError unless two callables."""
    if operator is None:
        raise ValueError("MatrixSensing needs A, or operator=(forward, adjoint) and shape")
    forward, adjoint = operator
    if not callable(forward) or not callable(adjoint):
        raise ValueError("forward and adjoint must be callables")
    return forward, adjoint


def _backend_of(b: Any, dtype: Any) -> tuple[str, Any, Any]:
    """``(backend, dtype, device)`` of a matrix-free problem: those of ``b`` (NumPy for lists),
    ``dtype`` overriding."""
    name = backend_name_of(b) or "numpy"
    be = backend_like(b) if name != "numpy" else None
    if dtype is None and be is not None:
        dtype = be.dtype
    return name, dtype, (be.device if be is not None else None)


def _dense_measurements(A: Any) -> tuple[Any, Backend]:
    """The measurement matrices as a finite, real 3-D array of their backend, with the
    backend. O(k m n)."""
    _require_real(A, "A")
    if backend_name_of(A) is None:
        A = np.asarray(A, dtype=np.float64)
    if len(A.shape) != 3:
        raise ValueError(
            f"A must be a (k, m, n) array of measurement matrices, got shape {tuple(A.shape)}"
        )
    be = backend_like(A)
    if int(A.shape[0]) == 0:
        raise ValueError("A holds no measurement matrices (k = 0)")
    A = be.asarray(A)
    if not be.all_finite(A):
        raise ValueError("A contains non-finite values")
    return A, be


def _measurements(be: Backend, b: Any) -> Any:
    """The measurements as a finite, real 1-D array of the problem's backend ``be``. O(k)."""
    _require_real(b, "b")
    b = be.asarray(b)
    if len(b.shape) != 1:
        raise ValueError(f"b must be a 1-D vector of measurements, got shape {tuple(b.shape)}")
    if not be.all_finite(b):
        raise ValueError("b contains non-finite values")
    return b
