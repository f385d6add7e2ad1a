r"""Compiled kernels of matrix completion, by family.

* :mod:`~rankopt.problems._kernels.jit`: how every kernel is compiled, a serial and a parallel
  twin of one Python loop (:class:`~rankopt.problems._kernels.jit.TwinKernel`, numba's
  on-disk cache, numba imported lazily);
* :mod:`~rankopt.problems._kernels.loops`: the loops themselves (plain Python; the reference
  semantics when run uncompiled);
* :mod:`~rankopt.problems._kernels.sampling`: ``A B^T`` and the residual at the observed
  entries, for NumPy (numba, or a chunked NumPy fallback), torch and CuPy;
* :mod:`~rankopt.problems._kernels.products`: CSR matrices on the fixed pattern of Omega and
  the products of the Gauss-Newton operator and the block-Jacobi preconditioner;
* :mod:`~rankopt.problems._kernels.blocked`: Omega in column-block order
  (:class:`~rankopt.problems._kernels.blocked.BlockedPattern`) and grouped by column.

This package re-exports the public functions and classes of the families. Constants
(``blocked.BLOCK_BYTES``, ``sampling.CHUNK``) are not re-exported: they are read from their
own module, which is where to change them.
"""

from .blocked import BlockedPattern, csc_pattern
from .jit import HAVE_NUMBA, TwinKernel, active_threads, kernel_threads, resolve_parallel, threads
from .products import (
    PatternCSR,
    csr_matmul,
    csr_rmatmul,
    gram_inverses,
    make_csr,
    row_bounds,
    rowwise_matmul,
    sample_project,
    sample_project_csr,
)
from .sampling import sample_lowrank, sample_lowrank_numpy, sampled_residual, warmup

__all__ = [
    "HAVE_NUMBA",
    "TwinKernel",
    "threads",
    "kernel_threads",
    "active_threads",
    "resolve_parallel",
    "sample_lowrank",
    "sampled_residual",
    "sample_lowrank_numpy",
    "warmup",
    "make_csr",
    "PatternCSR",
    "row_bounds",
    "csr_matmul",
    "csr_rmatmul",
    "gram_inverses",
    "rowwise_matmul",
    "sample_project",
    "sample_project_csr",
    "BlockedPattern",
    "csc_pattern",
]
