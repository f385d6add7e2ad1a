"""Solver loop shared by every solver: stopping criteria, history, callbacks, progress bar.

A solver subclasses :class:`Solver` and implements ``init`` and ``step``; ``run`` owns the loop.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from ..containers import FixedRankPoint, TangentVector
from ..manifold import check_metric

__all__ = [
    "euclidean_inner",
    "StopReason",
    "History",
    "SolverResult",
    "Solver",
    "IterationInfo",
    "RankWarning",
    "blas_threads",
    "set_blas_threads",
    "get_blas_threads",
]


class RankWarning(UserWarning):
    """A result or a start has another rank than the one asked for (see :func:`rankopt.solve`)."""


def euclidean_inner(manifold: Any, a: TangentVector, b: TangentVector) -> float:
    """The embedded Euclidean inner product of two tangent vectors, as a Python float (one host
    read). O((m + n) r^2)."""
    return manifold.backend.to_float(manifold.euclidean_inner(a, b))


def cost_and_gradient_norm(problem: Any, x: Any) -> tuple[float, float]:
    """``(f(x), ||P_x Z||_F)``: the cost and the norm of the projected Euclidean gradient (the
    metric-independent gradient norm every stopping test uses). One cost-and-gradient call
    plus a projection, O(problem + (m+n) r^2)."""
    f, Z = problem.cost_and_egrad(x)
    M = problem.manifold(x.rank)
    g = M.geometry.project(x, Z)
    return float(f), math.sqrt(max(euclidean_inner(M, g, g), 0.0))


class ConvergenceWarning(UserWarning):
    """:func:`rankopt.solve` stopped before its convergence test held (``max_iter``,
    ``max_time``, no progress, or non-finite values): ``result.converged`` is False and the
    result is the last (finite) point, not a solution to ``tol``."""


# ---------------------------------------------------------------------------
# BLAS threads: solvers run their small dense kernels (QR of (m+n) x 2r, SVD of 2r x 2r,
# products with r columns) with one BLAS thread by default. On a machine whose cores are busy,
# a multi-threaded BLAS makes such calls up to 100x slower (threads wait for each other);
# with idle cores they are too small to gain from threads (measured in
# benchmarks/threads.py). threadpoolctl sets the limit of every loaded BLAS for the duration
# of a run and restores it afterwards.
# ---------------------------------------------------------------------------

_default_threads: int | None = 1
_LIMIT_ACTIVE = threading.local()
# threadpoolctl's scan of the loaded libraries costs ~0.5-2 ms, as much as 100 iterations of a
# small solve: keep the controller, and rescan when modules were imported since (a new import
# may have loaded another BLAS, e.g. torch's)
_controller: list[Any] = [None, -1]


def _blas_controller() -> Any:
    from threadpoolctl import ThreadpoolController

    if _controller[0] is None or _controller[1] != len(sys.modules):
        _controller[0], _controller[1] = ThreadpoolController(), len(sys.modules)
    return _controller[0]


def _check_threads(threads: Any) -> None:
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")


def set_blas_threads(threads: int | None) -> None:
    """Default number of threads inside solver runs, for BLAS and the problems' numba kernels
    together (:func:`blas_threads`; ``None``: leave the BLAS settings alone, kernels serial).

    The default is 1. ``solve(..., threads=...)`` overrides it for one call.
    """
    global _default_threads
    _check_threads(threads)
    _default_threads = threads


def get_blas_threads() -> int | None:
    """The default set by :func:`set_blas_threads` (1 unless changed)."""
    return _default_threads


@contextmanager
def blas_threads(threads: int | None | str = "default") -> Iterator[None]:
    """Context manager: run with ``threads`` threads, BLAS and the problems' kernels together.

    Every loaded BLAS library is limited to ``threads`` threads (threadpoolctl), and the numba
    kernels of problems built with ``parallel=None`` (the default of
    :class:`~rankopt.problems.MatrixCompletion`: sampling, the Gauss-Newton operator, the
    block preconditioner, the spectral start's products) run on ``threads`` numba threads
    (:func:`rankopt.problems.kernel_threads`: the parallel twins from 2 threads on, the serial
    ones at 1). ``"default"`` uses :func:`get_blas_threads`; ``None`` changes nothing (BLAS as
    it is, kernels serial unless a problem asks for ``parallel=True``). Nested uses inside an
    active block do nothing (the outer setting, ``None`` included, holds for the solvers a
    solver runs). Setting and restoring the limit costs about 20 us (the threadpoolctl
    controller is kept between calls and rebuilt only after new imports).
    """
    if threads == "default":
        threads = get_blas_threads()
    _check_threads(threads)
    if getattr(_LIMIT_ACTIVE, "on", False):
        yield
        return
    _LIMIT_ACTIVE.on = True  # also for None: an outer "leave alone" holds for inner runs
    try:
        if threads is None:
            yield
        else:
            from ..problems import kernel_threads

            with _blas_controller().limit(limits=threads, user_api="blas"):
                with kernel_threads(threads):
                    yield
    finally:
        _LIMIT_ACTIVE.on = False


def _check_real(Z: Any) -> None:
    """Raise on a complex gradient (rankopt works over the reals; casting would drop Im)."""
    parts = Z if isinstance(Z, tuple) else (Z,)
    for part in parts:
        arrays = (part.A, part.B) if hasattr(part, "A") and hasattr(part, "B") else (part,)
        for a in arrays:
            if "complex" in str(getattr(a, "dtype", "")):
                raise TypeError(
                    f"the problem's Euclidean gradient is complex ({a.dtype}); rankopt optimizes "
                    "over real matrices only (split a complex problem into real and imaginary parts)"
                )


class StopReason(str, Enum):
    """Why a run stopped. Compares equal to its string value (``res.stop_reason == "non-finite"``)."""

    GRADIENT = "gradient"  # ||grad|| <= max(gtol, tol * ||grad(x0)||)
    COST_CHANGE = "cost-change"  # relative cost change below ftol for `patience` iterations
    TARGET_COST = "target-cost"  # cost <= target_cost
    MAX_ITER = "max-iter"
    MAX_TIME = "max-time"
    MIN_STEP = "min-step"  # the line search could not make progress
    NON_FINITE = "non-finite"  # cost or gradient became nan/inf; the last good point is kept
    CALLBACK = "callback"  # a callback returned True

    def __str__(self) -> str:
        return self.value

    @property
    def converged(self) -> bool:
        return self in (StopReason.GRADIENT, StopReason.COST_CHANGE, StopReason.TARGET_COST)


@dataclass
class History:
    """Per-iteration record (index 0 is the starting point)."""

    iteration: list[int] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    step_size: list[float] = field(default_factory=list)
    rank: list[int] = field(default_factory=list)
    rel_error: list[float] = field(default_factory=list)

    def append(self, it, cost, gnorm, t, step, rank, err) -> None:
        self.iteration.append(it)
        self.cost.append(cost)
        self.grad_norm.append(gnorm)
        self.time.append(t)
        self.step_size.append(step)
        self.rank.append(rank)
        self.rel_error.append(err)

    def extend(self, other: History, it0: int = 0, t0: float = 0.0) -> None:
        """Append another run's history (skipping its starting point), shifting counters."""
        for k in range(1, len(other.iteration)):
            self.append(
                other.iteration[k] + it0,
                other.cost[k],
                other.grad_norm[k],
                other.time[k] + t0,
                other.step_size[k],
                other.rank[k],
                other.rel_error[k],
            )

    def __len__(self) -> int:
        return len(self.iteration)

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=float) for k, v in self.__dict__.items()}


@dataclass
class SolverResult:
    """Result of a solver run.

    Attributes
    ----------
    point : FixedRankPoint
        Final (last finite) iterate.
    cost, grad_norm : float
        At ``point``; ``grad_norm`` is the norm of the tangent projection of the Euclidean
        gradient (metric-independent, so solvers compare).
    iterations : int
    stop_reason : StopReason
    converged : bool
    history : History
    time : float
        Wall-clock seconds of the run (start point evaluation included).
    solver : str
    """

    point: FixedRankPoint
    cost: float
    grad_norm: float
    iterations: int
    stop_reason: StopReason
    converged: bool
    history: History
    time: float
    solver: str = ""
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.point.rank

    def __repr__(self) -> str:
        return (
            f"SolverResult(solver={self.solver}, cost={self.cost:.3e}, grad_norm={self.grad_norm:.3e}, "
            f"iterations={self.iterations}, rank={self.rank}, stop_reason={self.stop_reason.value!r}, "
            f"converged={self.converged}, time={self.time:.3f}s)"
        )


@dataclass
class IterationInfo:
    """What a callback receives after each iteration."""

    iteration: int
    point: FixedRankPoint
    cost: float
    grad_norm: float
    step_size: float
    time: float


class Solver:
    """Base class: the optimization loop with stopping criteria.

    Parameters
    ----------
    max_iter : int
        Most iterations.
    tol : float
        Relative gradient tolerance: stop when ``||grad|| <= tol * ||grad(x0)||``.
    gtol : float
        Absolute gradient tolerance.
    ftol : float
        Stop when ``|f_k - f_{k+1}| <= ftol * max(|f_k|, tiny)`` for ``patience`` iterations in a row (0: off).
    patience : int
        Iterations in a row the ``ftol`` test must hold.
    target_cost : float or None
        Stop once the cost is at or below this value.
    max_time : float
        Seconds (checked after every iteration).
    min_step : float
        Stop (not converged) when a step size (the line search's, or the learning rate) falls
        below this.
    metric : rankopt.metrics.Metric or None
        Metric under which gradients are taken (Euclidean if None).
    verbose : bool
        Show a tqdm progress bar with cost and gradient norm.
    track_error : bool
        Record ``problem.relative_error`` per iteration when the problem knows its truth.
    """

    name = "solver"

    def __init__(
        self,
        *,
        max_iter: int = 1000,
        tol: float = 1e-10,
        gtol: float = 0.0,
        ftol: float = 0.0,
        patience: int = 3,
        target_cost: float | None = None,
        max_time: float = math.inf,
        min_step: float = 1e-14,
        metric: Any = None,
        verbose: bool = False,
        track_error: bool = False,
    ) -> None:
        if max_iter < 0:
            raise ValueError(f"max_iter must be >= 0, got {max_iter}")
        if not tol >= 0 or not gtol >= 0 or not ftol >= 0:
            raise ValueError("tolerances must be >= 0")
        if metric is not None:
            check_metric(metric)  # a TypeError naming the metric objects, before any work
        self.max_iter, self.tol, self.gtol, self.ftol = int(max_iter), tol, gtol, ftol
        self.patience, self.target_cost, self.max_time = patience, target_cost, max_time
        self.min_step, self.metric, self.verbose, self.track_error = (
            min_step,
            metric,
            verbose,
            track_error,
        )

    # -- to implement -----------------------------------------------------------
    def init(self, problem, manifold, x) -> Any:
        return None

    def step(
        self, problem, manifold, x, cost, egrad, grad, state
    ) -> tuple[FixedRankPoint, Any, float]:
        """One iteration. ``grad`` is ``P_x(egrad)`` (Euclidean projection). Returns
        ``(x_new, state_new, step_size)``; ``step_size = 0`` means no progress was possible."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------
    def rgrad(self, manifold, x, grad: TangentVector) -> TangentVector:
        """Riemannian gradient under the solver's metric from the projected Euclidean one."""
        return manifold.metric.solve(manifold, x, grad)

    def _manifold(self, problem, rank: int):
        M = problem.manifold(rank, metric=self.metric)
        M.validate = False
        return M

    # -- the loop ----------------------------------------------------------------
    def run(
        self,
        problem,
        x0: FixedRankPoint | None = None,
        *,
        rank: int | None = None,
        seed: Any = None,
        callback: Callable[[IterationInfo], Any] | None = None,
    ) -> SolverResult:
        """Minimize ``problem`` from ``x0`` (or its spectral start / a random point of ``rank``).

        Runs with the default number of BLAS threads (:func:`get_blas_threads`, 1 unless changed
        by :func:`set_blas_threads`).
        """
        t0 = time.perf_counter()
        with blas_threads():
            if x0 is None:
                if rank is None:
                    raise ValueError("give a starting point x0 or a rank")
                x0 = problem.spectral_init(rank, seed=seed)
                if x0 is None:
                    x0 = problem.manifold(rank).random_point(seed)
            manifold = self._manifold(problem, x0.rank)
            manifold.validate = True
            manifold.check_point(x0)
            manifold.validate = False
            return self._loop(problem, manifold, x0, t0, callback)

    def _loop(self, problem, manifold, x, t0: float, callback) -> SolverResult:
        """The iteration: stopping tests, one ``step``, evaluation of the new point, history."""
        hist = History()
        f, Z = problem.cost_and_egrad(x)
        _check_real(Z)
        g = manifold.geometry.project(x, Z)
        gn = math.sqrt(max(euclidean_inner(manifold, g, g), 0.0))
        if not (math.isfinite(f) and math.isfinite(gn)):
            raise ValueError("cost or gradient is not finite at the starting point")
        gstop = max(self.gtol, self.tol * gn)
        state = self.init(problem, manifold, x)
        hist.append(0, f, gn, time.perf_counter() - t0, 0.0, x.rank, self._err(problem, x))
        bar = self._bar()
        reason, it, small = StopReason.MAX_ITER, 0, 0
        while True:
            reason = self._stop_before(f, gn, gstop, it, t0)
            if reason is not None:
                break
            x_new, state_new, step = self.step(problem, manifold, x, f, Z, g, state)
            if step == 0.0 or step < self.min_step:
                reason = StopReason.MIN_STEP
                break
            if x_new.rank != manifold.r:
                manifold = self._manifold(problem, x_new.rank)
            f_new, Z_new = problem.cost_and_egrad(x_new)
            g_new = manifold.geometry.project(x_new, Z_new) if math.isfinite(f_new) else None
            gn_new = (
                math.sqrt(max(euclidean_inner(manifold, g_new, g_new), 0.0))
                if g_new is not None
                else math.nan
            )
            if not (math.isfinite(f_new) and math.isfinite(gn_new)):
                reason = StopReason.NON_FINITE
                break
            it += 1
            small = (
                small + 1
                if self.ftol > 0 and abs(f - f_new) <= self.ftol * max(abs(f), 1e-300)
                else 0
            )
            x, f, Z, g, gn, state = x_new, f_new, Z_new, g_new, gn_new, state_new
            hist.append(it, f, gn, time.perf_counter() - t0, step, x.rank, self._err(problem, x))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(cost=f"{f:.3e}", grad=f"{gn:.2e}", rank=x.rank)
            if callback is not None and callback(IterationInfo(it, x, f, gn, step, hist.time[-1])):
                reason = StopReason.CALLBACK
                break
            if small >= self.patience:
                reason = StopReason.COST_CHANGE
                break
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        return SolverResult(
            x, f, gn, it, reason, reason.converged, hist, elapsed, self.name, {"state": state}
        )

    def _stop_before(self, f: float, gn: float, gstop: float, it: int, t0: float):
        """The tests made before each step (in this order), or None to go on."""
        if gn <= gstop:
            return StopReason.GRADIENT
        if self.target_cost is not None and f <= self.target_cost:
            return StopReason.TARGET_COST
        if it >= self.max_iter:
            return StopReason.MAX_ITER
        if time.perf_counter() - t0 >= self.max_time:
            return StopReason.MAX_TIME
        return None

    def _err(self, problem, x) -> float:
        if not self.track_error:
            return math.nan
        e = problem.relative_error(x)
        return math.nan if e is None else float(e)

    def _bar(self):
        if not self.verbose:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.max_iter, desc=self.name, leave=False)
