r"""Held-out observations: the seeded split, the :class:`Holdout` an estimate is judged on
(RMSE, the bar of the zero matrix, the held-out least-squares scale), and the ridge grid of
``ridge="auto"``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..._backend import as_rng
from ...containers import FixedRankPoint
from ...problems.base import EntryProblem
from ._estimate import rms_observed, sum_squares

__all__ = [
    "VALIDATION_FRACTION",
    "RIDGE_GRID",
    "ZERO_SCALE",
    "Holdout",
    "split_indices",
    "split",
    "ridge_grid",
]

#: Default fraction of the observations held out for validation.
VALIDATION_FRACTION = 0.1
#: Relative ridge strengths tried by ``ridge="auto"`` (times ``N / (m n)``, see ridge_grid).
RIDGE_GRID = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0)
#: Scale of the returned point when no estimate beats the zero matrix on held-out entries (a
#: manifold point cannot be zero; this one is zero to working precision in every use).
ZERO_SCALE = 1e-12


@dataclass
class Holdout:
    """Held-out observations: a problem on them and the RMSE of the zero matrix there.

    ``zero_bar``: the held-out RMSE an estimate must beat to count as better than the zero
    matrix, ``zero_rmse sqrt(1 - 9 / N_v)``: a fitted scale ``c X`` of an estimate ``X``
    unrelated to the data lowers the held-out sum of squares by ``sigma^2 chi^2_1`` on
    average, so only a decrease of more than 9 ``sigma^2`` (three standard errors, with
    ``sigma^2 ~ zero_rmse^2``) is significant.
    """

    problem: Any
    zero_rmse: float

    @property
    def zero_bar(self) -> float:
        return self.zero_rmse * math.sqrt(max(1.0 - 9.0 / self.problem.num_observations, 0.0))

    def rmse(self, x: FixedRankPoint) -> float:
        """Root mean square error of ``x`` on the held-out observations. O(|held out| r)."""
        resid = sum_squares(self.problem, self.problem.residual(x))
        return math.sqrt(resid / self.problem.num_observations)

    def scale(self, x: FixedRankPoint) -> float:
        """``c = argmin_c ||c A_v(X) - b_v||`` clipped to ``[ZERO_SCALE, 1]``; ``ZERO_SCALE``
        unless significant: the decrease ``<A_v X, b_v>^2 / ||A_v X||^2`` of the held-out sum
        of squares must exceed ``9 zero_rmse^2`` (as for :attr:`zero_bar`). O(|held out| r)."""
        p = self.problem
        b = p.observed_values()
        pred = p.residual(x) + b  # A_v(X)
        be = p.manifold(1).backend
        num = be.to_float(be.vdot(pred, b))
        den = be.to_float(be.sum_sq(pred))
        if not (den > 0 and num > 0) or num * num / den <= 9.0 * self.zero_rmse**2:
            return ZERO_SCALE
        return float(min(max(num / den, ZERO_SCALE), 1.0))


def split_indices(num: int, fraction: float, seed: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)``: sorted positions, ``round(fraction num)`` held out (seeded)."""
    n_val = min(max(int(round(fraction * num)), 1), num - 1)
    perm = as_rng(seed).permutation(num)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def split(problem: Any, fraction: float, seed: Any) -> tuple[Any, Holdout]:
    """Hold out ``round(fraction N)`` observations, uniformly at random (seeded).

    Returns the training problem (same weight decay) and the :class:`Holdout` (no ridge).
    """
    train, val = split_indices(problem.num_observations, fraction, seed)
    held = problem.subset(val, weight_decay=0.0)
    return problem.subset(train), Holdout(held, rms_observed(held))


def ridge_grid(problem: Any) -> list[float]:
    r"""Weight decays tried by ``ridge="auto"``: ``RIDGE_GRID`` times ``p = N / (m n)``.

    ``p`` is the diagonal of ``A^* A`` for completion (the weight of the data term per entry),
    so ``lam = rho p`` is a ridge of relative strength ``rho``; 1 for other problems."""
    m, n = problem.shape
    scale = problem.num_observations / (m * n) if isinstance(problem, EntryProblem) else 1.0
    return [rho * scale for rho in RIDGE_GRID]
