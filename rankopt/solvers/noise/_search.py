r"""Pieces the rank searches share (the rank-1 start, callbacks shifted into a later phase),
and the search of a known noise level: :func:`discrepancy_rank_search`."""

from __future__ import annotations

import math
from typing import Any

from ...containers import FixedRankPoint
from .._rank_growth import RankAdaptive
from ..base import IterationInfo, SolverResult, StopReason
from ..newton import RGN
from ._estimate import discrepancy_cost, noise_estimate
from ._report import DiscrepancyReport

__all__ = ["shift_callback", "rank_one_start", "discrepancy_rank_search"]


def shift_callback(callback: Any, it0: int, t0: float) -> Any:
    """A callback that reports iterations and times shifted by ``it0`` and ``t0`` (later phases)."""
    if callback is None:
        return None

    def shifted(info: IterationInfo) -> Any:
        return callback(
            IterationInfo(
                info.iteration + it0,
                info.point,
                info.cost,
                info.grad_norm,
                info.step_size,
                info.time + t0,
            )
        )

    return shifted


def rank_one_start(problem: Any, seed: Any) -> FixedRankPoint:
    """The rank-1 start of the rank searches: the problem's spectral start, else a random point
    (seeded)."""
    x1 = problem.spectral_init(1, seed=seed)
    return x1 if x1 is not None else problem.manifold(1).random_point(seed)


def discrepancy_rank_search(
    problem: Any,
    max_rank: int,
    sigma: float,
    *,
    seed: Any = 0,
    tol: float = 1e-10,
    gtol: float = 0.0,
    max_iter: int = 200,
    max_time: float = math.inf,
    stage_max_iter: int = 6,
    callback: Any = None,
    solver_options: dict | None = None,
) -> SolverResult:
    r"""Smallest rank (at most ``max_rank``) whose fit reaches the discrepancy level.

    Rank-adaptive Gauss-Newton on all observations from the rank-1 spectral start, stopped at
    the first iterate with ``f(X) <= discrepancy_cost(problem, X.rank, sigma)`` (known noise
    level ``sigma``). ``info["rank_chosen"]`` is that iterate's rank; ``info["rank_search"]``
    is the :class:`~rankopt.solvers.noise.DiscrepancyReport` the ``info`` keys
    (``rank_chosen``, ``noise``, ``noise_estimate``) are built from.
    """
    opts = dict(solver_options or {})
    opts.pop("target_cost", None)
    reached = {"flag": False}

    def stop(info: IterationInfo) -> bool:
        if callback is not None and callback(info):
            return True
        if info.cost <= discrepancy_cost(problem, info.point.rank, sigma):
            reached["flag"] = True
            return True
        return False

    search = RankAdaptive(
        RGN(),
        max_rank=max_rank,
        add=1,
        stage_max_iter=stage_max_iter,
        tol=tol,
        gtol=gtol,
        max_iter=max_iter,
        max_time=max_time,
        **opts,
    )
    res = search.run(problem, rank_one_start(problem, seed), seed=seed, callback=stop)
    if reached["flag"]:
        res.stop_reason, res.converged = StopReason.TARGET_COST, True
    report = DiscrepancyReport(
        rank_chosen=res.rank, noise=sigma, noise_estimate=noise_estimate(problem, res.point)
    )
    res.info.update(report.as_info())
    res.info["rank_search"] = report
    res.solver = "rank-adaptive Gauss-Newton (discrepancy principle)"
    return res
