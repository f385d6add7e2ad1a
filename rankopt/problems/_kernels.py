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
    "csr_matmul",
    "csr_rmatmul",
    "gram_inverses",
    "rowwise_matmul",
    "sample_project",
    "sample_project_csr",
    "csc_pattern",
    "row_bounds",
    "threads",
    "BlockedPattern",
    "BLOCK_BYTES",
]

#: Entries per chunk in the NumPy / array-API fallback (bounds the two |chunk| x r
#: temporaries to about 2 * 32768 * r * 8 bytes).
CHUNK = 32_768
#: Entries per chunk on a GPU (temporaries of 2 * GPU_CHUNK * k numbers: 320 MB at k = 20).
GPU_CHUNK = 1 << 20

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


# --------------------------------------------------------------------------- CSR products
# Products with the sparse matrix W = P_Omega^*(w) on the fixed CSR pattern (cols, indptr),
# and the per-row Gram matrices of the block-Jacobi preconditioner. Each source function is
# compiled serially and, separately, with parallel=True (then prange runs on numba's threads).
def _csr_matmul(w, cols, indptr, V, out):  # pragma: no cover - compiled
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


def _csr_rmatmul(w, cols, indptr, U, bounds, parts):  # pragma: no cover - compiled
    # chunk t owns rows bounds[t]..bounds[t+1]-1 and scatters into its own parts[t]
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


def _gram_inverses(B, idx, ptr, bounds, shift, out):  # pragma: no cover - compiled
    # out[i] = (sum_{k in ptr[i]:ptr[i+1]} B[idx[k]] B[idx[k]]^T + d I)^{-1} by Cholesky, with
    # d = shift + 1e-10 tr / r (+ 1e-300); chunk t (rows bounds[t]..bounds[t+1]-1) reuses its
    # scratch matrices
    # the Gram matrix of a row: gather its neighbours' rows of B and one BLAS product X^T X
    # (measured 3x faster than accumulating outer products in loops, which numba does not
    # vectorize here)
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


def _rowwise_matmul(X, G, out):  # pragma: no cover - compiled
    # out[i] = X[i] @ G[i] for a stack of r x r matrices G
    r = X.shape[1]
    for i in prange(X.shape[0]):
        for b in range(r):
            acc = 0.0
            for a in range(r):
                acc += X[i, a] * G[i, a, b]
            out[i, b] = acc
    return out


def _coo_matmul(w, rows, cols, V, bounds, parts):  # pragma: no cover - compiled
    # chunk t (entries bounds[t]..bounds[t+1]-1) accumulates parts[t][rows[k]] += w[k] V[cols[k]]
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


def _coo_rmatmul(w, rows, cols, U, bounds, out):  # pragma: no cover - compiled
    # out[cols[k]] += w[k] U[rows[k]]; chunks own disjoint column ranges (whole column blocks)
    r = U.shape[1]
    for t in prange(bounds.shape[0] - 1):
        for k in range(bounds[t], bounds[t + 1]):
            i = rows[k]
            j = cols[k]
            a = w[k]
            for c in range(r):
                out[j, c] += a * U[i, c]
    return out


def _sample_project(A, B, rows, cols, bounds, zv, ztu):  # pragma: no cover - compiled
    # one pass over Omega: w = <A_i, B_j>, zv[.][i] += w B[j, :k], ztu[.][j] += w A[i, k:];
    # chunk t (entries bounds[t]..bounds[t+1]-1) writes part t of an output with one part
    # per chunk, or part 0 of a shared one (then the chunks own disjoint rows / columns).
    # Products are formed in float64 (exact for float32 factors). Indexing A[i, k + c] with
    # k = 2k / 2 (not a separate offset argument) keeps the loops vectorized: 40 against 53
    # ns per entry measured at n = 1e5.
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


def _sample_project_csr(A, B, cols, indptr, bounds, zv, ztu):  # pragma: no cover - compiled
    # _sample_project in CSR order: row i's sum of w B[j, :k] stays in a local accumulator;
    # chunk t owns rows bounds[t]..bounds[t+1]-1 and scatters into ztu[t] (or the shared
    # ztu[0] with one chunk)
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


def _block_sort(rows, cols, width, ptr, rows_out, cols_out):  # pragma: no cover - compiled
    # stable counting sort of the entries by column block cols // width
    nxt = ptr[:-1].copy()
    for k in range(cols.shape[0]):
        b = cols[k] // width
        q = nxt[b]
        rows_out[q] = rows[k]
        cols_out[q] = cols[k]
        nxt[b] = q + 1
    return rows_out


def _block_sort_values(cols, width, ptr, vals, out):  # pragma: no cover - compiled
    # the same stable counting sort as _block_sort, applied to a value array
    nxt = ptr[:-1].copy()
    for k in range(cols.shape[0]):
        b = cols[k] // width
        out[nxt[b]] = vals[k]
        nxt[b] += 1
    return out


_SOURCES = {
    "block_sort_values": _block_sort_values,
    "sample_project": _sample_project,
    "sample_project_csr": _sample_project_csr,
    "coo_matmul": _coo_matmul,
    "coo_rmatmul": _coo_rmatmul,
    "block_sort": _block_sort,
    "csr_matmul": _csr_matmul,
    "csr_rmatmul": _csr_rmatmul,
    "gram_inverses": _gram_inverses,
    "rowwise_matmul": _rowwise_matmul,
}


@cache
def _compiled_csr(name: str, parallel: bool):
    """numba dispatcher of one CSR kernel (``reassoc`` fast-math only), serial or threaded."""
    global prange
    import numba

    prange = numba.prange
    opts = {"cache": True, "fastmath": {"reassoc"}, "nogil": True}
    fn = _SOURCES[name]
    if parallel:
        return numba.njit(parallel=True, **opts)(fn)
    # a renamed copy, so that the serial machine code is cached apart from the threaded one
    name = fn.__name__ + "_serial"
    code = fn.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):  # Python >= 3.11
        code = code.replace(co_qualname=name)
    serial = type(fn)(code, fn.__globals__, name)
    return numba.njit(**opts)(serial)


def threads(parallel: bool | None) -> int:
    """Threads a kernel call with ``parallel`` runs on: ``numba.get_num_threads()`` or 1."""
    if not parallel:
        return 1
    import numba

    return int(numba.get_num_threads())


def row_bounds(indptr: np.ndarray, parts: int) -> np.ndarray:
    """Row boundaries splitting the entries of a CSR pattern into ``parts`` equal shares."""
    nnz = int(indptr[-1])
    targets = (np.arange(1, parts) * nnz) // parts
    inner = np.searchsorted(indptr, targets, side="left")
    return np.concatenate([[0], inner, [indptr.shape[0] - 1]]).astype(np.int64)


def csr_matmul(
    w: np.ndarray, cols: np.ndarray, indptr: np.ndarray, V: np.ndarray, *, parallel: bool = False
) -> np.ndarray:
    """``W @ V`` for the CSR matrix ``W`` with values ``w`` on the pattern ``(cols, indptr)``.

    O(nnz k); threaded over rows when ``parallel``. numba required."""
    V = np.ascontiguousarray(V, dtype=np.float64)
    out = np.empty((indptr.shape[0] - 1, V.shape[1]))
    return _compiled_csr("csr_matmul", bool(parallel))(w, cols, indptr, V, out)


def csr_rmatmul(
    w: np.ndarray,
    cols: np.ndarray,
    indptr: np.ndarray,
    U: np.ndarray,
    n: int,
    *,
    parallel: bool = False,
) -> np.ndarray:
    """``W^T @ U`` (n x k) by scattering the rows of ``U``: O(nnz k). Threaded: rows split in
    equal-nnz shares, one private n x k accumulator per thread, summed (O(threads n k))."""
    U = np.ascontiguousarray(U, dtype=np.float64)
    t = threads(parallel)
    bounds = row_bounds(np.asarray(indptr), t)
    parts = np.empty((t, int(n), U.shape[1]))
    _compiled_csr("csr_rmatmul", bool(parallel))(w, cols, indptr, U, bounds, parts)
    return parts[0] if t == 1 else parts.sum(axis=0)


def gram_inverses(
    B: np.ndarray, idx: np.ndarray, ptr: np.ndarray, shift: float, *, parallel: bool = False
) -> np.ndarray:
    r"""``(sum_{k in row i} B_{idx_k} B_{idx_k}^T + shift I)^{-1}`` for every row i of a pattern.

    The diagonal blocks of the Gauss-Newton operator of completion (block-Jacobi
    preconditioner): with ``B = V`` and the CSR pattern, the block acting on row i of ``Up``;
    with ``B = U`` and the CSC pattern, on row j of ``Vp``. A relative ``1e-10 tr(G) / k``
    keeps rows with fewer than k entries invertible. O(nnz k^2 + rows k^3); float32 output
    (a preconditioner needs no more), ``rows x k x k``.
    """
    B = np.ascontiguousarray(B, dtype=np.float64)
    k = B.shape[1]
    out = np.empty((ptr.shape[0] - 1, k, k), dtype=np.float32)
    bounds = row_bounds(np.asarray(ptr), threads(parallel))
    return _compiled_csr("gram_inverses", bool(parallel))(B, idx, ptr, bounds, float(shift), out)


def rowwise_matmul(X: np.ndarray, G: np.ndarray, *, parallel: bool = False) -> np.ndarray:
    """``out[i] = X[i] @ G[i]`` for a stack ``G`` (rows x k x k). O(rows k^2)."""
    X = np.ascontiguousarray(X, dtype=np.float64)
    out = np.empty_like(X)
    return _compiled_csr("rowwise_matmul", bool(parallel))(X, G, out)


def sample_project(
    A: np.ndarray,
    B: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    shape: tuple[int, int],
    *,
    bounds: np.ndarray | None = None,
    disjoint: str | None = None,
    parallel: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    r"""``(W B[:, :k], W^T A[:, k:])`` for the sparse ``W = P_Omega(A B^T)``, in one pass.

    ``A``, ``B`` have 2k columns. For each observed entry ``e = (i, j)``: ``w_e = <A_i,
    B_j>``, then ``(W B_{:, :k})_i += w_e B_{j, :k}`` and ``(W^T A_{:, k:})_j += w_e
    A_{i, k:}``: the rows ``A_i`` and ``B_j`` are read once per entry and ``w`` is never stored
    (sampling, ``W V`` and ``W^T U`` took three passes before). With ``A = [U M + Up, U]`` and
    ``B = [V, Vp]`` (k = r) this is the data part ``(W V, W^T U)`` of the Gauss-Newton operator
    of completion. O(|Omega| k) time.

    Parameters
    ----------
    A, B : float arrays (m, 2k), (n, 2k)
        C-contiguous factors; float64 or float32 (products and sums in float64).
    rows, cols : integer arrays (|Omega|,)
        The entries, in any order (row-major or column-block order; indices are trusted).
    shape : (m, n)
    bounds : int64 array (chunks + 1,), optional
        Entry boundaries of the chunks (run in parallel with ``parallel``; default: one
        chunk, or ``numba.get_num_threads()`` equal chunks with ``parallel``).
    disjoint : {None, "rows", "cols"}
        What the chunks own: ``"rows"`` (whole rows, e.g. row-major order split at row
        boundaries: ``W B_{:, :k}`` is shared), ``"cols"`` (whole columns, e.g. whole column
        blocks: ``W^T A_{:, k:}`` shared), or None (both private, one m x k and one n x k
        accumulator per chunk, summed: O(chunks (m + n) k)).
    parallel : bool
        numba threads over the chunks.

    Returns
    -------
    (m x k, n x k) float64 arrays.
    """
    m, n = int(shape[0]), int(shape[1])
    q = A.shape[1]
    if B.shape[1] != q or q % 2 or q == 0:
        raise ValueError(
            f"sample_project needs A, B with the same even width, got {A.shape}, {B.shape}"
        )
    if bounds is None:
        parts = threads(parallel)
        bounds = (np.arange(parts + 1) * rows.shape[0]) // parts
    bounds = np.asarray(bounds, dtype=np.int64)
    t = bounds.shape[0] - 1
    zv = np.zeros((1 if disjoint == "rows" else t, m, q // 2))
    ztu = np.zeros((1 if disjoint == "cols" else t, n, q // 2))
    _compiled_csr("sample_project", bool(parallel))(A, B, rows, cols, bounds, zv, ztu)
    return (zv[0] if zv.shape[0] == 1 else zv.sum(0)), (ztu[0] if ztu.shape[0] == 1 else ztu.sum(0))


def sample_project_csr(
    A: np.ndarray,
    B: np.ndarray,
    cols: np.ndarray,
    indptr: np.ndarray,
    n: int,
    *,
    parallel: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sample_project` on a CSR pattern ``(cols, indptr)`` (m = ``len(indptr) - 1``).

    Row i's ``(W B_{:, :k})_i`` is summed in a local accumulator (measured at n = 1e4,
    |Omega| = 6e5, one thread: 22 ns per entry against 25 for the row-major
    :func:`sample_project` and 24 for the three passes it replaces). Threaded: rows split in
    equal-nnz shares, one private n x k accumulator of ``W^T A_{:, k:}`` per thread, summed.
    """
    q = A.shape[1]
    if B.shape[1] != q or q % 2 or q == 0:
        raise ValueError(
            f"sample_project needs A, B with the same even width, got {A.shape}, {B.shape}"
        )
    bounds = row_bounds(np.asarray(indptr), threads(parallel))
    t = bounds.shape[0] - 1
    zv = np.empty((indptr.shape[0] - 1, q // 2))
    ztu = np.zeros((t, int(n), q // 2))
    _compiled_csr("sample_project_csr", bool(parallel))(A, B, cols, indptr, bounds, zv, ztu)
    return zv, (ztu[0] if t == 1 else ztu.sum(0))


def _counting_sort(rows, cols, ptr, out):  # pragma: no cover - compiled
    nxt = ptr[:-1].copy()
    for k in range(cols.shape[0]):
        j = cols[k]
        out[nxt[j]] = rows[k]
        nxt[j] += 1
    return out


_SOURCES["counting_sort"] = _counting_sort


class BlockedPattern:
    r"""Omega in column-block order, for the passes of the Gauss-Newton operator at scale.

    Row-major order reads the rows of ``A`` in order but the rows ``B_j`` (sampling),
    ``V_j`` (``W V``) and ``(W^T U)_j`` (``W^T U``) at random over all n columns: at
    n = 1e6, r = 10 that is 160 MB read at random, once per entry. Sorting the entries by
    ``(column block, row, column)``, blocks of ``width`` columns whose rows of ``B`` fill
    about ``BLOCK_BYTES``, keeps the random accesses inside one block (cache-resident) and
    re-reads ``A`` once per block, in order. Measured at n = 1e6, |Omega| = 6e7, 2r = 20, one
    thread: sampling 4.7 s row-major, 2.7 s with 4 blocks, 1.9 s with 16, 3.0 s with 64.

    Attributes
    ----------
    rows, cols : int32 or int64 arrays (|Omega|,)
        The entries in block order (within a block, row-major).
    block_ptr : int64 array (blocks + 1,)
        Entries of block b are ``block_ptr[b]..block_ptr[b+1]-1``.
    width : int
        Columns per block.
    """

    def __init__(self, rows: np.ndarray, cols: np.ndarray, n: int, width: int) -> None:
        blocks = -(-int(n) // int(width))
        counts = np.bincount(cols // width, minlength=blocks)
        ptr = np.zeros(blocks + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        self.rows, self.cols = np.empty_like(rows), np.empty_like(cols)
        _compiled_csr("block_sort", False)(rows, cols, int(width), ptr, self.rows, self.cols)
        self.block_ptr, self.width, self.n = ptr, int(width), int(n)
        self._source_cols = cols  # the row-major columns, to reorder values the same way

    def reorder(self, vals: np.ndarray) -> np.ndarray:
        """Values given in the original (row-major) order, in block order. O(|Omega|)."""
        out = np.empty_like(vals)
        return _compiled_csr("block_sort_values", False)(
            self._source_cols, self.width, self.block_ptr, vals, out
        )

    def operator(self, vals: np.ndarray, m: int) -> Any:
        """``W`` (values ``vals`` in block order) as a scipy ``LinearOperator``: single-vector
        products in block order (measured at n = 1e6, |Omega| = 6e7: 0.16 s and 0.15 s for
        ``W x`` and ``W^T y``, against 0.31 s and 0.25 s for scipy's CSR)."""
        import scipy.sparse.linalg as sla

        return sla.LinearOperator(
            (int(m), self.n),
            matvec=lambda x: self.matmul(vals, np.reshape(x, (-1, 1)), m)[:, 0],
            rmatvec=lambda y: self.rmatmul(vals, np.reshape(y, (-1, 1)))[:, 0],
            matmat=lambda X: self.matmul(vals, X, m),
            rmatmat=lambda Y: self.rmatmul(vals, Y),
            dtype=np.float64,
        )

    def chunks(self, parts: int) -> np.ndarray:
        """Entry boundaries of ``parts`` chunks of whole blocks with about equal entries."""
        nnz = int(self.block_ptr[-1])
        targets = (np.arange(1, parts) * nnz) // parts
        inner = self.block_ptr[np.searchsorted(self.block_ptr, targets)]
        return np.unique(np.concatenate([[0], inner, [nnz]])).astype(np.int64)

    def sample_project(self, A: np.ndarray, B: np.ndarray, m: int, *, parallel: bool = False):
        """:func:`sample_project` in block order: ``(W B[:, :k], W^T A[:, k:])`` for
        ``W = P_Omega(A B^T)``; threaded chunks own whole blocks (``W^T A`` shared)."""
        bounds = self.chunks(threads(parallel))
        return sample_project(
            A,
            B,
            self.rows,
            self.cols,
            (m, self.n),
            bounds=bounds,
            disjoint="cols",
            parallel=parallel,
        )

    def matmul(self, w: np.ndarray, V: np.ndarray, m: int, *, parallel: bool = False):
        """``W V`` for the values ``w`` in block order: O(nnz k); threaded chunks of blocks
        with one private m x k accumulator each (summed)."""
        V = np.ascontiguousarray(V, dtype=np.float64)
        bounds = self.chunks(threads(parallel))
        parts = np.empty((bounds.shape[0] - 1, int(m), V.shape[1]))
        _compiled_csr("coo_matmul", bool(parallel))(w, self.rows, self.cols, V, bounds, parts)
        return parts[0] if parts.shape[0] == 1 else parts.sum(axis=0)

    def rmatmul(self, w: np.ndarray, U: np.ndarray, *, parallel: bool = False):
        """``W^T U`` for the values ``w`` in block order: O(nnz k); threaded chunks own whole
        blocks, hence disjoint column ranges of the output (no private copies)."""
        U = np.ascontiguousarray(U, dtype=np.float64)
        out = np.zeros((self.n, U.shape[1]))
        bounds = self.chunks(threads(parallel))
        _compiled_csr("coo_rmatmul", bool(parallel))(w, self.rows, self.cols, U, bounds, out)
        return out


#: Bytes of the rows of B (2r float64 per column) that one column block of BlockedPattern holds.
BLOCK_BYTES = 8 << 20


def csc_pattern(rows: np.ndarray, cols: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows_by_column, col_ptr)``: the row indices of Omega grouped by column (in their
    original order within a column), and the column pointer. A counting sort: O(nnz) time,
    one index array of nnz entries."""
    ptr = np.zeros(int(n) + 1, dtype=np.int64)
    np.cumsum(np.bincount(cols, minlength=int(n)), out=ptr[1:])
    out = np.empty_like(rows)
    _compiled_csr("counting_sort", False)(rows, cols, ptr, out)
    return out, ptr.astype(rows.dtype)


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
