r"""Noise-aware solving for data problems: checks, noise estimates, held-out validation, rank choice.

A *data problem* is a least-squares problem ``f(X) = 1/2 ||A(X) - b||^2 (+ lam/2 ||X||_F^2)``
with ``N`` observations that can be split (:class:`~rankopt.problems.MatrixCompletion`,
:class:`~rankopt.problems.MatrixSensing`): it has ``num_observations``, ``observed_values()``,
``residual(x)`` and ``subset(index)``. For these, :func:`rankopt.solve` (through this module)

* warns before solving when ``N`` is below the degrees of freedom ``r (m + n - r)`` of the
  rank-r manifold (the fit is then under-determined), and names the rows and columns of a
  completion problem with fewer than ``r`` observations (never determined);
* estimates the noise level from the residual of a fit of rank ``k``,
  ``sigma_hat^2 = ||A(X) - b||^2 / (N - k (m + n - k))`` (the unbiased estimate of a linear
  least-squares model with ``dof`` parameters);
* when the data are noisy (``sigma_hat > NOISE_DETECT_REL * rms(b)``) and the rank is free
  (``rank="auto"``, or ``method="auto"``, whose ``rank`` is a maximum), chooses the rank on a
  held-out part of the observations (:func:`validated_rank_search`): rank-adaptive
  Gauss-Newton on the rest, keeping the iterate with the smallest held-out error (early
  stopping), then a refit on all observations at the chosen rank, stopped by the discrepancy
  principle at the noise level of the chosen iterate;
* with a known noise level (``noise=sigma``) stops every fit by the discrepancy principle,
  ``||A(X) - b||^2 <= tau (N - dof) sigma^2`` with ``tau = 1 + 2 sqrt(2 / N)`` (two standard
  deviations of ``||noise||^2 / sigma^2``, a chi-square with ``N`` degrees of freedom), and
  chooses the smallest rank that reaches it;
* after a fixed-rank fit, checks that the answer is identifiable at that rank
  (:func:`identifiability`): components at round-off or noise level, and, when cheap signals
  suggest it, whether a rank-adaptive fit reaches the same residual at a lower rank.

What was done is reported in ``result.info`` (``noise_estimate``, ``rank_chosen``,
``validation_rmse``, ``zero_rmse``, ...) and every departure from what was asked comes with a
warning (:class:`NoiseWarning`, :class:`UnderdeterminedWarning`,
:class:`IdentifiabilityWarning`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._backend import as_rng
from ..containers import FixedRankPoint
from .base import History, IterationInfo, SolverResult, StopReason, cost_and_gradient_norm
from .newton import RGN

__all__ = [
    "NoiseWarning",
    "UnderdeterminedWarning",
    "IdentifiabilityWarning",
    "Plan",
    "Holdout",
    "is_data_problem",
    "degrees_of_freedom",
    "noise_estimate",
    "discrepancy_cost",
    "default_max_rank",
    "plan",
    "precheck",
    "split",
    "split_indices",
    "ridge_grid",
    "RIDGE_GRID",
    "validated_rank_search",
    "discrepancy_rank_search",
    "identifiability",
    "finish",
    "shift_callback",
    "oracle_error",
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
#: Default fraction of the observations held out for validation.
VALIDATION_FRACTION = 0.1
#: The held-out error must fall by this relative amount to count as an improvement.
VALIDATION_RTOL = 1e-4
#: Early stopping: give up after this many rank increases without a held-out improvement.
VALIDATION_RANK_PATIENCE = 2
#: Relative ridge strengths tried by ``ridge="auto"`` (times ``N / (m n)``, see ridge_grid).
RIDGE_GRID = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0)
#: Scale of the returned point when no estimate beats the zero matrix on held-out entries (a
#: manifold point cannot be zero; this one is zero to working precision in every use).
ZERO_SCALE = 1e-12
#: Relative size (``s_i / s_1``) below which a fitted component is at round-off level.
TAIL_REL = 1e-8
#: Problems with at most this many entries ``m n`` always get the rank-adaptive check.
SMALL_PROBLEM = 50_000


class NoiseWarning(UserWarning):
    """The data are noisy and the result is limited by it (or no better than zero)."""


class UnderdeterminedWarning(UserWarning):
    """Fewer observations than degrees of freedom, or rows/columns that cannot be determined."""


class IdentifiabilityWarning(UserWarning):
    """The data do not determine the answer at the rank asked (a lower rank fits as well)."""


# --------------------------------------------------------------------------- basics
def is_data_problem(problem: Any) -> bool:
    """Whether ``problem`` follows the data protocol (observations that can be split)."""
    return all(
        hasattr(problem, a)
        for a in ("num_observations", "observed_values", "residual", "subset", "shape")
    ) and bool(getattr(problem, "least_squares", False))


def degrees_of_freedom(m: int, n: int, r: int) -> int:
    """``r (m + n - r)``: the dimension of the manifold of m x n matrices of rank r."""
    return int(r) * (int(m) + int(n) - int(r))


def _to_numpy(problem: Any, a: Any) -> np.ndarray:
    return problem.manifold(1).backend.to_numpy(a).astype(np.float64)


def _sq(problem: Any, a: Any) -> float:
    be = problem.manifold(1).backend
    return be.to_float(be.sum_sq(a))


def rms_observed(problem: Any) -> float:
    """Root mean square of the observed values: the RMSE of the zero matrix."""
    return math.sqrt(_sq(problem, problem.observed_values()) / problem.num_observations)


def noise_estimate(problem: Any, x: FixedRankPoint) -> float:
    r"""``sigma_hat = ||A(X) - b|| / sqrt(max(N - dof, 1))`` at the fit ``x`` (data term only).

    Unbiased for the noise variance when ``x`` is the least-squares fit of a correct linear
    model with ``dof = r (m + n - r)`` parameters. O(one residual evaluation).
    """
    m, n = problem.shape
    dof = degrees_of_freedom(m, n, x.rank)
    return math.sqrt(_sq(problem, problem.residual(x)) / max(problem.num_observations - dof, 1))


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


# --------------------------------------------------------------------------- plan and checks
@dataclass
class Plan:
    """What :func:`rankopt.solve` will do beyond running the solver (see :func:`plan`)."""

    data: bool
    auto_rank: bool
    rank: int
    noise: float | None
    validation: float
    check_rank: Any
    ridge: Any = None
    info: dict = field(default_factory=dict)


#: the options of :func:`rankopt.solve` that :func:`plan` reads (``max_rank`` too, with
#: ``rank="auto"``)
OPTIONS = ("noise", "validation", "check_rank", "ridge")


def plan(problem: Any, rank: Any, method: str, options: dict) -> Plan:
    """Read (and remove) this module's options from ``options``; validate; run :func:`precheck`.

    Options: ``noise`` (None: estimate; 0: exact data, skip all noise handling; a positive
    float: the known standard deviation), ``validation`` (held-out fraction, default 0.1),
    ``check_rank`` ("auto", True or False: the identifiability check), ``max_rank`` (with
    ``rank="auto"``), ``ridge`` (weight decays tried by the validated search: ``"auto"`` for
    :func:`ridge_grid`, a number or a list of them, or None for the problem's own; default
    ``"auto"`` with ``rank="auto"`` on a problem without weight decay, else None).
    """
    noise = options.pop("noise", None)
    validation = options.pop("validation", VALIDATION_FRACTION)
    check_rank = options.pop("check_rank", "auto")
    max_rank = options.pop("max_rank", None) if rank == "auto" else None
    ridge = _check_ridge(options.pop("ridge", "default"))
    if noise is not None:
        noise = float(noise)
        if not (noise >= 0 and math.isfinite(noise)):
            raise ValueError(f"noise must be None, 0 or a positive finite number, got {noise!r}")
    validation = float(validation)
    if not 0.0 < validation < 0.5:
        raise ValueError(f"validation (held-out fraction) must lie in (0, 0.5), got {validation!r}")
    if check_rank not in ("auto", True, False):
        raise ValueError(f"check_rank must be 'auto', True or False, got {check_rank!r}")
    data = is_data_problem(problem)
    auto_rank = isinstance(rank, str)
    if auto_rank:
        if rank != "auto":
            raise ValueError(f"rank must be a positive integer or 'auto', got {rank!r}")
        if not data:
            raise ValueError(
                "rank='auto' chooses the rank on held-out observations and needs a data problem "
                f"(MatrixCompletion or MatrixSensing), got {type(problem).__name__}"
            )
        if method.lower() != "auto":
            raise ValueError(f"rank='auto' works with method='auto' only, got method={method!r}")
        rank = default_max_rank(problem) if max_rank is None else max_rank
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
        what = "max_rank" if auto_rank else "rank"
        raise ValueError(f"{what} must be a positive integer, got {rank!r}")
    if ridge == "default":  # rank="auto" also chooses a ridge unless the problem has one
        own = float(getattr(problem, "weight_decay", 0.0))
        ridge = "auto" if auto_rank and own == 0.0 else None
    p = Plan(data, auto_rank, int(rank), noise, validation, check_rank, ridge)
    if data and rank <= min(problem.shape):  # larger ranks: the solver raises a clear error
        p.info.update(precheck(problem, p.rank))
    return p


def _check_ridge(ridge: Any) -> Any:
    if ridge is None or ridge in ("auto", "default"):
        return ridge
    values = [ridge] if np.isscalar(ridge) else list(ridge)
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(
            f"ridge must be None, 'auto', a weight decay >= 0 or a list of them, got {ridge!r}"
        ) from None
    if not values or not all(v >= 0 and math.isfinite(v) for v in values):
        raise ValueError(f"ridge weight decays must be finite and >= 0, got {ridge!r}")
    return values


def precheck(problem: Any, rank: int, stacklevel: int = 4) -> dict:
    """Warn when the data cannot determine a rank-``rank`` fit; return what was found.

    * ``N < r (m + n - r)``: fewer observations than degrees of freedom (any rank-r fit
      interpolates and the solution set is a manifold of positive dimension);
    * completion only: rows and columns with fewer than ``r`` observations (their factors
      are never determined), counted and listed (first 10) in the warning and in the
      returned ``underdetermined_rows`` / ``underdetermined_cols``.
    """
    m, n = problem.shape
    N = problem.num_observations
    dof = degrees_of_freedom(m, n, rank)
    info: dict[str, Any] = {"num_observations": N, "degrees_of_freedom": dof}
    if N < dof:
        warnings.warn(
            f"only {N} observations for a rank-{rank} fit with {dof} degrees of freedom "
            f"(r (m + n - r)): the problem is under-determined, many rank-{rank} matrices fit the "
            "data and the answer is not the truth in general; use a lower rank or more data",
            UnderdeterminedWarning,
            stacklevel=stacklevel,
        )
    under = getattr(problem, "underdetermined", None)
    if under is not None:
        rows, cols = under(rank)
        info["underdetermined_rows"], info["underdetermined_cols"] = rows, cols
        if rows.size or cols.size:
            warnings.warn(
                f"{rows.size} rows and {cols.size} columns have fewer than rank={rank} "
                f"observations and cannot be determined (rows {rows[:10].tolist()}, columns "
                f"{cols[:10].tolist()}{', ...' if max(rows.size, cols.size) > 10 else ''}); "
                "their entries are guesses. Drop them or use a lower rank.",
                UnderdeterminedWarning,
                stacklevel=stacklevel,
            )
    return info


def is_noisy(problem: Any, x: FixedRankPoint) -> tuple[bool, float]:
    """``(noisy, sigma_hat)``: whether the residual at ``x`` is above ``NOISE_DETECT_REL``."""
    sigma = noise_estimate(problem, x)
    return sigma > NOISE_DETECT_REL * rms_observed(problem), sigma


# --------------------------------------------------------------------------- held-out data
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
        return math.sqrt(
            _sq(self.problem, self.problem.residual(x)) / self.problem.num_observations
        )


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
    scale = problem.num_observations / (m * n) if hasattr(problem, "nnz") else 1.0
    return [rho * scale for rho in RIDGE_GRID]


# --------------------------------------------------------------------------- rank searches
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


def _rank_one_start(problem: Any, seed: Any) -> FixedRankPoint:
    x1 = problem.spectral_init(1, seed=seed)
    return x1 if x1 is not None else problem.manifold(1).random_point(seed)


@dataclass
class _Search:
    """One rank-adaptive fit on the training part, watched on the held-out part."""

    weight_decay: float
    best: dict
    closest: dict
    curve: list
    result: SolverResult
    user_stop: bool
    train: Any


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
    from .rank_adaptive import RankAdaptive  # late: rank_adaptive imports this module

    # the zero matrix is the first candidate; beating it must be significant (see Holdout)
    best = {"val": held.zero_bar, "x": None, "it": -1, "rank": 0}
    closest = {"val": math.inf, "x": None}  # best held-out error, even if not below zero's
    curve: list[float] = []
    user_stop = {"flag": False}

    def consider(x: FixedRankPoint, it: int) -> None:
        v = held.rmse(x)
        curve.append(v)
        if v < closest["val"]:
            closest.update(val=v, x=x)
        if v < best["val"] * (1.0 - VALIDATION_RTOL):
            best.update(val=v, x=x, it=it, rank=x.rank)

    def monitor(info: IterationInfo) -> bool:
        consider(info.point, info.iteration)
        if callback is not None and callback(info):
            user_stop["flag"] = True
            return True
        return info.point.rank >= max(best["rank"], 1) + VALIDATION_RANK_PATIENCE

    x1 = _rank_one_start(train, seed)
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
       :func:`ridge_grid` for ``"auto"``): rank-adaptive Gauss-Newton
       (:class:`~rankopt.solvers.RankAdaptive`, one pair per stage) on the training part from
       its rank-1 spectral start, computing the held-out RMSE after every iteration
       (O(|held out| r)) and keeping the best iterate. It stops early once
       ``VALIDATION_RANK_PATIENCE`` rank increases brought no improvement (by
       ``VALIDATION_RTOL``): more rank only fits noise. The weight decay with the best
       held-out error wins.
    3. If no iterate beats the zero matrix on the held-out part (significantly, see
       :class:`Holdout`), the closest one is scaled by the held-out least-squares factor
       ``c = <A_v(X), b_v> / ||A_v(X)||^2`` (if significant, else ``ZERO_SCALE``) and
       returned with a :class:`NoiseWarning` (no refit).
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
    ``problem`` itself) whose ``info`` holds ``rank_chosen``, ``validation_rmse``,
    ``zero_rmse``, ``validation_history`` (held-out RMSE per training iteration of the chosen
    fit), ``noise_estimate``, ``shrinkage``, ``weight_decay``, ``ridge_scan`` (weight decay,
    best held-out RMSE, its rank) and ``validation_fraction``.
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
    resT = chosen.result
    info: dict[str, Any] = {
        "exact_fit": exact is not None,
        "validation_fraction": fraction,
        "validation_history": chosen.curve,
        "zero_rmse": held.zero_rmse,
        "train_iterations": its,
        "train_stop": str(resT.stop_reason),
        "weight_decay": chosen.weight_decay,
        "ridge_scan": [
            (z.weight_decay, z.best["val"] if z.best["x"] is not None else None, z.best["rank"])
            for z in searches
        ],
    }
    if not found:  # nothing beats zero on held-out entries
        return _zero_fallback(problem, held, chosen, max_rank, its, info, t0)
    xb = chosen.best["x"]
    info.update(rank_chosen=xb.rank, validation_rmse=chosen.best["val"], shrinkage=1.0)
    info["best_train_iteration"] = chosen.best["it"]
    if chosen.weight_decay == own:
        target_problem = problem
    else:
        everything = np.arange(problem.num_observations)
        target_problem = problem.subset(everything, weight_decay=chosen.weight_decay)
    refit = RGN(
        tol=0.0,
        gtol=gtol,
        max_iter=max_iter if len(lams) > 1 else max(max_iter - its, 0),
        max_time=max_time - (time.perf_counter() - t0),
        ftol=STALL_FTOL,
        patience=STALL_PATIENCE,
        target_cost=_refit_target(problem, chosen.train, xb, user_target),
        **opts,
    )
    resR = refit.run(
        target_problem, xb, callback=shift_callback(callback, its, time.perf_counter() - t0)
    )
    reason = resR.stop_reason
    stopped_early = resT.stop_reason == StopReason.CALLBACK and not chosen.user_stop
    if any(z.user_stop for z in searches):
        reason = StopReason.CALLBACK
    elif not stopped_early and resT.stop_reason in (StopReason.MAX_TIME, StopReason.NON_FINITE):
        reason = resT.stop_reason
    info["noise_estimate"] = noise_estimate(problem, resR.point)
    return _result(problem, resR.point, its, resT, resR, reason, t0, info)


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
        exact.best.update(
            x=exact.result.point,
            rank=exact.result.point.rank,
            val=held.rmse(exact.result.point),
            it=exact.result.iterations,
        )
    found = [z for z in searches if z.best["x"] is not None]
    chosen = exact or min(
        found or searches, key=lambda z: z.best["val"] if found else z.closest["val"]
    )
    return chosen, exact, found


def _zero_fallback(problem, held, chosen, max_rank, its, info, t0) -> SolverResult:
    """No iterate beats the zero matrix on the held-out part: the closest one, scaled by the
    held-out least-squares factor (or ``ZERO_SCALE``), with a :class:`NoiseWarning`."""
    x = chosen.closest["x"]
    c = _holdout_scale(held, x)
    info.update(rank_chosen=0, validation_rmse=held.zero_rmse, shrinkage=c)
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
    return _result(problem, xs, its, chosen.result, None, StopReason.MIN_STEP, t0, info)


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


def _refit_target(problem: Any, train: Any, xb: FixedRankPoint, user_target: Any) -> Any:
    """Discrepancy-principle target of the refit: the chosen iterate's noise level on the
    training part (data term; plus the ridge term at the chosen iterate), None for exact data."""
    m, n = problem.shape
    dof = degrees_of_freedom(m, n, xb.rank)
    sigma_t = math.sqrt(_sq(train, train.residual(xb)) / max(train.num_observations - dof, 1))
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


def _holdout_scale(held: Holdout, x: FixedRankPoint) -> float:
    """``c = argmin_c ||c A_v(X) - b_v||`` clipped to ``[ZERO_SCALE, 1]``; ``ZERO_SCALE``
    unless significant: the decrease ``<A_v X, b_v>^2 / ||A_v X||^2`` of the held-out sum of
    squares must exceed ``9 zero_rmse^2`` (as for :attr:`Holdout.zero_bar`)."""
    p = held.problem
    b = p.observed_values()
    pred = p.residual(x) + b  # A_v(X)
    be = p.manifold(1).backend
    num = be.to_float(be.vdot(pred, b))
    den = be.to_float(be.sum_sq(pred))
    if not (den > 0 and num > 0) or num * num / den <= 9.0 * held.zero_rmse**2:
        return ZERO_SCALE
    return float(min(max(num / den, ZERO_SCALE), 1.0))


def _result(problem, x, its, resT, resR, reason, t0, info) -> SolverResult:
    """The search's result: history of the chosen training fit then of the refit; the cost
    and gradient are those of ``problem`` itself at ``x``."""
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
    level ``sigma``). ``info["rank_chosen"]`` is that iterate's rank.
    """
    from .rank_adaptive import RankAdaptive

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
    res = search.run(problem, _rank_one_start(problem, seed), seed=seed, callback=stop)
    if reached["flag"]:
        res.stop_reason, res.converged = StopReason.TARGET_COST, True
    res.info.update(
        rank_chosen=res.rank, noise=sigma, noise_estimate=noise_estimate(problem, res.point)
    )
    res.solver = "rank-adaptive Gauss-Newton (discrepancy principle)"
    return res


# --------------------------------------------------------------------------- the oracle
def oracle_error(problem: Any, rtol: float = 1e-10, maxiter: int = 5000) -> float:
    r"""Relative error of the least-squares fit on the true tangent space (needs ``truth``).

    With ``X*`` the truth and ``T`` its tangent space, the oracle knows ``T`` and fits
    ``xi* = argmin_{xi in T} ||A(X* + xi) - b||^2``, i.e. solves the Gauss-Newton system
    ``P_T A^* A P_T xi = P_T A^*(b - A(X*))`` (by CG to ``rtol``); its error is
    ``||xi*||_F / ||X*||_F``. For Gaussian noise of level ``sigma`` this is the error of the
    best linear unbiased estimate given the tangent space, about
    ``sigma sqrt(dof / p) / ||X*||_F`` for completion with ``p = N / (m n)`` (measured: 1.2 times
    that at 1000 x 1000, oversampling 3). Cost: one CG solve, O(iterations N r).
    """
    from .newton import truncated_cg

    x = problem.truth
    if x is None:
        raise ValueError("oracle_error needs a problem with a known truth")
    M = problem.manifold(x.rank)
    _, Z = problem.cost_and_egrad(x)
    g = M.projection(x, Z)
    xi, _, _ = truncated_cg(
        lambda v: M.projection(x, problem.ehess(x, M.embed(x, v))), g, M, rtol, maxiter
    )
    be = M.backend
    return math.sqrt(be.to_float(M.euclidean_inner(xi, xi)) / be.to_float(be.sum_sq(x.s)))


# --------------------------------------------------------------------------- identifiability
def _coherence(x: FixedRankPoint, be: Any) -> float:
    """``max_i max(m max_j U_ji^2, n max_j V_ji^2)``: the spikiest singular vector."""
    U, V = be.to_numpy(x.U), be.to_numpy(x.V)
    return float(max(U.shape[0] * np.max(U**2), V.shape[0] * np.max(V**2)))


def _noise_level(problem: Any, sigma: float) -> float | None:
    r"""Singular value at which a fitted component is as large as its noise:
    ``sigma sqrt(max(m, n) / p)`` with ``p = N / (m n)`` (completion; uniform sampling)."""
    if not hasattr(problem, "nnz"):
        return None
    m, n = problem.shape
    return sigma * math.sqrt(max(m, n) * m * n / problem.num_observations)


def identifiability(
    problem: Any,
    res: SolverResult,
    *,
    check_rank: Any = "auto",
    seed: Any = 0,
    time_budget: float = math.inf,
    stacklevel: int = 4,
) -> dict:
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

    Returns the findings (``tail_components``, ``lower_rank_fit``, ``lower_rank_point``,
    ``identifiable``).
    """
    from .rank_adaptive import RankAdaptive

    x = res.point
    be = problem.manifold(x.rank).backend
    s = be.to_numpy(x.s).astype(np.float64)
    out: dict[str, Any] = {}
    noisy, sigma = is_noisy(problem, x)
    level = TAIL_REL * s[0]
    what = "round-off"
    if noisy:
        nl = _noise_level(problem, sigma)
        if nl is not None and nl > level:
            level, what = nl, "noise"
    tail = int(np.sum(s <= level))
    out["tail_components"] = tail
    if tail:
        k = len(s) - tail
        warnings.warn(
            f"{tail} of the {len(s)} singular values of the rank-{len(s)} fit are at {what} level "
            f"(<= {level:.2e}; largest {s[0]:.2e}): the data support rank {k} at most, the "
            "remaining components are not determined. Use a lower rank or rank='auto'.",
            IdentifiabilityWarning,
            stacklevel=stacklevel,
        )
        out["identifiable"] = False
    m, n = problem.shape
    run = check_rank is True or (
        check_rank == "auto"
        and (m * n <= SMALL_PROBLEM or _coherence(x, be) > 6 * math.log(max(m, n)) + 6)
    )
    under = problem.num_observations < degrees_of_freedom(m, n, x.rank)
    if noisy or tail or under or x.rank < 2 or not run or not res.converged or time_budget <= 0:
        return out  # (under-determined: already warned; no rank is identifiable there)
    check = RankAdaptive(
        RGN(), max_rank=x.rank - 1, add=1, tol=1e-10, max_iter=20 * x.rank, max_time=time_budget
    )
    alt = check.run(problem, _rank_one_start(problem, seed), seed=seed)
    fit = math.sqrt(2 * max(res.cost, 0.0))
    alt_fit = math.sqrt(_sq(problem, problem.residual(alt.point)))
    scale = math.sqrt(_sq(problem, problem.observed_values()))
    if alt.converged and alt_fit <= max(10.0 * fit, 1e-8 * scale):
        diff = (x.to_lowrank() - alt.point.to_lowrank()).fro_norm() / float(np.linalg.norm(s))
        out.update(identifiable=False, lower_rank_fit=alt.rank, lower_rank_point=alt.point)
        warnings.warn(
            f"a rank-{alt.rank} point fits the data as well as this rank-{x.rank} fit (residual "
            f"{alt_fit:.2e} vs {fit:.2e}) and differs from it by {diff:.2e} (relative): the "
            f"rank-{x.rank} answer is not identifiable. Use rank={alt.rank} or method='auto'.",
            IdentifiabilityWarning,
            stacklevel=stacklevel,
        )
    else:
        out.setdefault("identifiable", True)
    return out


# --------------------------------------------------------------------------- after a run
def finish(
    problem: Any, res: SolverResult, p: Plan, *, seed: Any = 0, solver: Any = None
) -> SolverResult:
    """Post-run checks of :func:`rankopt.solve` on a data problem; fills ``res.info``.

    Adds ``noise_estimate`` and the precheck findings. A result at the full rank asked from a
    fixed-rank method (or from phase 1 of "auto") goes through :func:`identifiability`; when
    that finds a lower-rank fit that is as good, "auto" (whose rank is a maximum) returns it
    instead, with a warning, and the fixed-rank methods keep their answer (warned).
    """
    if not p.data:
        return res
    from .rank_adaptive import Auto, RankAdaptive

    res.info.update({k: v for k, v in p.info.items() if k not in res.info})
    if "noise_estimate" not in res.info:
        res.info["noise_estimate"] = noise_estimate(problem, res.point)
    res.info.setdefault("rank_chosen", res.rank)
    is_auto = isinstance(solver, Auto)
    fixed = not isinstance(solver, RankAdaptive) and (not is_auto or res.info.get("phase") == 1)
    if fixed and res.rank == p.rank:
        left = getattr(solver, "max_time", math.inf) - res.time
        budget = min(max(1.0, 2.0 * res.time), left)
        found = identifiability(
            problem, res, check_rank=p.check_rank, seed=seed, time_budget=budget, stacklevel=4
        )
        alt = found.pop("lower_rank_point", None)
        res.info.update(found)
        if is_auto and alt is not None:
            res.point = alt
            res.cost, res.grad_norm = cost_and_gradient_norm(problem, alt)
            res.info["rank_reduced_from"] = p.rank
            res.info["noise_estimate"] = noise_estimate(problem, alt)
            warnings.warn(
                f"method 'auto' returns the rank-{alt.rank} fit (rank={p.rank} is a maximum): "
                f"the rank-{p.rank} fit it found first is not identifiable",
                IdentifiabilityWarning,
                stacklevel=3,
            )
    elif is_auto and not p.auto_rank and res.rank < p.rank:
        chosen = res.info.get("rank_chosen")
        noisy = res.info["noise_estimate"] > NOISE_DETECT_REL * rms_observed(problem)
        if noisy and "validation_rmse" in res.info:
            why = (
                f"the held-out error was smallest at rank {chosen} (noise estimate "
                f"{res.info['noise_estimate']:.2e})"
            )
            category = NoiseWarning
        else:
            why = f"a rank-{res.rank} point fits the data, so rank {p.rank} is not identifiable"
            category = IdentifiabilityWarning
        warnings.warn(
            f"method 'auto' returns rank {res.rank} < rank={p.rank} (a maximum for 'auto'): {why}",
            category,
            stacklevel=3,
        )
    return res
