r"""Preconditioners of the distributed Gauss-Newton operator: block-Jacobi and diagonal.

The same preconditioners as single-process completion
(:mod:`rankopt.problems._preconditioners`, where their derivation and measurements are):

* :class:`DistributedBlockJacobi`: ``Up_i <- (I - U U^T) G_i^{-1} Up_i`` with
  ``G_i = sum_{j in Omega_i} V_j V_j^T (+ lam)``, and ``H_j`` likewise for ``Vp`` (float32
  inverses, reused while the subspaces move less than ``BLOCK_REUSE``, then rotated). On the
  grid, row i's observations lie in the ``P_c`` cells of its grid row: each cell forms its
  part of ``G_i`` (O(|Omega_ab| r^2), NumPy), the parts are summed by a tree reduction (the
  set-up moves ``P (m + n) r^2`` numbers for a ``P x P`` grid, once or twice per solve), and
  the owner of the row block inverts them (O(m_a r^3)). Applying it moves nothing but the
  two r x r Gram matrices of the projection;
* :class:`DistributedDiagonal`: ``G_i ~ (c_i / n + lam) I``, ``H_j ~ (d_j / m + lam) I`` from
  the observation counts, O((m + n) r) a call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..containers import FixedRankPoint, TangentVector
from ..problems._preconditioners import BLOCK_REUSE
from . import _dask, tasks
from .arrays import BlockedArray, from_numpy, grams
from .backend import DaskBackend
from .grid import Grid

__all__ = ["DistributedBlockJacobi", "DistributedDiagonal"]

Apply = Callable[[TangentVector], TangentVector]


def _side_grams(grid: Grid, F: BlockedArray, rows: bool, shift: float) -> Any:
    """The inverted Gram stacks of one side, a persisted 3-D dask array (blocks x r x r)."""
    pr, pc = grid.cells
    r = F.shape[1]
    name = _dask.new_name("jacobi-rows" if rows else "jacobi-cols")
    dsk: dict = {}
    parts: dict[int, list] = {}
    for a, b in grid.cell_list():
        key = (name + "-p", a, b)
        if rows:  # row i of Up: sum over its cells of V_j V_j^T
            dsk[key] = (tasks.gram_rows, grid.key(a, b), (F.dask.name, b, 0))
            parts.setdefault(a, []).append(key)
        else:
            dsk[key] = (tasks.gram_cols, grid.key(a, b), (F.dask.name, a, 0))
            parts.setdefault(b, []).append(key)
    for i, keys in parts.items():
        _dask.tree_sum(dsk, name + "-s", keys, (name + "-s", i))
        dsk[(name, i, 0, 0)] = (tasks.invert_blocks, (name + "-s", i), shift)
    chunks = grid.row_chunks if rows else grid.col_chunks
    arr = _dask.array_from_graph(name, dsk, [grid.blocks, F.dask], (chunks, (r,), (r,)), np.float32)
    return _dask.persist([arr])[0]


def _rowwise(P: BlockedArray, G: Any, rot: np.ndarray | None) -> BlockedArray:
    """``P_i rot^T G_i rot`` per row, blockwise on the workers (lazy)."""
    name = _dask.new_name("rowwise")
    rot = None if rot is None else _dask.embed(np.ascontiguousarray(rot))
    dsk = {(name, i, 0): (tasks.rowwise, (P.dask.name, i, 0), (G.name, i, 0, 0), rot)
           for i in range(len(P.row_chunks))}  # fmt: skip
    arr = _dask.array_from_graph(name, dsk, [P.dask, G], (P.row_chunks, (P.shape[1],)))
    return BlockedArray(arr, P.backend)


class DistributedBlockJacobi:
    """Block-Jacobi preconditioner on the grid (see the module notes).

    Parameters
    ----------
    grid : Grid
    weight_decay : float

    Attributes
    ----------
    blocks : (U_0, V_0, G_r, G_c) or None
        The point whose blocks are held, and the persisted float32 stacks of inverses.
    setups : int
        How many times the blocks were computed.
    """

    def __init__(self, grid: Grid, weight_decay: float) -> None:
        self.grid, self.weight_decay = grid, float(weight_decay)
        self.blocks: tuple[Any, Any, Any, Any] | None = None
        self.setups = 0

    def rotations(self, U: BlockedArray, V: BlockedArray) -> tuple | None:
        """``(R_u, R_v) = (U_0^T U, V_0^T V)`` when the held blocks serve ``(U, V)``."""
        if self.blocks is None or self.blocks[0].shape != U.shape:
            return None
        Ru, Rv = grams([(self.blocks[0], U), (self.blocks[1], V)])
        eye = np.eye(U.shape[1])
        drift = max(np.abs(Ru.T @ Ru - eye).max(), np.abs(Rv.T @ Rv - eye).max())
        return (Ru, Rv) if drift <= BLOCK_REUSE else None

    def compute_blocks(self, U: BlockedArray, V: BlockedArray) -> None:
        """The inverses at ``(U, V)``: O(|Omega| r^2 + (m + n) r^3), one synchronization."""
        Gr = _side_grams(self.grid, V, rows=True, shift=self.weight_decay)
        Gc = _side_grams(self.grid, U, rows=False, shift=self.weight_decay)
        self.blocks = (U, V, Gr, Gc)
        self.setups += 1

    def at(self, x: FixedRankPoint) -> Apply:
        """The preconditioner at ``x``: the held blocks rotated, or new ones."""
        m, n = self.grid.shape
        U, V = x.U, x.V
        rot = self.rotations(U, V)
        if rot is None:
            self.compute_blocks(U, V)
        Ru, Rv = rot if rot is not None else (None, None)
        _, _, Gr, Gc = self.blocks
        mw = self.grid.nnz / (m * n) + self.weight_decay

        def apply(t: TangentVector) -> TangentVector:
            up = _rowwise(t.Up, Gr, Rv)
            vp = _rowwise(t.Vp, Gc, Ru)
            gu, gv = grams([(U, up), (V, vp)])
            return TangentVector(t.M / mw, up - U @ gu, vp - V @ gv)

        return apply


class DistributedDiagonal:
    """``G_i ~ (c_i / n + lam) I``, ``H_j ~ (d_j / m + lam) I``, ``M`` scaled by
    ``|Omega| / (m n) + lam`` (see the module notes).

    Parameters
    ----------
    row_counts, col_counts : int arrays (m,), (n,)
    nnz : int
    weight_decay : float
    backend : DaskBackend
        The row blocks of the weights (sent to the cluster once).
    """

    def __init__(
        self,
        row_counts: np.ndarray,
        col_counts: np.ndarray,
        nnz: int,
        weight_decay: float,
        backend: DaskBackend,
    ) -> None:
        m, n = len(row_counts), len(col_counts)
        rw = row_counts / n + weight_decay
        cw = col_counts / m + weight_decay
        rw = np.where(rw > 0, rw, 1.0)[:, None]  # empty rows: no scaling
        cw = np.where(cw > 0, cw, 1.0)[:, None]
        self.row_inv = from_numpy(1.0 / rw, backend.row_chunks, backend)
        self.col_inv = from_numpy(1.0 / cw, backend.col_chunks, backend)
        self.core_weight = nnz / (m * n) + weight_decay

    def at(self, x: FixedRankPoint) -> Apply:
        U, V = x.U, x.V
        ri, ci, mw = self.row_inv, self.col_inv, self.core_weight

        def apply(t: TangentVector) -> TangentVector:
            up, vp = t.Up * ri, t.Vp * ci
            gu, gv = grams([(U, up), (V, vp)])
            return TangentVector(t.M / mw, up - U @ gu, vp - V @ gv)

        return apply
