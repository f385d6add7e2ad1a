"""Riemannian solvers on the fixed-rank manifold, and :func:`solve`, the entry point.

Every solver shares the loop of :class:`~rankopt.solvers.base.Solver` (stopping criteria,
history, callbacks, progress bar); the stochastic-style ones call the update rules of
:mod:`rankopt.rules`, the same specs the torch optimizers call.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any

from . import noise
from .adaptive import RuleSolver, rule_solvers, solver_class
from .base import (
    ConvergenceWarning,
    History,
    IterationInfo,
    RankWarning,
    Solver,
    SolverResult,
    StopReason,
    blas_threads,
    get_blas_threads,
    set_blas_threads,
)
from .gradient import RCG, RGD
from .newton import RGN
from .options import (
    METHOD_CLASSES,
    check_single_rank,
    check_solve_args,
    is_rank_adaptive,
    make_solver,
    method_options,
)
from .rank_adaptive import Auto, RankAdaptive

# one named solver per registered rule (RHeavyBall, RAdamW, DLRAAdam, Riemannion, ...),
# generated from its spec (rankopt.solvers.adaptive): nothing here names a rule
globals().update(rule_solvers())

__all__ = [
    "solve",
    "Solver",
    "SolverResult",
    "StopReason",
    "History",
    "IterationInfo",
    "noise",
    "RGD",
    "RCG",
    "RGN",
    *rule_solvers(),
    "RuleSolver",
    "solver_class",
    "RankAdaptive",
    "Auto",
    "METHODS",
    "RankWarning",
    "ConvergenceWarning",
    "method_options",
    "blas_threads",
    "set_blas_threads",
    "get_blas_threads",
]


class _Factories(Mapping):
    """Method name -> solver factory, a live view of ``METHOD_CLASSES`` (see :data:`METHODS`)."""

    def __getitem__(self, name: str) -> Any:
        cls, fixed = METHOD_CLASSES[name]
        return functools.partial(cls, **fixed) if fixed else cls

    def __iter__(self):
        return iter(METHOD_CLASSES)

    def __len__(self) -> int:
        return len(METHOD_CLASSES)


#: method name -> solver factory (the class, or the class with the arguments ``solve`` fixes,
#: e.g. ``"newton"`` is ``RGN(hessian="exact")``): every method :func:`solve` accepts besides
#: ``"adaptive-<method>"``, including one per registered rule (:mod:`rankopt.rules.registry`).
#: A live view of :data:`rankopt.solvers.options.METHOD_CLASSES`, the one table ``solve``
#: builds its solvers from.
METHODS: Mapping[str, Any] = _Factories()


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
    """Minimize a problem over matrices of rank ``rank`` (at most ``rank`` for rank-adaptive methods).

    Parameters
    ----------
    problem : rankopt.problems.Problem
        e.g. ``MatrixCompletion``, ``MatrixSensing`` or ``Problem(cost, egrad, ehess)``
        (not an array: wrap data in a problem first).
    rank : int or "auto"
        Target rank, ``1 <= rank <= min(m, n)``. For rank-adaptive methods (``"auto"``,
        ``"adaptive-<method>"``, ``"dlra-heavyball"``, ``"dlra-adam"``, and the rules given a
        ``rank_tol``) it is the largest rank: the result has rank at most ``rank``.
        ``"auto"`` (data problems, method "auto"): choose the rank on held-out observations,
        up to the option ``max_rank`` (default :func:`rankopt.solvers.noise.default_max_rank`).
    method : str
        ``"auto"`` (default, :class:`Auto`): Riemannian Gauss-Newton/Newton-CG from the spectral
        start at full rank; if that does not converge within a small budget, rank-adaptive
        Gauss-Newton from rank 1 (adding the top singular pair of the normal part of the
        gradient at each stage). Robust to the condition number of the target; needs the
        problem's Hessian (``problem.has_hessian``). Others: ``"rgd"``, ``"rcg"``, ``"rgn"``,
        ``"newton"``, ``"rsgd"``, ``"rheavyball"``, ``"radagrad"``, ``"radamw"``, ``"dlra-heavyball"``,
        ``"dlra-adam"``, ``"riemannion"``, ``"radamw-elementwise"``, ``"reference-radamw"``,
        ``"reference-radagrad"`` (the authors' code, dense m x n state), or
        ``"adaptive-<method>"`` for the rank-adaptive wrapper around one of them. With
        ``"auto"`` these are the keys of :data:`METHODS`. See "Which solver when" in the docs.
    tol : float
        Relative gradient tolerance (``||grad|| <= tol ||grad(x0)||``).
    max_iter : int, optional
        Iteration limit (default 200 for "auto"/"rgn"/"newton", 2000 otherwise).
    seed : int, Generator or None
        For the spectral start / random start (no global random state is used).
    verbose : bool
        Progress bar.
    x0 : FixedRankPoint, optional
        Starting point (default: the problem's spectral start, else random). It is checked
        (real, finite, ``s > 0``, orthonormal factors). Of rank above ``rank``: its best
        rank-``rank`` truncation is used, with a :class:`RankWarning`. Of rank below ``rank``:
        rank-adaptive methods start from it and grow; fixed-rank methods raise ``ValueError``.
    callback : callable(IterationInfo) -> bool, optional
        Called after every iteration; returning True stops the run.
    **options
        Passed to the solver (e.g. ``metric=``, ``lr=``, ``max_time=``, ``track_error=True``);
        :func:`method_options` lists what each method takes, and an option the method does not
        take raises ``TypeError`` naming the methods that do. ``threads=N`` runs this call on
        ``N`` threads: BLAS, and the numba kernels of problems built with ``parallel=None``
        (completion's sampling, Gauss-Newton operator, preconditioner, spectral start) on the
        same ``N`` (:func:`blas_threads`; default :func:`get_blas_threads`, which is 1;
        ``None`` leaves the BLAS settings alone). ``max_rank`` may only repeat ``rank`` (with
        ``rank="auto"`` it is the largest rank tried). For data problems (completion,
        sensing) also the options of :func:`rankopt.solvers.noise.plan`: ``noise`` (None:
        estimate it; 0: exact data; sigma: known level), ``validation`` (held-out fraction,
        0.1), ``check_rank`` ("auto", True, False), ``ridge`` (weight decays tried on held-out
        data). See :mod:`rankopt.solvers.noise` for what is checked, warned and reported in
        ``info``.

    Returns
    -------
    SolverResult
        Of rank ``rank``; a rank-adaptive method may return a lower rank (it found nothing
        worth adding), which is reported by a :class:`RankWarning`. A run that stopped
        without converging (``result.converged`` False: max-iter, max-time, min-step,
        non-finite) is reported by a :class:`ConvergenceWarning`.
    """
    threads = options.pop("threads", "default")
    check_single_rank(problem, rank, method)
    if isinstance(rank, str) and rank == "auto":  # the plan checks it, gives the largest rank
        plan = noise.plan(problem, rank, method, options)  # pops the noise options
        rank, x0 = check_solve_args(problem, plan.rank, method, x0, options)
    else:
        mine = {k: options.pop(k) for k in noise.OPTIONS if k in options}
        rank, x0 = check_solve_args(problem, rank, method, x0, options)
        plan = noise.plan(problem, rank, method, mine)
    if max_iter is None:
        key = method.lower()
        max_iter = (
            200 if key in ("auto", "rgn", "newton") or key.startswith("adaptive-rgn") else 2000
        )
    options = dict(options, tol=tol, max_iter=max_iter, verbose=verbose)
    if isinstance(method, str) and method.lower() == "auto":  # the plan's choices, as arguments
        options.update(noise=plan.noise, validation=plan.validation, ridge=plan.ridge)
        options["first_phase"] = not plan.auto_rank
    solver = make_solver(method, options, rank)
    with blas_threads(threads):
        if x0 is None and rank == min(problem.shape):
            x0 = _full_rank_start(problem, rank, seed)
        res = solver.run(problem, x0, rank=rank, seed=seed, callback=callback)
        if not plan.auto_rank:  # rank="auto" returns the rank it chose, up to max_rank
            _check_result_rank(res, rank, method, is_rank_adaptive(method, options))
        _check_converged(res, method)
        # the checks after the run (an identifiability fit among them) on the same threads
        return noise.finish(problem, res, plan, seed=seed, solver=solver)


def _check_converged(res: SolverResult, method: str) -> None:
    """Warn (``ConvergenceWarning``) when the run stopped before its convergence test held
    (not for a callback's stop: the caller asked for it)."""
    if res.converged or res.stop_reason == StopReason.CALLBACK:
        return
    warnings.warn(
        f"method {method!r} stopped without converging ({res.stop_reason} after "
        f"{res.iterations} iterations, {res.time:.2g} s; gradient norm {res.grad_norm:.2e}): "
        "the result is the last point, not a solution to tol. Raise max_iter/max_time, or see "
        "'Which solver when' in the docs.",
        ConvergenceWarning,
        stacklevel=3,
    )


def _check_result_rank(res: SolverResult, rank: int, method: str, adaptive: bool) -> None:
    """Warn (``RankWarning``) when the result's rank is not the one asked for."""
    if res.rank == rank:
        return
    if adaptive and res.rank < rank:
        msg = (
            f"method {method!r} returned rank {res.rank} < rank={rank}: the rank-adaptive method "
            f"stopped growing (or truncated) at rank {res.rank}; rank is an upper bound for it"
        )
    else:  # a fixed-rank method must keep the rank: this would be a bug
        msg = f"method {method!r} returned rank {res.rank}, not the rank={rank} asked for"
    res.info["rank_asked"] = rank
    warnings.warn(msg, RankWarning, stacklevel=3)


def _full_rank_start(problem: Any, rank: int, seed: Any) -> Any:
    """A start at ``rank = min(m, n)``, where a problem's truncated spectral start may refuse.

    Uses ``problem.spectral_init(rank)`` when the problem gives one; otherwise the rank-(r-1)
    spectral start plus the missing pair: the top singular pair ``(u, sigma, v)`` of the normal
    part of ``-egrad`` (the steepest direction that raises the rank; ``v`` spans the one
    direction left), entered with the exact line-search step when the problem has one. Cost:
    one spectral start, one gradient and one randomized SVD of rank 1.
    """
    import numpy as np

    from ..containers import LowRankMatrix
    from .rank_adaptive import normal_top_singular

    try:
        return problem.spectral_init(rank, seed=seed)
    except ValueError:
        if rank < 2:
            return _vector_start(problem, seed)
    x = problem.spectral_init(rank - 1, seed=seed)
    if x is None:
        return None
    M = problem.manifold(rank - 1)
    _, Z = problem.cost_and_egrad(x)
    negZ = tuple(-1.0 * z for z in Z) if isinstance(Z, tuple) else -1.0 * Z
    u, s, v = normal_top_singular(M, x, negZ, 1, seed=seed)
    sigma = float(M.backend.to_numpy(s)[0])
    if not sigma > 0:  # nothing outside the manifold: a tiny new singular value keeps rank r
        sigma = float(M.backend.to_numpy(x.s)[-1]) * _FULL_RANK_NEW_SIGMA
        t = 1.0
    else:
        t = problem.exact_step(x, LowRankMatrix(u * s[None, :1], v))
        t = float(t) if t is not None and np.isfinite(t) and t > 0 else 1.0
    grown = x.to_lowrank() + LowRankMatrix(u * (t * sigma), v)
    return problem.manifold(rank).from_matrix(grown)


def _vector_start(problem: Any, seed: Any) -> Any:
    """A start for a 1 x n or m x 1 problem (rank 1 = min(m, n), no truncated spectral start).

    ``X_0 = t H_1(-egrad(0))``: the negative gradient at ``X = 0`` (for completion the observed
    entries, ``P_Omega^*(b)``), scaled by the exact line-search step when the problem has one;
    a random point when that gradient is zero. O(problem's gradient + max(m, n)).
    """
    import numpy as np

    from ..containers import FixedRankPoint
    from .adaptive import dense_gradient

    M = problem.manifold(1)
    r0 = M.random_point(seed)
    zero = FixedRankPoint(r0.U, r0.s * 0.0, r0.V)  # X = 0, in the factored form of rank 1
    _, Z = problem.cost_and_egrad(zero)
    try:
        x = M.from_matrix(-1.0 * dense_gradient(M, Z))  # 1 x n or m x 1: max(m, n) numbers
    except ValueError:  # the gradient at 0 is 0 (or not finite): nothing to start from
        return r0
    t = problem.exact_step(zero, x.to_lowrank())
    if t is not None and np.isfinite(t) and t > 0:
        x = FixedRankPoint(x.U, x.s * float(t), x.V)
    return x


# new singular value, relative to the last one, when the gradient has no normal part at
# rank - 1 (the data are fit exactly there): small enough not to disturb the fit
_FULL_RANK_NEW_SIGMA = 1e-6
