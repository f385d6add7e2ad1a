r"""Compiled kernels for sampling low-rank matrices at a set of entries.

The hot spot of matrix completion is sampling ``X = A B^T`` at the observed entries
``Omega = {(rows[k], cols[k])}``::

    out[k] = sum_c A[rows[k], c] * B[cols[k], c],      k = 0 .. |Omega| - 1

which costs O(|Omega| r) arithmetic and |Omega| random row reads of ``B`` (rows of ``A`` are
read in order when Omega is sorted row-major). NumPy needs two gathers into |Omega| x r
temporaries plus an ``einsum`` (about 1-2.5 ms for 60k entries at r = 10 on a 2-core x86);
the numba loop below reads each row once and writes one number per entry (about 0.4 ms
serial, 0.2 ms on two threads; see ``benchmarks/sampling_kernels.py``).

NumPy inputs use numba when it is importable (``@njit(cache=True)`` with only the
``reassoc`` fast-math flag, so that the length-k dot products are vectorized: 1.5x faster at
k = 20, measured; results differ from the in-order loop by round-off only) and a chunked NumPy
fallback otherwise. Torch / CuPy inputs use the same gather-multiply-sum, chunked, in their
own namespace (they are array-API arrays: indexing, ``*`` and ``sum`` behave alike).

This module also holds the two small constructors of a CSR matrix on a fixed pattern
(scipy for NumPy, ``torch.sparse_csr_tensor`` for torch): ``rankopt._backend`` has no sparse
constructor yet.
"""

from __future__ import annotations

import importlib.util
import warnings
from functools import cache
from typing import Any

import numpy as np

#: Whether numba can be imported. It is imported lazily, on the first kernel call: importing
#: numba and loading its registries costs about 1 s once per process, which users of the
#: dense problems (sensing, generic) should not pay.
HAVE_NUMBA = importlib.util.find_spec("numba") is not None

__all__ = [
    "HAVE_NUMBA",
    "sample_lowrank",
    "sampled_residual",
    "sample_lowrank_numpy",
    "make_csr",
    "warmup",
]

#: Entries per chunk in the NumPy / array-API fallback (bounds the two |chunk| x r
#: temporaries to about 2 * 32768 * r * 8 bytes).
CHUNK = 32_768

prange = range  # becomes numba.prange (range when run as Python) once numba is imported


# --------------------------------------------------------------------------- kernel sources
# Plain Python loops, compiled by numba on first use (see _compiled); run as Python they are
# the reference semantics: each dot product accumulates c = 0 .. k-1 in order. Serial and
# threaded versions are separate functions so that their on-disk cache entries differ.
def _sample_serial(A, B, rows, cols, out):  # pragma: no cover - compiled
    r = A.shape[1]
    for k in range(rows.shape[0]):
        i = rows[k]
        j = cols[k]
        acc = 0.0
        for c in range(r):
            acc += A[i, c] * B[j, c]
        out[k] = acc
    return out


def _sample_parallel(A, B, rows, cols, out):  # pragma: no cover - compiled
    r = A.shape[1]
    for k in prange(rows.shape[0]):
        i = rows[k]
        j = cols[k]
        acc = 0.0
        for c in range(r):
            acc += A[i, c] * B[j, c]
        out[k] = acc
    return out


def _residual_serial(A, B, rows, cols, b, out):  # pragma: no cover - compiled
    r = A.shape[1]
    ss = 0.0
    for k in range(rows.shape[0]):
        i = rows[k]
        j = cols[k]
        acc = 0.0
        for c in range(r):
            acc += A[i, c] * B[j, c]
        acc -= b[k]
        out[k] = acc
        ss += acc * acc
    return ss


def _residual_parallel(A, B, rows, cols, b, out):  # pragma: no cover - compiled
    r = A.shape[1]
    ss = 0.0
    for k in prange(rows.shape[0]):
        i = rows[k]
        j = cols[k]
        acc = 0.0
        for c in range(r):
            acc += A[i, c] * B[j, c]
        acc -= b[k]
        out[k] = acc
        ss += acc * acc
    return ss


@cache
def _compiled(parallel: bool):
    """``(sample, residual)`` numba dispatchers; ``cache=True`` keeps the machine code on disk.

    ``fastmath={"reassoc"}``: the dot products may be reassociated (SIMD), nothing else (no
    flush-to-zero, no nan/inf assumptions); results match the Python loops to round-off.
    """
    global prange
    import numba

    prange = numba.prange
    if parallel:
        opts = {"cache": True, "fastmath": {"reassoc"}, "parallel": True}
        return numba.njit(**opts)(_sample_parallel), numba.njit(**opts)(_residual_parallel)
    opts = {"cache": True, "fastmath": {"reassoc"}, "nogil": True}
    return numba.njit(**opts)(_sample_serial), numba.njit(**opts)(_residual_serial)


def _use_parallel(parallel: bool | None, size: int) -> bool:
    """Serial unless asked: see the ``parallel`` parameter of :func:`sample_lowrank`."""
    return bool(parallel)


def warmup(parallel: bool | None = None) -> float:
    """Load (or compile) the numba kernels for float64 data and int32/int64 indices now.

    The first call in a process costs about 1-2 s (numba's own start-up plus loading the
    cached machine code, or compiling it on the very first run); call this before timing
    a solver. Returns the seconds spent. No-op without numba.
    """
    import time

    t = time.perf_counter()
    if HAVE_NUMBA:
        A = np.zeros((2, 1))
        for idx in (np.int32, np.int64):
            rows = np.zeros(1, dtype=idx)
            for par in (False, True) if parallel is None else (bool(parallel),):
                sample_lowrank(A, A, rows, rows, np.empty(1), parallel=par)
                sampled_residual(A, A, rows, rows, np.zeros(1), np.empty(1), parallel=par)
    return time.perf_counter() - t


def _prepare_numpy(A: np.ndarray, B: np.ndarray, rows: np.ndarray, cols: np.ndarray):
    dtype = np.result_type(A.dtype, B.dtype)
    A = np.ascontiguousarray(A, dtype=dtype)  # O((m + n) k) copies at most; no-ops usually
    B = np.ascontiguousarray(B, dtype=dtype)
    return A, B, np.ascontiguousarray(rows), np.ascontiguousarray(cols), dtype


def _check_shapes(A: Any, B: Any, rows: Any, cols: Any, out: Any) -> None:
    if len(A.shape) != 2 or len(B.shape) != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(
            f"sample_lowrank needs A (m, k) and B (n, k), got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    if rows.shape != cols.shape or len(rows.shape) != 1:
        raise ValueError(
            f"rows and cols must be 1-D of equal length, got {tuple(rows.shape)}, {tuple(cols.shape)}"
        )
    if out is not None and tuple(out.shape) != tuple(rows.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(rows.shape)}")


def sample_lowrank_numpy(
    A: np.ndarray, B: np.ndarray, rows: np.ndarray, cols: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """Pure-NumPy reference: ``out[k] = A[rows[k]] . B[cols[k]]``, in chunks of ``CHUNK``.

    O(|Omega| k) work and O(CHUNK k) temporary memory.
    """
    for lo in range(0, rows.shape[0], CHUNK):
        hi = min(lo + CHUNK, rows.shape[0])
        a = np.take(A, rows[lo:hi], axis=0)
        b = np.take(B, cols[lo:hi], axis=0)
        np.einsum("ij,ij->i", a, b, out=out[lo:hi])
    return out


def _sample_xp(A: Any, B: Any, rows: Any, cols: Any, out: Any) -> Any:
    """Array-API version (torch, cupy): chunked gather, multiply, sum."""
    for lo in range(0, int(rows.shape[0]), CHUNK):
        hi = min(lo + CHUNK, int(rows.shape[0]))
        out[lo:hi] = (A[rows[lo:hi]] * B[cols[lo:hi]]).sum(1)
    return out


def sample_lowrank(
    A: Any,
    B: Any,
    rows: Any,
    cols: Any,
    out: Any = None,
    *,
    parallel: bool | None = None,
    use_numba: bool | None = None,
) -> Any:
    r"""Sample ``A @ B.T`` at the entries ``(rows[k], cols[k])``.

    ``out[k] = sum_c A[rows[k], c] * B[cols[k], c]``: O(|Omega| k) time, no m x n array and
    (with numba) no |Omega| x k temporary.

    Parameters
    ----------
    A : array (m, k)
    B : array (n, k)
    rows, cols : integer arrays (|Omega|,)
        Indices are trusted (the caller validates them once); out-of-range indices are
        undefined behaviour in the compiled kernel.
    out : array (|Omega|,), optional
        Written in place and returned; allocated when None.
    parallel : bool, optional
        Threaded numba kernel (``numba.get_num_threads()`` threads). Off by default: on an
        idle 2-core machine it halves the kernel time (0.4 -> 0.2 ms at |Omega| = 60k,
        k = 10), but numba's OpenMP workers spin-wait and compete with OpenBLAS's threads,
        and on a loaded machine the threaded kernel was measured 5-10x *slower* than the
        serial one (``benchmarks/sampling_kernels.py``).
    use_numba : bool, optional
        Force (True) or forbid (False) the numba kernel for NumPy inputs; default: use it
        when numba imports.

    Returns
    -------
    out : array (|Omega|,)
    """
    _check_shapes(A, B, rows, cols, out)
    if isinstance(A, np.ndarray) and isinstance(B, np.ndarray):
        A, B, rows, cols, dtype = _prepare_numpy(A, B, rows, cols)
        if out is None:
            out = np.empty(rows.shape[0], dtype=dtype)
        if use_numba is None:
            use_numba = HAVE_NUMBA
        if use_numba and not HAVE_NUMBA:
            raise ImportError("use_numba=True but numba is not installed: pip install numba")
        if not use_numba:
            return sample_lowrank_numpy(A, B, rows, cols, out)
        return _compiled(_use_parallel(parallel, rows.shape[0]))[0](A, B, rows, cols, out)
    if out is None:
        out = A.new_empty(rows.shape) if hasattr(A, "new_empty") else _xp_empty(A, rows.shape[0])
    return _sample_xp(A, B, rows, cols, out)


def _xp_empty(like: Any, size: int) -> Any:
    from .._backend import backend_like

    be = backend_like(like)
    return be.zeros((size,))


def sampled_residual(
    A: Any,
    B: Any,
    rows: Any,
    cols: Any,
    b: Any,
    out: Any,
    *,
    parallel: bool | None = None,
    use_numba: bool | None = None,
) -> float:
    r"""Residual at the samples, in place: ``out = P_Omega(A B^T) - b``; returns ``||out||^2``.

    One pass over Omega with numba (O(|Omega| k)); otherwise :func:`sample_lowrank` followed
    by a subtraction and a dot product.
    """
    _check_shapes(A, B, rows, cols, out)
    if isinstance(A, np.ndarray) and isinstance(B, np.ndarray):
        if use_numba is None:
            use_numba = HAVE_NUMBA
        if use_numba and HAVE_NUMBA:
            A, B, rows, cols, _ = _prepare_numpy(A, B, rows, cols)
            kernel = _compiled(_use_parallel(parallel, rows.shape[0]))[1]
            return float(kernel(A, B, rows, cols, b, out))
        sample_lowrank(A, B, rows, cols, out, use_numba=use_numba)
        np.subtract(out, b, out=out)
        return float(np.dot(out, out))
    sample_lowrank(A, B, rows, cols, out)
    out -= b
    return float((out * out).sum())


# --------------------------------------------------------------------------- sparse matrices
def make_csr(
    backend_name: str, data: Any, indices: Any, indptr: Any, shape: tuple[int, int]
) -> Any:
    """A CSR matrix on a fixed pattern, sharing ``indices``/``indptr`` (no copy, no check).

    NumPy: ``scipy.sparse.csr_matrix`` (about 15 us to build: the pattern arrays are int32 or
    int64 already, so scipy does not scan them). Torch: ``torch.sparse_csr_tensor`` with the
    invariant checks off (the pattern was validated once); its beta-status warning is silenced.
    """
    if backend_name == "numpy":
        import scipy.sparse as sp

        return sp.csr_matrix((data, indices, indptr), shape=shape, copy=False)
    if backend_name == "torch":
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                indptr, indices, data, size=shape, check_invariants=False
            )
    if backend_name == "cupy":  # pragma: no cover - needs a GPU
        import cupyx.scipy.sparse as csp

        return csp.csr_matrix((data, indices, indptr), shape=shape)
    raise ValueError(f"unknown backend {backend_name!r}")
