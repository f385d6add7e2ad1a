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

What was done is reported in ``result.info["noise_report"]``, a :class:`NoiseReport`
(dataclass: the noise estimate, the rank chosen, the pre-check :class:`DataCheck`, the rank
search's :class:`ValidationReport` or :class:`DiscrepancyReport`, the
:class:`IdentifiabilityReport`), and, built from it, in the flat keys of ``result.info``
(``noise_estimate``, ``rank_chosen``, ``validation_rmse``, ``zero_rmse``, ...; see
:meth:`NoiseReport.as_info`). Every departure from what was asked comes with a warning
(:class:`NoiseWarning`, :class:`UnderdeterminedWarning`, :class:`IdentifiabilityWarning`).

Layout: this package re-exports every public name from modules that are one thing each, and
is the place to import them from (the modules are private; their names may move):

* ``_estimate``: the data protocol, degrees of freedom, the noise estimate, the discrepancy
  level, the warnings (imports nothing else of the package);
* ``_report``: the typed results (:class:`NoiseReport` and its parts);
* ``_holdout``: the seeded split, :class:`Holdout`, :func:`ridge_grid`;
* ``_plan``: :class:`Plan`, :func:`plan` and :func:`precheck` (before the run);
* ``_search``: the pieces the rank searches share, and :func:`discrepancy_rank_search`;
* ``_validation``: :func:`validated_rank_search`;
* ``_identifiability``: :func:`identifiability`;
* ``_finish``: :func:`finish` (after the run);
* ``_oracle``: :func:`oracle_error` (the benchmarks' reference).

Imports go one way: :mod:`rankopt.solvers.rank_adaptive` (``Auto``) imports this package, which
imports ``rankopt.solvers._rank_growth`` (``RankAdaptive``) and never ``rank_adaptive``; how a
solver treats its rank reaches :func:`finish` through its ``rank_role``
(:class:`~rankopt.solvers.rank_adaptive.RankRole`), not through its class.
"""

from __future__ import annotations

from ._estimate import (
    NOISE_DETECT_REL,
    STALL_FTOL,
    STALL_PATIENCE,
    IdentifiabilityWarning,
    NoiseWarning,
    UnderdeterminedWarning,
    default_max_rank,
    degrees_of_freedom,
    discrepancy_cost,
    discrepancy_tau,
    is_data_problem,
    is_noisy,
    noise_estimate,
    rms_observed,
    sum_squares,
)
from ._finish import finish
from ._holdout import (
    RIDGE_GRID,
    VALIDATION_FRACTION,
    ZERO_SCALE,
    Holdout,
    ridge_grid,
    split,
    split_indices,
)
from ._identifiability import SMALL_PROBLEM, TAIL_REL, identifiability
from ._oracle import oracle_error
from ._plan import OPTIONS, Plan, plan, precheck
from ._report import (
    DataCheck,
    DiscrepancyReport,
    IdentifiabilityReport,
    NoiseReport,
    ValidationReport,
)
from ._search import discrepancy_rank_search, rank_one_start, shift_callback
from ._validation import VALIDATION_RANK_PATIENCE, VALIDATION_RTOL, validated_rank_search

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
    # added with the split (typed results, and names other modules use)
    "NoiseReport",
    "DataCheck",
    "ValidationReport",
    "DiscrepancyReport",
    "IdentifiabilityReport",
    "OPTIONS",
    "NOISE_DETECT_REL",
    "STALL_FTOL",
    "STALL_PATIENCE",
    "VALIDATION_FRACTION",
    "VALIDATION_RTOL",
    "VALIDATION_RANK_PATIENCE",
    "ZERO_SCALE",
    "TAIL_REL",
    "SMALL_PROBLEM",
    "is_noisy",
    "rms_observed",
    "sum_squares",
    "discrepancy_tau",
    "rank_one_start",
]
