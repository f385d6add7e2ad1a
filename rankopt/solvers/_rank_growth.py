r"""Rank-adaptive wrapper around any inner solver: :class:`RankAdaptive`, and how a solver uses
its rank (:class:`RankRole`).

Stage ``k`` runs the inner solver at rank ``r_k``; then the rank grows by the top singular
pairs of the *normal* part of the negative Euclidean gradient,
``N = (I - U U^T) (-egrad) (I - V V^T)``, which is the best rank-one descent direction that
leaves the manifold (Uschmajew & Vandereycken, "Greedy rank updates combined with Riemannian
descent methods for low-rank optimization", SampTA 2015; Gao & Absil, "A Riemannian rank-adaptive
method for low-rank matrix completion", 2022). The new pairs enter with the exact step along
``X + t u sigma v^T`` when the problem offers one. Optionally the rank also shrinks by truncation
at ``rank_tol`` (``||s_{j:}|| <= rank_tol ||s||``).

Cost of a rank update: a randomized SVD of ``N`` through products with the gradient
(O(q (|Omega| + (m+n) r) p) for ``p`` probe vectors and ``q`` power iterations).

This module is the lower half of :mod:`rankopt.solvers.rank_adaptive` (which re-exports its
public names): the noise-aware rank searches of :mod:`rankopt.solvers.noise` run
:class:`RankAdaptive`, and :class:`~rankopt.solvers.rank_adaptive.Auto` runs those searches, so
the imports go one way: ``rank_adaptive -> noise -> _rank_growth``. It imports neither.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
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

__all__ = ["RankAdaptive", "RankRole", "normal_top_singular", "rank_role"]


class RankRole(str, Enum):
    """How a solver treats the ``rank`` it is given: what :func:`rankopt.solve`'s post-run
    checks (:func:`rankopt.solvers.noise.finish`) may conclude from a result of lower rank.

    A solver declares its role in the class attribute ``rank_role``; solvers that do not
    (every fixed-rank solver) are ``FIXED`` (:func:`rank_role`).
    """

    #: keeps the rank it is given: a result at that rank gets the identifiability check,
    #: and a lower-rank fit the check finds is only reported (warned), never returned
    FIXED = "fixed"
    #: grows (or truncates) its rank up to the one given (:class:`RankAdaptive`): the rank
    #: of the result is its own choice, not checked
    ADAPTIVE = "adaptive"
    #: the two phases of :class:`~rankopt.solvers.rank_adaptive.Auto`: the rank given is a
    #: maximum; a phase-1 result (``info["phase"] == 1``) is a fixed-rank fit that the check
    #: may replace by a lower-rank one, a phase-2 result below the maximum is explained
    AUTO = "auto"


def rank_role(solver: Any) -> RankRole:
    """The :class:`RankRole` of ``solver`` (its ``rank_role`` attribute; ``FIXED`` without one,
    and for ``None``)."""
    return RankRole(getattr(solver, "rank_role", RankRole.FIXED))


#: A stage that ends (iteration cap or stage_tol) while its last iteration divided the gradient
#: by more than 1 / FAST_DECREASE is continued at the same rank (it converges superlinearly).
FAST_DECREASE = 0.1
#: A stage below ``max_rank`` around a Gauss-Newton/Newton inner solver (:class:`RGN`) ends once
#: an iteration lowered the cost by less than this fraction (``stage_ftol="auto"``): the fit at
#: this rank is then done up to what the missing directions leave, and more iterations there only
#: sharpen a fit the next stage redoes. Measured at 1e5 x 1e5, kappa 100, oversampling 3 (the
#: validated search of ``solve``, 6 iterations a stage): in the 9 stages below rank 10 the
#: second iteration lowered the cost by 1.6-12.5%, the third by 0.07-2.7%, the fourth to sixth
#: by at most 0.11% each, and those three took 65 s of the 98 s spent in the 9 stages (their
#: inner CG solves to a tightening forcing term). With 1e-3 such a stage stops after its
#: fourth or fifth iteration, its gradient 100 times or more below its start. Not larger: at
#: 3e-2 a stage of seed 4 stopped after its second iteration with the gradient only 3 times
#: lower, and the next rank update added a spurious direction (error 0.38 -> 5.9).
STAGE_FTOL = 1e-3


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


_INNER_FIELDS = (
    "tol",
    "gtol",
    "max_iter",
    "max_time",
    "track_error",
    "ftol",
    "patience",
    "verbose",
)


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
    stage_ftol : float or "auto"
        A stage below ``max_rank`` also ends after an iteration that lowered the cost by less
        than this fraction (0: off). ``"auto"``: :data:`STAGE_FTOL` around :class:`RGN`, 0
        around first-order inner solvers (whose cost falls slowly far from a fit as well).

    Attributes
    ----------
    rank_role : RankRole
        ``RankRole.ADAPTIVE``: the rank of the result is the solver's own choice, at most
        ``max_rank``.
    """

    name = "RankAdaptive"
    rank_role = RankRole.ADAPTIVE

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
        stage_ftol: Any = "auto",
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.max_idle = int(max_idle)
        if stage_ftol != "auto" and not (isinstance(stage_ftol, (int, float)) and stage_ftol >= 0):
            raise ValueError(f"stage_ftol must be 'auto' or a number >= 0, got {stage_ftol!r}")
        self.stage_ftol = stage_ftol
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
        patience = inner.patience  # the final stage's
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
                self._configure_stage(final, gtol, it, t0, patience)
                res = inner.run(
                    problem, x, callback=stage_callback if callback is not None else None
                )
                hist.extend(res.history, it, hist.time[-1] if hist.time else 0.0)
                it += res.iterations
                stop, x, max_rank, idle = self._after_stage(
                    problem, x, res, max_rank, final, it, gtol, seed, idle
                )
                if stop is not None:
                    reason = stop
                    break
        f, gn = cost_and_gradient_norm(problem, x)
        return SolverResult(x, f, gn, it, reason, reason.converged, hist,
                            time.perf_counter() - t0, f"RankAdaptive({inner.name})",
                            {"g_ref": g_ref})  # fmt: skip

    def _after_stage(self, problem, x, res, max_rank, final, it, gtol, seed, idle):
        """What follows a stage that started at ``x`` and returned ``res``: truncation, the
        end of the run, another stage at the same rank, or a rank update (:meth:`_grow`).

        Returns ``(reason, x, max_rank, idle)``: ``reason`` (a :class:`StopReason`) ends the
        run, None runs another stage from ``x`` (at most ``max_rank``); ``idle`` counts the
        stages in a row that made no inner iteration and changed no rank.
        """
        rank_before, x = x.rank, res.point
        if res.stop_reason in (StopReason.NON_FINITE, StopReason.CALLBACK, StopReason.MAX_TIME):
            return res.stop_reason, x, max_rank, idle
        if self.rank_tol is not None and x.rank > 1:
            x_cut = self._truncate(problem, x)
            if x_cut.rank < x.rank:  # shrink, then polish (or grow again) at the new rank
                x, max_rank = x_cut, min(max_rank, x_cut.rank) if final else max_rank
                if it < self.max_iter:
                    return None, x, max_rank, idle
        if it >= self.max_iter or final:
            reason = StopReason.MAX_ITER if it >= self.max_iter else res.stop_reason
            return reason, x, max_rank, idle
        if _converging_fast(res, gtol):
            # the stage ended (iteration cap or stage_tol) while converging superlinearly:
            # finish the fit at this rank before looking outside the manifold, where the
            # unfinished fit would show up as a spurious direction
            return None, x, max_rank, idle
        # an inner run that made no iteration cannot make the next one either: the tangent
        # fit is as good as it gets at this rank, so growing must not wait
        stuck = res.iterations == 0
        action, x_new = self._grow(problem, x, max_rank, gtol, res.grad_norm, seed, force=stuck)
        if action == "done":  # nothing left outside the manifold: polish at this rank
            max_rank = x.rank
        elif action == "grow":
            x = x_new
        # "wait": the tangent part still dominates; another stage at this rank
        idle = idle + 1 if (stuck and x.rank == rank_before) else 0
        return None, x, max_rank, idle

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

    def _configure_stage(self, final: bool, gtol: float, it: int, t0: float, patience: int) -> None:
        """The inner solver's tolerances and budgets for the next stage: a loose, short stage
        below ``max_rank`` (ended by ``stage_tol``, ``stage_max_iter`` or the stage's cost
        stall, :meth:`_stage_ftol`); the whole remaining budget and the run's own tests at it
        (``patience`` the inner solver's own)."""
        inner = self.inner
        inner.gtol = gtol
        inner.tol = 0.0 if final else self.stage_tol
        inner.ftol = self.ftol if final else self._stage_ftol()
        inner.patience = patience if final else 1
        left = self.max_iter - it
        inner.max_iter = left if final else min(self.stage_max_iter, left)
        inner.max_time = self.max_time - (time.perf_counter() - t0)

    def _stage_ftol(self) -> float:
        """The cost-stall fraction that ends a stage below ``max_rank`` (see ``stage_ftol``)."""
        if self.stage_ftol != "auto":
            return float(self.stage_ftol)
        return STAGE_FTOL if isinstance(self.inner, RGN) else 0.0

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
