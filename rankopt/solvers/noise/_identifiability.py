r"""Is a fixed-rank fit determined by the data at its rank? :func:`identifiability`: the tail
test and, when cheap signals suggest it, a rank-adaptive fit that may reach the same residual
at a lower rank."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from ...containers import FixedRankPoint
from ...problems.base import EntryProblem
from .._rank_growth import RankAdaptive
from ..base import SolverResult
from ..newton import RGN
from ._estimate import IdentifiabilityWarning, degrees_of_freedom, is_noisy, sum_squares
from ._report import IdentifiabilityReport
from ._search import rank_one_start

__all__ = ["TAIL_REL", "SMALL_PROBLEM", "identifiability"]

#: Relative size (``s_i / s_1``) below which a fitted component is at round-off level.
TAIL_REL = 1e-8
#: Problems with at most this many entries ``m n`` always get the rank-adaptive check.
SMALL_PROBLEM = 50_000


def identifiability(
    problem: Any,
    res: SolverResult,
    *,
    check_rank: Any = "auto",
    seed: Any = 0,
    time_budget: float = math.inf,
    stacklevel: int = 4,
) -> IdentifiabilityReport:
    r"""Check that a fixed-rank fit is determined by the data at its rank; warn if not.

    1. *Tail test* (always, O(r)): components with ``s_i <= TAIL_REL s_1`` (round-off level) or,
       for noisy completion data, ``s_i <= sigma_hat sqrt(max(m, n) / p)`` (noise level: a
       component that small is rotated by the noise as much as it is determined by the data).
    2. *Rank-adaptive check* (exact data; ``check_rank=True``, or ``"auto"`` when the problem is
       small, ``m n <= SMALL_PROBLEM``, or some singular vector is much spikier than a random
       one, coherence ``> 6 ln max(m, n) + 6``, the signature of the spurious interpolants
       that a rank above the truth's admits): rank-adaptive Gauss-Newton from rank 1 up to
       the same rank. If it stops at a lower rank ``k`` with a residual as small, a rank-k
       point fits the data as well and the rank-r answer is not identifiable.

    Returns the findings as an :class:`~rankopt.solvers.noise.IdentifiabilityReport`
    (``tail_components``, ``identifiable``, ``lower_rank_fit``, ``lower_rank_point``;
    ``.as_info()`` is the dict of earlier versions, without the point).
    """
    x = res.point
    be = problem.manifold(x.rank).backend
    s = be.to_numpy(x.s).astype(np.float64)
    noisy, sigma = is_noisy(problem, x)
    tail = _tail_test(problem, s, noisy, sigma, stacklevel + 1)
    report = IdentifiabilityReport(tail_components=tail, identifiable=False if tail else None)
    m, n = problem.shape
    run = check_rank is True or (
        check_rank == "auto"
        and (m * n <= SMALL_PROBLEM or _coherence(x, be) > 6 * math.log(max(m, n)) + 6)
    )
    under = problem.num_observations < degrees_of_freedom(m, n, x.rank)
    if noisy or tail or under or x.rank < 2 or not run or not res.converged or time_budget <= 0:
        return report  # (under-determined: already warned; no rank is identifiable there)
    check = RankAdaptive(
        RGN(), max_rank=x.rank - 1, add=1, tol=1e-10, max_iter=20 * x.rank, max_time=time_budget
    )
    alt = check.run(problem, rank_one_start(problem, seed), seed=seed)
    fit = math.sqrt(2 * max(res.cost, 0.0))
    alt_fit = math.sqrt(sum_squares(problem, problem.residual(alt.point)))
    scale = math.sqrt(sum_squares(problem, problem.observed_values()))
    if not (alt.converged and alt_fit <= max(10.0 * fit, 1e-8 * scale)):
        report.identifiable = True
        return report
    diff = (x.to_lowrank() - alt.point.to_lowrank()).fro_norm() / float(np.linalg.norm(s))
    report.identifiable, report.lower_rank_fit, report.lower_rank_point = False, alt.rank, alt.point
    warnings.warn(
        f"a rank-{alt.rank} point fits the data as well as this rank-{x.rank} fit (residual "
        f"{alt_fit:.2e} vs {fit:.2e}) and differs from it by {diff:.2e} (relative): the "
        f"rank-{x.rank} answer is not identifiable. Use rank={alt.rank} or method='auto'.",
        IdentifiabilityWarning,
        stacklevel=stacklevel,
    )
    return report


def _tail_test(problem: Any, s: np.ndarray, noisy: bool, sigma: float, stacklevel: int) -> int:
    """Number of singular values ``s`` (descending) at round-off level (``TAIL_REL s_1``) or,
    on noisy data, at noise level (:func:`_noise_level`, when larger); warns if any. O(r)."""
    level = TAIL_REL * s[0]
    what = "round-off"
    if noisy:
        nl = _noise_level(problem, sigma)
        if nl is not None and nl > level:
            level, what = nl, "noise"
    tail = int(np.sum(s <= level))
    if tail:
        k = len(s) - tail
        warnings.warn(
            f"{tail} of the {len(s)} singular values of the rank-{len(s)} fit are at {what} level "
            f"(<= {level:.2e}; largest {s[0]:.2e}): the data support rank {k} at most, the "
            "remaining components are not determined. Use a lower rank or rank='auto'.",
            IdentifiabilityWarning,
            stacklevel=stacklevel,
        )
    return tail


def _coherence(x: FixedRankPoint, be: Any) -> float:
    """``max_i max(m max_j U_ji^2, n max_j V_ji^2)``: the spikiest singular vector. O((m+n) r)."""
    U, V = be.to_numpy(x.U), be.to_numpy(x.V)
    return float(max(U.shape[0] * np.max(U**2), V.shape[0] * np.max(V**2)))


def _noise_level(problem: Any, sigma: float) -> float | None:
    r"""Singular value at which a fitted component is as large as its noise:
    ``sigma sqrt(max(m, n) / p)`` with ``p = N / (m n)`` (completion; uniform sampling)."""
    if not isinstance(problem, EntryProblem):
        return None
    m, n = problem.shape
    return sigma * math.sqrt(max(m, n) * m * n / problem.num_observations)
