r"""The spectral start of distributed completion, and the data matrix as a linear operator.

The same start as single-process completion (:mod:`rankopt.problems._spectral`: the top-r SVD
of ``(m n / |Omega|) P_Omega^*(b)``, or its degree-weighted variant for skewed sampling, with
rows and columns trimmed at twice their median norm), with the data matrix held on the grid:

* the weighting and the trimming run cell by cell; the trimming needs the norms of all rows
  and columns, which are summed over the grid (tree reductions) and gathered: ``m + n``
  numbers to the client, ``m_a + n_b`` factors back to each cell;
* the SVD is scipy's (PROPACK by default, ARPACK, or the randomized SVD), run on the client
  on :class:`GridOperator`, whose products ``Y x`` and ``Y^T y`` are distributed: each sends
  the vector's blocks to the cells (``n_b`` or ``m_a`` numbers per cell), runs the compiled
  CSR kernels there (O(|Omega_ab|) per vector) and gathers the ``m`` (or ``n``) numbers of the
  result. The Lanczos basis (``max(10 r, r + 60)`` vectors of length m and n) lives on the
  client: O((m + n) (10 r + 60)) memory there, 1.6 GB at m = n = 1e6, r = 10; beyond that
  size the client, not the workers, bounds the start.

With the same data and seed the start equals the single-process one up to rounding (the sums
run in another order), so PROPACK converges or fails on the same problems:
:meth:`MatrixCompletion.spectral_init_if_separated
<rankopt.distributed.MatrixCompletion.spectral_init_if_separated>` skips phase 1 of
``rankopt.solve`` exactly where the single-process class does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator

from .._backend import as_rng
from ..containers import FixedRankPoint
from ..problems._spectral import (
    DISPERSED,
    cap_factors,
    check_spectral_args,
    degree_scales,
    dispersion,
    spectral_factors,
)
from . import _dask, tasks
from .backend import DaskBackend
from .grid import Grid
from .observed import cell_array

__all__ = ["GridOperator", "spectral_point", "weighted_cells"]


def _row_sums(grid: Grid, values: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Sums of squares of ``values`` per row and per column of the whole matrix (gathered)."""
    name = _dask.new_name(what)
    dsk: dict = {}
    rows: dict[int, list] = {}
    cols: dict[int, list] = {}
    for j, (a, b) in enumerate(grid.cell_list()):
        dsk[(name + "-c", j)] = (tasks.row_col_sq, grid.key(a, b), (values.name, j))
        dsk[(name + "-r", j)] = (tasks.res_of, (name + "-c", j))
        dsk[(name + "-k", j)] = (tasks.ss_of, (name + "-c", j))
        rows.setdefault(a, []).append((name + "-r", j))
        cols.setdefault(b, []).append((name + "-k", j))
    pr, pc = grid.cells
    for a in range(pr):
        _dask.tree_sum(dsk, name + "-rs", rows[a], (name + "-rs", a))
    for b in range(pc):
        _dask.tree_sum(dsk, name + "-cs", cols[b], (name + "-cs", b))
    dsk[name] = (list, [[(name + "-rs", a) for a in range(pr)],
                           [(name + "-cs", b) for b in range(pc)]])  # fmt: skip
    out = _dask.compute(_dask.object_from_graph(name, dsk, [grid.blocks, values]))[0]
    return np.concatenate(out[0]), np.concatenate(out[1])


def weighted_cells(
    grid: Grid, weighting: str, counts: tuple[np.ndarray, np.ndarray], trim: float | None
) -> Any:
    """The values of the spectral start's data matrix, cell by cell (persisted): weighted
    (``"uniform"``: ``m n / |Omega|``; ``"degree"``: ``1 / sqrt(c_i d_j)``) and trimmed
    (:func:`rankopt.problems._spectral.trim_values`). O(|Omega|) work, ``m + n`` numbers
    gathered for the trimming."""
    m, n = grid.shape
    name = _dask.new_name("spectral-w")
    dsk: dict = {}
    dr, dc = degree_scales(counts) if weighting == "degree" else (None, None)
    rb, cb = grid.row_bounds, grid.col_bounds
    for j, (a, b) in enumerate(grid.cell_list()):
        if dr is None:
            dsk[(name, j)] = (tasks.scaled_values, grid.key(a, b), m * n / grid.nnz, None, None)
        else:
            dsk[(name, j)] = (tasks.scaled_values, grid.key(a, b), 1.0,
                              _dask.embed(dr[rb[a] : rb[a + 1]]),
                              _dask.embed(dc[cb[b] : cb[b + 1]]))  # fmt: skip
    w = _dask.persist([cell_array(grid, name, dsk, [])])[0]
    if trim is None:
        return w
    if not trim > 0:
        raise ValueError(f"trim must be positive or None, got {trim!r}")
    row_sq, col_sq = _row_sums(grid, w, "spectral-norms")
    fr = cap_factors(np.sqrt(row_sq), float(trim))
    fc = cap_factors(np.sqrt(col_sq), float(trim))
    name2 = _dask.new_name("spectral-t")
    dsk2 = {(name2, j): (tasks.trimmed, grid.key(a, b), (w.name, j),
                         _dask.embed(fr[rb[a] : rb[a + 1]]), _dask.embed(fc[cb[b] : cb[b + 1]]))
            for j, (a, b) in enumerate(grid.cell_list())}  # fmt: skip
    return _dask.persist([cell_array(grid, name2, dsk2, [w])])[0]


class GridOperator(LinearOperator):
    """The sparse m x n matrix with per-cell values ``w`` as a scipy ``LinearOperator`` whose
    products run on the cluster (one synchronization per product; see the module notes).

    Attributes
    ----------
    products : int
        Products computed so far (matrix-vector or matrix-matrix).
    """

    def __init__(self, grid: Grid, w: Any) -> None:
        super().__init__(np.float64, grid.shape)
        self.grid, self.w, self.products = grid, w, 0

    def _apply(self, X: np.ndarray, transpose: bool) -> np.ndarray:
        grid = self.grid
        X = np.asarray(X, dtype=np.float64)
        X = X[:, None] if X.ndim == 1 else X
        inb, outb = (
            (grid.row_bounds, grid.col_bounds) if transpose else (grid.col_bounds, grid.row_bounds)
        )
        pieces = [
            _dask.embed(np.ascontiguousarray(X[inb[i] : inb[i + 1]])) for i in range(len(inb) - 1)
        ]
        name = _dask.new_name("Yt" if transpose else "Y")
        dsk: dict = {}
        parts: dict[int, list] = {}
        for j, (a, b) in enumerate(grid.cell_list()):
            src, dst = (a, b) if transpose else (b, a)
            fn = tasks.rmatmul if transpose else tasks.matmul
            dsk[(name + "-p", j)] = (fn, grid.key(a, b), (self.w.name, j), pieces[src], 1.0)
            parts.setdefault(dst, []).append((name + "-p", j))
        for i, keys in parts.items():
            _dask.tree_sum(dsk, name + "-s", keys, (name + "-s", i))
        dsk[name] = (list, [(name + "-s", i) for i in range(len(outb) - 1)])
        arr = _dask.object_from_graph(name, dsk, [grid.blocks, self.w])
        self.products += 1
        return np.concatenate(_dask.compute(arr)[0], axis=0)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return self._apply(X, transpose=False)

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._apply(X, transpose=True)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, transpose=False)[:, 0]

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, transpose=True)[:, 0]

    def _adjoint(self) -> Any:
        return LinearOperator(
            self.dtype, (self.shape[1], self.shape[0]), matvec=self._rmatvec,
            rmatvec=self._matvec, matmat=self._rmatmat, rmatmat=self._matmat,
        )  # fmt: skip


def spectral_point(
    grid: Grid,
    backend: DaskBackend,
    rank: int,
    seed: Any,
    method: str,
    weighting: str,
    trim: float | None,
    fallback: bool,
    exact_step: Callable[[FixedRankPoint, Any], float],
) -> FixedRankPoint:
    """The spectral start (see the module notes) as a point with blocked factors.

    ``exact_step(x, D)`` is the problem's exact line search (the degree-weighted start is
    scaled by it). Raises what single-process ``spectral_init`` raises (ValueError for a
    rank out of range or data of lower rank; with ``fallback=False``, PROPACK's
    ``LinAlgError``).
    """
    check_spectral_args(rank, grid.shape, method, weighting)
    counts = (grid.row_counts, grid.col_counts)
    if weighting == "auto":
        weighting = "degree" if dispersion(*counts) > DISPERSED else "uniform"
    w = weighted_cells(grid, weighting, counts, trim)
    Y = GridOperator(grid, w)
    U, s, V = spectral_factors(
        Y, int(rank), as_rng(seed), method, grid.nnz,
        counts if weighting == "degree" else None, fallback,
    )  # fmt: skip
    x = FixedRankPoint(
        backend.asarray(np.ascontiguousarray(U)), s.copy(), backend.asarray(np.ascontiguousarray(V))
    )
    if weighting == "degree":  # the exact line search along the ray t X0
        t = exact_step(FixedRankPoint(x.U, x.s * 0.0, x.V), x.to_lowrank())
        if t > 0 and np.isfinite(t):
            x = FixedRankPoint(x.U, x.s * t, x.V)
    return x
