"""Optimization problems on the fixed-rank manifold: the protocol solvers call and concrete cases.

* :class:`Problem`: base class and generic problem from user callables;
* :class:`DataProblem`, :class:`EntryProblem`: the data protocol of problems fitted to
  observations (:mod:`rankopt.problems.base`);
* :class:`MatrixCompletion`: observed entries, sparse gradient, exact line search, spectral start;
* :class:`MatrixSensing`: linear measurements ``<A_i, X>`` (dense or matrix-free);
* generators :func:`low_rank_truth`, :func:`random_completion`, :func:`random_sensing`;
* :func:`warmup_kernels`: pay numba's one-time start-up (about 1-2 s per process) before
  timing a completion solve;
* :func:`kernel_threads`: the numba threads of the completion kernels in a block (what
  ``rankopt.solve(..., threads=N)`` enters; problems built with ``parallel=None`` follow it).

Modules: ``base`` (protocols, :class:`Problem`), ``completion``, ``sensing``, ``synthetic``;
the package-internal parts of completion: ``_observations`` (validation, CSR layout),
``_kernels`` (numba kernels by family), ``_gauss_newton``, ``_preconditioners``, ``_spectral``,
and ``_svd`` (truncated SVDs, shared with ``sensing``).
"""

from ._kernels import kernel_threads
from ._kernels import warmup as warmup_kernels
from .base import DataProblem, EntryProblem, Problem
from .completion import MatrixCompletion
from .sensing import MatrixSensing
from .synthetic import low_rank_truth, random_completion, random_sensing

__all__ = [
    "Problem",
    "DataProblem",
    "EntryProblem",
    "MatrixCompletion",
    "MatrixSensing",
    "low_rank_truth",
    "random_completion",
    "random_sensing",
    "warmup_kernels",
    "kernel_threads",
]
