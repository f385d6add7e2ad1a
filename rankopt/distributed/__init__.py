r"""Completion beyond one machine: the same problems and solvers on a Dask cluster.

:class:`MatrixCompletion` takes the observed entries as Dask arrays (or a Dask DataFrame),
spreads them over a 2-D grid of cells on the workers of the current ``distributed.Client``,
and keeps the factors of every point in row blocks there; ``rankopt.solve`` runs on it
unchanged, with only r x r and 2r x 2r matrices on the client::

    import distributed, rankopt as ro, rankopt.distributed as rd
    client = distributed.Client(distributed.LocalCluster(n_workers=2))
    p = rd.MatrixCompletion(rows, cols, values, shape=(m, n))   # 1-D dask arrays
    res = ro.solve(p, rank=10, tol=1e-10)
    U = res.point.U.to_dask()                                    # row blocks, persisted

Modules (dask and distributed are imported on first use: ``pip install -e '.[distributed]'``):

* :mod:`~rankopt.distributed.completion`: the problem;
* :mod:`~rankopt.distributed.grid`: the cells, their construction and validation;
* :mod:`~rankopt.distributed.arrays`: row-blocked arrays, TSQR, Gram matrices;
* :mod:`~rankopt.distributed.backend`, :mod:`~rankopt.distributed.manifold`: the backend and
  the manifold the geometry runs on;
* :mod:`~rankopt.distributed.observed`: the sparse residual on the grid;
* :mod:`~rankopt.distributed.preconditioner`, :mod:`~rankopt.distributed.spectral`,
  :mod:`~rankopt.distributed.subsets`: the preconditioners, the spectral start, held-out
  subsets;
* :mod:`~rankopt.distributed.tasks`: what runs inside the tasks (the compiled kernels);
* :mod:`~rankopt.distributed.communication`: counting what moves.
"""

from .arrays import BlockedArray
from .communication import Traffic, measure, snapshot, worker_memory
from .completion import MatrixCompletion, gather_point
from .grid import Grid, grid_shape

__all__ = [
    "MatrixCompletion",
    "BlockedArray",
    "Grid",
    "grid_shape",
    "gather_point",
    "Traffic",
    "snapshot",
    "measure",
    "worker_memory",
]
