r"""Riemannian SGD with heavy-ball / Nesterov momentum (rank-adaptive with ``rank_tol``).

Cost per step: one retraction (O((m+n) r^2 + r^3)) and, with momentum, one transport of the
buffer by projection (ten products of size (m or n) x r x r).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..containers import FixedRankPoint, TangentVector
from .base import Rule, add_weight_decay, check_common, count_init, retract_state, started, state
from .registry import register

__all__ = ["SGDState", "RSGD", "RHeavyBall"]


@state
class SGDState:
    """State of :class:`RSGD`: the step count and the momentum buffer (tangent at x, or None)."""

    count: Any = 0
    momentum_buffer: TangentVector | None = None


@register(method="rsgd", ordinary="sgd")
@dataclass(frozen=True, kw_only=True)
class RSGD(Rule):
    r"""Riemannian SGD with momentum, following ``torch.optim.SGD``'s conventions.

    ``d = grad + wd X`` (coupled L2, as torch's SGD); ``b <- mu T(b) + (1 - dampening) d`` (first
    step ``b = d``); direction ``d + mu b`` (Nesterov) or ``b``; ``x <- R_x(-lr dir)``; ``b`` is
    transported to the new point by projection (heavy ball on manifolds with projection
    transport). ``rank_tol`` makes the retraction rank-adaptive (see
    :meth:`rankopt.geometry.Geometry.retract_adaptive`).

    Parameters
    ----------
    lr : float
        Learning rate.
    momentum : float
        Momentum factor ``mu`` (0: plain Riemannian SGD).
    dampening : float
        Dampening of the momentum, in [0, 1] (torch's SGD).
    nesterov : bool
        Nesterov momentum (needs ``momentum > 0`` and ``dampening = 0``).
    weight_decay : float
        Coupled L2 weight decay ``wd`` (added to the gradient, as torch's SGD).
    """

    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_common(self)
        if not self.momentum >= 0:
            raise ValueError(f"invalid momentum={self.momentum!r}: must be >= 0")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")

    def init(self, manifold, x: FixedRankPoint) -> SGDState:
        buf = manifold.geometry.zero_vector(x) if self.momentum != 0 else None
        return SGDState(count_init(manifold, x), buf)

    def step(self, manifold, x, grad, state: SGDState, *, lr: Any = None):
        lr = self.lr if lr is None else lr
        d = add_weight_decay(manifold, x, grad, self.weight_decay)
        buf = state.momentum_buffer
        if self.momentum != 0:
            on = started(state.count, manifold.backend.xp)  # torch: b = d at the first step
            buf = buf * (on * self.momentum) + d * (1.0 - on * self.dampening)
            direction = d.axpy(self.momentum, buf) if self.nesterov else buf
        else:
            direction = d
        return retract_state(self, manifold, x, direction, -lr, SGDState(state.count + 1, buf))


@register(method="rheavyball", ordinary="sgd")
@dataclass(frozen=True, kw_only=True)
class RHeavyBall(RSGD):
    """Riemannian heavy ball: :class:`RSGD` with ``momentum=0.9`` by default."""

    momentum: float = 0.9
