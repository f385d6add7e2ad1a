"""Small typed containers: points, tangent vectors and factored matrices.

They hold arrays of any backend and support ``+``, ``-``, scalar ``*`` and ``/`` (with NumPy
scalars on either side: ``__array_ufunc__ = None`` makes NumPy defer to us).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Number
from typing import Any

import numpy as np


def _is_scalar(a: Any) -> bool:
    if isinstance(a, (Number, np.number)):
        return True
    shape = getattr(a, "shape", None)
    return shape is not None and len(shape) == 0


@dataclass(frozen=True, eq=False)
class LowRankMatrix:
    """The matrix ``A @ B.T`` kept in factored form.

    Attributes
    ----------
    A : array, shape (m, k)
    B : array, shape (n, k)

    Sums concatenate factors (``A1 B1^T + A2 B2^T = [A1, A2] [B1, B2]^T``), so the rank bound
    grows; call :meth:`FixedRankManifold.from_matrix` to recompress.
    """

    A: Any
    B: Any

    __array_ufunc__ = None

    def __post_init__(self):
        if len(self.A.shape) != 2 or len(self.B.shape) != 2:
            raise ValueError(
                f"LowRankMatrix factors must be 2-D, got A{tuple(self.A.shape)} and B{tuple(self.B.shape)}"
            )
        if self.A.shape[1] != self.B.shape[1]:
            raise ValueError(
                "LowRankMatrix factors need the same number of columns, got "
                f"A{tuple(self.A.shape)} and B{tuple(self.B.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.A.shape[0]), int(self.B.shape[0]))

    @property
    def rank_bound(self) -> int:
        return int(self.A.shape[1])

    @property
    def T(self) -> LowRankMatrix:
        return LowRankMatrix(self.B, self.A)

    def _concat(self, a, b):
        from ._backend import backend_like

        return backend_like(a).concat([a, b], axis=1)

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
        if not _is_scalar(a):
            return NotImplemented
        return LowRankMatrix(self.A * a, self.B)

    __rmul__ = __mul__

    def __truediv__(self, a: Any) -> LowRankMatrix:
        if not _is_scalar(a):
            return NotImplemented
        return LowRankMatrix(self.A / a, self.B)

    def to_dense(self) -> Any:
        """The m x n array ``A @ B.T`` (small problems and tests only)."""
        return self.A @ self.B.T

    def __matmul__(self, other: Any) -> Any:
        return self.A @ (self.B.T @ other)

    def fro_norm(self) -> float:
        """Frobenius norm, via QR of both factors: O((m+n) k^2), accurate to eps * norm."""
        from ._backend import backend_like

        be = backend_like(self.A)
        if self.rank_bound == 0:
            return 0.0
        _, ra = be.qr(self.A)
        _, rb = be.qr(self.B)
        return float(be.xp.sqrt(be.sum_sq(ra @ rb.T)))


@dataclass(frozen=True, eq=False)
class FixedRankPoint:
    """A point ``X = U diag(s) V^T`` on the manifold of rank-r matrices.

    Attributes
    ----------
    U : array, shape (m, r), orthonormal columns
    s : array, shape (r,), positive (rankopt keeps them in descending order)
    V : array, shape (n, r), orthonormal columns
    """

    U: Any
    s: Any
    V: Any

    __array_ufunc__ = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.U.shape[0]), int(self.V.shape[0]))

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    def to_lowrank(self) -> LowRankMatrix:
        """``X`` as ``LowRankMatrix(U diag(s), V)``."""
        return LowRankMatrix(self.U * self.s[None, :], self.V)

    def to_dense(self) -> Any:
        return (self.U * self.s[None, :]) @ self.V.T

    # point arithmetic leaves the manifold: sums are LowRankMatrix, scalings stay points
    def __add__(self, other: Any) -> LowRankMatrix:
        return self.to_lowrank() + other

    __radd__ = __add__

    def __sub__(self, other: Any) -> LowRankMatrix:
        return self.to_lowrank() - other

    def __rsub__(self, other: Any) -> LowRankMatrix:
        return other - self.to_lowrank()

    def __neg__(self) -> FixedRankPoint:
        return FixedRankPoint(-self.U, self.s, self.V)

    def __mul__(self, a: Any) -> FixedRankPoint:
        if not _is_scalar(a):
            return NotImplemented
        if float(a) == 0.0:
            raise ValueError("scaling a FixedRankPoint by 0 leaves the manifold (rank 0)")
        if float(a) < 0:
            return FixedRankPoint(-self.U, self.s * (-a), self.V)
        return FixedRankPoint(self.U, self.s * a, self.V)

    __rmul__ = __mul__

    def __truediv__(self, a: Any) -> FixedRankPoint:
        if not _is_scalar(a):
            return NotImplemented
        return self * (1.0 / a)

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
    """A tangent vector ``xi = U M V^T + Up V^T + U Vp^T`` at a point ``(U, s, V)``.

    Attributes
    ----------
    M : array, shape (r, r)
    Up : array, shape (m, r), with ``U^T Up = 0``
    Vp : array, shape (n, r), with ``V^T Vp = 0``

    Linear combinations are taken componentwise, which is exact for vectors at the same point.
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

    def __mul__(self, a: Any) -> TangentVector:
        if not _is_scalar(a):
            return NotImplemented
        return TangentVector(self.M * a, self.Up * a, self.Vp * a)

    __rmul__ = __mul__

    def __truediv__(self, a: Any) -> TangentVector:
        if not _is_scalar(a):
            return NotImplemented
        return TangentVector(self.M / a, self.Up / a, self.Vp / a)

    def axpy(self, a: Any, other: TangentVector) -> TangentVector:
        """``self + a * other`` in one pass."""
        return TangentVector(self.M + a * other.M, self.Up + a * other.Up, self.Vp + a * other.Vp)

    def __iter__(self):
        yield self.M
        yield self.Up
        yield self.Vp
