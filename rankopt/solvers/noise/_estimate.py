r"""The data protocol and the noise model: degrees of freedom, the noise estimate, the
discrepancy level, the default maximum rank, and the warnings of :mod:`rankopt.solvers.noise`.

The lowest module of the package: it imports nothing from the rest of :mod:`rankopt.solvers`,
and every other piece (and :class:`~rankopt.solvers.rank_adaptive.Auto`) imports it.
"""

from __future__ import annotations

import math
from typing import Any

from ...containers import FixedRankPoint
from ...problems.base import DataProblem

__all__ = [
    "NoiseWarning",
    "UnderdeterminedWarning",
    "IdentifiabilityWarning",
    "NOISE_DETECT_REL",
    "STALL_FTOL",
    "STALL_PATIENCE",
    "is_data_problem",
    "degrees_of_freedom",
    "sum_squares",
    "rms_observed",
    "noise_estimate",
    "is_noisy",
    "discrepancy_tau",
    "discrepancy_cost",
    "default_max_rank",
]

#: Relative noise level (``sigma_hat / rms(b)``) below which data count as exact. Exact data
#: fitted to the default tolerance leave residuals many orders of magnitude smaller.
NOISE_DETECT_REL = 1e-6
#: Cost-stall rule for least-squares fits (``ftol``, ``patience`` of the solver loop): with a
#: nonzero residual (noise, or a rank too small) Gauss-Newton converges linearly to the
#: least-squares point and the gradient test alone would run to ``max_iter``. A relative cost
#: decrease below 1e-5 twice in a row leaves an excess cost of about 1e-5 of the residual,
#: i.e. well under 1% of the statistical error.
STALL_FTOL = 1e-5
STALL_PATIENCE = 2


class NoiseWarning(UserWarning):
    """The data are noisy and the result is limited by it (or no better than zero)."""


class UnderdeterminedWarning(UserWarning):
    """Fewer observations than degrees of freedom, or rows/columns that cannot be determined."""


class IdentifiabilityWarning(UserWarning):
    """The data do not determine the answer at the rank asked (a lower rank fits as well)."""


def is_data_problem(problem: Any) -> bool:
    """Whether ``problem`` follows the data protocol (observations that can be split)."""
    return isinstance(problem, DataProblem) and bool(problem.least_squares)


def degrees_of_freedom(m: int, n: int, r: int) -> int:
    """``r (m + n - r)``: the dimension of the manifold of m x n matrices of rank r."""
    return int(r) * (int(m) + int(n) - int(r))


def sum_squares(problem: Any, a: Any) -> float:
    """``||a||^2`` as a Python float, for an array ``a`` of ``problem``'s backend (residuals,
    observed values). O(size of ``a``)."""
    be = problem.manifold(1).backend
    return be.to_float(be.sum_sq(a))


def rms_observed(problem: Any) -> float:
    """Root mean square of the observed values: the RMSE of the zero matrix."""
    return math.sqrt(sum_squares(problem, problem.observed_values()) / problem.num_observations)


def noise_estimate(problem: Any, x: FixedRankPoint) -> float:
    r"""``sigma_hat = ||A(X) - b|| / sqrt(max(N - dof, 1))`` at the fit ``x`` (data term only).

    Unbiased for the noise variance when ``x`` is the least-squares fit of a correct linear
    model with ``dof = r (m + n - r)`` parameters. O(one residual evaluation).
    """
    m, n = problem.shape
    dof = degrees_of_freedom(m, n, x.rank)
    resid = sum_squares(problem, problem.residual(x))
    return math.sqrt(resid / max(problem.num_observations - dof, 1))


def is_noisy(problem: Any, x: FixedRankPoint) -> tuple[bool, float]:
    """``(noisy, sigma_hat)``: whether the residual at ``x`` is above ``NOISE_DETECT_REL``."""
    sigma = noise_estimate(problem, x)
    return sigma > NOISE_DETECT_REL * rms_observed(problem), sigma


def discrepancy_tau(num_observations: int) -> float:
    """``1 + 2 sqrt(2 / N)``: two standard deviations of ``||noise||^2 / (N sigma^2)``."""
    return 1.0 + 2.0 * math.sqrt(2.0 / max(num_observations, 1))


def discrepancy_cost(problem: Any, rank: int, sigma: float) -> float:
    r"""Cost at which the discrepancy principle stops a rank-``rank`` fit:
    ``1/2 tau (N - dof) sigma^2`` (the ridge term, if any, is not part of the test)."""
    m, n = problem.shape
    N = problem.num_observations
    return 0.5 * discrepancy_tau(N) * max(N - degrees_of_freedom(m, n, rank), 1) * sigma**2


def default_max_rank(problem: Any) -> int:
    """Largest rank whose degrees of freedom are at most half the observations (at least 1),
    capped at 100: the default maximum of ``rank="auto"``."""
    m, n = problem.shape
    N = problem.num_observations
    r = 1
    while r < min(m, n) - 1 and r < 100 and degrees_of_freedom(m, n, r + 1) <= N / 2:
        r += 1
    return r
