r"""After the solver run of :func:`rankopt.solve` on a data problem: :func:`finish` checks the
result (:func:`~rankopt.solvers.noise.identifiability`), explains a rank below the one asked,
and reports everything in a :class:`~rankopt.solvers.noise.NoiseReport`.

How the solver treats its rank comes from its ``rank_role``
(:class:`~rankopt.solvers.rank_adaptive.RankRole`), so this module needs no solver class.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from .._rank_growth import RankRole, rank_role
from ..base import SolverResult, cost_and_gradient_norm
from ._estimate import (
    NOISE_DETECT_REL,
    IdentifiabilityWarning,
    NoiseWarning,
    noise_estimate,
    rms_observed,
)
from ._identifiability import identifiability
from ._plan import Plan
from ._report import NoiseReport, ValidationReport

__all__ = ["finish"]


def finish(
    problem: Any, res: SolverResult, p: Plan, *, seed: Any = 0, solver: Any = None
) -> SolverResult:
    """Post-run checks of :func:`rankopt.solve` on a data problem; fills ``res.info``.

    A result at the full rank asked from a fixed-rank method (or from phase 1 of "auto")
    goes through :func:`~rankopt.solvers.noise.identifiability`; when that finds a lower-rank
    fit that is as good, "auto" (whose rank is a maximum) returns it instead, with a warning,
    and the fixed-rank methods keep their answer (warned). A result of "auto" below the rank
    asked is explained by a warning (the held-out error, or identifiability). Which case
    applies is read from ``solver.rank_role`` (:func:`~rankopt.solvers.rank_adaptive.rank_role`).

    ``res.info["noise_report"]`` is the :class:`~rankopt.solvers.noise.NoiseReport` of all
    this (the noise estimate, the rank chosen, the pre-check of ``p``, the rank search's
    report, the identifiability findings); the flat keys of ``res.info`` (``noise_estimate``,
    ``rank_chosen``, ``num_observations``, ...) are built from it
    (:meth:`~rankopt.solvers.noise.NoiseReport.as_info`). Not a data problem: ``res``
    unchanged. Cost: one residual, plus the identifiability check when it runs.
    """
    if not p.data:
        return res
    role = rank_role(solver)
    est = res.info.get("noise_estimate")
    report = NoiseReport(
        noise_estimate=noise_estimate(problem, res.point) if est is None else est,
        rank_chosen=res.info.get("rank_chosen", res.rank),
        data=p.data_check,
        search=res.info.get("rank_search"),
    )
    is_auto = role is RankRole.AUTO
    fixed = role is RankRole.FIXED or (is_auto and res.info.get("phase") == 1)
    if fixed and res.rank == p.rank:
        _check_fixed_rank(problem, res, p, report, is_auto, seed, solver)
    elif is_auto and not p.auto_rank and res.rank < p.rank:
        _explain_lower_rank(problem, res, p, report)
    res.info.update(report.as_info())
    res.info["noise_report"] = report
    return res


def _check_fixed_rank(problem, res, p, report, is_auto, seed, solver) -> None:
    """The identifiability check of a fixed-rank result (within ``max(1 s, 2 x the run's
    time)`` and what is left of the solver's ``max_time``), into ``report``; "auto" returns
    the lower-rank fit the check finds instead (``res`` updated, warned)."""
    left = getattr(solver, "max_time", math.inf) - res.time
    budget = min(max(1.0, 2.0 * res.time), left)
    found = identifiability(
        problem, res, check_rank=p.check_rank, seed=seed, time_budget=budget, stacklevel=5
    )
    report.identifiability = found
    alt = found.lower_rank_point
    if is_auto and alt is not None:
        res.point = alt
        res.cost, res.grad_norm = cost_and_gradient_norm(problem, alt)
        report.rank_reduced_from = p.rank
        report.rank_chosen = alt.rank
        report.noise_estimate = noise_estimate(problem, alt)
        warnings.warn(
            f"method 'auto' returns the rank-{alt.rank} fit (rank={p.rank} is a maximum): "
            f"the rank-{p.rank} fit it found first is not identifiable",
            IdentifiabilityWarning,
            stacklevel=4,
        )


def _explain_lower_rank(problem: Any, res: SolverResult, p: Plan, report: NoiseReport) -> None:
    """Warn why "auto" returned a rank below ``rank`` (a maximum for it): the held-out error
    on noisy data (:class:`NoiseWarning`), else a lower-rank fit that fits the data
    (:class:`IdentifiabilityWarning`)."""
    noisy = report.noise_estimate > NOISE_DETECT_REL * rms_observed(problem)
    if noisy and isinstance(report.search, ValidationReport):
        why = (
            f"the held-out error was smallest at rank {report.rank_chosen} (noise estimate "
            f"{report.noise_estimate:.2e})"
        )
        category = NoiseWarning
    else:
        why = f"a rank-{res.rank} point fits the data, so rank {p.rank} is not identifiable"
        category = IdentifiabilityWarning
    warnings.warn(
        f"method 'auto' returns rank {res.rank} < rank={p.rank} (a maximum for 'auto'): {why}",
        category,
        stacklevel=4,
    )
