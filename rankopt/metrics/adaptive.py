r"""Metrics adapted from AdaGrad and Adam: Kronecker-diagonal weights from row/column
statistics of the gradients (:func:`adaptive_diagonals`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..containers import TangentVector
from .kronecker import KroneckerDiagonal

__all__ = [
    "AdaGrad",
    "Adam",
    "adaptive_diagonals",
    "tangent_row_col_sq",
    "ADAPTIVE_EPS",
    "ADAPTIVE_FACTORING",
    "FACTORINGS",
]


def tangent_row_col_sq(manifold, x, g: TangentVector) -> tuple[Any, Any]:
    r"""Row and column squared norms of the ambient matrix of a tangent vector.

    See :meth:`rankopt.geometry.Geometry.row_col_sq`: O((m+n) r^2), no m x n matrix is formed.
    These are the statistics of RASA (Kasai, Jawanpuria, Mishra, ICML 2019) and, restricted to
    the tangent space, of the RAdaGrad code's ``diag(G G^T)``, ``diag(G^T G)``.
    """
    return manifold.geometry.row_col_sq(x, g)


FACTORINGS = ("adafactor", "quartic")
#: defaults of the adaptive metrics and of the rules built on them (RAdaGrad, RAdamW), chosen
#: by ``benchmarks/optimizer_step.py`` and ``benchmarks/optimizers.py`` (see docs/optimizers.md)
ADAPTIVE_FACTORING = "adafactor"
ADAPTIVE_EPS = 1e-3


def adaptive_diagonals(
    row_ms: Any, col_ms: Any, eps: float, factoring: str, xp: Any
) -> tuple[Any, Any]:
    r"""The weights ``(D_L, D_R)`` of an adaptive metric from row/column mean squares.

    ``row_ms`` (..., m) and ``col_ms`` (..., n) are (bias-corrected) mean squares of the rows and
    columns of the gradients, ``v_L,i = mean_j v_ij`` and ``v_R,j = mean_i v_ij`` of a second
    moment ``v`` (m x n, never formed). The metric ``<xi, D_L eta D_R>`` then scales a gradient
    ``G`` roughly as ``G_ij / (D_L,i D_R,j)``:

    * ``"adafactor"``: the factored second moment of Adafactor (Shazeer & Stern, ICML 2018),
      ``v_ij ~ v_L,i v_R,j / mean(v)``, so ``G / sqrt(v_ij)`` needs a square root per side:
      ``D_L = sqrt(v_L + eps^2 mu) / mu^{1/4}``, ``D_R`` likewise, with ``mu = mean(v_L)`` the
      overall mean square. ``eps`` is relative (a fraction of the RMS gradient): the direction
      does not depend on the scale of the data, and no weight falls below ``eps`` times the
      typical one, which bounds how much rows or columns with vanishing statistics are amplified.
    * ``"quartic"``: ``D = (sqrt(v) + eps)^{1/2}`` per side, i.e. ``G / (v_L^{1/4} v_R^{1/4})``
      (a diagonal Shampoo-like ``L^{-1/4} G R^{-1/4}``);
      ``eps`` is absolute here. Measured worse on ill-conditioned problems
      (``benchmarks/optimizers.py``).

    Shapes ``(..., m)``, ``(..., n)`` (stacks); O(m + n).
    """
    if factoring == "quartic":
        return (xp.sqrt(row_ms) + eps) ** 0.5, (xp.sqrt(col_ms) + eps) ** 0.5
    if factoring != "adafactor":
        raise ValueError(f"factoring must be one of {FACTORINGS}, got {factoring!r}")
    mu = xp.mean(row_ms, axis=-1, keepdims=True)
    mu = xp.where(mu > 0, mu, 1.0)
    q = mu**0.25
    floor = (eps * eps) * mu
    return xp.sqrt(row_ms + floor) / q, xp.sqrt(col_ms + floor) / q


@dataclass(frozen=True, repr=False)
class AdaGrad(KroneckerDiagonal):
    r"""Metric adapted from AdaGrad: Kronecker-diagonal, from row/column gradient statistics.

    With ``g_t`` the tangent-projected Euclidean gradients seen so far, the statistics are the
    accumulated mean squares of their rows and columns, ``v_L = sum_t rowsq(g_t) / n`` and
    ``v_R = sum_t colsq(g_t) / m`` (O(m + n) memory, see :func:`tangent_row_col_sq`), and the
    weights ``(D_L, D_R) = adaptive_diagonals(v_L, v_R, eps, factoring)``: with the default
    ``factoring="adafactor"``, ``D_L = sqrt(v_L + eps^2 mu) / mu^{1/4}`` and likewise ``D_R``
    (``mu`` the mean of ``v_L``), so that ``D_L,i D_R,j ~ sqrt(v_ij)`` for the factored second
    moment of Adafactor and the Riemannian gradient approximates AdaGrad's ``G / sqrt(v)``.
    ``eps`` is relative (a fraction of the RMS gradient). Before any statistics exist
    (``row_stats=None``) the metric is Euclidean.

    Parameters
    ----------
    eps : float
        Relative floor of the statistics (see :func:`adaptive_diagonals`).
    row_stats, col_stats : arrays (..., m), (..., n) or None
        Accumulated row / column mean squares.
    steps : int
        Number of updates so far.
    factoring : {"adafactor", "quartic"}
        How the weights come from the statistics (:func:`adaptive_diagonals`).
    """

    eps: float = ADAPTIVE_EPS
    row_stats: Any = None
    col_stats: Any = None
    steps: int = 0

    factoring: str = ADAPTIVE_FACTORING

    def __post_init__(self):
        super().__post_init__()
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if (self.row_stats is None) != (self.col_stats is None):
            raise ValueError("give both row_stats and col_stats, or neither")
        if self.row_stats is not None:
            c = self._norm()
            from .._backend import backend_like

            left, right = adaptive_diagonals(
                self.row_stats / c,
                self.col_stats / c,
                self.eps,
                self.factoring,
                backend_like(self.row_stats).xp,
            )
            object.__setattr__(self, "left", left)
            object.__setattr__(self, "right", right)

    def _norm(self) -> float:
        return 1.0

    def _combine(self, old, new):
        return new if old is None else old + new

    def update(self, manifold, x, g: TangentVector) -> AdaGrad:
        """A new metric with the statistics of the tangent gradient ``g`` added."""
        rows, cols = tangent_row_col_sq(manifold, x, g)
        m, n = x.shape
        rows, cols = rows / n, cols / m
        return replace(
            self,
            row_stats=self._combine(self.row_stats, rows),
            col_stats=self._combine(self.col_stats, cols),
            steps=self.steps + 1,
            left=None,
            right=None,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps}, steps={self.steps}, exact={self.exact})"


@dataclass(frozen=True, repr=False)
class Adam(AdaGrad):
    r"""Metric adapted from Adam: exponential moving averages of the row/column statistics.

    ``v_L <- beta2 v_L + (1 - beta2) rowsq(g) / n``, ``v_R`` likewise, bias-corrected by
    ``1 - beta2^t``, then the weights of :class:`AdaGrad` from the corrected statistics.
    """

    beta2: float = 0.999

    def __post_init__(self):
        if not 0.0 <= self.beta2 < 1.0:
            raise ValueError(f"beta2 must lie in [0, 1), got {self.beta2}")
        super().__post_init__()

    def _norm(self) -> float:
        return 1.0 - self.beta2**self.steps if self.steps > 0 else 1.0

    def _combine(self, old, new):
        if old is None:
            return (1.0 - self.beta2) * new
        return self.beta2 * old + (1.0 - self.beta2) * new
