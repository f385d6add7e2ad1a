r"""RAdamW and RAdaGrad: steps along the Riemannian gradient of an adaptive metric.

Both keep O(m + n) second-moment statistics per matrix: the mean squares of the rows and
columns of the tangent-projected gradients (:meth:`rankopt.geometry.Geometry.row_col_sq`),
turned into the weights ``D_L``, ``D_R`` of a Kronecker-diagonal metric
(:func:`rankopt.metrics.adaptive_diagonals`), whose Riemannian gradient is the direction
(:class:`rankopt.metrics.KroneckerDiagonal`, solved exactly in closed form). RAdamW also keeps a first moment as a tangent vector, transported by projection.

Cost per step: statistics 6 products of size (m or n) x r x r, the direct solve 14, the
retraction O((m+n) r^2 + r^3), the transport of the first moment 10: O((m+n) r^2 + r^3) in
all, with O((m+n) r + r^2) state per matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..containers import FixedRankPoint, TangentVector
from ..metrics import (
    ADAPTIVE_EPS,
    ADAPTIVE_FACTORING,
    FACTORINGS,
    SOLVERS,
    STRUCTURES,
    KroneckerDiagonal,
    adaptive_diagonals,
)
from .base import (
    Rule,
    add_weight_decay,
    check_common,
    column,
    count_init,
    lerp,
    move_state,
    retract,
    retract_state,
    state,
)
from .registry import register

__all__ = ["AdamState", "AdaGradState", "AdaptiveRule", "RAdamW", "RAdaGrad"]


@state
class AdamState:
    """State of :class:`RAdamW`: count, first moment (tangent at x), row/column mean-square EMAs."""

    count: Any
    exp_avg: TangentVector
    row_stats: Any
    col_stats: Any


@state
class AdaGradState:
    """State of :class:`RAdaGrad`: count and the accumulated row/column mean squares."""

    count: Any
    row_stats: Any
    col_stats: Any


def _zero_stats(manifold, x: FixedRankPoint) -> tuple[Any, Any]:
    xp = manifold.backend.xp
    return xp.zeros_like(x.U[..., 0]), xp.zeros_like(x.V[..., 0])


def _mean_squares(manifold, x: FixedRankPoint, g: TangentVector) -> tuple[Any, Any]:
    """Row mean squares ``rowsq(g) / n`` and column mean squares ``colsq(g) / m``."""
    rows, cols = manifold.geometry.row_col_sq(x, g)
    m, n = x.shape
    return rows / n, cols / m


@dataclass(frozen=True, kw_only=True)
class AdaptiveRule(Rule):
    """The fields RAdaGrad and RAdamW share: the adaptive metric built from their statistics.

    Parameters
    ----------
    metric_eps : float
        Relative floor of the adaptive metric (:func:`rankopt.metrics.adaptive_diagonals`'s
        ``eps``): a fraction of the RMS gradient, so the iterates do not depend on the loss scale.
    factoring : str
        How the metric's weights come from the row/column statistics: ``"adafactor"`` (the
        square root of Adafactor's factored second moment) or ``"quartic"`` (``v^{-1/4}`` per
        side).
    structure : str
        ``"full"`` (the metric restricted to the tangent space) or ``"block"`` (its
        block-diagonal part in ``(M, Up, Vp)``).
    solver : str
        ``"direct"`` (the exact closed form) or ``"pcg"`` (preconditioned conjugate gradients).
    exact : bool
        False applies only the metric's preconditioner (``structure="full"``).
    cg_tol : float or None
        PCG's relative tolerance (``solver="pcg"``).
    cg_maxiter : int
        PCG's most iterations (``solver="pcg"``).
    """

    metric_eps: float = ADAPTIVE_EPS
    factoring: str = ADAPTIVE_FACTORING
    structure: str = "full"
    solver: str = "direct"
    exact: bool = True
    cg_tol: float | None = 1e-4
    cg_maxiter: int = 20

    def __post_init__(self) -> None:
        check_common(self)
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {self.structure!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.factoring not in FACTORINGS:
            raise ValueError(f"factoring must be one of {FACTORINGS}, got {self.factoring!r}")
        if isinstance(self.cg_maxiter, bool) or not int(self.cg_maxiter) >= 1:
            raise ValueError(
                f"invalid cg_maxiter={self.cg_maxiter!r}: the metric solve needs at least 1 "
                "iteration (with 0 the optimizer would never move)"
            )
        if self.structure == "block" and not self.exact:
            raise ValueError("exact=False (precondition only) applies to structure='full' only")

    def metric(self, manifold, row_ms: Any, col_ms: Any) -> KroneckerDiagonal:
        """The metric with weights from (bias-corrected) mean squares ``(..., m)``, ``(..., n)``."""
        left, right = adaptive_diagonals(
            row_ms, col_ms, self.metric_eps, self.factoring, manifold.backend.xp
        )
        return KroneckerDiagonal(
            left, right, self.exact, self.cg_tol, self.cg_maxiter, self.structure, self.solver
        )


@register(method="radamw", ordinary="adamw")
@dataclass(frozen=True, kw_only=True)
class RAdamW(AdaptiveRule):
    r"""Riemannian AdamW on the fixed-rank manifold.

    ``t <- t + 1``; ``v_L <- beta2 v_L + (1 - beta2) rowsq(grad) / n`` and ``v_R`` likewise;
    ``m <- beta1 m + (1 - beta1) grad`` (tangent, transported by projection after the step);
    direction ``d = G_x^{-1} (m / (1 - beta1^t))`` under the metric with weights from
    ``v / (1 - beta2^t)`` (:func:`rankopt.metrics.adaptive_diagonals`); decoupled weight decay
    ``d <- d + wd X`` (alone it gives exactly ``(1 - lr wd) X``); ``x <- R_x(-lr d)``.

    Parameters
    ----------
    lr : float
        Learning rate.
    betas : tuple of float
        Adam's ``(beta1, beta2)``: decay of the first moment and of the row/column statistics.
    weight_decay : float
        Decoupled weight decay ``wd`` (AdamW's).
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0

    def init(self, manifold, x: FixedRankPoint) -> AdamState:
        row, col = _zero_stats(manifold, x)
        return AdamState(count_init(manifold, x), manifold.geometry.zero_vector(x), row, col)

    def step(self, manifold, x, grad, state: AdamState, *, lr: Any = None):
        lr = self.lr if lr is None else lr
        be = manifold.backend
        b1, b2 = self.betas
        t = state.count + 1
        rows, cols = _mean_squares(manifold, x, grad)
        row = be.lerp(rows, state.row_stats, b2)  # b2 v + (1 - b2) rows
        col = be.lerp(cols, state.col_stats, b2)
        mom = lerp(manifold, grad, state.exp_avg, b1)  # b1 m + (1 - b1) grad
        c1, c2 = 1.0 - b1**t, column(1.0 - b2**t)
        d = self.metric(manifold, row / c2, col / c2).solve(manifold, x, mom)
        # R_x(-lr (d / c1 + wd X)): the bias correction and lr scale r x r blocks only
        if self.weight_decay != 0:
            d = add_weight_decay(manifold, x, d, c1 * self.weight_decay)
        return retract_state(self, manifold, x, d, -lr / c1, AdamState(t, mom, row, col))


@register(method="radagrad", ordinary="adagrad")
@dataclass(frozen=True, kw_only=True)
class RAdaGrad(AdaptiveRule):
    r"""Riemannian AdaGrad on the fixed-rank manifold.

    ``g = grad + wd X`` (coupled, as torch's Adagrad); ``v_L <- v_L + rowsq(g) / n``, ``v_R``
    likewise; ``x <- R_x(-lr_t G_x^{-1} g)`` under the metric with weights from ``v``, with
    torch's schedule ``lr_t = lr / (1 + (t - 1) lr_decay)``.

    Parameters
    ----------
    lr : float
        Learning rate.
    lr_decay : float
        torch's Adagrad schedule ``lr / (1 + (t - 1) lr_decay)``.
    weight_decay : float
        Coupled L2 weight decay (added to the gradient, as torch's Adagrad).
    """

    lr: float = 1e-2
    lr_decay: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lr_decay >= 0:
            raise ValueError(f"invalid lr_decay={self.lr_decay!r}: must be >= 0")

    def init(self, manifold, x: FixedRankPoint) -> AdaGradState:
        return AdaGradState(count_init(manifold, x), *_zero_stats(manifold, x))

    def step(self, manifold, x, grad, state: AdaGradState, *, lr: Any = None):
        lr = self.lr if lr is None else lr
        g = add_weight_decay(manifold, x, grad, self.weight_decay)
        rows, cols = _mean_squares(manifold, x, g)
        row, col = state.row_stats + rows, state.col_stats + cols
        d = self.metric(manifold, row, col).solve(manifold, x, g)
        lr_t = lr / (1.0 + state.count * self.lr_decay)
        x_new = retract(self, manifold, x, d, -lr_t)
        return x_new, move_state(manifold, x, x_new, AdaGradState(state.count + 1, row, col))
