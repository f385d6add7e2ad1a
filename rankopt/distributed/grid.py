r"""Observed entries on a 2-D grid of blocks: :class:`Grid`, from Dask arrays or a DataFrame.

The m x n matrix is cut into ``P_r`` row blocks and ``P_c`` column blocks (as equal as the
sizes allow); cell ``(a, b)`` holds the observations in rows of block ``a`` and columns of
block ``b`` (a :class:`~rankopt.distributed.tasks.Block`, one task's data, persisted on a
worker). Row block ``a`` of the m-side factors (``U``, ``Up``) serves the ``P_c`` cells of grid
row ``a``, column block ``b`` of ``V``, ``Vp`` the ``P_r`` cells of grid column ``b``.

Why a grid and not row blocks: a product with the sparse residual ``W`` (the gradient's
projection, every application of the Gauss-Newton operator) needs, for the cell ``(a, b)``,
row block ``a`` of the m-side factor and block ``b`` of the n-side one, and returns partial
sums over the cell's rows and columns, which are added across the grid row / column. Per
application every cell receives ``(m / P_r + n / P_c) 2r`` numbers and sends
``(m / P_r + n / P_c) r``: with ``P_r = P_c = P`` and ``W = P^2`` workers, ``3 (m + n) r / P``
numbers per worker. With row blocks only (``P_c = 1``) every worker needs all of ``V`` and
``Vp``, ``3 n r`` numbers: ``sqrt(W)`` times more, and ``n r`` memory per worker whatever W.

Building the grid moves every observation once (a shuffle: each input chunk is split by cell,
then each cell concatenates its pieces from every chunk), O(|Omega| log |Omega|) in all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..problems._observations import check_indices, check_values
from . import _dask, tasks

__all__ = ["Grid", "grid_shape", "as_dask_vectors", "from_dataframe_columns"]


def grid_shape(workers: int) -> tuple[int, int]:
    """``(P, P)`` with ``P = ceil(sqrt(workers))``: at least one cell per worker, and
    ``(m + n) r / P`` numbers moved per cell and product."""
    p = max(1, math.ceil(math.sqrt(max(int(workers), 1))))
    return (p, p)


def _bounds(size: int, parts: int) -> np.ndarray:
    parts = max(1, min(int(parts), size))
    return np.round(np.linspace(0, size, parts + 1)).astype(np.int64)


def as_dask_vectors(rows: Any, cols: Any, vals: Any) -> tuple[Any, Any, Any]:
    """The three inputs as 1-D dask arrays of equal, known chunks (NumPy inputs are wrapped
    in one chunk; ``vals`` and ``cols`` are rechunked like ``rows`` when they differ).

    Raises
    ------
    ValueError
        As :class:`rankopt.problems.MatrixCompletion`: mismatched lengths, no entries, or
        arrays that are not 1-D.
    """
    _, da, _ = _dask.require()
    out = []
    for what, a in (("rows", rows), ("cols", cols), ("vals", vals)):
        if not type(a).__module__.startswith("dask.array"):
            try:
                a = da.from_array(np.asarray(a), chunks=-1)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{what} must be array-like: {e}") from None
        if a.ndim != 1:
            raise ValueError(f"{what} must be 1-D, got shape {a.shape}")
        if any(math.isnan(c) for c in a.chunks[0]):
            a = a.compute_chunk_sizes()
        out.append(a)
    r, c, v = out
    if not (r.shape[0] == c.shape[0] == v.shape[0]):
        raise ValueError(
            f"rows, cols and vals must have the same length, got {r.shape[0]}, {c.shape[0]}, "
            f"{v.shape[0]}"
        )
    if v.shape[0] == 0:
        raise ValueError("matrix completion needs at least one observed entry (vals is empty)")
    c = c if c.chunks == r.chunks else c.rechunk(r.chunks)
    v = v if v.chunks == r.chunks else v.rechunk(r.chunks)
    return r, c, v


def from_dataframe_columns(df: Any, row: str, col: str, value: str) -> tuple[Any, Any, Any]:
    """Three dask arrays (chunks = the DataFrame's partitions) from its columns."""
    missing = [c for c in (row, col, value) if c not in df.columns]
    if missing:
        raise ValueError(
            f"the DataFrame has no column {missing[0]!r} (columns: {list(df.columns)})"
        )
    return tuple(df[c].to_dask_array(lengths=True) for c in (row, col, value))


def _check_stats(stats: list[tuple], shape: tuple[int, int], vdtype: Any) -> None:
    """The errors of the single-process class, from the per-chunk statistics."""
    m, n = shape
    sized = [s for s in stats if s[0] > 0]
    rmin, rmax = min(s[1] for s in sized), max(s[2] for s in sized)
    cmin, cmax = min(s[3] for s in sized), max(s[4] for s in sized)
    check_indices(np.array([rmin, rmax]), m, "rows")
    check_indices(np.array([cmin, cmax]), n, "cols")
    offset = 0
    for s in stats:
        if s[5] >= 0:
            raise ValueError(f"vals must be finite; vals[{offset + s[5]}] = {s[6]}")
        offset += s[0]


@dataclass
class Grid:
    """Observations on a ``P_r x P_c`` grid of cells, persisted on the cluster.

    Attributes
    ----------
    shape : (m, n)
    row_bounds, col_bounds : int64 arrays (P_r + 1,), (P_c + 1,)
    blocks : dask array of objects, shape (P_r, P_c), one chunk per cell
        Each chunk a :class:`~rankopt.distributed.tasks.Block` (persisted).
    cell_nnz : int array (P_r, P_c)
        Observations per cell.
    row_counts, col_counts : int64 arrays (m,), (n,)
        Observations per row and per column (on the client).
    summaries : list
        Per cell: ``(nnz, duplicates, first duplicate, row counts, column counts)``.
    """

    shape: tuple[int, int]
    row_bounds: np.ndarray
    col_bounds: np.ndarray
    blocks: Any
    cell_nnz: np.ndarray
    row_counts: np.ndarray
    col_counts: np.ndarray
    summaries: list = field(default_factory=list, repr=False)

    @property
    def cells(self) -> tuple[int, int]:
        return (len(self.row_bounds) - 1, len(self.col_bounds) - 1)

    @property
    def row_chunks(self) -> tuple[int, ...]:
        return tuple(int(c) for c in np.diff(self.row_bounds))

    @property
    def col_chunks(self) -> tuple[int, ...]:
        return tuple(int(c) for c in np.diff(self.col_bounds))

    @property
    def nnz(self) -> int:
        return int(self.cell_nnz.sum())

    def key(self, a: int, b: int) -> tuple:
        """The task key of cell ``(a, b)``."""
        return (self.blocks.name, a, b)

    def cell_list(self) -> list[tuple[int, int]]:
        """The cells in row-major order (the order of every per-cell vector)."""
        pr, pc = self.cells
        return [(a, b) for a in range(pr) for b in range(pc)]

    @classmethod
    def build(cls, rows: Any, cols: Any, vals: Any, shape: tuple[int, int],
              cells: tuple[int, int]) -> Grid:  # fmt: skip
        """Validate the entries (the single-process errors) and shuffle them into cells.

        One pass over the chunks for the checks (ranges, finiteness), then the shuffle
        (persisted), then one pass over the cells for the duplicate check and the counts.
        """
        r, c, v = as_dask_vectors(rows, cols, vals)
        check_indices(np.zeros(0, dtype=r.dtype), shape[0], "rows")
        check_indices(np.zeros(0, dtype=c.dtype), shape[1], "cols")
        check_values(np.zeros(0, dtype=v.dtype))
        nch = len(r.chunks[0])
        name = _dask.new_name("entries")
        dsk = {(name + "-stats", i): (tasks.chunk_stats, (r.name, i), (c.name, i), (v.name, i))
               for i in range(nch)}  # fmt: skip
        dsk[name + "-stats"] = (list, [(name + "-stats", i) for i in range(nch)])
        stats = _dask.compute(_dask.object_from_graph(name + "-stats", dsk, [r, c, v]))
        _check_stats(stats[0], shape, v.dtype)
        grid = cls._shuffle(r, c, v, shape, cells)
        grid.check_duplicates()
        return grid

    @classmethod
    def _shuffle(cls, r: Any, c: Any, v: Any, shape: tuple[int, int], cells: tuple) -> Grid:
        m, n = shape
        rb, cb = _bounds(m, cells[0]), _bounds(n, cells[1])
        pr, pc = len(rb) - 1, len(cb) - 1
        name = _dask.new_name("grid")
        dsk: dict = {}
        nch = len(r.chunks[0])
        for i in range(nch):
            dsk[(name + "-split", i)] = (tasks.split_chunk, (r.name, i), (c.name, i), (v.name, i),
                                         rb, cb)  # fmt: skip
            for j in range(pr * pc):
                dsk[(name + "-piece", i, j)] = (_dask_item, (name + "-split", i), j)
        for a in range(pr):
            for b in range(pc):
                j = a * pc + b
                pieces = [(name + "-piece", i, j) for i in range(nch)]
                dsk[(name, a, b)] = (tasks.build_block, a, b, (int(rb[a]), int(cb[b])),
                                     (int(rb[a + 1] - rb[a]), int(cb[b + 1] - cb[b])), n,
                                     *pieces)  # fmt: skip
        blocks = _dask.array_from_graph(name, dsk, [r, c, v], ((1,) * pr, (1,) * pc), object)
        (blocks,) = _dask.persist([blocks])
        return cls.from_blocks(blocks, shape, rb, cb)

    @classmethod
    def from_blocks(cls, blocks: Any, shape: tuple[int, int], rb: np.ndarray,
                    cb: np.ndarray) -> Grid:  # fmt: skip
        """A grid over persisted cells (summaries computed: one synchronization)."""
        pr, pc = len(rb) - 1, len(cb) - 1
        name = _dask.new_name("summary")
        dsk = {(name, a, b): (tasks.block_summary, (blocks.name, a, b))
               for a in range(pr) for b in range(pc)}  # fmt: skip
        dsk[name] = (list, list(dsk))
        summ = _dask.compute(_dask.object_from_graph(name, dsk, [blocks]))[0]
        nnz = np.array([s[0] for s in summ], dtype=np.int64).reshape(pr, pc)
        m, n = shape
        rc, cc = np.zeros(m, np.int64), np.zeros(n, np.int64)
        for (a, b), s in zip(((a, b) for a in range(pr) for b in range(pc)), summ, strict=True):
            rc[rb[a] : rb[a + 1]] += s[3]
            cc[cb[b] : cb[b + 1]] += s[4]
        return cls(tuple(shape), rb, cb, blocks, nnz, rc, cc, summ)

    def check_duplicates(self) -> None:
        """ValueError (the single-process message) when a position is observed twice."""
        summ = self.summaries
        total = sum(s[1] for s in summ)
        if total:
            first = min(s[2] for s in summ if s[1])
            i, j = divmod(int(first), self.shape[1])
            raise ValueError(
                f"duplicate observed entries: position ({i}, {j}) appears more than once "
                f"({total} duplicates in total); aggregate them first"
            )


def _dask_item(t: Any, i: int) -> Any:
    return t[i]
