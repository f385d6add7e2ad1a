r"""Which options each :func:`rankopt.solve` method takes, and the checks ``solve`` runs first.

``solve(problem, rank, method=..., **options)`` passes ``options`` to a solver's constructor
(and, for the fixed-learning-rate rules, on to the rule's spec). This module lists the
accepted names per method, read from the constructors' signatures and the rule specs'
``hyperparameters()``, so that a wrong or misspelled option fails before the run with a
message that names the methods that do take it. It also checks the problem, the rank and the starting point (:func:`check_solve_args`).

Nothing here changes a solver's arithmetic: the checks run once per ``solve`` call and cost
O(1), plus one orthonormality check of ``x0`` (O((m+n) r^2)) when a start is given.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..containers import FixedRankPoint
from ..rules.registry import registered
from .adaptive import solver_class
from .base import RankWarning, Solver
from .gradient import RCG, RGD
from .newton import RGN
from .rank_adaptive import Auto, RankAdaptive

__all__ = [
    "METHOD_CLASSES",
    "method_options",
    "option_table",
    "is_rank_adaptive",
    "check_solve_args",
    "check_single_rank",
    "make_solver",
    "solve_keywords",
]


class MethodTable(Mapping):
    """Method name -> ``(solver class, constructor arguments solve fixes itself)``: the one table
    of :func:`rankopt.solve`'s methods. The solvers of the loop (``"auto"``, ``"rgd"``, ...) and,
    read from the rule registry (:mod:`rankopt.rules.registry`) at every lookup, one method per
    registered rule: a rule registered later (by a test, an experiment) is a method at once.
    ``rankopt.solvers.METHODS`` is its view of factories, and ``docs/solvers.md`` lists exactly
    these names (``tests/test_input_checks.py`` checks both)."""

    _fixed: dict[str, tuple[type, dict[str, Any]]] = {
        "auto": (Auto, {}),
        "rgd": (RGD, {}),
        "rcg": (RCG, {}),
        "rgn": (RGN, {}),
        "newton": (RGN, {"hessian": "exact"}),
    }

    def _table(self) -> dict[str, tuple[type, dict[str, Any]]]:
        rules = {reg.method: (solver_class(reg.spec), {}) for reg in registered()}
        return {**self._fixed, **rules}

    def __getitem__(self, key: str) -> tuple[type, dict[str, Any]]:
        return self._table()[key]

    def __iter__(self):
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


#: see :class:`MethodTable`
METHOD_CLASSES = MethodTable()

# arguments of solve() itself: given as options they would clash
_SOLVE_ARGS = ("problem", "rank", "method", "tol", "max_iter", "seed", "verbose", "x0", "callback")
#: keyword arguments solve() takes besides the solver options
solve_keywords = ("threads",)


def _rule_spec(cls: type) -> Any:
    """The rule spec class (:mod:`rankopt.rules`) a fixed-learning-rate solver steps with."""
    return getattr(cls, "spec_class", None)


def _keyword_defaults(fn: Callable, skip: set[str]) -> tuple[dict[str, Any], bool]:
    """Keyword parameters of ``fn`` with defaults, and whether it takes ``**kw``."""
    out, var_kw = {}, False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is not p.VAR_POSITIONAL and p.name not in skip:
            out[p.name] = None if p.default is p.empty else p.default
    return out, var_kw


def _class_options(cls: type) -> dict[str, Any]:
    """Constructor keywords of ``cls``, following ``**kw`` up the class hierarchy."""
    out: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        opts, var_kw = _keyword_defaults(vars(klass)["__init__"], {"self", "inner"})
        for k, v in opts.items():
            out.setdefault(k, v)
        if not var_kw:
            break
    spec = _rule_spec(cls)
    if spec is not None:  # the rule solvers pass the rest on to their rule's spec
        for k, v in spec.hyperparameters().items():
            if k not in out or out[k] is None:
                out[k] = v
    return out


def _split_method(method: str) -> tuple[str | None, str]:
    key = method.lower()
    if key.startswith("adaptive-"):
        return "adaptive", key[len("adaptive-") :]
    return None, key


def _check_method(method: Any) -> None:
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    wrapper, key = _split_method(method)
    if key not in METHOD_CLASSES or (wrapper and key == "auto"):
        names = sorted(METHOD_CLASSES)
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown method {method!r}{hint}; choose one of {names} "
            "or 'adaptive-<method>' (e.g. 'adaptive-rcg')"
        )


def method_options(method: str) -> dict[str, Any]:
    """Options ``solve(..., method=method, **options)`` accepts, with their defaults.

    Parameters
    ----------
    method : str
        A method name of :func:`rankopt.solve` (``"auto"``, ``"rcg"``, ``"adaptive-rgd"``, ...).

    Returns
    -------
    dict
        Option name -> default (None where the default is "not set"). For
        ``"adaptive-<m>"`` the options of :class:`RankAdaptive` and of the inner method ``m``
        (each goes where it belongs; the stopping options go to the wrapper).
        ``solve``'s own arguments (``tol``, ``max_iter``, ``verbose``, ...) are not options.
    """
    _check_method(method)
    wrapper, key = _split_method(method)
    cls, fixed = METHOD_CLASSES[key]
    opts = {k: v for k, v in _class_options(cls).items() if k not in fixed}
    if wrapper:
        opts = {**opts, **_class_options(RankAdaptive)}
    opts.update(dict.fromkeys(solve_keywords))
    for k in _SOLVE_ARGS:
        opts.pop(k, None)
    return dict(sorted(opts.items()))


def option_table() -> dict[str, list[str]]:
    """Option name -> the methods (of ``METHOD_CLASSES``) that take it."""
    table: dict[str, list[str]] = {}
    for name in METHOD_CLASSES:
        for opt in method_options(name):
            table.setdefault(opt, []).append(name)
    return table


def is_rank_adaptive(method: str, options: dict[str, Any]) -> bool:
    """Whether the method may return a rank below ``rank`` (``rank`` is then a cap).

    True for "auto", "adaptive-<method>" and the rules whose truncation tolerance ``rank_tol``
    is set (by default for the DLRA rules, or given as an option).
    """
    wrapper, key = _split_method(method)
    if wrapper or key == "auto":
        return True
    spec = _rule_spec(METHOD_CLASSES[key][0])
    if spec is None:
        return False
    return options.get("rank_tol", spec.hyperparameters().get("rank_tol")) is not None


def _check_options(method: str, options: dict[str, Any]) -> None:
    accepted = method_options(method)
    table = option_table()
    for name in options:
        if name in accepted:
            continue
        if name in _SOLVE_ARGS:
            raise TypeError(f"solve() got {name!r} twice (it is an argument of solve itself)")
        takers = table.get(name)
        if takers:
            msg = (
                f"method {method!r} takes no option {name!r}; it is an option of "
                f"{', '.join(repr(t) for t in takers)}"
            )
        else:
            close = difflib.get_close_matches(name, list(accepted), n=3, cutoff=0.6)
            msg = f"unknown option {name!r} for method {method!r}" + (
                f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            )
        raise TypeError(
            f"{msg}. Options of {method!r}: {', '.join(accepted)} "
            "(rankopt.solvers.method_options(method) lists them with their defaults)"
        )


def _check_problem(problem: Any, method: str) -> tuple[int, int]:
    if isinstance(problem, np.ndarray) or hasattr(problem, "__array__"):
        raise TypeError(
            "solve() takes a problem, not an array: wrap your data first, e.g. "
            "rankopt.problems.MatrixCompletion(rows, cols, vals, shape=(m, n)) for observed "
            "entries, or rankopt.problems.Problem(cost, egrad, shape=(m, n)) for your own cost "
            "(a dense matrix A: cost(x) = 0.5 * ||x.to_dense() - A||^2, egrad(x) = x.to_dense() - A; "
            "its best rank-r approximation is also np.linalg.svd(A))"
        )
    missing = [a for a in ("shape", "cost_and_egrad", "manifold") if not hasattr(problem, a)]
    if missing:
        raise TypeError(
            f"solve() needs a rankopt problem (rankopt.problems.Problem or a subclass); "
            f"got {type(problem).__name__}, which has no {', '.join(missing)}"
        )
    dtype = getattr(problem, "dtype", None)
    if dtype is not None and "complex" in str(dtype):
        raise TypeError(f"rankopt works with real matrices only; the problem's dtype is {dtype}")
    _, key = _split_method(method)
    if key in ("auto", "rgn", "newton") and not getattr(problem, "has_hessian", True):
        raise ValueError(
            f"method {method!r} runs Gauss-Newton/Newton-CG, which needs the problem's Hessian "
            f"(problem.ehess), and this {type(problem).__name__} has none: pass ehess=... to "
            "Problem, or use a first-order method (method='rcg', 'rgd', 'radamw', ...)"
        )
    return tuple(problem.shape)


def _check_rank(rank: Any, shape: tuple[int, int]) -> int:
    m, n = shape
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be an integer or 'auto', got {rank!r} ({type(rank).__name__})")
    if not 1 <= rank <= min(m, n):
        raise ValueError(
            f"rank must be in [1, min(m, n) = {min(m, n)}] for a {m}x{n} problem, got {rank}"
        )
    return int(rank)


def _check_x0(problem: Any, x0: Any, rank: int, adaptive: bool) -> FixedRankPoint:
    """Validate a starting point; a rank above ``rank`` is truncated with a :class:`RankWarning`."""
    if isinstance(x0, (tuple, list)) and len(x0) == 3:
        raise TypeError(
            "x0 must be a rankopt.FixedRankPoint(U, s, V) (V of shape (n, r), not Vt); "
            "build it with problem.manifold(r).from_matrix(X) or FixedRankPoint(U, s, Vt.T)"
        )
    if not isinstance(x0, FixedRankPoint):
        raise TypeError(f"x0 must be a rankopt.FixedRankPoint, got {type(x0).__name__}")
    for part in (x0.U, x0.s, x0.V):
        if "complex" in str(getattr(part, "dtype", "")):
            raise TypeError(f"x0 must be real; it has dtype {part.dtype}")
    if x0.shape != tuple(problem.shape):
        raise ValueError(f"x0 has shape {x0.shape}, the problem {tuple(problem.shape)}")
    problem.manifold(x0.rank).check_point(x0)  # finite, s > 0, orthonormal U and V
    if x0.rank > rank:
        warnings.warn(
            f"x0 has rank {x0.rank} but rank={rank} was asked: starting from its best rank-{rank} "
            f"truncation (its {rank} largest singular triplets)",
            RankWarning,
            stacklevel=4,
        )
        order = np.argsort(-problem.manifold(x0.rank).backend.to_numpy(x0.s), kind="stable")[:rank]
        idx = np.sort(order)
        return FixedRankPoint(x0.U[:, idx], x0.s[idx], x0.V[:, idx])
    if x0.rank < rank and not adaptive:
        raise ValueError(
            f"x0 has rank {x0.rank} but rank={rank} was asked, and a fixed-rank method cannot add "
            "rank: give an x0 of that rank, or use a rank-adaptive method (method='auto' or "
            "'adaptive-<method>'), which starts from x0 and grows up to rank"
        )
    return x0


def check_single_rank(problem: Any, rank: Any, method: Any) -> None:
    """Refuse ``"auto"`` on a 1 x n or m x 1 problem that has no rank-1 spectral start.

    Such a matrix has a single rank, 1 = min(m, n). The fixed-rank methods handle it
    (:func:`rankopt.solve` starts them from the negative gradient at 0, for completion the
    observed entries), but ``method="auto"`` and ``rank="auto"`` may go on to their
    rank-adaptive search, which starts from ``problem.spectral_init(1)``; a problem whose
    truncated spectral start needs ``rank < min(m, n)`` (``MatrixCompletion``) refuses it.
    Raises ``ValueError`` naming the shape and the methods to use instead. Cost: one
    ``spectral_init(1)`` of a 1 x n problem, only for such shapes.
    """
    shape = tuple(getattr(problem, "shape", ()) or ())
    if len(shape) != 2 or min(shape) != 1 or not isinstance(method, str):
        return
    if _split_method(method) != (None, "auto") and not (isinstance(rank, str) and rank == "auto"):
        return
    try:
        problem.spectral_init(1, seed=0)
    except ValueError as err:
        m, n = shape
        raise ValueError(
            f"method={method!r}, rank={rank!r} cannot solve this {m}x{n} "
            f"{type(problem).__name__}: a {m}x{n} matrix has the single rank 1 = min(m, n), and "
            "the rank-adaptive search of 'auto' starts from problem.spectral_init(1), which this "
            "problem refuses at rank = min(m, n) (its truncated spectral start needs rank < "
            "min(m, n)). Use a fixed-rank method with rank=1: method='rgn' (the Gauss-Newton of "
            "'auto'), 'rcg' or 'rgd'"
        ) from err


def check_solve_args(
    problem: Any, rank: Any, method: Any, x0: Any, options: dict[str, Any]
) -> tuple[int, Any]:
    """Check the arguments of :func:`rankopt.solve`; returns ``(rank, x0)`` (x0 maybe truncated).

    Raises ``TypeError``/``ValueError`` naming the problem for: a non-problem (e.g. an
    ndarray), a complex problem or start, a rank outside ``[1, min(m, n)]``, an unknown method
    or option (naming the methods that take it, or the close spellings), a Gauss-Newton method
    on a problem without Hessian, a ``max_rank`` that differs from ``rank``, and an invalid
    ``x0`` (see :func:`rankopt.solve` for what happens when its rank differs from ``rank``).
    """
    _check_method(method)
    shape = _check_problem(problem, method)
    rank = _check_rank(rank, shape)
    _check_options(method, options)
    if options.get("max_rank") is not None and options["max_rank"] != rank:
        raise ValueError(
            f"solve() caps the rank of rank-adaptive methods at rank={rank}; drop "
            f"max_rank={options['max_rank']} or pass rank={options['max_rank']}"
        )
    if x0 is not None:
        x0 = _check_x0(problem, x0, rank, is_rank_adaptive(method, options))
    return rank, x0


def make_solver(method: str, options: dict[str, Any], rank: int) -> Solver:
    """Build the solver of ``method`` with ``options`` (checked), its rank capped at ``rank``."""
    wrapper, key = _split_method(method)
    cls, fixed = METHOD_CLASSES[key]
    opts = dict(options)
    if wrapper:
        # the wrapper's own options go to it; the loop options (Solver's) to both (RankAdaptive
        # sets the inner tolerances and budgets per stage); the rest to the inner solver
        common = _class_options(Solver)
        mine = _class_options(RankAdaptive)
        outer = {k: v for k, v in opts.items() if k in mine}
        inner_opts = {k: v for k, v in opts.items() if k not in mine or k in common}
        outer["max_rank"] = rank
        return RankAdaptive(cls(**fixed, **inner_opts), **outer)
    if is_rank_adaptive(method, opts) and _rule_spec(cls) is not None:
        opts["max_rank"] = rank  # the rank-adaptive retraction truncates to at most this
    if issubclass(cls, RankAdaptive):  # "auto": its rank is a maximum
        opts["max_rank"] = rank
    return cls(**fixed, **opts)
