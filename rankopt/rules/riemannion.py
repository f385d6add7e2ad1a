r"""Riemannion: Muon on the fixed-rank manifold (Bogachev et al., arXiv 2507.12142, ICLR 2026).

One step at ``X = U diag(s) V^T`` with the Riemannian gradient ``g = P_X(G)``:

.. math::

    b &\leftarrow \beta\, \mathcal{T}_{X_{-} \to X}(b) + g
        && \text{heavy ball, buffer carried by projection (first step: } b = g)\\
    D &= P_X(\operatorname{polar}(b))
        && \text{Muon's orthogonalization, exact (the matrix sign of a rank} \le 2r
           \text{ tangent vector)}\\
    X &\leftarrow H_r\big((1 - \eta\gamma) X - \eta D\big)
        && \text{decoupled weight decay, truncated-SVD retraction}

``polar(b)`` is computed from a 2r x 2r SVD (:meth:`rankopt.geometry.Geometry.orthogonalize`),
not by Newton-Schulz iterations: the paper's "OrthoLR" and "ProjectLR" procedures. The buffer
stores ``b`` before orthogonalization (as Muon does) and is transported to the new point by
projection, fused with the retraction. Cost per step: two QRs of m x r and n x r blocks and a
2r x 2r SVD for the orthogonalization, the same for the retraction, ten (m or n) x r x r products
for the transport: O((m + n) r^2 + r^3); state: one tangent vector, O((m + n) r).

Where rankopt's reading of the paper needed a choice (the authors' code could not be read here):
directions of ``b`` whose singular values are below ``ortho_tol`` times the largest are dropped
(set to 0, not lifted to unit length), so a rank-deficient gradient does not become a step along
rounding noise; and the rank options of every rule (``rank_tol``) are available, the paper's
method being the fixed-rank default.

The exact matrix sign is discontinuous: the step jumps where a singular value of ``b`` crosses
the cut-off, and near a small kept one a change of the gradient is amplified by up to
``s_1 / s_i`` (up to ``1 / ortho_tol``). ``ns_steps=5`` puts Muon's own orthogonalization beside
it (five quintic Newton-Schulz iterations, a polynomial of ``b``: continuous, gain at most
3.4445^5, about 490); this is rankopt's variant, not the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..containers import FixedRankPoint, TangentVector
from .base import Rule, add_weight_decay, check_common, count_init, retract_state, state
from .registry import register

__all__ = ["RiemannionState", "Riemannion"]


@state
class RiemannionState:
    """State of :class:`Riemannion`: the step count and the momentum buffer (tangent at x)."""

    count: Any = 0
    momentum_buffer: TangentVector | None = None


@register(method="riemannion", ordinary="adamw")
@dataclass(frozen=True, kw_only=True)
class Riemannion(Rule):
    r"""Riemannion (Bogachev et al. 2025): heavy-ball momentum, Muon's orthogonalized step, SVD retraction.

    ``b <- momentum T(b) + grad``; ``D = P_x(polar(b))`` (unit singular values on the kept
    directions); ``x <- R_x(-lr (D + weight_decay X))``, i.e. the best rank-r approximation of
    ``(1 - lr weight_decay) X - lr D``. The step has spectral norm about ``lr`` whatever the
    gradient's scale, so ``lr`` is a length in the weights' units (a schedule that decays it is
    needed to converge to high accuracy). Ordinary parameters in the same torch optimizer move
    with AdamW (Muon's convention), with the same ``lr`` and ``weight_decay``.

    Parameters
    ----------
    lr : float
        Learning rate: the spectral norm of the orthogonalized step.
    momentum : float
        Heavy-ball coefficient ``beta`` in [0, 1) (the buffer is not damped: ``b <- beta b + g``).
    weight_decay : float
        Decoupled weight decay ``gamma``: ``X`` shrinks by ``1 - lr gamma`` before the step.
    ns_steps : int
        0 (the paper): the exact polar factor from a 2r x 2r SVD. A positive number: that many
        of Muon's quintic Newton-Schulz iterations instead (rankopt's continuous variant, 5 in
        Muon; singular values land in about [0.7, 1.2]), see
        :meth:`rankopt.geometry.Geometry.orthogonalize`.
    ortho_tol : float
        With ``ns_steps=0``: relative cut-off of the orthogonalization; singular values of the
        buffer at or below ``max(ortho_tol, 64 eps)`` times the largest are dropped, not lifted
        to 1 (the exact matrix sign jumps where one crosses it).
    """

    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    ns_steps: int = 0
    ortho_tol: float = 1e-7

    def __post_init__(self) -> None:
        check_common(self)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"invalid momentum={self.momentum!r}: must be in [0, 1)")
        if not 0.0 <= self.ortho_tol < 1.0:
            raise ValueError(f"invalid ortho_tol={self.ortho_tol!r}: must be in [0, 1)")
        if (
            isinstance(self.ns_steps, bool)
            or not isinstance(self.ns_steps, int)
            or not (0 <= self.ns_steps <= 100)
        ):
            raise ValueError(f"invalid ns_steps={self.ns_steps!r}: an integer in [0, 100]")

    def init(self, manifold, x: FixedRankPoint) -> RiemannionState:
        return RiemannionState(count_init(manifold, x), manifold.geometry.zero_vector(x))

    def step(self, manifold, x, grad, state: RiemannionState, *, lr: Any = None):
        lr = self.lr if lr is None else lr
        buf = state.momentum_buffer * self.momentum + grad
        d = manifold.geometry.orthogonalize(x, buf, self.ortho_tol, self.ns_steps)
        d = add_weight_decay(manifold, x, d, self.weight_decay)
        return retract_state(self, manifold, x, d, -lr, RiemannionState(state.count + 1, buf))
