"""Small typed containers: points, tangent vectors and factored matrices.

They hold arrays of any backend and support ``+``, ``-``, scalar ``*`` and ``/`` (with NumPy
scalars on either side: ``__array_ufunc__ = None`` makes NumPy defer to us).

Every container may hold a *stack* of same-shape matrices: arrays with leading batch dimensions
``(...)`` in front of the matrix dimensions (``U: (..., m, r)``, ``s: (..., r)``), as geoopt's
last-dimensions convention and torch.optim's multi-tensor kernels do. One matrix is the case
with no leading dimension. Tangent vectors and factored matrices also accept per-item
coefficients: an array of shape ``(...)`` multiplies each matrix of the stack by its own number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Number
from typing import Any

import numpy as np


def _is_scalar(a: Any) -> bool:
    if isinstance(a, (Number, np.number)):
        return True
    shape = getattr(a, "shape", None)
    return shape is not None and len(shape) == 0


def _coefficient(a: Any, batch_shape: tuple[int, ...]) -> Any:
    """``a`` ready to multiply ``(..., p, q)`` arrays: a scalar, or per-item values ``(...)``.

    Returns ``NotImplemented`` for anything else (so Python tries the other operand).
    """
    if _is_scalar(a):
        return a
    shape = getattr(a, "shape", None)
    if shape is not None and len(batch_shape) > 0 and tuple(shape) == tuple(batch_shape):
        return a[..., None, None]
    return NotImplemented


def _batch_of(a: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in a.shape[:-2])


def _real_factor(a: Any, what: str) -> float:
    """A scalar factor of a point as a float; raises unless it is real and finite."""
    if isinstance(a, complex) or "complex" in str(getattr(a, "dtype", "")):
        raise TypeError(f"cannot {what} the complex number {a!r}: rankopt points are real")
    c = float(a)
    if not math.isfinite(c):
        raise ValueError(
            f"cannot {what} {c}: the factor must be a finite nonzero real number (the result "
            "would have non-finite singular values, which is not a point of the manifold)"
        )
    return c


def _check_scaled(s: Any, c: float) -> None:
    """Raise unless the scaled singular values are finite and positive (O(r), one host read)."""
    if not bool(((s > 0) & (s < math.inf)).all()):
        raise ValueError(
            f"scaling a FixedRankPoint by {c:g} makes its singular values overflow to inf or "
            "underflow to 0 (not a point of the manifold); rescale the factor"
        )


def _no_point_plus_tangent(other: Any) -> None:
    """A clear error for ``x + xi``: a tangent vector only makes sense through the manifold."""
    if isinstance(other, TangentVector):
        raise TypeError(
            "adding or subtracting a TangentVector and a FixedRankPoint is not defined: a "
            "tangent vector is stored in the point's frame (M, Up, Vp). Use "
            "manifold.retraction(x, xi) to move along it, or manifold.embed(x, xi) for the "
            "ambient matrix (a LowRankMatrix) to add to x"
        )


@dataclass(frozen=True, eq=False)
class LowRankMatrix:
    """The matrix ``A @ B.T`` kept in factored form (or a stack of them).

    Attributes
    ----------
    A : array, shape (..., m, k)
    B : array, shape (..., n, k)

    Sums concatenate factors (``A1 B1^T + A2 B2^T = [A1, A2] [B1, B2]^T``), so the rank bound
    grows; call :meth:`FixedRankManifold.from_matrix` to recompress.
    """

    A: Any
    B: Any

    __array_ufunc__ = None

    def __post_init__(self):
        a, b = tuple(self.A.shape), tuple(self.B.shape)
        if len(a) < 2 or len(b) < 2:
            raise ValueError(
                f"LowRankMatrix factors must be (stacks of) matrices, got A{a} and B{b}"
            )
        if a[:-2] != b[:-2]:
            raise ValueError(
                f"LowRankMatrix factors need the same leading dimensions, got A{a} and B{b}"
            )
        if a[-1] != b[-1]:
            raise ValueError(
                f"LowRankMatrix factors need the same number of columns, got A{a} and B{b}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """Matrix shape ``(m, n)`` (of each matrix of a stack)."""
        return (int(self.A.shape[-2]), int(self.B.shape[-2]))

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading (stack) dimensions; ``()`` for one matrix."""
        return _batch_of(self.A)

    @property
    def rank_bound(self) -> int:
        return int(self.A.shape[-1])

    @property
    def T(self) -> LowRankMatrix:
        return LowRankMatrix(self.B, self.A)

    def _concat(self, a, b):
        from ._backend import backend_like

        return backend_like(a).concat([a, b], axis=-1)

    def __add__(self, other: Any) -> LowRankMatrix:
        if isinstance(other, FixedRankPoint):
            other = other.to_lowrank()
        if not isinstance(other, LowRankMatrix):
            return NotImplemented
        if other.shape != self.shape:
            raise ValueError(f"cannot add LowRankMatrix of shapes {self.shape} and {other.shape}")
        return LowRankMatrix(self._concat(self.A, other.A), self._concat(self.B, other.B))

    __radd__ = __add__

    def __neg__(self) -> LowRankMatrix:
        return LowRankMatrix(-self.A, self.B)

    def __sub__(self, other: Any) -> LowRankMatrix:
        if isinstance(other, FixedRankPoint):
            other = other.to_lowrank()
        if not isinstance(other, LowRankMatrix):
            return NotImplemented
        return self + (-other)

    def __rsub__(self, other: Any) -> LowRankMatrix:
        return (-self) + other

    def __mul__(self, a: Any) -> LowRankMatrix:
        a = _coefficient(a, self.batch_shape)
        if a is NotImplemented:
            return NotImplemented
        return LowRankMatrix(self.A * a, self.B)

    __rmul__ = __mul__

    def __truediv__(self, a: Any) -> LowRankMatrix:
        a = _coefficient(a, self.batch_shape)
        if a is NotImplemented:
            return NotImplemented
        return LowRankMatrix(self.A / a, self.B)

    def to_dense(self) -> Any:
        """The ``(..., m, n)`` array ``A @ B^T`` (small problems and tests only)."""
        return self.A @ self.B.swapaxes(-1, -2)

    def __matmul__(self, other: Any) -> Any:
        return self.A @ (self.B.swapaxes(-1, -2) @ other)

    def fro_norm(self) -> Any:
        """Frobenius norm via QR of both factors: O((m+n) k^2), accurate to eps * norm.

        A float for one matrix; an array of shape ``(...)`` for a stack.
        """
        from ._backend import backend_like

        be = backend_like(self.A)
        if self.rank_bound == 0:
            return 0.0 if not self.batch_shape else be.zeros(self.batch_shape)
        _, ra = be.qr(self.A)
        _, rb = be.qr(self.B)
        out = be.xp.sqrt(be.sum_sq(ra @ rb.swapaxes(-1, -2)))
        return float(out) if not self.batch_shape else out


@dataclass(frozen=True, eq=False)
class FixedRankPoint:
    """A point ``X = U diag(s) V^T`` on the manifold of rank-r matrices (or a stack of them).

    Attributes
    ----------
    U : array, shape (..., m, r), orthonormal columns
    s : array, shape (..., r), positive (rankopt keeps them in descending order)
    V : array, shape (..., n, r), orthonormal columns
    """

    U: Any
    s: Any
    V: Any

    __array_ufunc__ = None

    @property
    def shape(self) -> tuple[int, int]:
        """Matrix shape ``(m, n)`` (of each matrix of a stack)."""
        return (int(self.U.shape[-2]), int(self.V.shape[-2]))

    @property
    def rank(self) -> int:
        return int(self.s.shape[-1])

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading (stack) dimensions; ``()`` for one point."""
        return _batch_of(self.U)

    def to_lowrank(self) -> LowRankMatrix:
        """``X`` as ``LowRankMatrix(U diag(s), V)``."""
        return LowRankMatrix(self.U * self.s[..., None, :], self.V)

    def to_dense(self) -> Any:
        return (self.U * self.s[..., None, :]) @ self.V.swapaxes(-1, -2)

    # point arithmetic leaves the manifold: sums are LowRankMatrix, scalings stay points
    def __add__(self, other: Any) -> LowRankMatrix:
        _no_point_plus_tangent(other)
        return self.to_lowrank() + other

    __radd__ = __add__

    def __sub__(self, other: Any) -> LowRankMatrix:
        _no_point_plus_tangent(other)
        return self.to_lowrank() - other

    def __rsub__(self, other: Any) -> LowRankMatrix:
        _no_point_plus_tangent(other)
        return other - self.to_lowrank()

    def __neg__(self) -> FixedRankPoint:
        return FixedRankPoint(-self.U, self.s, self.V)

    def __mul__(self, a: Any) -> FixedRankPoint:
        """``a X`` for a finite nonzero real scalar ``a``: a point again (``s`` scaled by ``|a|``).

        Raises ``ValueError`` when ``a`` is 0, nan or inf, or when the scaled singular values
        overflow or underflow (the result would not be a rank-r point). O(r).
        """
        if not _is_scalar(a):
            return NotImplemented
        c = _real_factor(a, "scale a FixedRankPoint by")
        if c == 0.0:
            raise ValueError("scaling a FixedRankPoint by 0 leaves the manifold (rank 0)")
        out = (
            FixedRankPoint(-self.U, self.s * (-a), self.V)
            if c < 0
            else FixedRankPoint(self.U, self.s * a, self.V)
        )
        _check_scaled(out.s, c)
        return out

    __rmul__ = __mul__

    def __truediv__(self, a: Any) -> FixedRankPoint:
        """``X / a`` for a finite nonzero real scalar ``a`` (see :meth:`__mul__`)."""
        if not _is_scalar(a):
            return NotImplemented
        c = _real_factor(a, "divide a FixedRankPoint by")
        if c == 0.0:
            raise ValueError("cannot divide a FixedRankPoint by 0 (the result is not a matrix)")
        return self * (1.0 / c)

    # Pymanopt-style unpacking: ``u, s, vt = point`` as with Pymanopt's FixedRankEmbedded
    @property
    def Vt(self) -> Any:
        """``V^T`` (r x n), the third factor in Pymanopt's ``(u, s, vt)`` convention."""
        return self.V.T

    def __iter__(self):
        """``u, s, vt = point``: yields ``U``, ``s`` and ``V^T`` (Pymanopt's order and layout).

        The third item is ``V^T`` (r x n), not the field ``V`` (n x r), so that
        ``u @ np.diag(s) @ vt`` is ``X`` as in Pymanopt; use ``point.V`` for ``V``.
        """
        return iter((self.U, self.s, self.V.T))

    def __len__(self) -> int:
        return 3


@dataclass(frozen=True, eq=False)
class TangentVector:
    """A tangent vector ``xi = U M V^T + Up V^T + U Vp^T`` at a point ``(U, s, V)`` (or a stack).

    Attributes
    ----------
    M : array, shape (..., r, r)
    Up : array, shape (..., m, r), with ``U^T Up = 0``
    Vp : array, shape (..., n, r), with ``V^T Vp = 0``

    Linear combinations are taken componentwise, which is exact for vectors at the same point.
    Coefficients may be scalars or per-item arrays of shape ``(...)``.
    """

    M: Any
    Up: Any
    Vp: Any

    __array_ufunc__ = None

    def __add__(self, other: Any) -> TangentVector:
        if not isinstance(other, TangentVector):
            return NotImplemented
        return TangentVector(self.M + other.M, self.Up + other.Up, self.Vp + other.Vp)

    def __radd__(self, other: Any) -> TangentVector:
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) support
            return self
        return self.__add__(other)

    def __sub__(self, other: Any) -> TangentVector:
        if not isinstance(other, TangentVector):
            return NotImplemented
        return TangentVector(self.M - other.M, self.Up - other.Up, self.Vp - other.Vp)

    def __neg__(self) -> TangentVector:
        return TangentVector(-self.M, -self.Up, -self.Vp)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading (stack) dimensions; ``()`` for one vector."""
        return _batch_of(self.M)

    def __mul__(self, a: Any) -> TangentVector:
        a = _coefficient(a, self.batch_shape)
        if a is NotImplemented:
            return NotImplemented
        return TangentVector(self.M * a, self.Up * a, self.Vp * a)

    __rmul__ = __mul__

    def __truediv__(self, a: Any) -> TangentVector:
        a = _coefficient(a, self.batch_shape)
        if a is NotImplemented:
            return NotImplemented
        return TangentVector(self.M / a, self.Up / a, self.Vp / a)

    def axpy(self, a: Any, other: TangentVector) -> TangentVector:
        """``self + a * other`` (``a`` a scalar or per-item values of shape ``(...)``)."""
        a = _coefficient(a, self.batch_shape)
        if a is NotImplemented:
            raise ValueError("axpy takes a scalar or an array of the stack's shape (...)")
        return TangentVector(self.M + a * other.M, self.Up + a * other.Up, self.Vp + a * other.Vp)

    def __iter__(self):
        yield self.M
        yield self.Up
        yield self.Vp
