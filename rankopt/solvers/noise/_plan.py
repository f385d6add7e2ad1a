r"""The plan of :func:`rankopt.solve` for data problems: its options read and checked, the rank
resolved (``rank="auto"``), and the pre-check of the observations (:func:`precheck`)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._estimate import (
    UnderdeterminedWarning,
    default_max_rank,
    degrees_of_freedom,
    is_data_problem,
)
from ._holdout import VALIDATION_FRACTION
from ._report import DataCheck

__all__ = ["OPTIONS", "Plan", "plan", "precheck"]

#: the options of :func:`rankopt.solve` that :func:`plan` reads (``max_rank`` too, with
#: ``rank="auto"``)
OPTIONS = ("noise", "validation", "check_rank", "ridge")


@dataclass
class Plan:
    """What :func:`rankopt.solve` will do beyond running the solver (see :func:`plan`).

    Attributes
    ----------
    data : bool
        Whether the problem follows the data protocol (:func:`is_data_problem`); all noise
        handling is skipped otherwise.
    auto_rank : bool
        ``rank="auto"``: the rank is chosen on held-out observations, up to ``rank``.
    rank : int
        The rank asked, or the largest rank tried with ``rank="auto"``.
    noise : float or None
        Known noise level (0: exact data), None to estimate it.
    validation : float
        Held-out fraction of the validated search.
    check_rank : "auto" or bool
        The identifiability check (:func:`~rankopt.solvers.noise.identifiability`).
    ridge : None, "auto" or list of float
        Weight decays the validated search tries (None: the problem's own).
    data_check : DataCheck or None
        What :func:`precheck` found (None when it did not run: not a data problem, or a rank
        above ``min(m, n)``, which the solver refuses with a clear error).
    """

    data: bool
    auto_rank: bool
    rank: int
    noise: float | None
    validation: float
    check_rank: Any
    ridge: Any = None
    data_check: DataCheck | None = None

    @property
    def info(self) -> dict[str, Any]:
        """The pre-check's findings as ``result.info`` keys (``DataCheck.as_info``); empty
        when it did not run."""
        return self.data_check.as_info() if self.data_check is not None else {}


def plan(problem: Any, rank: Any, method: str, options: dict) -> Plan:
    """Read (and remove) this module's options from ``options``; validate; run :func:`precheck`.

    Options: ``noise`` (None: estimate; 0: exact data, skip all noise handling; a positive
    float: the known standard deviation), ``validation`` (held-out fraction, default 0.1),
    ``check_rank`` ("auto", True or False: the identifiability check), ``max_rank`` (with
    ``rank="auto"``), ``ridge`` (weight decays tried by the validated search: ``"auto"`` for
    :func:`~rankopt.solvers.noise.ridge_grid`, a number or a list of them, or None for the
    problem's own; default ``"auto"`` with ``rank="auto"`` on a problem without weight decay,
    else None).
    """
    noise, validation, check_rank, max_rank, ridge = _read_options(rank, options)
    data = is_data_problem(problem)
    auto_rank = isinstance(rank, str)
    rank = _resolve_rank(problem, rank, method, max_rank, data)
    if ridge == "default":  # rank="auto" also chooses a ridge unless the problem has one
        own = float(getattr(problem, "weight_decay", 0.0))
        ridge = "auto" if auto_rank and own == 0.0 else None
    p = Plan(data, auto_rank, int(rank), noise, validation, check_rank, ridge)
    if data and rank <= min(problem.shape):  # larger ranks: the solver raises a clear error
        p.data_check = precheck(problem, p.rank)
    return p


def _read_options(rank: Any, options: dict) -> tuple[Any, float, Any, Any, Any]:
    """Pop and check ``noise``, ``validation``, ``check_rank``, ``max_rank`` (only with
    ``rank="auto"``) and ``ridge`` from ``options``; ``ridge`` is ``"default"`` if not given."""
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
    return noise, validation, check_rank, max_rank, ridge


def _resolve_rank(problem: Any, rank: Any, method: str, max_rank: Any, data: bool) -> Any:
    """The rank of the run: ``rank`` itself, or for ``rank="auto"`` (data problems and
    method "auto" only) ``max_rank`` (default :func:`default_max_rank`); checked positive."""
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
    return rank


def _check_ridge(ridge: Any) -> Any:
    """``ridge`` as given (None, ``"auto"``, ``"default"``) or as a list of floats >= 0."""
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


def precheck(problem: Any, rank: int, stacklevel: int = 4) -> DataCheck:
    """Warn when the data cannot determine a rank-``rank`` fit; return what was found.

    * ``N < r (m + n - r)``: fewer observations than degrees of freedom (any rank-r fit
      interpolates and the solution set is a manifold of positive dimension);
    * completion only: rows and columns with fewer than ``r`` observations (their factors
      are never determined), counted and listed (first 10) in the warning and in the
      returned ``underdetermined_rows`` / ``underdetermined_cols``.

    Returns a :class:`DataCheck` (``.as_info()``: the dict of earlier versions). O(N).
    """
    m, n = problem.shape
    N = problem.num_observations
    dof = degrees_of_freedom(m, n, rank)
    found = DataCheck(num_observations=N, degrees_of_freedom=dof)
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
        found.underdetermined_rows, found.underdetermined_cols = rows, cols
        if rows.size or cols.size:
            warnings.warn(
                f"{rows.size} rows and {cols.size} columns have fewer than rank={rank} "
                f"observations and cannot be determined (rows {rows[:10].tolist()}, columns "
                f"{cols[:10].tolist()}{', ...' if max(rows.size, cols.size) > 10 else ''}); "
                "their entries are guesses. Drop them or use a lower rank.",
                UnderdeterminedWarning,
                stacklevel=stacklevel,
            )
    return found
