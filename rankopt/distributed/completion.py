r"""Matrix completion on a Dask cluster: :class:`MatrixCompletion`.

The problem of :class:`rankopt.problems.MatrixCompletion`,
``min 1/2 ||P_Omega(X) - b||^2 + lam/2 ||X||_F^2`` over rank-r ``X``, with the observations on a
grid of cells on the workers (:class:`~rankopt.distributed.grid.Grid`), the factors of every
point and tangent vector in row blocks there (:class:`~rankopt.distributed.arrays.BlockedArray`),
and only r x r and 2r x 2r matrices on the client. ``rankopt.solve`` runs on it unchanged
(same solvers, same decisions), on the current ``distributed.Client``.

Per Gauss-Newton operator application (one inner CG iteration), with a ``P x P`` grid:

* work: one fused pass over every cell (sampling ``D`` and accumulating ``W V``, ``W^T U``:
  the compiled :func:`~rankopt.problems._kernels.sample_project_csr`), O(|Omega| r / W) per
  worker, plus O((m + n) r^2 / W) for the projections and the preconditioner;
* communication: every cell receives the row blocks ``U_a``, ``Up_a``, ``V_b``, ``Vp_b``
  (``2 (m / P + n / P) r`` numbers) and sends its partial sums of ``W V``, ``W^T U``
  (``(m / P + n / P) r``), the tree reductions of the Gram matrices move ``r^2`` numbers per
  block: at most ``3 P (m + n) r + 2 P r^2`` numbers in all (8 bytes each), fewer when
  cells share a worker with the blocks they read;
* synchronizations: about six per CG iteration (the core ``M = U^T W V``, three inner
  products of CG, the preconditioner's projection), each a round trip client - scheduler.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..containers import FixedRankPoint, LowRankMatrix, TangentVector
from ..geometry import Geometry
from ..problems._preconditioners import check_kind, resolve_kind
from ..problems._spectral import TRIM, dispersion
from ..problems.base import (
    Problem,
    check_weight_decay,
    lowrank_inner,
    lowrank_sq_norm,
    relative_error_lowrank,
)
from . import _dask, tasks
from .arrays import BlockedArray, flush, gram
from .backend import DaskBackend
from .grid import Grid, from_dataframe_columns, grid_shape
from .manifold import DistributedManifold
from .observed import ObservedMatrix, cell_array, cell_values
from .preconditioner import DistributedBlockJacobi, DistributedDiagonal
from .spectral import spectral_point

__all__ = ["MatrixCompletion", "gather_point"]


def gather_point(x: FixedRankPoint) -> FixedRankPoint:
    """A point with NumPy factors on the client (gathers blocked ones: O((m + n) r) moved)."""
    U = x.U.compute() if isinstance(x.U, BlockedArray) else np.asarray(x.U)
    V = x.V.compute() if isinstance(x.V, BlockedArray) else np.asarray(x.V)
    return FixedRankPoint(U, np.asarray(x.s), V)


def _workers(client: Any) -> int:
    return max(1, len(client.scheduler_info().get("workers", {})))


class MatrixCompletion(Problem):
    r"""Matrix completion with the observations and the factors on a Dask cluster.

    Parameters
    ----------
    rows, cols : 1-D dask arrays of integers (|Omega|,)
        Positions of the observed entries (distinct). NumPy arrays are accepted (one chunk).
    values : 1-D dask array (|Omega|,)
        Observed values (finite), chunked like ``rows`` (rechunked if not).
    shape : (int, int)
        ``(m, n)``.
    weight_decay : float
        Ridge weight ``lam >= 0``.
    blocks : (int, int), optional
        Grid of cells ``(P_r, P_c)``; default ``(P, P)`` with ``P = ceil(sqrt(W))`` for ``W``
        workers (:func:`~rankopt.distributed.grid.grid_shape`).
    truth : FixedRankPoint, optional
        The matrix the data came from (NumPy factors; enables :meth:`relative_error`).
    preconditioner : {"auto", "diagonal", "block"}
        As for :class:`rankopt.problems.MatrixCompletion` (``"auto"``: block-Jacobi from
        ``BLOCK_MIN_NNZ`` observations on).
    client : distributed.Client, optional
        Default: the current client.
    grid : Grid, optional
        Cells already on the cluster (then ``rows``, ``cols``, ``values`` are not read): what
        :meth:`from_grid` and :meth:`subset` pass.

    Attributes
    ----------
    grid : Grid
        The cells (persisted) and the observation counts.
    values : dask array
        The observed values, one chunk per cell.
    nnz : int

    Raises
    ------
    ValueError
        The errors of the single-process class, with the same messages: mismatched lengths,
        no entries, non-integer or out-of-range indices, non-finite values, duplicate
        positions, a negative weight decay; and no running ``distributed.Client``.

    Notes
    -----
    The observation order of :meth:`subset` is the row-major (CSR) order of the
    single-process class, so held-out splits pick the same entries. :meth:`residual` and
    :meth:`observed_values` return dask arrays with one chunk per cell (cells row-major,
    each row-major): the same numbers in another order.
    """

    least_squares = True

    def __init__(
        self,
        rows: Any,
        cols: Any,
        values: Any,
        shape: tuple[int, int],
        weight_decay: float = 0.0,
        *,
        blocks: tuple[int, int] | None = None,
        truth: FixedRankPoint | None = None,
        preconditioner: str = "auto",
        client: Any = None,
        grid: Grid | None = None,
    ) -> None:
        _dask.require()
        super().__init__(shape=shape, truth=truth)
        wd = check_weight_decay(weight_decay)
        kind = check_kind(preconditioner)
        if grid is None:
            workers = _workers(_dask.get_client(client))
            cells = grid_shape(workers) if blocks is None else _check_blocks(blocks)
            grid = Grid.build(rows, cols, values, self.shape, cells)
        elif grid.shape != self.shape:
            raise ValueError(f"the grid holds a {grid.shape} matrix, not {self.shape}")
        self._setup(grid, wd, kind)

    @classmethod
    def from_dataframe(
        cls,
        df: Any,
        shape: tuple[int, int],
        row: str = "row",
        col: str = "col",
        value: str = "value",
        **kwargs: Any,
    ) -> MatrixCompletion:
        """The problem from a Dask DataFrame with one observation per record (columns
        ``row``, ``col``, ``value``); ``kwargs`` as for the constructor."""
        r, c, v = from_dataframe_columns(df, row, col, value)
        return cls(r, c, v, shape, **kwargs)

    @classmethod
    def from_grid(
        cls, grid: Grid, weight_decay: float = 0.0, preconditioner: str = "auto",
        truth: FixedRankPoint | None = None,
    ) -> MatrixCompletion:  # fmt: skip
        """A problem over cells already on the cluster (what :meth:`subset` builds)."""
        return cls(None, None, None, grid.shape, weight_decay, truth=truth,
                   preconditioner=preconditioner, grid=grid)  # fmt: skip

    def _setup(self, grid: Grid, weight_decay: float, preconditioner: str) -> None:
        self.grid = grid
        self.weight_decay, self.preconditioner = weight_decay, preconditioner
        self.nnz = grid.nnz
        self._be = DaskBackend("dask", np.dtype(np.float64), None, grid.row_chunks, grid.col_chunks)
        self.backend = "dask"
        self._geometry = Geometry(self._be)
        self.values = cell_values(grid)
        self._last: tuple[FixedRankPoint, Any, float] | None = None
        self._block_jacobi: DistributedBlockJacobi | None = None
        self._diagonal: DistributedDiagonal | None = None
        self._positions: Any = None
        self._truth_blocked: FixedRankPoint | None = None

    @property
    def has_hessian(self) -> bool:
        return True

    def __repr__(self) -> str:
        m, n = self.shape
        return (
            f"rankopt.distributed.MatrixCompletion(shape=({m}, {n}), nnz={self.nnz}, "
            f"cells={self.grid.cells}, weight_decay={self.weight_decay})"
        )

    def manifold(self, rank: int, metric: Any = None) -> DistributedManifold:
        """The :class:`~rankopt.distributed.manifold.DistributedManifold` of this problem."""
        m, n = self.shape
        return DistributedManifold(m, n, rank, self._be, metric, geometry=self._geometry)

    # ------------------------------------------------------------------ points
    def _point(self, x: Any) -> FixedRankPoint:
        """``x`` with blocked factors (the same object when it has them)."""
        x = self._as_point(x)
        if isinstance(x.U, BlockedArray) and isinstance(x.V, BlockedArray):
            return x
        be = self._be
        return FixedRankPoint(be.asarray(x.U), np.asarray(x.s, dtype=np.float64), be.asarray(x.V))

    def _direction(self, x: FixedRankPoint, D: Any) -> LowRankMatrix:
        """An ambient direction as a LowRankMatrix with blocked factors."""
        if isinstance(D, TangentVector):
            D = self._geometry.embed(x, D)
        if isinstance(D, FixedRankPoint):
            D = D.to_lowrank()
        if not isinstance(D, LowRankMatrix):
            raise ValueError(
                "a direction of distributed completion must be a LowRankMatrix, FixedRankPoint "
                f"or TangentVector, got {type(D).__name__}"
            )
        if D.shape != self.shape:
            raise ValueError(f"direction has shape {D.shape}, expected {self.shape}")
        return LowRankMatrix(self._be.asarray(D.A), self._be.asarray(D.B))

    # ------------------------------------------------------------------ data protocol
    @property
    def num_observations(self) -> int:
        """``|Omega|``."""
        return self.nnz

    def observed_values(self) -> Any:
        """The observed values, a dask array with one chunk per cell."""
        return self.values

    def observation_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Observations per row (length m) and per column (length n), NumPy int arrays."""
        return self.grid.row_counts, self.grid.col_counts

    def underdetermined(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and columns with fewer than ``rank`` observations (sorted index arrays)."""
        rc, cc = self.observation_counts()
        return np.flatnonzero(rc < rank), np.flatnonzero(cc < rank)

    def sampling_dispersion(self) -> float:
        """Coefficient of variation of the row and column counts, the larger."""
        return dispersion(*self.observation_counts())

    def residual(self, x: FixedRankPoint) -> Any:
        """``P_Omega(X) - b``, a dask array with one chunk per cell. O(|Omega| r)."""
        return self._fresh_residual(self._point(x))[0]

    def subset(self, index: Any, weight_decay: float | None = None) -> MatrixCompletion:
        """The problem on the observations at ``index`` (positions in row-major order, as for
        the single-process class); the truth is kept. O(|Omega|) on the workers, ``index``
        sent once (O(|index|) from the client)."""
        from .subsets import select_cells

        index = np.asarray(index)
        if index.ndim != 1 or index.dtype.kind not in "iu":
            raise ValueError("index must be a 1-D integer array of observation positions")
        grid = select_cells(self.grid, index)
        wd = self.weight_decay if weight_decay is None else weight_decay
        return MatrixCompletion.from_grid(grid, wd, self.preconditioner, self.truth)

    # ------------------------------------------------------------------ cost and gradient
    def _fresh_residual(self, x: FixedRankPoint) -> tuple[Any, float]:
        """``(R, ||R||^2)``, ``R = P_Omega(X) - b`` (persisted, cell by cell); cached for the
        last point (line searches evaluate the cost first). One synchronization."""
        if self._last is not None and self._last[0] is x:
            return self._last[1], self._last[2]
        grid = self.grid
        flush()
        name = _dask.new_name("residual")
        dsk: dict = {}
        ss_keys = []
        s = _dask.embed(np.asarray(x.s, dtype=np.float64))
        for j, (a, b) in enumerate(grid.cell_list()):
            dsk[(name + "-t", j)] = (tasks.residual, grid.key(a, b), (x.U.dask.name, a, 0),
                                     (x.V.dask.name, b, 0), s)  # fmt: skip
            dsk[(name, j)] = (tasks.res_of, (name + "-t", j))
            dsk[(name + "-ss", j)] = (tasks.ss_of, (name + "-t", j))
            ss_keys.append((name + "-ss", j))
        _dask.tree_sum(dsk, name + "-sum", ss_keys, (name + "-sum",))
        deps = [x.U.dask, x.V.dask]
        res = _dask.persist([cell_array(grid, name, dsk, deps)])[0]
        total = _dask.array_from_graph(name + "-sum", dsk, [grid.blocks, *deps], (), np.float64)
        ss = float(_dask.compute(total)[0])
        self._last = (x, res, ss)
        return res, ss

    def _ridge_cost(self, x: FixedRankPoint) -> float:
        return 0.0 if self.weight_decay == 0.0 else 0.5 * self.weight_decay * float(np.sum(x.s**2))

    def cost(self, x: FixedRankPoint) -> float:
        """``f(X)``: O(|Omega| r / W) per worker, one synchronization."""
        x = self._point(x)
        return 0.5 * self._fresh_residual(x)[1] + self._ridge_cost(x)

    def cost_and_egrad(self, x: FixedRankPoint) -> tuple[float, Any]:
        """``(f(X), nabla f(X))``: the gradient is ``P_Omega^*(R)``, an
        :class:`~rankopt.distributed.observed.ObservedMatrix` (plus ``lam X`` as a
        LowRankMatrix when ``weight_decay > 0``)."""
        x = self._point(x)
        res, ss = self._fresh_residual(x)
        f = 0.5 * ss + self._ridge_cost(x)
        R = ObservedMatrix(self.grid, res, self._be)
        if self.weight_decay == 0.0:
            return f, R
        return f, (R, LowRankMatrix(x.U * (self.weight_decay * x.s)[None, :], x.V))

    def egrad(self, x: FixedRankPoint) -> Any:
        return self.cost_and_egrad(x)[1]

    def ehess(self, x: FixedRankPoint, D: Any) -> Any:
        """``P_Omega(D)`` (``+ lam D``): the Gauss-Newton operator, an ObservedMatrix."""
        x = self._point(x)
        D = self._direction(x, D)
        grid = self.grid
        name = _dask.new_name("sampled")
        dsk = {(name, j): (tasks.sample, grid.key(a, b), (D.A.dask.name, a, 0), (D.B.dask.name, b, 0))
               for j, (a, b) in enumerate(grid.cell_list())}  # fmt: skip
        H = ObservedMatrix(grid, cell_array(grid, name, dsk, [D.A.dask, D.B.dask]), self._be)
        return H if self.weight_decay == 0.0 else (H, D * self.weight_decay)

    def exact_step(self, x: FixedRankPoint, D: Any) -> float:
        r"""``t* = -(<R, P_Omega(D)> + lam <X, D>) / (||P_Omega(D)||^2 + lam ||D||^2)``:
        O(|Omega| k / W) per worker, one synchronization (two more with a ridge)."""
        x = self._point(x)
        D = self._direction(x, D)
        res, _ = self._fresh_residual(x)
        flush()
        grid = self.grid
        name = _dask.new_name("step")
        dsk: dict = {}
        keys = []
        for j, (a, b) in enumerate(grid.cell_list()):
            dsk[(name + "-p", j)] = (tasks.step_parts, grid.key(a, b), (res.name, j),
                                     (D.A.dask.name, a, 0), (D.B.dask.name, b, 0))  # fmt: skip
            keys.append((name + "-p", j))
        _dask.tree_sum(dsk, name, keys, (name, 0))
        arr = _dask.array_from_graph(name, dsk, [grid.blocks, res, D.A.dask, D.B.dask], ((2,),))
        num, den = (float(v) for v in _dask.compute(arr)[0])
        if self.weight_decay > 0.0:
            X = x.to_lowrank()
            num += self.weight_decay * float(lowrank_inner(self._be, X, D))
            den += self.weight_decay * float(lowrank_sq_norm(self._be, D))
        return 0.0 if den == 0.0 else -num / den

    # ------------------------------------------------------------------ Gauss-Newton
    def gn_operator(self, manifold: Any, x: FixedRankPoint) -> Any:
        r"""``v -> P_x P_Omega(D_v) + lam v`` on the tangent space at ``x``: one fused pass
        over every cell, tree sums of the partial ``W V`` and ``W^T U``, the core
        ``M' = U^T W V`` (one synchronization). See the module notes for its costs."""
        x = self._point(x)
        U, V, lam = x.U, x.V, self.weight_decay

        def apply(v: TangentVector) -> TangentVector:
            ZV, ZtU = self._gauss_newton_pass(U, V, v)
            M = gram(U, ZV)
            out = TangentVector(M, ZV - U @ M, ZtU - V @ M.T)
            return out.axpy(lam, v) if lam > 0 else out

        return apply

    def _gauss_newton_pass(
        self, U: BlockedArray, V: BlockedArray, v: TangentVector
    ) -> tuple[BlockedArray, BlockedArray]:
        """``(W V, W^T U)`` for ``W = P_Omega(D_v)`` (lazy blocked arrays)."""
        grid = self.grid
        r = U.shape[1]
        name = _dask.new_name("gn")
        M = _dask.embed(np.ascontiguousarray(v.M))
        dsk: dict = {}
        rows: dict[int, list] = {}
        cols: dict[int, list] = {}
        for a, b in grid.cell_list():
            t = (name + "-t", a, b)
            dsk[t] = (tasks.gauss_newton_cell, grid.key(a, b), (U.dask.name, a, 0),
                      (v.Up.dask.name, a, 0), M, (V.dask.name, b, 0), (v.Vp.dask.name, b, 0))  # fmt: skip
            dsk[(name + "-zv", a, b)] = (tasks.res_of, t)
            dsk[(name + "-ztu", a, b)] = (tasks.ss_of, t)
            rows.setdefault(a, []).append((name + "-zv", a, b))
            cols.setdefault(b, []).append((name + "-ztu", a, b))
        for a, keys in rows.items():
            _dask.tree_sum(dsk, name + "-ZV", keys, (name + "-ZV", a, 0))
        for b, keys in cols.items():
            _dask.tree_sum(dsk, name + "-ZtU", keys, (name + "-ZtU", b, 0))
        deps = [grid.blocks, U.dask, V.dask, v.Up.dask, v.Vp.dask]
        zv = _dask.array_from_graph(name + "-ZV", dsk, deps, (grid.row_chunks, (r,)))
        ztu = _dask.array_from_graph(name + "-ZtU", dsk, deps, (grid.col_chunks, (r,)))
        return BlockedArray(zv, self._be), BlockedArray(ztu, self._be)

    def gn_preconditioner(self, manifold: Any, x: FixedRankPoint) -> Any:
        """Block-Jacobi (``"block"``) or diagonal preconditioner of the inner CG, as in one
        process (:mod:`~rankopt.distributed.preconditioner`)."""
        x = self._point(x)
        kind = resolve_kind(self.preconditioner, self.nnz, True)
        if kind == "block":
            if self._block_jacobi is None:
                self._block_jacobi = DistributedBlockJacobi(self.grid, self.weight_decay)
            return self._block_jacobi.at(x)
        if self._diagonal is None:
            rc, cc = self.observation_counts()
            self._diagonal = DistributedDiagonal(rc, cc, self.nnz, self.weight_decay, self._be)
        return self._diagonal.at(x)

    # ------------------------------------------------------------------ start and error
    def spectral_init(
        self,
        rank: int,
        seed: Any = None,
        method: str = "propack",
        weighting: str = "auto",
        trim: float | None = TRIM,
    ) -> FixedRankPoint:
        """The spectral start of :meth:`rankopt.problems.MatrixCompletion.spectral_init` (same
        options), with distributed products (:mod:`~rankopt.distributed.spectral`)."""
        return spectral_point(self.grid, self._be, rank, seed, method, weighting, trim, True,
                              self.exact_step)  # fmt: skip

    def spectral_init_if_separated(self, rank: int, seed: Any = None) -> FixedRankPoint | None:
        """The spectral start when PROPACK converges for its top ``rank`` values, else None
        (as :meth:`rankopt.problems.MatrixCompletion.spectral_init_if_separated`)."""
        try:
            return spectral_point(self.grid, self._be, rank, seed, "propack", "auto", TRIM,
                                  False, self.exact_step)  # fmt: skip
        except np.linalg.LinAlgError:
            return None

    def relative_error(self, x: FixedRankPoint) -> float | None:
        """``||X - X_true||_F / ||X_true||_F`` (QR of the blocked factors), None without a
        truth."""
        if self.truth is None:
            return None
        if self._truth_blocked is None:
            self._truth_blocked = self._point(self.truth)
        return relative_error_lowrank(self._point(x), self._truth_blocked)


def _check_blocks(blocks: Any) -> tuple[int, int]:
    try:
        pr, pc = (int(b) for b in blocks)
    except (TypeError, ValueError):
        raise ValueError(
            f"blocks must be a pair (P_r, P_c) of positive integers, got {blocks!r}"
        ) from None
    if pr < 1 or pc < 1:
        raise ValueError(f"blocks must be a pair (P_r, P_c) of positive integers, got {blocks!r}")
    return pr, pc
