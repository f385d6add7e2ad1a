r"""Sampling a low-rank matrix at a set of entries: the hot spot of matrix completion.

With ``X = A B^T`` and the observed entries ``Omega = {(rows[k], cols[k])}``::

    out[k] = sum_c A[rows[k], c] * B[cols[k], c],      k = 0 .. |Omega| - 1

which costs O(|Omega| r) arithmetic and |Omega| random row reads of ``B`` (rows of ``A`` are
read in order when Omega is sorted row-major). NumPy needs two gathers into |Omega| x r
temporaries plus an ``einsum`` (about 1-2.5 ms for 60k entries at r = 10 on a 2-core x86);
the numba loop reads each row once and writes one number per entry (about 0.4 ms serial,
0.2 ms on two threads; see ``benchmarks/sampling_kernels.py``).

NumPy inputs use the numba kernels :data:`SAMPLE` and :data:`RESIDUAL` when numba is
importable (see :mod:`~rankopt.problems._kernels.jit`) and a chunked NumPy fallback otherwise.
Torch / CuPy inputs use the same gather-multiply-sum, chunked, in their own namespace (they are
array-API arrays: indexing, ``*`` and ``sum`` behave alike).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..._backend import backend_like
from .jit import HAVE_NUMBA, TwinKernel

__all__ = [
    "CHUNK",
    "GPU_CHUNK",
    "SAMPLE",
    "RESIDUAL",
    "sample_lowrank",
    "sampled_residual",
    "sample_lowrank_numpy",
    "warmup",
]

#: Entries per chunk in the NumPy / array-API fallback (bounds the two |chunk| x r
#: temporaries to about 2 * 32768 * r * 8 bytes).
CHUNK = 32_768
#: Entries per chunk on a GPU (temporaries of 2 * GPU_CHUNK * k numbers: 320 MB at k = 20).
GPU_CHUNK = 1 << 20

#: ``out[k] = <A[rows[k]], B[cols[k]]>`` (:func:`~rankopt.problems._kernels.loops.sample`).
SAMPLE = TwinKernel("sample")
#: The same, minus ``b[k]``, returning the squared norm
#: (:func:`~rankopt.problems._kernels.loops.residual`).
RESIDUAL = TwinKernel("residual")


def warmup(parallel: bool | None = None) -> float:
    """Load (or compile) the numba kernels for float64 data and int32/int64 indices now.

    The first call in a process costs about 1-2 s (numba's own start-up plus loading the
    cached machine code, or compiling it on the very first run); call this before timing
    a solver. ``parallel``: the serial (False), parallel (True) or both (None) twins.
    Returns the seconds spent. No-op without numba.
    """
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


def _on_gpu(a: Any) -> bool:
    """Whether an array lives on a GPU (a CUDA torch tensor, or any CuPy array)."""
    dev = getattr(a, "device", None)
    if getattr(dev, "type", None) is not None:  # torch
        return dev.type != "cpu"
    return type(a).__module__.split(".")[0] == "cupy"


def _sample_xp(A: Any, B: Any, rows: Any, cols: Any, out: Any) -> Any:
    """Array-API version (torch, cupy): chunked gather, multiply, sum.

    Chunks of ``CHUNK`` entries on the CPU (cache-sized temporaries) and ``GPU_CHUNK`` on a
    GPU (fewer, larger kernel launches: 60 million entries would otherwise take 1800 launches
    of each kernel)."""
    size = GPU_CHUNK if _on_gpu(A) else CHUNK
    for lo in range(0, int(rows.shape[0]), size):
        hi = min(lo + size, int(rows.shape[0]))
        out[lo:hi] = (A[rows[lo:hi]] * B[cols[lo:hi]]).sum(1)
    return out


def _xp_empty(like: Any, size: int) -> Any:
    """A length-``size`` output in the namespace, dtype and device of ``like`` (uninitialized
    for torch, zeros otherwise; every entry is written next)."""
    if hasattr(like, "new_empty"):  # torch
        return like.new_empty((size,))
    return backend_like(like).zeros((size,))


def _use_numba(use_numba: bool | None) -> bool:
    """The ``use_numba`` argument resolved: default on when numba imports; ImportError when
    forced without numba."""
    if use_numba is None:
        return HAVE_NUMBA
    if use_numba and not HAVE_NUMBA:
        raise ImportError("use_numba=True but numba is not installed: pip install numba")
    return bool(use_numba)


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
        if not _use_numba(use_numba):
            return sample_lowrank_numpy(A, B, rows, cols, out)
        return SAMPLE(parallel)(A, B, rows, cols, out)
    if out is None:
        out = _xp_empty(A, int(rows.shape[0]))
    return _sample_xp(A, B, rows, cols, out)


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
            return float(RESIDUAL(parallel)(A, B, rows, cols, b, out))
        sample_lowrank(A, B, rows, cols, out, use_numba=use_numba)
        np.subtract(out, b, out=out)
        return float(np.dot(out, out))
    sample_lowrank(A, B, rows, cols, out)
    out -= b
    return float((out * out).sum())
