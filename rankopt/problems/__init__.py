"""Optimization problems on the fixed-rank manifold: the protocol solvers call and concrete cases.

* :class:`Problem`: base class and generic problem from user callables;
* :class:`MatrixCompletion`: observed entries, sparse gradient, exact line search, spectral start;
* :class:`MatrixSensing`: linear measurements ``<A_i, X>`` (dense or matrix-free);
* generators :func:`low_rank_truth`, :func:`random_completion`, :func:`random_sensing`;
* :func:`warmup_kernels`: pay numba's one-time start-up (about 1-2 s per process) before
  timing a completion solve.
"""

from ._kernels import warmup as warmup_kernels
from .base import Problem
from .completion import MatrixCompletion
from .sensing import MatrixSensing
from .synthetic import low_rank_truth, random_completion, random_sensing

__all__ = [
    "Problem",
    "MatrixCompletion",
    "MatrixSensing",
    "low_rank_truth",
    "random_completion",
    "random_sensing",
    "warmup_kernels",
]
