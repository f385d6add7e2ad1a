r"""What runs inside the tasks: the work on one block of observations, on a worker.

A :class:`Block` holds the observed entries of one cell ``(a, b)`` of the grid (rows of row
block ``a``, columns of column block ``b``) in local CSR order (indices relative to the cell),
with their values. The functions below take a block and the matching row blocks of the
factors (``A_a``: rows of block a, ``B_b``: rows of block b) and call the compiled kernels of
single-process completion (:mod:`rankopt.problems._kernels`: the same numba loops, serial,
one task per block): sampling and the residual (O(|Omega_ab| k)), the products with the
sparse residual ``W V``, ``W^T U`` (O(|Omega_ab| k)), the fused pass of the Gauss-Newton
operator (O(|Omega_ab| r)), and the per-row Gram matrices of the block-Jacobi preconditioner
(O(|Omega_ab| r^2), NumPy). Everything here is plain NumPy in, NumPy out (nothing imports
dask): the scheduler moves the results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..problems._kernels import (
    csc_pattern,
    csr_matmul,
    csr_rmatmul,
    rowwise_matmul,
    sample_lowrank,
    sample_project_csr,
    sampled_residual,
)

__all__ = [
    "Block",
    "chunk_stats",
    "split_chunk",
    "build_block",
    "block_summary",
    "values_of",
    "residual",
    "ss_of",
    "res_of",
    "matmul",
    "rmatmul",
    "sample",
    "gauss_newton_cell",
    "step_parts",
    "gram_rows",
    "gram_cols",
    "invert_blocks",
    "rowwise",
    "positions",
    "select",
    "scaled_values",
    "trimmed",
    "row_col_sq",
]

#: Entries per chunk of the partial Gram computation (bounds its |chunk| x r x r temporary).
GRAM_CHUNK = 1 << 15


@dataclass
class Block:
    """The observations of one grid cell, in local CSR order.

    Attributes
    ----------
    cell : (a, b)
    offset : (row0, col0)
        Global index of the cell's first row and column.
    shape : (m_a, n_b)
    rows, cols : int32 arrays (nnz,)
        Local positions (``rows`` sorted, ``cols`` sorted within a row).
    indptr : int64 array (m_a + 1,)
    vals : float64 array (nnz,)
    n : int
        Columns of the whole matrix (for global linear indices).
    """

    cell: tuple[int, int]
    offset: tuple[int, int]
    shape: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray
    indptr: np.ndarray
    vals: np.ndarray
    n: int
    dup_count: int = 0
    dup_first: int = -1
    _csc: Any = field(default=None, repr=False)

    @property
    def nnz(self) -> int:
        return int(self.vals.shape[0])

    def csc(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows_by_column, col_ptr)`` of the cell (counting sort, built once per worker)."""
        if self._csc is None:
            self._csc = csc_pattern(self.rows, self.cols, self.shape[1])
        return self._csc


# ------------------------------------------------------------------------------ shuffle
def chunk_stats(r: np.ndarray, c: np.ndarray, v: np.ndarray) -> tuple:
    """``(size, rmin, rmax, cmin, cmax, first non-finite position or -1, its value)`` of one
    input chunk: the checks of the whole input come from these. O(chunk)."""
    size = int(r.shape[0])
    if size == 0:
        return (0, 0, -1, 0, -1, -1, 0.0)
    bad = np.flatnonzero(~np.isfinite(np.asarray(v, dtype=np.float64)))
    first = int(bad[0]) if bad.size else -1
    return (
        size,
        int(r.min()),
        int(r.max()),
        int(c.min()),
        int(c.max()),
        first,
        float(v[first]) if first >= 0 else 0.0,
    )


def split_chunk(
    r: np.ndarray, c: np.ndarray, v: np.ndarray, row_bounds: np.ndarray, col_bounds: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The entries of one input chunk by grid cell (row-major list of ``(rows, cols, vals)``).
    One stable sort by cell, O(chunk log chunk)."""
    pr, pc = len(row_bounds) - 1, len(col_bounds) - 1
    a = np.searchsorted(row_bounds, r, side="right") - 1
    b = np.searchsorted(col_bounds, c, side="right") - 1
    cell = a * pc + b
    order = np.argsort(cell, kind="stable")
    ends = np.cumsum(np.bincount(cell, minlength=pr * pc))
    starts = ends - np.bincount(cell, minlength=pr * pc)
    r, c = np.asarray(r, dtype=np.int64)[order], np.asarray(c, dtype=np.int64)[order]
    v = np.asarray(v, dtype=np.float64)[order]
    return [(r[s:e], c[s:e], v[s:e]) for s, e in zip(starts, ends, strict=True)]


def build_block(a: int, b: int, offset: tuple, shape: tuple, n: int, *pieces: tuple) -> Block:
    """The cell ``(a, b)`` from its pieces of every input chunk: local indices, sorted
    row-major (O(nnz log nnz)); duplicate positions are counted (the client raises)."""
    row0, col0 = offset
    m_a, n_b = shape
    rows = np.concatenate([p[0] for p in pieces]) - row0 if pieces else np.zeros(0, np.int64)
    cols = np.concatenate([p[1] for p in pieces]) - col0 if pieces else np.zeros(0, np.int64)
    vals = np.concatenate([p[2] for p in pieces]) if pieces else np.zeros(0)
    lin = rows * n_b + cols
    order = np.argsort(lin, kind="stable")
    lin = lin[order]
    dup = np.flatnonzero(lin[1:] == lin[:-1])
    first = -1
    if dup.size:
        i, j = divmod(int(lin[dup[0]]), n_b)
        first = (row0 + i) * n + (col0 + j)
    indptr = np.zeros(m_a + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=m_a), out=indptr[1:])
    return Block(
        (a, b),
        (row0, col0),
        (m_a, n_b),
        rows[order].astype(np.int32),
        cols[order].astype(np.int32),
        indptr,
        np.ascontiguousarray(vals[order]),
        n,
        int(dup.size),
        first,
    )


def block_summary(block: Block) -> tuple:
    """``(nnz, duplicates, first duplicate (global linear index), row counts, col counts)``."""
    m_a, n_b = block.shape
    return (
        block.nnz,
        block.dup_count,
        block.dup_first,
        np.diff(block.indptr),
        np.bincount(block.cols, minlength=n_b),
    )


def values_of(block: Block) -> np.ndarray:
    """The observed values of the cell (local CSR order)."""
    return block.vals


# ------------------------------------------------------------------------------ evaluation
def residual(block: Block, U: np.ndarray, V: np.ndarray, s: np.ndarray) -> tuple:
    """``(P_Omega(U diag(s) V^T) - b, its squared norm)`` on the cell: O(nnz r)."""
    out = np.empty(block.nnz)
    A = np.ascontiguousarray(np.asarray(U) * s[None, :])
    ss = sampled_residual(A, np.ascontiguousarray(V), block.rows, block.cols, block.vals, out,
                          parallel=False)  # fmt: skip
    return out, float(ss)


def sample(block: Block, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``P_Omega(A B^T)`` on the cell (local CSR order): O(nnz k)."""
    return sample_lowrank(np.ascontiguousarray(A), np.ascontiguousarray(B), block.rows,
                          block.cols, parallel=False)  # fmt: skip


def res_of(t: tuple) -> np.ndarray:
    return t[0]


def ss_of(t: tuple) -> float:
    return t[1]


def matmul(block: Block, w: np.ndarray, V: np.ndarray, scale: float) -> np.ndarray:
    """``scale W V`` for the cell's sparse ``W`` with values ``w``: m_a x k, O(nnz k)."""
    out = csr_matmul(w, block.cols, block.indptr, V, parallel=False)
    return out if scale == 1.0 else out * scale


def rmatmul(block: Block, w: np.ndarray, U: np.ndarray, scale: float) -> np.ndarray:
    """``scale W^T U``: n_b x k, O(nnz k)."""
    out = csr_rmatmul(w, block.cols, block.indptr, U, block.shape[1], parallel=False)
    return out if scale == 1.0 else out * scale


def gauss_newton_cell(
    block: Block, U: np.ndarray, Up: np.ndarray, M: np.ndarray, V: np.ndarray, Vp: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    r"""The cell's part of ``(W V, W^T U)`` for ``W = P_Omega(D)``, ``D = [U M + Up, U] [V,
    Vp]^T`` (a tangent vector's ambient matrix), in one pass over the cell's entries
    (:func:`~rankopt.problems._kernels.sample_project_csr`): O(nnz r + m_a r^2)."""
    A = np.empty((U.shape[0], 2 * U.shape[1]))
    np.matmul(U, M, out=A[:, : U.shape[1]])
    A[:, : U.shape[1]] += Up
    A[:, U.shape[1] :] = U
    B = np.ascontiguousarray(np.concatenate([V, Vp], axis=1))
    return sample_project_csr(A, B, block.cols, block.indptr, block.shape[1], parallel=False)


def step_parts(block: Block, res: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``[<R, P_Omega(A B^T)>, ||P_Omega(A B^T)||^2]`` on the cell (the exact line search's
    numerator and denominator parts): O(nnz k)."""
    pd = sample_lowrank(np.ascontiguousarray(A), np.ascontiguousarray(B), block.rows,
                        block.cols, parallel=False)  # fmt: skip
    return np.array([float(np.dot(res, pd)), float(np.dot(pd, pd))])


# ------------------------------------------------------------------------------ preconditioner
def _grouped_grams(F: np.ndarray, idx: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """``out[g] = sum_{k in ptr[g]:ptr[g+1]} F[idx[k]] F[idx[k]]^T`` for every group g, in
    chunks of about ``GRAM_CHUNK`` entries: O(nnz r^2) time, O(GRAM_CHUNK r^2) memory."""
    groups, r = ptr.shape[0] - 1, F.shape[1]
    out = np.zeros((groups, r, r))
    g = 0
    while g < groups:
        h = int(np.searchsorted(ptr, ptr[g] + GRAM_CHUNK, side="right")) - 1
        h = min(max(h, g + 1), groups)
        lo, hi = int(ptr[g]), int(ptr[h])
        if hi > lo:
            X = F[idx[lo:hi]]
            counts = np.diff(ptr[g : h + 1])
            full = np.flatnonzero(counts) + g
            out[full] = np.add.reduceat(X[:, :, None] * X[:, None, :], ptr[full] - lo, axis=0)
        g = h
    return out


def gram_rows(block: Block, V: np.ndarray) -> np.ndarray:
    """The cell's part of ``G_i = sum_{j in Omega_i} V_j V_j^T`` for its rows: m_a x r x r."""
    return _grouped_grams(np.asarray(V), block.cols, block.indptr)


def gram_cols(block: Block, U: np.ndarray) -> np.ndarray:
    """The cell's part of ``H_j = sum_{i in Omega^j} U_i U_i^T`` for its columns: n_b x r x r."""
    rows_by_col, ptr = block.csc()
    return _grouped_grams(np.asarray(U), rows_by_col, ptr)


def invert_blocks(G: np.ndarray, shift: float) -> np.ndarray:
    r"""``(G_i + d_i I)^{-1}`` in float32 with ``d_i = shift + 1e-10 tr(G_i) / r + 1e-300``,
    as the single-process kernel (:func:`~rankopt.problems._kernels.gram_inverses`).
    O(rows r^3)."""
    r = G.shape[-1]
    d = shift + 1e-10 * np.trace(G, axis1=1, axis2=2) / r + 1e-300
    G = G + d[:, None, None] * np.eye(r)
    return np.linalg.inv(G).astype(np.float32)


def rowwise(P: np.ndarray, G: np.ndarray, rot: Any) -> np.ndarray:
    """``out_i = P_i rot^T G_i rot`` (``rot`` None: ``P_i G_i``): the block-Jacobi step on the
    rows of one block, O(rows r^2)."""
    if rot is None:
        return rowwise_matmul(np.asarray(P), G, parallel=False)
    return rowwise_matmul(np.asarray(P) @ rot.T, G, parallel=False) @ rot


# ------------------------------------------------------------------------------ subsets
def positions(block: Block, before: np.ndarray, row_start: np.ndarray) -> np.ndarray:
    """Global row-major (CSR) positions of the cell's entries: ``row_start[i]`` (first position
    of local row i in the whole matrix) plus ``before[i]`` (entries of row i in the cells to the
    left) plus the rank within the row. O(nnz)."""
    counts = np.diff(block.indptr)
    within = np.arange(block.nnz) - np.repeat(block.indptr[:-1], counts)
    return np.repeat(row_start + before, counts) + within


def select(block: Block, pos: np.ndarray, index: np.ndarray) -> Block:
    """The cell restricted to the entries whose global position is in ``index`` (sorted). The
    local order is kept (it stays row-major). O(nnz log |index|)."""
    k = np.searchsorted(index, pos)
    keep = np.zeros(pos.shape[0], dtype=bool)
    inside = k < index.shape[0]
    keep[inside] = index[k[inside]] == pos[inside]
    rows, cols = block.rows[keep], block.cols[keep]
    indptr = np.zeros(block.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=block.shape[0]), out=indptr[1:])
    return Block(block.cell, block.offset, block.shape, rows, cols, indptr,
                 np.ascontiguousarray(block.vals[keep]), block.n)  # fmt: skip


# ------------------------------------------------------------------------------ spectral
def scaled_values(
    block: Block, scale: float, row_d: np.ndarray | None, col_d: np.ndarray | None
) -> np.ndarray:
    """``scale b_ij`` (``row_d`` None), else ``b_ij / (row_d[i] col_d[j])`` (the degree
    weighting), for the cell's values. O(nnz)."""
    if row_d is None:
        return block.vals * scale
    return block.vals / (np.repeat(row_d, np.diff(block.indptr)) * col_d[block.cols])


def trimmed(block: Block, w: np.ndarray, row_f: np.ndarray, col_f: np.ndarray) -> np.ndarray:
    """``w_ij row_f[i] col_f[j]`` (the trimming factors of the local rows and columns)."""
    return w * np.repeat(row_f, np.diff(block.indptr)) * col_f[block.cols]


def row_col_sq(block: Block, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums of ``w^2`` per local row and per local column of the cell."""
    sq = w * w
    rows = np.bincount(block.rows, sq, minlength=block.shape[0])
    return rows, np.bincount(block.cols, sq, minlength=block.shape[1])
