r"""Matrices with values on the observed entries, held on the grid: :class:`ObservedMatrix`.

``W = P_Omega^*(w)``, the sparse m x n matrix with the values ``w`` at the observed positions
(the gradient of completion is this with ``w`` the residual). Its values are a 1-D dask array
with one chunk per grid cell (cells in row-major order, each in its local CSR order). The
geometry needs only its products with tall-skinny blocked matrices:

* ``W B`` (m x k): cell ``(a, b)`` computes ``W_ab B_b`` (the compiled
  :func:`~rankopt.problems._kernels.csr_matmul`, O(|Omega_ab| k)); the ``P_c`` partial
  products of grid row ``a`` are summed by a tree reduction (fan-in 8) into row block ``a``;
* ``W^T A`` (n x k): ``W_ab^T A_a`` per cell (:func:`~rankopt.problems._kernels.csr_rmatmul`),
  summed over the grid column.

Per product each cell receives ``n_b k`` (or ``m_a k``) numbers and sends ``m_a k`` (or
``n_b k``): ``P (m + n) k`` numbers cross the network for a ``P x P`` grid at most.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _dask, tasks
from .arrays import BlockedArray
from .backend import DaskBackend, DistributedOperator
from .grid import Grid

__all__ = ["ObservedMatrix", "cell_values", "cell_array"]


def cell_array(grid: Grid, name: str, dsk: dict, deps: list) -> Any:
    """A 1-D dask array over the keys ``(name, j)``, one chunk per cell (row-major)."""
    chunks = tuple(int(c) for c in grid.cell_nnz.ravel())
    return _dask.array_from_graph(name, dsk, [grid.blocks, *deps], (chunks,), np.float64)


def cell_values(grid: Grid) -> Any:
    """The observed values as a 1-D dask array, one chunk per cell (persisted)."""
    name = _dask.new_name("values")
    dsk = {
        (name, j): (tasks.values_of, grid.key(a, b)) for j, (a, b) in enumerate(grid.cell_list())
    }
    return _dask.persist([cell_array(grid, name, dsk, [])])[0]


class ObservedMatrix(DistributedOperator):
    """``scale * P_Omega^*(values)`` on a grid (see the module notes).

    Parameters
    ----------
    grid : Grid
    values : dask array (|Omega|,)
        One chunk per cell, in the grid's cell order.
    backend : DaskBackend
        Where the products' results live (its row blocks are the grid's).
    scale : float
    """

    def __init__(self, grid: Grid, values: Any, backend: DaskBackend, scale: float = 1.0) -> None:
        self.grid, self.data, self.backend, self.scale = grid, values, backend, float(scale)
        self.shape = grid.shape

    def __repr__(self) -> str:
        return f"ObservedMatrix(shape={self.shape}, nnz={self.grid.nnz}, cells={self.grid.cells})"

    @property
    def values(self) -> Any:
        """The values at the observed entries (a 1-D dask array, cell by cell)."""
        return self.data if self.scale == 1.0 else self.data * self.scale

    def __mul__(self, a: Any) -> ObservedMatrix:
        if not isinstance(a, (int, float, np.number)):
            return NotImplemented
        return ObservedMatrix(self.grid, self.data, self.backend, self.scale * float(a))

    __rmul__ = __mul__

    def __neg__(self) -> ObservedMatrix:
        return self * -1.0

    def _product(self, F: BlockedArray, transpose: bool) -> BlockedArray:
        grid = self.grid
        pr, pc = grid.cells
        k = F.shape[1]
        name = _dask.new_name("WtA" if transpose else "WB")
        dsk: dict = {}
        parts: dict[int, list] = {}
        for j, (a, b) in enumerate(grid.cell_list()):
            key = (name + "-p", a, b)
            if transpose:
                dsk[key] = (tasks.rmatmul, grid.key(a, b), (self.data.name, j),
                            (F.dask.name, a, 0), self.scale)  # fmt: skip
                parts.setdefault(b, []).append(key)
            else:
                dsk[key] = (tasks.matmul, grid.key(a, b), (self.data.name, j),
                            (F.dask.name, b, 0), self.scale)  # fmt: skip
                parts.setdefault(a, []).append(key)
        for i, keys in parts.items():
            _dask.tree_sum(dsk, name, keys, (name, i, 0))
        chunks = grid.col_chunks if transpose else grid.row_chunks
        arr = _dask.array_from_graph(name, dsk, [grid.blocks, self.data, F.dask], (chunks, (k,)))
        return BlockedArray(arr, self.backend)

    def matmul(self, B: BlockedArray) -> BlockedArray:
        """``W B`` for an n x k BlockedArray: an m x k BlockedArray (lazy). O(|Omega| k)."""
        if B.row_chunks != self.grid.col_chunks:
            raise ValueError(f"W B needs B with the column blocks {self.grid.col_chunks}")
        return self._product(B, transpose=False)

    def rmatmul(self, A: BlockedArray) -> BlockedArray:
        """``W^T A`` for an m x k BlockedArray: an n x k BlockedArray (lazy). O(|Omega| k)."""
        if A.row_chunks != self.grid.row_chunks:
            raise ValueError(f"W^T A needs A with the row blocks {self.grid.row_chunks}")
        return self._product(A, transpose=True)
