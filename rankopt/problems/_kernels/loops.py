r"""The loops of the compiled kernels, as plain Python functions.

Every function here is a numba kernel source: :class:`~rankopt.problems._kernels.jit.TwinKernel`
compiles it into a serial and a threaded twin (``parallel=False`` / ``True``). The outer loop of
a kernel whose iterations are independent is ``numba.prange``: threaded in the parallel twin,
an ordinary ``range`` in the serial one. Loops whose iterations depend on each other (the
counting sorts) use ``range`` and are only ever compiled serial.

Run as Python (without compilation) the functions are the reference semantics: each dot
product accumulates ``c = 0 .. k-1`` in order (the compiled ones may reassociate it, see
:data:`~rankopt.problems._kernels.jit.JIT_OPTIONS`). numba's ``prange`` runs as ``range`` in
Python too; without numba the loops still run, with ``range``.

This module imports numba, so it is imported when a kernel is first compiled (by
:class:`~rankopt.problems._kernels.jit.TwinKernel`), not with :mod:`rankopt.problems`.
Arguments are trusted: shapes and index ranges are checked by the callers in
:mod:`~rankopt.problems._kernels.sampling`, :mod:`~rankopt.problems._kernels.products` and
:mod:`~rankopt.problems._kernels.blocked`; an out-of-range index is undefined behaviour once
compiled.
"""

from __future__ import annotations

import numpy as np

try:
    from numba import prange
except ImportError:  # pragma: no cover - without numba the loops run as plain Python
    prange = range

#: Type of every array argument (annotations only: numba ignores them).
Array = np.ndarray

__all__ = [
    "sample",
    "residual",
    "csr_matmul",
    "csr_rmatmul",
    "gram_inverses",
    "rowwise_matmul",
    "coo_matmul",
    "coo_rmatmul",
    "sample_project",
    "sample_project_csr",
    "block_sort",
    "block_sort_values",
    "counting_sort",
]


# --------------------------------------------------------------------------- sampling
# out[k] = <A[rows[k]], B[cols[k]]>: O(|Omega| k), |Omega| random row reads of B.
def sample(
    A: Array, B: Array, rows: Array, cols: Array, out: Array
) -> Array:  # pragma: no cover - compiled
    """``out[k] = sum_c A[rows[k], c] B[cols[k], c]``: ``A B^T`` at the entries. O(|Omega| k)."""
    r = A.shape[1]
    for k in prange(rows.shape[0]):
        i = rows[k]
        j = cols[k]
        acc = 0.0
        for c in range(r):
            acc += A[i, c] * B[j, c]
        out[k] = acc
    return out


def residual(
    A: Array, B: Array, rows: Array, cols: Array, b: Array, out: Array
) -> float:  # pragma: no cover - compiled
    """``out[k] = <A[rows[k]], B[cols[k]]> - b[k]``, in place; returns ``||out||^2``. O(|Omega| k)."""
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


# --------------------------------------------------------------------------- CSR products
# Products with the sparse matrix W = P_Omega^*(w) on the fixed CSR pattern (cols, indptr),
# and the per-row Gram matrices of the block-Jacobi preconditioner.
def csr_matmul(
    w: Array, cols: Array, indptr: Array, V: Array, out: Array
) -> Array:  # pragma: no cover - compiled
    """``out = W V`` (m x k), row by row. O(nnz k)."""
    r = V.shape[1]
    for i in prange(indptr.shape[0] - 1):
        for c in range(r):
            out[i, c] = 0.0
        for k in range(indptr[i], indptr[i + 1]):
            j = cols[k]
            a = w[k]
            for c in range(r):
                out[i, c] += a * V[j, c]
    return out


def csr_rmatmul(
    w: Array, cols: Array, indptr: Array, U: Array, bounds: Array, parts: Array
) -> Array:  # pragma: no cover - compiled
    """``parts[t] = W[rows of chunk t]^T U[rows of chunk t]``: chunk t owns rows
    ``bounds[t]..bounds[t+1]-1`` and scatters into its own ``parts[t]`` (summed by the caller).
    O(nnz k + chunks n k)."""
    r = U.shape[1]
    for t in prange(bounds.shape[0] - 1):
        part = parts[t]
        for j in range(part.shape[0]):
            for c in range(r):
                part[j, c] = 0.0
        for i in range(bounds[t], bounds[t + 1]):
            for k in range(indptr[i], indptr[i + 1]):
                j = cols[k]
                a = w[k]
                for c in range(r):
                    part[j, c] += a * U[i, c]
    return parts


def gram_inverses(
    B: Array, idx: Array, ptr: Array, bounds: Array, shift: float, out: Array
) -> Array:  # pragma: no cover - compiled
    """``out[i] = (sum_{k in ptr[i]:ptr[i+1]} B[idx[k]] B[idx[k]]^T + d I)^{-1}`` by Cholesky.

    ``d = shift + 1e-10 tr / r (+ 1e-300)``; chunk t (rows ``bounds[t]..bounds[t+1]-1``) reuses
    its scratch matrices. The Gram matrix of a row gathers its neighbours' rows of ``B`` and
    takes one BLAS product ``X^T X`` (measured 3x faster than accumulating outer products in
    loops, which numba does not vectorize here). O(nnz r^2 + rows r^3).
    """
    r = B.shape[1]
    for t in prange(bounds.shape[0] - 1):
        L = np.empty((r, r))
        for i in range(bounds[t], bounds[t + 1]):
            c = ptr[i + 1] - ptr[i]
            X = np.empty((c, r))
            for k in range(c):
                X[k] = B[idx[ptr[i] + k]]
            G = X.T @ X if c > 0 else np.zeros((r, r))
            tr = 0.0
            for a in range(r):
                tr += G[a, a]
            d = shift + 1e-10 * tr / r + 1e-300
            for a in range(r):
                G[a, a] += d
            for a in range(r):  # Cholesky G = L L^T, lower triangle
                for b in range(a + 1):
                    acc = G[a, b]
                    for c in range(b):
                        acc -= L[a, c] * L[b, c]
                    if a == b:
                        L[a, a] = np.sqrt(acc)
                    else:
                        L[a, b] = acc / L[b, b]
            for a in range(r):  # G <- L^{-1} (lower), in place of G
                G[a, a] = 1.0 / L[a, a]
                for b in range(a):
                    acc = 0.0
                    for c in range(b, a):
                        acc -= L[a, c] * G[c, b]
                    G[a, b] = acc / L[a, a]
            for a in range(r):  # G^{-1} = L^{-T} L^{-1}
                for b in range(a + 1):
                    acc = 0.0
                    for c in range(a, r):
                        acc += G[c, a] * G[c, b]
                    out[i, a, b] = acc
                    out[i, b, a] = acc
    return out


def rowwise_matmul(X: Array, G: Array, out: Array) -> Array:  # pragma: no cover - compiled
    """``out[i] = X[i] @ G[i]`` for a stack of r x r matrices ``G``. O(rows r^2)."""
    r = X.shape[1]
    for i in prange(X.shape[0]):
        for b in range(r):
            acc = 0.0
            for a in range(r):
                acc += X[i, a] * G[i, a, b]
            out[i, b] = acc
    return out


def sample_project(
    A: Array, B: Array, rows: Array, cols: Array, bounds: Array, zv: Array, ztu: Array
) -> Array:  # pragma: no cover - compiled
    """One pass over Omega: ``w = <A_i, B_j>``, ``zv[.][i] += w B[j, :k]``, ``ztu[.][j] += w A[i, k:]``.

    Chunk t (entries ``bounds[t]..bounds[t+1]-1``) writes part t of an output with one part per
    chunk, or part 0 of a shared one (then the chunks own disjoint rows / columns). Products are
    formed in float64 (exact for float32 factors). Indexing ``A[i, k + c]`` with ``k = 2k / 2``
    (not a separate offset argument) keeps the loops vectorized: 40 against 53 ns per entry
    measured at n = 1e5. O(|Omega| k).
    """
    k2 = A.shape[1]
    k = k2 // 2
    sv = 1 if zv.shape[0] > 1 else 0
    su = 1 if ztu.shape[0] > 1 else 0
    for t in prange(bounds.shape[0] - 1):
        pv = zv[t * sv]
        pu = ztu[t * su]
        for e in range(bounds[t], bounds[t + 1]):
            i = rows[e]
            j = cols[e]
            w = 0.0
            for c in range(k2):
                w += np.float64(A[i, c]) * B[j, c]
            for c in range(k):
                pv[i, c] += w * B[j, c]
            for c in range(k):
                pu[j, c] += w * A[i, k + c]
    return zv


def sample_project_csr(
    A: Array, B: Array, cols: Array, indptr: Array, bounds: Array, zv: Array, ztu: Array
) -> Array:  # pragma: no cover - compiled
    """``sample_project`` in CSR order: row i's sum of ``w B[j, :k]`` stays in a local accumulator.

    Chunk t owns rows ``bounds[t]..bounds[t+1]-1`` and scatters into ``ztu[t]`` (or the shared
    ``ztu[0]`` with one chunk). O(|Omega| k).
    """
    k2 = A.shape[1]
    k = k2 // 2
    su = 1 if ztu.shape[0] > 1 else 0
    for t in prange(bounds.shape[0] - 1):
        pu = ztu[t * su]
        acc = np.empty(k)
        for i in range(bounds[t], bounds[t + 1]):
            for c in range(k):
                acc[c] = 0.0
            for e in range(indptr[i], indptr[i + 1]):
                j = cols[e]
                w = 0.0
                for c in range(k2):
                    w += np.float64(A[i, c]) * B[j, c]
                for c in range(k):
                    acc[c] += w * B[j, c]
                for c in range(k):
                    pu[j, c] += w * A[i, k + c]
            for c in range(k):
                zv[i, c] = acc[c]
    return zv


# --------------------------------------------------------------------------- column-block order
# Products on Omega in column-block order (BlockedPattern) and the sorts that build it.
def coo_matmul(
    w: Array, rows: Array, cols: Array, V: Array, bounds: Array, parts: Array
) -> Array:  # pragma: no cover - compiled
    """Chunk t (entries ``bounds[t]..bounds[t+1]-1``) accumulates
    ``parts[t][rows[k]] += w[k] V[cols[k]]``. O(nnz k + chunks m k)."""
    r = V.shape[1]
    for t in prange(bounds.shape[0] - 1):
        part = parts[t]
        for i in range(part.shape[0]):
            for c in range(r):
                part[i, c] = 0.0
        for k in range(bounds[t], bounds[t + 1]):
            i = rows[k]
            j = cols[k]
            a = w[k]
            for c in range(r):
                part[i, c] += a * V[j, c]
    return parts


def coo_rmatmul(
    w: Array, rows: Array, cols: Array, U: Array, bounds: Array, out: Array
) -> Array:  # pragma: no cover - compiled
    """``out[cols[k]] += w[k] U[rows[k]]``; the chunks own disjoint column ranges (whole column
    blocks). O(nnz k)."""
    r = U.shape[1]
    for t in prange(bounds.shape[0] - 1):
        for k in range(bounds[t], bounds[t + 1]):
            i = rows[k]
            j = cols[k]
            a = w[k]
            for c in range(r):
                out[j, c] += a * U[i, c]
    return out


def block_sort(
    rows: Array, cols: Array, width: int, ptr: Array, rows_out: Array, cols_out: Array
) -> Array:  # pragma: no cover - compiled
    """Stable counting sort of the entries by column block ``cols // width`` (serial). O(nnz)."""
    nxt = ptr[:-1].copy()
    for k in range(cols.shape[0]):
        b = cols[k] // width
        q = nxt[b]
        rows_out[q] = rows[k]
        cols_out[q] = cols[k]
        nxt[b] = q + 1
    return rows_out


def block_sort_values(
    cols: Array, width: int, ptr: Array, vals: Array, out: Array
) -> Array:  # pragma: no cover - compiled
    """The same stable counting sort as :func:`block_sort`, applied to a value array. O(nnz)."""
    nxt = ptr[:-1].copy()
    for k in range(cols.shape[0]):
        b = cols[k] // width
        out[nxt[b]] = vals[k]
        nxt[b] += 1
    return out


def counting_sort(
    rows: Array, cols: Array, ptr: Array, out: Array
) -> Array:  # pragma: no cover - compiled
    """The rows of the entries grouped by column, stable (serial). O(nnz)."""
    nxt = ptr[:-1].copy()
    for k in range(cols.shape[0]):
        j = cols[k]
        out[nxt[j]] = rows[k]
        nxt[j] += 1
    return out
