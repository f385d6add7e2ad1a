r"""The rank search of an unknown noise level: :func:`validated_rank_search` chooses the rank
(and a ridge) on held-out observations, then refits on all of them."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...containers import FixedRankPoint
from .._rank_growth import RankAdaptive
from ..base import History, IterationInfo, SolverResult, StopReason, cost_and_gradient_norm
from ..newton import RGN
from ._estimate import (
    NOISE_DETECT_REL,
    STALL_FTOL,
    STALL_PATIENCE,
    NoiseWarning,
    degrees_of_freedom,
    discrepancy_cost,
    noise_estimate,
    rms_observed,
    sum_squares,
)
from ._holdout import VALIDATION_FRACTION, ZERO_SCALE, Holdout, ridge_grid, split_indices
from ._report import ValidationReport
from ._search import rank_one_start, shift_callback

__all__ = ["VALIDATION_RTOL", "VALIDATION_RANK_PATIENCE", "validated_rank_search"]

#: The held-out error must fall by this relative amount to count as an improvement.
VALIDATION_RTOL = 1e-4
#: Early stopping: give up after this many rank increases without a held-out improvement.
VALIDATION_RANK_PATIENCE = 2


@dataclass
class _Candidate:
    """An iterate and its held-out RMSE ``val`` (``x`` None: no iterate yet; ``it`` its
    training iteration, ``rank`` its rank, 0 for the zero matrix)."""

    val: float
    x: FixedRankPoint | None = None
    it: int = -1
    rank: int = 0


@dataclass
class _Search:
    """One rank-adaptive fit on the training part, watched on the held-out part: ``best``
    beats the zero matrix significantly (see :class:`Holdout`), ``closest`` is the smallest
    held-out error even if it does not, ``curve`` the held-out RMSE per iteration."""

    weight_decay: float
    best: _Candidate
    closest: _Candidate
    curve: list[float]
    result: SolverResult
    user_stop: bool
    train: Any


def validated_rank_search(
    problem: Any,
    max_rank: int,
    *,
    seed: Any = 0,
    tol: float = 1e-10,
    gtol: float = 0.0,
    max_iter: int = 200,
    max_time: float = math.inf,
    fraction: float = VALIDATION_FRACTION,
    stage_max_iter: int = 6,
    callback: Any = None,
    solver_options: dict | None = None,
    ridge: Any = None,
) -> SolverResult:
    r"""Choose the rank (at most ``max_rank``), and a ridge, on held-out observations; refit.

    1. Split the observations (``fraction`` held out, seeded by ``seed``).
    2. For each weight decay (``ridge``: None keeps the problem's own; a list is tried in turn,
       :func:`~rankopt.solvers.noise.ridge_grid` for ``"auto"``): rank-adaptive Gauss-Newton
       (:class:`~rankopt.solvers.RankAdaptive`, one pair per stage) on the training part from
       its rank-1 spectral start, computing the held-out RMSE after every iteration
       (O(|held out| r)) and keeping the best iterate. It stops early once
       ``VALIDATION_RANK_PATIENCE`` rank increases brought no improvement (by
       ``VALIDATION_RTOL``): more rank only fits noise. The weight decay with the best
       held-out error wins.
    3. If no iterate beats the zero matrix on the held-out part (significantly, see
       :class:`~rankopt.solvers.noise.Holdout`), the closest one is scaled by the held-out
       least-squares factor ``c = <A_v(X), b_v> / ||A_v(X)||^2`` (if significant, else
       ``ZERO_SCALE``) and returned with a :class:`~rankopt.solvers.noise.NoiseWarning`
       (no refit).
    4. Otherwise refit on all observations (with the chosen weight decay) at the chosen rank
       from the chosen iterate, by Gauss-Newton stopped by the discrepancy principle at the
       chosen iterate's noise level ``sigma^2 = ||A_t(X) - b_t||^2 / (N_t - dof)`` (the same
       degree of fit, now with all data), by the cost-stall rule, or at the gradient
       tolerance (exact data).

    Budgets: ``max_time`` bounds the whole search; ``max_iter`` bounds the training fit and
    the refit together when one weight decay is tried, and each fit of a ridge scan (and the
    refit) on its own otherwise (a scan of 6 values can take up to 7 ``max_iter`` iterations:
    a shared budget would starve the last values and bias the choice).

    Cost: about one rank-adaptive solve on ``(1 - fraction) N`` observations per weight decay
    plus a few Gauss-Newton iterations. Returns a :class:`SolverResult` (cost and gradient of
    ``problem`` itself) whose ``info["rank_search"]`` is a
    :class:`~rankopt.solvers.noise.ValidationReport` (what was chosen, on what evidence), and
    whose other ``info`` keys are built from it: ``rank_chosen``, ``validation_rmse``,
    ``zero_rmse``, ``validation_history`` (held-out RMSE per training iteration of the chosen
    fit), ``noise_estimate``, ``shrinkage``, ``weight_decay``, ``ridge_scan`` (weight decay,
    best held-out RMSE, its rank), ``validation_fraction``, ``exact_fit``,
    ``train_iterations``, ``train_stop`` and ``best_train_iteration``.
    """
    t0 = time.perf_counter()
    opts = dict(solver_options or {})
    opts.pop("ftol", None)
    opts.pop("patience", None)
    user_target = opts.pop("target_cost", None)
    tr_idx, val_idx = split_indices(problem.num_observations, fraction, seed)
    held_p = problem.subset(val_idx, weight_decay=0.0)
    held = Holdout(held_p, rms_observed(held_p))
    own = float(getattr(problem, "weight_decay", 0.0))
    lams = [own] if ridge is None else (ridge_grid(problem) if ridge == "auto" else list(ridge))
    budget = dict(tol=tol, gtol=gtol, stage_max_iter=stage_max_iter, max_iter=max_iter)
    searches, its = _ridge_scan(
        problem, held, tr_idx, lams, max_rank, seed, callback, budget, opts, t0, max_time
    )
    chosen, exact, found = _pick(searches, held)
    summary = _scan_summary(searches, chosen, exact, held, fraction, its)
    if not found:  # nothing beats zero on held-out entries
        return _zero_fallback(problem, held, chosen, max_rank, its, summary, t0)
    report = ValidationReport(
        rank_chosen=chosen.best.x.rank,
        validation_rmse=chosen.best.val,
        shrinkage=1.0,
        best_train_iteration=chosen.best.it,
        **summary,
    )
    fit = dict(gtol=gtol, max_iter=max_iter if len(lams) > 1 else max(max_iter - its, 0))
    resR = _refit(problem, chosen, own, user_target, its, t0, max_time, callback, fit, opts)
    report.noise_estimate = noise_estimate(problem, resR.point)
    reason = _stop_reason(searches, chosen, resR)
    return _result(problem, resR.point, its, chosen.result, resR, reason, t0, report)


def _watched_fit(
    train: Any,
    held: Holdout,
    max_rank: int,
    seed: Any,
    callback: Any,
    budget: dict,
    opts: dict,
) -> _Search:
    """Rank-adaptive Gauss-Newton on ``train`` from rank 1, keeping the best held-out iterate
    and stopping after ``VALIDATION_RANK_PATIENCE`` rank increases without improvement."""
    # the zero matrix is the first candidate; beating it must be significant (see Holdout)
    best = _Candidate(held.zero_bar)
    closest = _Candidate(math.inf)  # best held-out error, even if not below zero's
    curve: list[float] = []
    user_stop = {"flag": False}

    def consider(x: FixedRankPoint, it: int) -> None:
        v = held.rmse(x)
        curve.append(v)
        if v < closest.val:
            closest.val, closest.x = v, x
        if v < best.val * (1.0 - VALIDATION_RTOL):
            best.val, best.x, best.it, best.rank = v, x, it, x.rank

    def monitor(info: IterationInfo) -> bool:
        consider(info.point, info.iteration)
        if callback is not None and callback(info):
            user_stop["flag"] = True
            return True
        return info.point.rank >= max(best.rank, 1) + VALIDATION_RANK_PATIENCE

    x1 = rank_one_start(train, seed)
    consider(x1, 0)
    search = RankAdaptive(
        RGN(),
        max_rank=max_rank,
        add=1,
        ftol=STALL_FTOL,
        patience=STALL_PATIENCE,
        **budget,
        **opts,
    )
    res = search.run(train, x1, seed=seed, callback=monitor)
    wd = float(getattr(train, "weight_decay", 0.0))
    return _Search(wd, best, closest, curve, res, user_stop["flag"], train)


def _ridge_scan(
    problem, held, tr_idx, lams, max_rank, seed, callback, budget, opts, t0, max_time
) -> tuple[list[_Search], int]:
    """One watched rank-adaptive fit on the training part per weight decay in ``lams``
    (``max_iter`` bounds each fit, ``max_time`` the whole scan); stops at a user's callback
    stop, a time-out, non-finite values, or an exact fit (a ridge could only add bias)."""
    searches: list[_Search] = []
    its = 0
    for lam in lams:
        fit_budget = dict(budget, max_time=max_time - (time.perf_counter() - t0))
        train = problem.subset(tr_idx, weight_decay=lam)
        shift = shift_callback(callback, its, time.perf_counter() - t0) if callback else None
        searches.append(_watched_fit(train, held, max_rank, seed, shift, fit_budget, opts))
        its += searches[-1].result.iterations
        last = searches[-1]
        stopped = last.result.stop_reason in (StopReason.MAX_TIME, StopReason.NON_FINITE)
        if last.user_stop or stopped or _exact_fit([last]) is not None:
            break
    return searches, its


def _pick(searches: list[_Search], held: Holdout) -> tuple[_Search, Any, list[_Search]]:
    """``(chosen, exact, found)``: an exact fit if there is one (its converged point, not an
    early-stopped iterate), else the search with the best held-out iterate; ``found`` are the
    searches with an iterate that beats zero (if none, the one closest to beating it)."""
    exact = _exact_fit(searches)
    if exact is not None:
        x = exact.result.point
        exact.best.x, exact.best.rank, exact.best.val = x, x.rank, held.rmse(x)
        exact.best.it = exact.result.iterations
    found = [z for z in searches if z.best.x is not None]
    chosen = exact or min(found or searches, key=lambda z: z.best.val if found else z.closest.val)
    return chosen, exact, found


def _scan_summary(
    searches: list[_Search], chosen: _Search, exact: Any, held: Holdout, fraction: float, its: int
) -> dict[str, Any]:
    """The :class:`ValidationReport` fields that do not depend on beating zero."""
    return dict(
        exact_fit=exact is not None,
        validation_fraction=fraction,
        validation_history=chosen.curve,
        zero_rmse=held.zero_rmse,
        train_iterations=its,
        train_stop=str(chosen.result.stop_reason),
        weight_decay=chosen.weight_decay,
        ridge_scan=[
            (z.weight_decay, z.best.val if z.best.x is not None else None, z.best.rank)
            for z in searches
        ],
    )


def _zero_fallback(problem, held, chosen, max_rank, its, summary, t0) -> SolverResult:
    """No iterate beats the zero matrix on the held-out part: the closest one, scaled by the
    held-out least-squares factor (or ``ZERO_SCALE``), with a :class:`NoiseWarning`."""
    x = chosen.closest.x
    c = held.scale(x)
    report = ValidationReport(rank_chosen=0, validation_rmse=held.zero_rmse, shrinkage=c, **summary)
    warnings.warn(
        f"no rank-1..{max_rank} estimate beats the zero matrix on the held-out "
        f"observations (held-out RMSE of zero: {held.zero_rmse:.3e}): the data are too noisy "
        f"to estimate anything at this sampling; returned the rank-{x.rank} fit closest to "
        f"them scaled by {c:.2e} (the held-out least-squares scale if significant, else "
        f"{ZERO_SCALE:g})",
        NoiseWarning,
        stacklevel=4,
    )
    xs = FixedRankPoint(x.U, x.s * c, x.V)
    return _result(problem, xs, its, chosen.result, None, StopReason.MIN_STEP, t0, report)


def _exact_fit(searches: list[_Search]) -> _Search | None:
    """The unregularized fit whose training residual reached exact-data level, if any.

    On exact data the held-out error can stall early (held-out entries of rows or columns
    left with fewer than ``r`` training observations cannot be predicted), and the iterate it
    picks is an unfinished fit; a training residual at ``NOISE_DETECT_REL`` of the data says
    that the data are exact, and then the converged fit is the answer."""
    for z in searches:
        if z.weight_decay != 0.0 or z.result.point is None:
            continue
        x, train = z.result.point, z.train
        if noise_estimate(train, x) <= NOISE_DETECT_REL * rms_observed(train):
            return z
    return None


def _refit(problem, chosen, own, user_target, its, t0, max_time, callback, fit, opts):
    """Gauss-Newton on all observations (with the chosen weight decay) from the chosen
    iterate, stopped at the discrepancy level of :func:`_refit_target`, by the cost-stall rule
    or at ``fit["gtol"]``, within ``fit["max_iter"]`` and what is left of ``max_time``."""
    xb = chosen.best.x
    if chosen.weight_decay == own:
        target_problem = problem
    else:
        everything = np.arange(problem.num_observations)
        target_problem = problem.subset(everything, weight_decay=chosen.weight_decay)
    refit = RGN(
        tol=0.0,
        gtol=fit["gtol"],
        max_iter=fit["max_iter"],
        max_time=max_time - (time.perf_counter() - t0),
        ftol=STALL_FTOL,
        patience=STALL_PATIENCE,
        target_cost=_refit_target(problem, chosen.train, xb, user_target),
        **opts,
    )
    return refit.run(
        target_problem, xb, callback=shift_callback(callback, its, time.perf_counter() - t0)
    )


def _refit_target(problem: Any, train: Any, xb: FixedRankPoint, user_target: Any) -> Any:
    """Discrepancy-principle target of the refit: the chosen iterate's noise level on the
    training part (data term; plus the ridge term at the chosen iterate), None for exact data."""
    m, n = problem.shape
    dof = degrees_of_freedom(m, n, xb.rank)
    resid = sum_squares(train, train.residual(xb))
    sigma_t = math.sqrt(resid / max(train.num_observations - dof, 1))
    target = None
    if sigma_t > NOISE_DETECT_REL * rms_observed(problem):
        target = discrepancy_cost(problem, xb.rank, sigma_t)
        wd = float(getattr(train, "weight_decay", 0.0))
        if wd > 0:
            be = problem.manifold(1).backend
            target += 0.5 * wd * be.to_float(be.sum_sq(xb.s))
    if user_target is not None:
        target = user_target if target is None else max(target, user_target)
    return target


def _stop_reason(searches: list[_Search], chosen: _Search, resR: SolverResult) -> StopReason:
    """The refit's stop reason, unless a user's callback stopped a training fit (CALLBACK) or
    the chosen training fit ran out of time or hit non-finite values (not merely stopped early
    by the held-out watch)."""
    resT = chosen.result
    stopped_early = resT.stop_reason == StopReason.CALLBACK and not chosen.user_stop
    if any(z.user_stop for z in searches):
        return StopReason.CALLBACK
    if not stopped_early and resT.stop_reason in (StopReason.MAX_TIME, StopReason.NON_FINITE):
        return resT.stop_reason
    return resR.stop_reason


def _result(problem, x, its, resT, resR, reason, t0, report) -> SolverResult:
    """The search's result: history of the chosen training fit then of the refit; the cost
    and gradient are those of ``problem`` itself at ``x``; ``info`` built from ``report``."""
    hist = History()
    h = resT.history
    hist.append(
        h.iteration[0], h.cost[0], h.grad_norm[0], h.time[0], 0.0, h.rank[0], h.rel_error[0]
    )
    hist.extend(h)
    it = its
    if resR is not None:
        hist.extend(resR.history, resT.iterations, resT.time)
        it += resR.iterations
    f, gn = cost_and_gradient_norm(problem, x)
    info = report.as_info()
    info["rank_search"] = report
    return SolverResult(
        x,
        f,
        gn,
        it,
        reason,
        reason.converged,
        hist,
        time.perf_counter() - t0,
        "validated rank-adaptive Gauss-Newton",
        info,
    )
