r"""RAdamWElementwise: RAdamW under the elementwise Adam metric (m x n second moment).

The metric rankopt's :class:`~rankopt.rules.RAdamW` approximates with O(m + n) statistics, in
full: ``v <- beta2 v + (1 - beta2) xi * xi`` with ``xi`` the ambient m x n matrix of the tangent
gradient, weights ``D = sqrt(v_hat + metric_eps^2 mean(v_hat))``
(:func:`rankopt.metrics.elementwise_weights`, the same relative ``metric_eps`` as the factored
metric), and the direction ``G_x^{-1} m_hat``, the Riemannian gradient of
``<xi, D * eta>`` restricted to ``T_x`` (:class:`rankopt.metrics.ElementwiseDiagonal`, solved by
PCG). First moment, bias corrections, decoupled decay and transport as :class:`RAdamW`.

State: a tangent first moment and an **m x n** second moment (``m n + (m + n) r`` numbers).
Cost: O(m n r) per PCG iteration (``cg_maxiter`` at most). For layers small enough to afford
it; ``benchmarks/optimizers.py`` measures how close the factored metric comes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..containers import FixedRankPoint, TangentVector
from ..metrics import ADAPTIVE_EPS, ElementwiseDiagonal, elementwise_weights
from .base import (
    Rule,
    add_weight_decay,
    check_common,
    count_init,
    lerp,
    retract_state,
    state,
)
from .registry import register

__all__ = ["ElementwiseAdamState", "RAdamWElementwise"]


@state
class ElementwiseAdamState:
    """State of :class:`RAdamWElementwise`: count, first moment (tangent), m x n second moment."""

    count: Any
    exp_avg: TangentVector
    exp_avg_sq: Any


@register(method="radamw-elementwise", ordinary="adamw")
@dataclass(frozen=True, kw_only=True)
class RAdamWElementwise(Rule):
    r"""Riemannian AdamW under the elementwise Adam metric (an m x n second moment).

    ``t <- t + 1``; ``m <- beta1 m + (1 - beta1) grad`` (tangent, transported);
    ``v <- beta2 v + (1 - beta2) xi * xi`` (m x n); ``d = G_x^{-1} (m / (1 - beta1^t))`` under
    the weights ``sqrt(v / (1 - beta2^t) + metric_eps^2 mu)``; ``x <- R_x(-lr (d + wd X))``.

    Parameters
    ----------
    lr : float
        Learning rate.
    betas : tuple of float
        Adam's ``(beta1, beta2)``.
    weight_decay : float
        Decoupled weight decay ``wd``.
    metric_eps : float
        Relative floor of the elementwise metric (:func:`rankopt.metrics.elementwise_weights`).
    cg_tol : float or None
        Relative tolerance of the PCG solve of the metric.
    cg_maxiter : int
        Most PCG iterations per step.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    metric_eps: float = ADAPTIVE_EPS
    cg_tol: float | None = 1e-6
    cg_maxiter: int = 50

    def __post_init__(self) -> None:
        check_common(self)
        if isinstance(self.cg_maxiter, bool) or not int(self.cg_maxiter) >= 1:
            raise ValueError(f"invalid cg_maxiter={self.cg_maxiter!r}: must be an integer >= 1")
        if self.cg_tol is not None and not self.cg_tol >= 0:
            raise ValueError(f"invalid cg_tol={self.cg_tol!r}: must be >= 0 or None")

    def init(self, manifold, x: FixedRankPoint) -> ElementwiseAdamState:
        g = manifold.geometry
        v = manifold.backend.zeros((*x.batch_shape, *x.shape))
        return ElementwiseAdamState(count_init(manifold, x), g.zero_vector(x), v)

    def step(self, manifold, x, grad, state: ElementwiseAdamState, *, lr: Any = None):
        lr = self.lr if lr is None else lr
        be = manifold.backend
        b1, b2 = self.betas
        t = state.count + 1
        E = manifold.geometry.embed(x, grad).to_dense()
        v = be.lerp(E * E, state.exp_avg_sq, b2)  # b2 v + (1 - b2) E^2
        mom = lerp(manifold, grad, state.exp_avg, b1)
        tt = t[..., None, None] if getattr(t, "ndim", 0) > 0 else t
        metric = ElementwiseDiagonal(
            elementwise_weights(v / (1.0 - b2**tt), self.metric_eps, be.xp),
            self.cg_tol,
            self.cg_maxiter,
        )
        c1 = 1.0 - b1**t
        d = metric.solve(manifold, x, mom)
        d = add_weight_decay(manifold, x, d, c1 * self.weight_decay)
        return retract_state(self, manifold, x, d, -lr / c1, ElementwiseAdamState(t, mom, v))
