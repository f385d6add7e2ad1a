r"""Subsets of the observations on the grid (held-out splits): :func:`select_cells`.

Positions count the observations in row-major (CSR) order, as in
:class:`rankopt.problems.MatrixCompletion`, so that a seeded split holds out the same entries
in one process and on the cluster. All observations of row block ``a`` form one contiguous
range of positions; within a cell, the global position of an entry is the first position of
its row, plus the entries of that row in the cells to its left, plus its rank in the row
(:func:`~rankopt.distributed.tasks.positions`, from the counts the client holds).
"""

from __future__ import annotations

import numpy as np

from . import _dask, tasks
from .grid import Grid

__all__ = ["select_cells"]


def _row_starts(grid: Grid) -> np.ndarray:
    """First row-major position of every row (length m)."""
    return np.concatenate([[0], np.cumsum(grid.row_counts)[:-1]])


def select_cells(grid: Grid, index: np.ndarray) -> Grid:
    """A grid with the observations at the sorted positions ``index`` only (each cell keeps its
    place; one task per cell, O(nnz_ab log |index|)); ``index`` is cut by row block and sent
    once per row block.

    Raises
    ------
    IndexError
        For positions outside ``[0, |Omega|)``.
    ValueError
        For repeated positions.
    """
    idx = np.sort(np.asarray(index, dtype=np.int64))
    nnz = grid.nnz
    if idx.size and (idx[0] < 0 or idx[-1] >= nnz):
        bad = idx[0] if idx[0] < 0 else idx[-1]
        raise IndexError(f"index {bad} is out of bounds for {nnz} observations")
    if idx.size > 1 and np.any(idx[1:] == idx[:-1]):
        raise ValueError("index repeats observation positions (an observation can be used once)")
    pr, pc = grid.cells
    rb = grid.row_bounds
    starts = _row_starts(grid)
    block_start = [int(starts[rb[a]]) if rb[a] < len(starts) else nnz for a in range(pr)] + [nnz]
    name = _dask.new_name("subset")
    dsk: dict = {}
    for a in range(pr):
        lo, hi = np.searchsorted(idx, [block_start[a], block_start[a + 1]])
        dsk[(name + "-idx", a)] = _dask.embed(idx[lo:hi])
        before = np.zeros(rb[a + 1] - rb[a], dtype=np.int64)
        for b in range(pc):
            j = a * pc + b
            pos = (name + "-pos", a, b)
            dsk[pos] = (tasks.positions, grid.key(a, b), _dask.embed(before.copy()),
                        _dask.embed(starts[rb[a] : rb[a + 1]]))  # fmt: skip
            dsk[(name, a, b)] = (tasks.select, grid.key(a, b), pos, (name + "-idx", a))
            before += grid.summaries[j][3]
    blocks = _dask.array_from_graph(name, dsk, [grid.blocks], ((1,) * pr, (1,) * pc), object)
    (blocks,) = _dask.persist([blocks])
    return Grid.from_blocks(blocks, grid.shape, grid.row_bounds, grid.col_bounds)
