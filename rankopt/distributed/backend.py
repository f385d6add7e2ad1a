r"""The backend of distributed points: :class:`DaskBackend`.

A :class:`rankopt._backend.Backend` whose tall arrays (m x k and n x k: factors, tangent
components, random probes) are :class:`~rankopt.distributed.arrays.BlockedArray` row blocks on
the cluster, and whose small arrays (r x r, 2r x 2r, singular values) are NumPy arrays on the
client. :class:`rankopt.geometry.Geometry` runs on it unchanged: its operations reach the
workers through the blocked arrays' operators and through the methods overridden here (QR by
:func:`~rankopt.distributed.arrays.tsqr`, Gram matrices and inner products by tree reductions,
products with the distributed observation matrix through :class:`DistributedOperator`).

A NumPy array given to :meth:`DaskBackend.asarray` becomes blocked when it is tall with m or n
rows (``shape[0] > shape[1]``), and stays on the client otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._backend import Backend, make_backend
from . import _dask
from .arrays import BlockedArray, Transposed, flush, from_numpy, tsqr, zeros
from .arrays import vdot as blocked_vdot

__all__ = ["DaskBackend", "DistributedOperator", "is_dask_array"]


def is_dask_array(x: Any) -> bool:
    """Whether ``x`` is a ``dask.array.Array`` (checked without importing dask)."""
    return type(x).__module__.startswith("dask.array")


class DistributedOperator:
    """Base class of ambient matrices that live on the cluster (the gradient of distributed
    completion, :class:`rankopt.distributed.observed.ObservedMatrix`): the backend treats
    them as sparse and calls their ``matmul(B)`` and ``rmatmul(A)`` (``Z B``, ``Z^T A`` for
    BlockedArrays) and reads their ``values`` (a 1-D dask array)."""

    shape: tuple[int, int]
    dtype: Any = np.dtype(np.float64)
    ndim = 2
    backend: Any = None

    def __rankopt_backend__(self) -> Any:
        return self.backend

    def matmul(self, B: BlockedArray) -> BlockedArray:  # pragma: no cover - abstract
        raise NotImplementedError

    def rmatmul(self, A: BlockedArray) -> BlockedArray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def values(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class _Namespace:
    """The array namespace of :class:`DaskBackend`: NumPy's (array-api-compat) for NumPy and
    dask arguments; for blocked arguments the few functions the geometry uses."""

    def __getattr__(self, name: str) -> Any:
        import array_api_compat.numpy as xnp

        base = getattr(xnp, name)
        if not callable(base) or name == "linalg":
            return base

        def dispatch(*args: Any, **kw: Any) -> Any:
            blocked = [a for a in args if isinstance(a, (BlockedArray, Transposed))]
            if not blocked:
                return base(*args, **kw)
            if name == "zeros_like" and isinstance(args[0], BlockedArray):
                a = args[0]
                return zeros(a.row_chunks, a.shape[1], a.dtype, a.backend)
            if name == "astype" and isinstance(args[0], BlockedArray):
                return args[0].astype(args[1])
            raise NotImplementedError(
                f"{name}() is not available for rankopt.distributed arrays (row-blocked Dask "
                "arrays); the distributed problems support the Euclidean metric and the "
                "solvers of rankopt.solve"
            )

        return dispatch


_XP = _Namespace()


@dataclass(frozen=True)
class DaskBackend(Backend):
    """Backend of a distributed problem: blocked tall arrays on the cluster, NumPy small ones.

    Parameters
    ----------
    name : str
        ``"dask"``.
    dtype : numpy dtype
        float64 (the only dtype of the distributed problems).
    device : None
    row_chunks, col_chunks : tuple of int
        Rows per block of the m-side (``U``, ``Up``) and n-side (``V``, ``Vp``) factors; equal
        when m = n.
    """

    row_chunks: tuple[int, ...] = ()
    col_chunks: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the matrices whose factors this backend holds."""
        return (sum(self.row_chunks), sum(self.col_chunks))

    @property
    def xp(self) -> Any:
        return _XP

    def chunks_for(self, rows: int) -> tuple[int, ...] | None:
        """The row blocks of a tall array with ``rows`` rows (m-side or n-side), else None."""
        m, n = self.shape
        if rows == m:
            return self.row_chunks
        if rows == n:
            return self.col_chunks
        return None

    # -- creation -------------------------------------------------------------
    def asarray(self, a: Any) -> Any:
        """Blocked arrays stay (cast to the dtype); tall m x k or n x k arrays (NumPy or dask)
        become blocked; everything else is a NumPy array on the client."""
        if isinstance(a, BlockedArray):
            return a.astype(self.dtype)
        if isinstance(a, Transposed):
            raise ValueError("a transposed BlockedArray cannot be converted; use .T")
        if is_dask_array(a):
            chunks = self.chunks_for(int(a.shape[0])) if a.ndim == 2 else None
            if chunks is None:
                return a.astype(self.dtype)
            return BlockedArray(a.astype(self.dtype).rechunk((chunks, -1)), self)
        a = make_backend("numpy", self.dtype).asarray(a)
        if a.ndim == 2 and a.shape[0] > a.shape[1]:
            chunks = self.chunks_for(a.shape[0])
            if chunks is not None:
                return from_numpy(a, chunks, self)
        return a

    def zeros(self, shape: tuple[int, ...]) -> Any:
        chunks = self.chunks_for(shape[0]) if len(shape) == 2 and shape[0] > shape[1] else None
        if chunks is not None:
            return zeros(chunks, shape[1], self.dtype, self)
        return np.zeros(shape, dtype=self.dtype)

    # -- linear algebra -------------------------------------------------------
    def qr(self, a: Any) -> tuple[Any, Any]:
        """Tall-skinny QR of a blocked array (:func:`~rankopt.distributed.arrays.tsqr`);
        NumPy's QR of a small one."""
        if isinstance(a, BlockedArray):
            return tsqr(a)
        return np.linalg.qr(a)

    def svd(self, a: Any) -> tuple[Any, Any, Any]:
        r"""Thin SVD. Blocked ``A = Q R`` (TSQR), ``R = W S Z^T``: ``(Q W, S, Z^T)``;
        transposed ``A^T = Z S (Q W)^T``: ``(Z, S, (Q W)^T)``. O(m k^2) on the workers, the
        k x k SVD on the client."""
        if isinstance(a, Transposed):
            U, s, Vh = self.svd(a.base)
            return Vh.T, s, Transposed(U)
        if isinstance(a, BlockedArray):
            Q, R = tsqr(a)
            W, s, Zh = np.linalg.svd(R, full_matrices=False)
            return Q @ W, s, Zh
        return np.linalg.svd(a, full_matrices=False)

    def concat(self, arrays: list[Any], axis: int = 0) -> Any:
        """Column concatenation of blocked arrays (tall NumPy ones are blocked first); NumPy
        concatenation otherwise."""
        if not any(isinstance(a, BlockedArray) for a in arrays):
            return np.concatenate(arrays, axis=axis)
        if axis not in (-1, 1):
            raise ValueError("BlockedArrays are concatenated along their columns only")
        parts = [self.asarray(a) for a in arrays]
        _, da, _ = _dask.require()
        joined = da.concatenate([p.dask for p in parts], axis=1)
        return BlockedArray(joined.rechunk({1: -1}), self)

    def vdot(self, a: Any, b: Any) -> Any:
        """``sum(a * b)``: a lazy 0-d dask array for blocked or dask operands (one number per
        block moves), NumPy's ``vdot`` for small ones."""
        if isinstance(a, BlockedArray) and isinstance(b, BlockedArray):
            return blocked_vdot(a, b)
        if is_dask_array(a) or is_dask_array(b):
            return (a * b).sum()
        if isinstance(a, (BlockedArray, Transposed)) or isinstance(b, (BlockedArray, Transposed)):
            raise ValueError("vdot of a BlockedArray needs another BlockedArray of its shape")
        return np.asarray(np.vdot(a, b))

    def rowdot(self, a: Any, b: Any, c: Any = None, d: Any = None) -> Any:
        if isinstance(a, BlockedArray):
            raise NotImplementedError(
                "row norms of distributed tangent vectors are not available (metrics other "
                "than the Euclidean one are not supported by rankopt.distributed)"
            )
        return super().rowdot(a, b, c, d)

    # -- host values ------------------------------------------------------------
    def to_float(self, a: Any) -> float:
        """A number on the client (a synchronization for lazy dask scalars)."""
        if is_dask_array(a):
            flush()
            return float(_dask.compute(a)[0])
        return float(a)

    def all_finite(self, a: Any) -> bool:
        if isinstance(a, BlockedArray):
            a = a.dask
        if is_dask_array(a):
            _, da, _ = _dask.require()
            flush()
            return bool(_dask.compute(da.isfinite(a).all())[0])
        return bool(np.all(np.isfinite(a)))

    def to_numpy(self, a: Any) -> np.ndarray:
        """NumPy copy on the client (blocked and dask arrays are gathered: O(size) moved)."""
        if isinstance(a, BlockedArray):
            return a.compute()
        if is_dask_array(a):
            flush()
            return np.asarray(_dask.compute(a)[0])
        return np.asarray(a)

    # -- ambient matrices ---------------------------------------------------------
    def is_sparse(self, z: Any) -> bool:
        return isinstance(z, DistributedOperator)

    def matmul_sparse(self, z: Any, b: Any) -> Any:
        return z.matmul(self.asarray(b))

    def rmatmul_sparse(self, z: Any, a: Any) -> Any:
        return z.rmatmul(self.asarray(a))

    def sparse_values(self, z: Any) -> Any:
        return z.values

    def sparse_to_dtype(self, z: Any) -> Any:
        return z

    def device_of(self, a: Any) -> Any:
        return None

    def same_device(self, a: Any) -> bool:
        return True
