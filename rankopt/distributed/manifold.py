r"""The fixed-rank manifold with distributed factors: :class:`DistributedManifold`.

The same manifold, geometry and solvers as in one process (:class:`rankopt.FixedRankManifold`,
:class:`rankopt.geometry.Geometry`), on a :class:`~rankopt.distributed.backend.DaskBackend`:
points have row-blocked factors ``U``, ``V`` and NumPy singular values ``s``; tangent
vectors have row-blocked ``Up``, ``Vp`` and a NumPy ``M``. Only the checks of array types
change (a point mixes the two kinds of arrays); stacks of points are not supported.

Cost of the geometry per operation, with ``P`` row blocks per side and ``W`` workers: the
O((m + n) r^2) work is spread over the blocks; every Gram matrix (``U^T Z V``, the
transport's ``U^T U_y``) moves ``r^2`` numbers per block to the client, every QR of the
retraction ``r^2`` per block both ways (:func:`~rankopt.distributed.arrays.tsqr`).
"""

from __future__ import annotations

from typing import Any

from .._backend import backend_name_of
from ..geometry import Geometry
from ..manifold import FixedRankManifold
from .backend import DaskBackend

__all__ = ["DistributedManifold"]


class DistributedManifold(FixedRankManifold):
    """:class:`rankopt.FixedRankManifold` of m x n matrices of rank r with blocked factors.

    Parameters
    ----------
    m, n, r : int
    backend : DaskBackend
        Its row blocks fix where the factors live (``backend.shape == (m, n)``).
    metric : rankopt.metrics.Metric, optional
        The Euclidean metric (default) is the one supported.
    validate : bool
        As for :class:`rankopt.FixedRankManifold` (finiteness and orthonormality checks are
        synchronizations here).
    geometry : rankopt.geometry.Geometry, optional
        Shared between the manifolds of one problem (it caches the random matrix of the
        retraction's QR per shape).
    """

    def __init__(
        self,
        m: int,
        n: int,
        r: int,
        backend: DaskBackend,
        metric: Any = None,
        validate: bool = True,
        geometry: Geometry | None = None,
    ) -> None:
        super().__init__(m, n, r, "numpy", backend.dtype, None, metric, validate)
        if backend.shape != (int(m), int(n)):
            raise ValueError(f"backend holds {backend.shape} matrices, not {(m, n)}")
        self.backend = backend
        self.geometry = geometry if geometry is not None else Geometry(backend)

    def __repr__(self) -> str:
        blocks = (len(self.backend.row_chunks), len(self.backend.col_chunks))
        return (
            f"DistributedManifold(m={self.m}, n={self.n}, r={self.r}, row blocks={blocks}, "
            f"metric={self.metric!r})"
        )

    def with_metric(self, metric: Any) -> DistributedManifold:
        return DistributedManifold(
            self.m, self.n, self.r, self.backend, metric, self.validate, self.geometry
        )

    def with_rank(self, r: int) -> DistributedManifold:
        return DistributedManifold(
            self.m, self.n, r, self.backend, self.metric, self.validate, self.geometry
        )

    def _check_array(
        self, a: Any, what: str, shape: tuple[int, ...] | None = None, batch: Any = None
    ) -> None:
        """NumPy (small parts) or this backend's blocked arrays, of ``shape`` (no stacks)."""
        name = backend_name_of(a)
        if name not in ("numpy", self.backend.name):
            raise ValueError(
                f"{what} is a {name or type(a).__name__} array; a distributed point holds "
                "rankopt.distributed BlockedArrays (factors) and NumPy arrays (s, M)"
            )
        if self.backend.is_complex(a):
            raise ValueError(f"{what} is complex ({a.dtype}); rankopt works with real matrices")
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise ValueError(f"{what} has shape {tuple(a.shape)}, expected {tuple(shape)}")
