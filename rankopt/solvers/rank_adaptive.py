r"""Rank-adaptive methods: :class:`RankAdaptive`, the wrapper around any inner solver, and
:class:`Auto`, the default of :func:`rankopt.solve`.

Layout: :class:`RankAdaptive`, :func:`normal_top_singular` and :class:`RankRole` are defined in
``rankopt/solvers/_rank_growth.py`` and re-exported here (this module is where they are
documented and imported from). :class:`Auto` is defined here: it runs the noise-aware rank
searches of :mod:`rankopt.solvers.noise`, which themselves run :class:`RankAdaptive`; keeping
:class:`RankAdaptive` below both makes the imports go one way
(``rank_adaptive -> noise -> _rank_growth``).

Stage ``k`` runs the inner solver at rank ``r_k``; then the rank grows by the top singular
pairs of the *normal* part of the negative Euclidean gradient,
``N = (I - U U^T) (-egrad) (I - V V^T)``, which is the best rank-one descent direction that
leaves the manifold (Uschmajew & Vandereycken, "Greedy rank updates combined with Riemannian
descent methods for low-rank optimization", SampTA 2015; Gao & Absil, "A Riemannian rank-adaptive
method for low-rank matrix completion", 2022). The new pairs enter with the exact step along
``X + t u sigma v^T`` when the problem offers one. Optionally the rank also shrinks by truncation
at ``rank_tol`` (``||s_{j:}|| <= rank_tol ||s||``).

Why: from a spectral start, fixed-rank methods stall on ill-conditioned targets (condition
number ``kappa = s_1 / s_r`` of 100 and more), because the small singular directions are
buried in the sampling noise of the start. Adding directions one "scale" at a time fits the
large singular values first and then the small ones, so the number of iterations barely
depends on ``kappa`` (see ``benchmarks/completion.py``).

Cost of a rank update: a randomized SVD of ``N`` through products with the gradient
(O(q (|Omega| + (m+n) r) p) for ``p`` probe vectors and ``q`` power iterations).
"""

from __future__ import annotations

import math
import time
from typing import Any

from ._rank_growth import RankAdaptive, RankRole, normal_top_singular, rank_role
from .base import History, Solver, SolverResult, StopReason
from .newton import RGN
from .noise import (
    STALL_FTOL,
    STALL_PATIENCE,
    discrepancy_cost,
    discrepancy_rank_search,
    is_data_problem,
    is_noisy,
    shift_callback,
    validated_rank_search,
)

__all__ = ["RankAdaptive", "Auto", "normal_top_singular", "RankRole", "rank_role", "outside_basin"]

#: Phase 1 of Auto continues past ``first_budget`` when the gradient still falls by this factor
#: per iteration or faster (geometric mean of the last three).
STEADY = 0.7
#: Phase 1 of Auto is outside Gauss-Newton's basin when two iterations in a row fail to divide
#: the gradient norm by ``1 / BASIN_RATE`` (see :func:`outside_basin`).
BASIN_RATE = 0.5
#: ... or when the gradient norm rises while it is above this fraction of its value after the
#: first iteration (below, a rise can be round-off at a tight ``tol``).
RISE_FLOOR = 1e-6


def outside_basin(grad_norms: list[float]) -> bool:
    r"""Whether a Gauss-Newton run from a spectral start has left (or never entered) its basin.

    ``grad_norms[k - 1]`` is the gradient norm ``g_k`` after iteration ``k`` (the start
    excluded). True after iteration ``k`` when

    * ``k >= 2`` and the gradient rose, ``g_k > g_{k-1}``, while ``g_{k-1} > RISE_FLOOR g_1``;
    * or ``k >= 3`` and neither of the last two iterations halved it:
      ``g_{k-1} > BASIN_RATE g_{k-2}`` and ``g_k > BASIN_RATE g_{k-1}``.

    In its basin, Gauss-Newton on a zero-residual least-squares problem divides the gradient
    by 3 or more per iteration (quadratic convergence: its model holds, the step is accepted
    whole). Measured from the spectral start at rank 10 (n = 1000 and 4000, oversampling
    1.5-5, three seeds; power-law sampling; noise 1e-5-1e-2; full trajectories of 20
    iterations): on the 26 runs where phase 1 converges (kappa = 1) the test never fires, the
    gradient never rose before convergence, and no two consecutive iterations from the second
    on had ratios above 0.5 (the largest single ratios: 0.68, after 0.19, at oversampling 1.5;
    0.68 and 0.62 among 0.2-0.4 on the slow, steady runs of power-law sampling). Where it fails
    (kappa 10-1e4), the first two iterations divide the gradient by 3-8 as well (the large
    singular values are fitted); then the gradient rises or falls by only 0.6-0.9 per
    iteration, the error grows and the inner CG runs up to its cap. The test fires at
    iteration 4 on 37 of those 45 runs (3 to 6 on the others). The two-slow-iterations part
    alone (the previous test) fires at the same iteration except where the gradient
    alternates (divided by 3, then multiplied by 1.5, ...): iteration 5 instead of 12 on two
    runs at n = 1000, and at 1e5 x 1e5, kappa 100 (``random_completion(..., seed=3)``),
    iteration 3 instead of 10. O(1).
    """
    k = len(grad_norms)
    g = grad_norms
    if k >= 2 and g[-1] > g[-2] and g[-2] > RISE_FLOOR * g[0]:
        return True
    return k >= 3 and g[-2] > BASIN_RATE * g[-3] and g[-1] > BASIN_RATE * g[-2]


def _rank_one_gradient(problem: Any, x1: Any, seed: Any) -> float:
    """The gradient norm at ``x1`` (default: the rank-1 spectral start, else a random point):
    phase 2's reference for the relative tolerance when phase 1 did not run. O(problem's
    gradient)."""
    if x1 is None:
        x1 = problem.spectral_init(1, seed=seed)
    if x1 is None:
        x1 = problem.manifold(1).random_point(seed)
    M1 = problem.manifold(x1.rank)
    g1 = M1.projection(x1, problem.egrad(x1))
    return math.sqrt(max(M1.backend.to_float(M1.euclidean_inner(g1, g1)), 0.0))


def _joined(h1: History, h2: History, it0: int, t0: float) -> History:
    """One history from two consecutive runs (the second's start is the first's end)."""
    out = History()
    out.append(
        h1.iteration[0], h1.cost[0], h1.grad_norm[0], h1.time[0], 0.0, h1.rank[0], h1.rel_error[0]
    )
    out.extend(h1)
    out.extend(h2, it0, t0)
    return out


class Auto(Solver):
    """The default of :func:`rankopt.solve`: fast when it can be, robust when it must be.

    1. Riemannian Gauss-Newton/Newton-CG at the full rank from the spectral start, with a
       budget of ``first_budget`` iterations, abandoned as soon as the gradient norm rises
       or two iterations in a row fail to halve it (:func:`outside_basin`; measured: in the
       basin every iteration divides it by 3 or more and it never rises; outside, e.g. kappa
       >= 10 at oversampling 3, it rises or falls by 0.6-0.9 per iteration from the third
       iteration on). Quadratic convergence makes this the fastest route when the start is
       in the basin. Skipped when the problem says that the top-``rank`` spectrum of its data
       is not separated from the rest (``problem.spectral_init_if_separated`` returns None:
       :meth:`rankopt.problems.MatrixCompletion.spectral_init_if_separated`; no rank-r
       subspace to start from; ``info["first_phase_skipped"]``). On data
       problems (completion, sensing) it also stops when the cost stalls at a nonzero
       residual (noise; :data:`rankopt.solvers.noise.STALL_FTOL`).
    2. If that has not converged, or it converged on noisy data (``noise=None`` and the
       residual's noise estimate is above :data:`~rankopt.solvers.noise.NOISE_DETECT_REL`
       times the RMS of the data), rank-adaptive Gauss-Newton from the rank-1 spectral start,
       adding one pair at a time (robust to condition numbers of 1e4 in our tests), up to
       ``rank``:

       * data problems, noise unknown (``noise=None``): on a training part of the
         observations, choosing the rank and stopping point by the error on the held-out rest
         (``validation`` of them), then refitting on all observations
         (:func:`rankopt.solvers.noise.validated_rank_search`);
       * known noise level (``noise=sigma > 0``): on all observations, stopped by the
         discrepancy principle (:func:`~rankopt.solvers.noise.discrepancy_rank_search`);
       * exact data (``noise=0``) and other problems: :class:`RankAdaptive` on all of it.

    ``rank`` is therefore a maximum: the result can have a lower rank (``info["phase"] == 2``).
    ``info["phase"]`` says which phase produced the result; the history holds both phases.

    Parameters
    ----------
    first_budget, stage_max_iter : int
    noise : float or None
        Standard deviation of the noise in the observations if known, 0 for exact data,
        None to estimate it.
    validation : float
        Fraction of the observations held out in the validated search.
    first_phase : bool
        False skips phase 1 (``rank="auto"`` in :func:`rankopt.solve`).
    ridge : None, "auto" or list of float
        Weight decays tried by the validated search (see
        :func:`rankopt.solvers.noise.validated_rank_search`).

    Attributes
    ----------
    rank_role : RankRole
        ``RankRole.AUTO``: ``rank`` is a maximum; :func:`rankopt.solvers.noise.finish` may
        replace a phase-1 result by a lower-rank fit that is as good (see :class:`RankRole`).
    """

    name = "auto"
    rank_role = RankRole.AUTO

    def __init__(
        self,
        *,
        first_budget: int = 20,
        stage_max_iter: int = 6,
        noise: float | None = None,
        validation: float = 0.1,
        first_phase: bool = True,
        ridge: Any = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.first_budget, self.stage_max_iter = first_budget, stage_max_iter
        self.noise, self.validation, self.first_phase = noise, validation, first_phase
        self.ridge = ridge

    def _common(self) -> dict:
        return dict(
            metric=self.metric,
            verbose=self.verbose,
            track_error=self.track_error,
            ftol=self.ftol,
            patience=self.patience,
            target_cost=self.target_cost,
        )

    def _first(self, problem, start, rank, data, callback):
        """Phase 1: Gauss-Newton at full rank with the basin watch. Returns its result."""
        common = self._common()
        if data:  # stop at a stalled nonzero residual; a known noise level sets a target
            common["ftol"] = max(self.ftol, STALL_FTOL)
            common["patience"] = STALL_PATIENCE
            if self.noise:
                common["target_cost"] = discrepancy_cost(problem, rank, self.noise)
        first = RGN(
            tol=self.tol,
            gtol=self.gtol,
            max_iter=min(self.first_budget, self.max_iter),
            max_time=self.max_time,
            **common,
        )
        watch: dict = {"seen": [], "user": False}

        def watch_progress(info):
            # Gauss-Newton in its basin converges quadratically: a gradient that no longer
            # halves per iteration means the start is outside it (outside_basin): phase 2 now
            watch["seen"].append(info.grad_norm)
            if callback is not None and callback(info):
                watch["user"] = True
                return True
            return outside_basin(watch["seen"])

        resA = first.run(problem, start, callback=watch_progress)
        if resA.stop_reason == StopReason.CALLBACK and not watch["user"]:
            resA.stop_reason, resA.converged = StopReason.MAX_ITER, False
        return resA

    def run(self, problem, x0=None, *, rank=None, seed=None, callback=None) -> SolverResult:
        t0 = time.perf_counter()
        rank = rank if rank is not None else (x0.rank if x0 is not None else None)
        if rank is None:
            raise ValueError("Auto needs rank=... or a starting point")
        data = is_data_problem(problem) and self.noise != 0
        resA = None
        start = self._start(problem, x0, rank, seed) if self.first_phase else None
        if start is not None:
            resA = self._first(problem, start, rank, data, callback)
            resA = self._extend_first(problem, resA, data, callback, t0)
            finished = (
                resA.converged
                or resA.stop_reason in (StopReason.CALLBACK, StopReason.MAX_TIME)
                or (resA.iterations >= self.max_iter)
            )
            noisy = False
            if finished and data and self.noise is None and resA.converged:
                noisy, resA.info["noise_estimate"] = is_noisy(problem, resA.point)
            if finished and not noisy:
                resA.solver, resA.info["phase"] = "auto (Gauss-Newton)", 1
                resA.time = time.perf_counter() - t0
                return resA
            gref = resA.history.grad_norm[0]
        else:  # phase 1 skipped or off: the tolerance refers to the rank-1 start
            gref = _rank_one_gradient(problem, None if self.first_phase else x0, seed)
        resB = self._second(problem, rank, seed, callback, resA, gref, data, t0)
        out = self._merge(resA, resB, t0)
        if self.first_phase and start is None:
            out.info["first_phase_skipped"] = "spectral start not separated"
        return out

    def _start(self, problem, x0, rank, seed):
        """Phase 1's start: ``x0``; else the spectral start, or None (phase 1 is skipped) when
        the problem says that its top-``rank`` spectrum is not separated from the rest
        (``problem.spectral_init_if_separated``, e.g.
        :meth:`rankopt.problems.MatrixCompletion.spectral_init_if_separated`: no rank-r
        subspace is determined by the data's spectrum, Gauss-Newton from it fails); else a
        random point."""
        if x0 is not None:
            return x0
        separated = getattr(problem, "spectral_init_if_separated", None)
        if separated is not None:
            return separated(rank, seed=seed)
        start = problem.spectral_init(rank, seed=seed)
        return start if start is not None else problem.manifold(rank).random_point(seed)

    def _extend_first(self, problem, resA, data, callback, t0):
        """Phase 1 that used up ``first_budget`` while still converging steadily (the last
        three iterations divided the gradient by ``1 / STEADY`` or more on average, and the
        watch did not fire) goes on at the same rank: it is in its basin, only slower than
        quadratic (e.g. heavily skewed sampling). Measured: power-law sampling with Zipf
        exponent 1 at 1000 x 1000 reached 2e-11 of a 1e-11 target in its 20 iterations and was
        then abandoned for a rank-adaptive restart of 150 more iterations."""
        g = resA.history.grad_norm
        budget = self.max_iter - resA.iterations
        steady = (
            resA.stop_reason == StopReason.MAX_ITER
            and resA.iterations >= min(self.first_budget, self.max_iter)  # not the watch
            and budget > 0
            and len(g) >= 4
            and (g[-1] / g[-4]) ** (1.0 / 3.0) <= STEADY
        )
        if not steady:
            return resA
        common = self._common()
        if data:
            common["ftol"] = max(self.ftol, STALL_FTOL)
            common["patience"] = STALL_PATIENCE
        more = RGN(
            tol=0.0,
            gtol=max(self.gtol, self.tol * g[0]),
            max_iter=budget,
            max_time=self.max_time - (time.perf_counter() - t0),
            **common,
        )
        user = shift_callback(callback, resA.iterations, resA.time)
        seen = list(g[-3:])
        stalled = {"flag": False}

        def watch(info):  # keep going only while the rate stays STEADY or better
            if user is not None and user(info):
                return True
            seen.append(info.grad_norm)
            if (seen[-1] / seen[-4]) ** (1.0 / 3.0) > STEADY:
                stalled["flag"] = True
                return True
            return False

        resC = more.run(problem, resA.point, callback=watch)
        if stalled["flag"]:
            resC.stop_reason, resC.converged = StopReason.MAX_ITER, False
        resC.history = _joined(resA.history, resC.history, resA.iterations, resA.time)
        resC.iterations += resA.iterations
        resC.time += resA.time
        resC.info["extended"] = True
        return resC

    def _second(self, problem, rank, seed, callback, resA, gref, data, t0):
        """Phase 2 (see the class docstring)."""
        gtol = max(self.gtol, self.tol * gref)
        it0 = resA.iterations if resA is not None else 0
        tA = resA.time if resA is not None else 0.0
        common = self._common()
        budget = dict(
            seed=seed,
            tol=self.tol,
            gtol=gtol,
            max_iter=self.max_iter - it0,
            max_time=self.max_time - (time.perf_counter() - t0),
            stage_max_iter=self.stage_max_iter,
            callback=shift_callback(callback, it0, tA) if callback else None,
            solver_options=common,
        )
        if data and self.noise is None:
            return validated_rank_search(
                problem, rank, fraction=self.validation, ridge=self.ridge, **budget
            )
        if data and self.noise:
            return discrepancy_rank_search(problem, rank, self.noise, **budget)
        x1 = problem.spectral_init(1, seed=seed)
        if x1 is None:
            x1 = problem.manifold(1).random_point(seed)
        second = RankAdaptive(
            RGN(),
            max_rank=rank,
            add=1,
            stage_max_iter=self.stage_max_iter,
            tol=self.tol,
            gtol=gtol,
            max_iter=budget["max_iter"],
            max_time=budget["max_time"],
            **common,
        )
        return second.run(problem, x1, seed=seed, callback=budget["callback"])

    def _merge(self, resA, resB, t0):
        if resA is None:
            resB.time, resB.info["phase"] = time.perf_counter() - t0, 2
            resB.solver = f"auto ({resB.solver})"
            return resB
        hist = History()
        h = resA.history
        hist.append(
            h.iteration[0], h.cost[0], h.grad_norm[0], h.time[0], 0.0, h.rank[0], h.rel_error[0]
        )
        hist.extend(h)
        hist.extend(resB.history, resA.iterations, resA.time)
        resB.history, resB.iterations = hist, resA.iterations + resB.iterations
        solver = resB.solver if resB.solver.startswith(("valid", "rank-adaptive G")) else ""
        resB.time = time.perf_counter() - t0
        resB.solver = f"auto ({solver or 'rank-adaptive Gauss-Newton'})"
        resB.info.update(phase=2, first_phase=resA)
        return resB
