"""Riemannian solvers on the fixed-rank manifold, and :func:`solve`, the entry point.

Every solver shares the loop of :class:`~rankopt.solvers.base.Solver` (stopping criteria,
history, callbacks, progress bar); the stochastic-style ones call the pure update rules of
:mod:`rankopt.solvers.rules`, the same functions the torch optimizers call.
"""

from __future__ import annotations

from typing import Any

from . import noise, rules
from .adaptive import DLRAAdam, DLRAHeavyBall, RAdaGrad, RAdamW, RHeavyBall
from .base import History, IterationInfo, Solver, SolverResult, StopReason
from .gradient import RCG, RGD
from .newton import RGN
from .rank_adaptive import Auto, RankAdaptive

__all__ = [
    "solve",
    "Solver",
    "SolverResult",
    "StopReason",
    "History",
    "IterationInfo",
    "rules",
    "noise",
    "RGD",
    "RCG",
    "RGN",
    "RHeavyBall",
    "RAdaGrad",
    "RAdamW",
    "DLRAHeavyBall",
    "DLRAAdam",
    "RankAdaptive",
    "Auto",
    "METHODS",
]

METHODS = {
    "rgd": RGD,
    "rcg": RCG,
    "rgn": RGN,
    "newton": lambda **kw: RGN(hessian="exact", **kw),
    "rheavyball": RHeavyBall,
    "radagrad": RAdaGrad,
    "radamw": RAdamW,
    "dlra-heavyball": DLRAHeavyBall,
    "dlra-adam": DLRAAdam,
}


def _make(method: str, kw: dict) -> Solver:
    key = method.lower()
    if key == "auto":
        return Auto(**kw)
    if key.startswith("adaptive-"):  # e.g. "adaptive-rcg": rank-adaptive around another solver
        return RankAdaptive(_make(key[len("adaptive-") :], {}), **kw)
    if key not in METHODS:
        raise ValueError(
            f"unknown method {method!r}; choose 'auto', 'adaptive-<method>' or one of {sorted(METHODS)}"
        )
    return METHODS[key](**kw)


def solve(
    problem: Any,
    rank: int,
    method: str = "auto",
    tol: float = 1e-10,
    max_iter: int | None = None,
    seed: Any = 0,
    verbose: bool = False,
    x0: Any = None,
    callback: Any = None,
    **options: Any,
) -> SolverResult:
    """Minimize a problem over matrices of rank (at most) ``rank``.

    Parameters
    ----------
    problem : rankopt.problems.Problem
        e.g. ``MatrixCompletion``, ``MatrixSensing`` or ``Problem(cost, egrad, ehess)``.
    rank : int or "auto"
        Target rank (the largest rank for rank-adaptive methods and for ``"auto"``, which can
        return a lower rank, with ``info["phase"] == 2``). ``"auto"`` (data problems,
        method "auto"): choose the rank on held-out observations, up to the option
        ``max_rank`` (default :func:`rankopt.solvers.noise.default_max_rank`).
    method : str
        ``"auto"`` (default, :class:`Auto`): Riemannian Gauss-Newton/Newton-CG from the spectral
        start at full rank; if that does not converge within a small budget, rank-adaptive
        Gauss-Newton from rank 1 (adding the top singular pair of the normal part of the
        gradient at each stage). Robust to the condition number of the target. Others: ``"rgd"``, ``"rcg"``, ``"rgn"``, ``"newton"``,
        ``"rheavyball"``, ``"radagrad"``, ``"radamw"``, ``"dlra-heavyball"``, ``"dlra-adam"``,
        or ``"adaptive-<method>"`` for the rank-adaptive wrapper around one of them.
    tol : float
        Relative gradient tolerance (``||grad|| <= tol ||grad(x0)||``).
    max_iter : int, optional
        Iteration limit (default 200 for "auto"/"rgn", 2000 otherwise).
    seed : int, Generator or None
        For the spectral start / random start (no global random state is used).
    verbose : bool
        Progress bar.
    x0 : FixedRankPoint, optional
        Starting point (default: the problem's spectral start, else random).
    callback : callable(IterationInfo) -> bool, optional
        Called after every iteration; returning True stops the run.
    **options
        Passed to the solver (e.g. ``metric=``, ``lr=``, ``max_time=``, ``track_error=True``),
        except those of :func:`rankopt.solvers.noise.plan` for data problems (completion,
        sensing): ``noise`` (None: estimate it; 0: exact data; sigma: known level),
        ``validation`` (held-out fraction, 0.1), ``check_rank`` ("auto", True, False),
        ``max_rank`` (with ``rank="auto"``), ``ridge`` (weight decays tried on held-out data).
        See :mod:`rankopt.solvers.noise` for what is checked, warned and reported in ``info``.

    Returns
    -------
    SolverResult
    """
    if max_iter is None:
        max_iter = (
            200
            if method.lower() in ("auto", "rgn", "newton") or method.startswith("adaptive-rgn")
            else 2000
        )
    plan = noise.plan(problem, rank, method, options)  # pops the noise options, warns
    rank = plan.rank
    kw = dict(options, tol=tol, max_iter=max_iter, verbose=verbose)
    solver = _make(method, kw)
    if isinstance(solver, RankAdaptive):
        solver.max_rank = rank
    if isinstance(solver, Auto):
        solver.noise, solver.validation, solver.ridge = plan.noise, plan.validation, plan.ridge
        solver.first_phase = not plan.auto_rank
    res = solver.run(problem, x0, rank=rank, seed=seed, callback=callback)
    return noise.finish(problem, res, plan, seed=seed, solver=solver)
