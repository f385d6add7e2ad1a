r"""Rank-adaptive wrapper around any inner solver.

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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .._backend import as_rng
from ..containers import FixedRankPoint, LowRankMatrix
from ..manifold import truncation_rank
from .base import (
    History,
    IterationInfo,
    Solver,
    SolverResult,
    StopReason,
    cost_and_gradient_norm,
)
from .newton import RGN

__all__ = ["RankAdaptive", "Auto", "normal_top_singular"]

#: Phase 1 of Auto continues past ``first_budget`` when the gradient still falls by this factor
#: per iteration or faster (geometric mean of the last three).
STEADY = 0.7


def _joined(h1: History, h2: History, it0: int, t0: float) -> History:
    """One history from two consecutive runs (the second's start is the first's end)."""
    out = History()
    out.append(
        h1.iteration[0], h1.cost[0], h1.grad_norm[0], h1.time[0], 0.0, h1.rank[0], h1.rel_error[0]
    )
    out.extend(h1)
    out.extend(h2, it0, t0)
    return out


#: A stage that ends (iteration cap or stage_tol) while its last iteration divided the gradient
#: by more than 1 / FAST_DECREASE is continued at the same rank (it converges superlinearly).
FAST_DECREASE = 0.1


def normal_top_singular(
    manifold, x: FixedRankPoint, Z: Any, k: int, seed: Any = 0, power_iters: int = 4
):
    """Top-k singular triplets of ``N = (I - U U^T) Z (I - V V^T)`` by randomized subspace iteration.

    Uses only ``Z @ B`` and ``Z^T @ A`` (dense, sparse or factored Z). Returns ``(u, s, v)`` with
    ``u`` (m x k) orthogonal to ``U`` and ``v`` (n x k) orthogonal to ``V``.
    """
    be = manifold.backend
    U, V = x.U, x.V

    def N(B):
        B = B - V @ (V.T @ B)
        Y = manifold.geometry.matmul(Z, B)
        return Y - U @ (U.T @ Y)

    def Nt(A):
        A = A - U @ (U.T @ A)
        Y = manifold.geometry.rmatmul(Z, A)
        return Y - V @ (V.T @ Y)

    p = min(k + 8, manifold.n - x.rank, manifold.m - x.rank)
    if p <= 0:
        return None
    Q, _ = be.qr(N(be.randn(as_rng(seed), (manifold.n, p))))
    for _ in range(power_iters):
        W, _ = be.qr(Nt(Q))
        Q, _ = be.qr(N(W))
    B = Nt(Q)  # n x p, so that N ~ Q B^T
    ub, s, vh = be.svd(B.T)  # B^T = ub s vh  ->  N ~ (Q ub) s vh
    k = min(k, p)
    u, v = Q @ ub[:, :k], vh[:k].T
    u = u - U @ (U.T @ u)
    v = v - V @ (V.T @ v)
    return u, s[:k], v


_INNER_FIELDS = ("tol", "gtol", "max_iter", "max_time", "track_error", "ftol", "verbose")


@contextmanager
def _inner_settings(inner: Solver, **settings: Any) -> Iterator[None]:
    """Set ``settings`` on the inner solver for the run; restore every field a stage changes
    (:data:`_INNER_FIELDS`) afterwards, also on errors."""
    saved = {k: getattr(inner, k) for k in _INNER_FIELDS}
    try:
        for k, v in settings.items():
            setattr(inner, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(inner, k, v)


def _converging_fast(res: SolverResult, gtol: float) -> bool:
    """A stage that stopped (iteration cap or stage tolerance) short of ``gtol`` while its
    gradient norm still fell by ``FAST_DECREASE`` or more per iteration."""
    g = res.history.grad_norm
    return (
        res.stop_reason in (StopReason.MAX_ITER, StopReason.GRADIENT)
        and res.grad_norm > gtol
        and len(g) >= 2
        and g[-1] < FAST_DECREASE * g[-2]
    )


class RankAdaptive(Solver):
    """Rank-increasing (and optionally decreasing) wrapper: ``RankAdaptive(inner, max_rank=r)``.

    Parameters
    ----------
    inner : Solver
        Solver run at each fixed rank (default :class:`RGN`).
    max_rank : int
        Largest rank allowed (the ``rank`` argument of ``solve``).
    add : int or "auto"
        Pairs added per update (default 1, the robust choice), or ``"auto"``: every normal
        singular value at least ``add_ratio`` times the largest. ``"auto"`` is faster on
        well-conditioned targets but can pick up sampling noise when the data are scarce
        (measured: oversampling 3 at 300 x 300 picked noise directions at kappa = 1e4), so
        :class:`Auto` uses ``add=1``. Without ``x0`` the starting rank follows the same rule on
        the spectral start.
    add_ratio : float
    rank_tol : float or None
        Truncate after each stage to the smallest rank with ``||s_{j:}|| <= rank_tol ||s||``.
    stage_tol : float
        Relative gradient decrease at which a stage (below ``max_rank``) ends.
    stage_max_iter : int
        Most inner iterations per stage below ``max_rank``.
    grow_ratio : float
        Add rank only once the top singular value of the normal part of the gradient exceeds
        ``grow_ratio`` times the norm of the tangent part (the fit at the current rank is done).
    max_idle : int
        Stop (``StopReason.MIN_STEP``, not converged) after this many stages in a row in which
        the inner solver made no iteration and the rank did not change. With ``max_iter`` and
        ``max_time`` (checked before every stage, whatever the inner solver did) this bounds
        every run.
    """

    name = "RankAdaptive"

    def __init__(
        self,
        inner: Solver | None = None,
        *,
        max_rank: int | None = None,
        add: Any = 1,
        add_ratio: float = 0.5,
        rank_tol: float | None = None,
        stage_tol: float = 1e-4,
        stage_max_iter: int = 6,
        grow_ratio: float = 10.0,
        max_idle: int = 2,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.max_idle = int(max_idle)
        self.grow_ratio = grow_ratio
        self.inner = inner if inner is not None else RGN()
        self.max_rank, self.add, self.add_ratio, self.rank_tol = max_rank, add, add_ratio, rank_tol
        self.stage_tol, self.stage_max_iter = stage_tol, stage_max_iter
        if add != "auto" and not (isinstance(add, int) and add >= 1):
            raise ValueError(f"add must be 'auto' or a positive int, got {add!r}")

    def _count(self, s: np.ndarray, room: int) -> int:
        if self.add != "auto":
            return min(int(self.add), room)
        if len(s) == 0 or not s[0] > 0:
            return 0
        return max(1, min(room, int(np.sum(s >= self.add_ratio * s[0]))))

    def run(self, problem, x0=None, *, rank=None, seed=None, callback=None) -> SolverResult:
        t0 = time.perf_counter()
        max_rank = self.max_rank or rank or (x0.rank if x0 is not None else None)
        if max_rank is None:
            raise ValueError("RankAdaptive needs max_rank (or rank=...)")
        x = self._start(problem, max_rank, seed) if x0 is None else x0
        hist, it, inner = History(), 0, self.inner
        g_ref, reason, res = None, StopReason.MAX_ITER, None

        def stage_callback(info):
            # report iterations and times of the whole run, not of the current stage
            t = info.time + (hist.time[-1] if hist.time else 0.0)
            shifted = IterationInfo(info.iteration + it, info.point, info.cost, info.grad_norm,
                                    info.step_size, t)  # fmt: skip
            return callback(shifted)

        idle = 0  # passes in a row that made no inner iteration and changed no rank
        with _inner_settings(inner, track_error=self.track_error, verbose=self.verbose):
            while True:
                # every pass honours the overall budgets, whatever the inner solver did
                stop = self._budget_stop(it, t0, idle)
                if stop is not None:
                    reason = stop
                    break
                if self.rank_tol is not None and x.rank > 1:
                    x = self._truncate(problem, x)  # drop negligible directions before fitting
                final = x.rank >= max_rank
                if g_ref is None:
                    f, g_ref = cost_and_gradient_norm(problem, x)
                    hist.append(0, f, g_ref, 0.0, 0.0, x.rank, self._err(problem, x))
                gtol = max(self.gtol, self.tol * g_ref)
                self._configure_stage(final, gtol, it, t0)
                res = inner.run(
                    problem, x, callback=stage_callback if callback is not None else None
                )
                hist.extend(res.history, it, hist.time[-1] if hist.time else 0.0)
                it += res.iterations
                rank_before, x = x.rank, res.point
                if res.stop_reason in (
                    StopReason.NON_FINITE,
                    StopReason.CALLBACK,
                    StopReason.MAX_TIME,
                ):
                    reason = res.stop_reason
                    break
                if self.rank_tol is not None and x.rank > 1:
                    x_cut = self._truncate(problem, x)
                    if x_cut.rank < x.rank:  # shrink, then polish (or grow again) at the new rank
                        x, max_rank = x_cut, min(max_rank, x_cut.rank) if final else max_rank
                        if it < self.max_iter:
                            continue
                if it >= self.max_iter or final:
                    reason = StopReason.MAX_ITER if it >= self.max_iter else res.stop_reason
                    break
                if _converging_fast(res, gtol):
                    # the stage ended (iteration cap or stage_tol) while converging
                    # superlinearly: finish the fit at this rank before looking outside the
                    # manifold, where the unfinished fit would show up as a spurious direction
                    continue
                # an inner run that made no iteration cannot make the next one either: the
                # tangent fit is as good as it gets at this rank, so growing must not wait
                stuck = res.iterations == 0
                action, x_new = self._grow(
                    problem, x, max_rank, gtol, res.grad_norm, seed, force=stuck
                )
                if action == "done":  # nothing left outside the manifold: polish at this rank
                    max_rank = x.rank
                elif action == "grow":
                    x = x_new
                # "wait": the tangent part still dominates; another stage at this rank
                idle = idle + 1 if (stuck and x.rank == rank_before) else 0
        f, gn = cost_and_gradient_norm(problem, x)
        return SolverResult(x, f, gn, it, reason, reason.converged, hist,
                            time.perf_counter() - t0, f"RankAdaptive({inner.name})",
                            {"g_ref": g_ref})  # fmt: skip

    def _start(self, problem, max_rank: int, seed) -> FixedRankPoint:
        """The spectral start (else a random point) cut to the leading singular values that
        :meth:`_count` keeps."""
        x0 = problem.spectral_init(max_rank, seed=seed)
        if x0 is None:
            x0 = problem.manifold(max_rank).random_point(seed)
        k = self._count(problem.manifold(max_rank).backend.to_numpy(x0.s), max_rank)
        return FixedRankPoint(x0.U[:, :k], x0.s[:k], x0.V[:, :k])

    def _budget_stop(self, it: int, t0: float, idle: int) -> StopReason | None:
        """The overall budgets, checked before every stage."""
        if it >= self.max_iter:
            return StopReason.MAX_ITER
        if time.perf_counter() - t0 >= self.max_time:
            return StopReason.MAX_TIME
        if idle >= self.max_idle:
            return StopReason.MIN_STEP  # no progress possible: stop, not converged
        return None

    def _configure_stage(self, final: bool, gtol: float, it: int, t0: float) -> None:
        """The inner solver's tolerances and budgets for the next stage: a loose, short stage
        below ``max_rank``; the whole remaining budget and the run's own tests at it."""
        inner = self.inner
        inner.gtol = gtol
        inner.tol = 0.0 if final else self.stage_tol
        inner.ftol = self.ftol if final else 0.0
        left = self.max_iter - it
        inner.max_iter = left if final else min(self.stage_max_iter, left)
        inner.max_time = self.max_time - (time.perf_counter() - t0)

    def _grow(self, problem, x, max_rank, gtol, gtan, seed, force=False):
        """Decide whether to add rank: ``("grow", x_new)``, ``("wait", None)`` or ``("done", None)``.

        Grows only when the top normal singular value exceeds ``grow_ratio`` times the tangent
        gradient norm ``gtan``: while the fit at the current rank is unfinished, the normal part
        is polluted by it and growing would add a spurious direction. It never waits when the
        tangent gradient is already at the tolerance (``gtan <= gtol``: the fit at this rank
        is finished; then it grows if the normal part exceeds ``grow_ratio * gtol`` and is done
        otherwise) or when ``force`` is set (the inner solver made no iteration): waiting then
        would repeat the same stage forever.
        """
        M = problem.manifold(x.rank)
        _, Z = problem.cost_and_egrad(x)
        room = max_rank - x.rank
        probe = room if self.add == "auto" else min(int(self.add), room)
        top = normal_top_singular(
            M,
            x,
            -1.0 * Z if not isinstance(Z, tuple) else tuple(-1.0 * z for z in Z),
            probe,
            seed=seed,
        )
        if top is None:
            return "done", None
        u, s, v = top
        sv = M.backend.to_numpy(s)
        if not sv[0] > gtol:
            return "done", None
        if gtan <= gtol:
            # the fit at this rank is finished: a normal part within grow_ratio of the
            # tolerance is round-off or noise, not a direction worth a new rank
            if sv[0] <= self.grow_ratio * gtol:
                return "done", None
        elif sv[0] < self.grow_ratio * gtan and not force:
            return "wait", None
        k = self._count(sv, room)
        u, s, v = u[:, :k], s[:k], v[:, :k]
        D = LowRankMatrix(u * s[None, :], v)
        t = problem.exact_step(x, D)
        t = float(t) if t is not None and math.isfinite(t) and t > 0 else 1.0
        grown = x.to_lowrank() + D * t
        return "grow", problem.manifold(x.rank + k).from_matrix(grown)

    def _truncate(self, problem, x):
        sv = problem.manifold(x.rank).backend.to_numpy(x.s).astype(np.float64)
        j = truncation_rank(sv, self.rank_tol)
        return FixedRankPoint(x.U[:, :j], x.s[:j], x.V[:, :j]) if j < len(sv) else x


class Auto(Solver):
    """The default of :func:`rankopt.solve`: fast when it can be, robust when it must be.

    1. Riemannian Gauss-Newton/Newton-CG at the full rank from the spectral start, with a
       budget of ``first_budget`` iterations, abandoned as soon as two iterations in a row fail
       to halve the gradient (measured: in the basin every iteration divides it by 3 or more;
       outside, e.g. kappa >= 10 at oversampling 3, the ratio stalls near 0.7). Quadratic
       convergence makes this the fastest route when the start is in the basin. On data
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
    """

    name = "auto"

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
        from . import noise as nz

        common = self._common()
        if data:  # stop at a stalled nonzero residual; a known noise level sets a target
            common["ftol"] = max(self.ftol, nz.STALL_FTOL)
            common["patience"] = nz.STALL_PATIENCE
            if self.noise:
                common["target_cost"] = nz.discrepancy_cost(problem, rank, self.noise)
        first = RGN(
            tol=self.tol,
            gtol=self.gtol,
            max_iter=min(self.first_budget, self.max_iter),
            max_time=self.max_time,
            **common,
        )
        watch = {"last": None, "slow": 0, "user": False}

        def watch_progress(info):
            # Gauss-Newton in its basin converges quadratically; two iterations in a row that do
            # not halve the gradient mean the start is outside it: switch to phase 2 early.
            last, watch["last"] = watch["last"], info.grad_norm
            if callback is not None and callback(info):
                watch["user"] = True
                return True
            if last is not None and info.iteration >= 3:
                watch["slow"] = watch["slow"] + 1 if info.grad_norm > 0.5 * last else 0
                return watch["slow"] >= 2
            return False

        resA = first.run(problem, start, callback=watch_progress)
        if resA.stop_reason == StopReason.CALLBACK and not watch["user"]:
            resA.stop_reason, resA.converged = StopReason.MAX_ITER, False
        return resA

    def run(self, problem, x0=None, *, rank=None, seed=None, callback=None) -> SolverResult:
        from . import noise as nz

        t0 = time.perf_counter()
        rank = rank if rank is not None else (x0.rank if x0 is not None else None)
        if rank is None:
            raise ValueError("Auto needs rank=... or a starting point")
        data = nz.is_data_problem(problem) and self.noise != 0
        resA = None
        if self.first_phase:
            start = x0 if x0 is not None else problem.spectral_init(rank, seed=seed)
            if start is None:
                start = problem.manifold(rank).random_point(seed)
            resA = self._first(problem, start, rank, data, callback)
            resA = self._extend_first(problem, resA, data, callback, t0)
            finished = (
                resA.converged
                or resA.stop_reason in (StopReason.CALLBACK, StopReason.MAX_TIME)
                or (resA.iterations >= self.max_iter)
            )
            noisy = False
            if finished and data and self.noise is None and resA.converged:
                noisy, resA.info["noise_estimate"] = nz.is_noisy(problem, resA.point)
            if finished and not noisy:
                resA.solver, resA.info["phase"] = "auto (Gauss-Newton)", 1
                resA.time = time.perf_counter() - t0
                return resA
            gref = resA.history.grad_norm[0]
        else:
            x1 = x0 if x0 is not None else problem.spectral_init(1, seed=seed)
            if x1 is None:
                x1 = problem.manifold(1).random_point(seed)
            M1 = problem.manifold(x1.rank)
            g1 = M1.projection(x1, problem.egrad(x1))
            gref = math.sqrt(max(M1.backend.to_float(M1.euclidean_inner(g1, g1)), 0.0))
        resB = self._second(problem, rank, seed, callback, resA, gref, data, t0)
        return self._merge(resA, resB, t0)

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
            from . import noise as nz

            common["ftol"] = max(self.ftol, nz.STALL_FTOL)
            common["patience"] = nz.STALL_PATIENCE
        more = RGN(
            tol=0.0,
            gtol=max(self.gtol, self.tol * g[0]),
            max_iter=budget,
            max_time=self.max_time - (time.perf_counter() - t0),
            **common,
        )
        from .noise import shift_callback

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
        from . import noise as nz

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
            callback=nz.shift_callback(callback, it0, tA) if callback else None,
            solver_options=common,
        )
        if data and self.noise is None:
            return nz.validated_rank_search(
                problem, rank, fraction=self.validation, ridge=self.ridge, **budget
            )
        if data and self.noise:
            return nz.discrepancy_rank_search(problem, rank, self.noise, **budget)
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
