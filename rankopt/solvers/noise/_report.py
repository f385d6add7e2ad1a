r"""Typed results of noise-aware solving: what was checked, estimated and chosen.

:func:`rankopt.solve` on a data problem puts a :class:`NoiseReport` in
``result.info["noise_report"]``; the rank searches put their own report (a
:class:`ValidationReport` or a :class:`DiscrepancyReport`) in ``result.info["rank_search"]``.
The flat keys of ``result.info`` that earlier versions documented (``noise_estimate``,
``rank_chosen``, ``validation_rmse``, ...) are still there, built from these reports by
:meth:`NoiseReport.as_info`: a field that is None is not a key (it did not apply), and a
field marked ``info=False`` in its metadata is only on the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ...containers import FixedRankPoint

__all__ = [
    "DataCheck",
    "ValidationReport",
    "DiscrepancyReport",
    "IdentifiabilityReport",
    "NoiseReport",
]


class _Report:
    """``as_info``: the report's fields as the flat keys of ``result.info``."""

    def as_info(self) -> dict[str, Any]:
        """The fields that are not None (and not marked ``info=False``), by name; a field that
        is itself a report contributes its own keys. O(number of fields)."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None or not f.metadata.get("info", True):
                continue
            if isinstance(value, _Report):
                out.update(value.as_info())
            else:
                out[f.name] = value
        return out


@dataclass
class DataCheck(_Report):
    """What :func:`~rankopt.solvers.noise.precheck` found: can the observations determine a
    fit of the rank checked?

    Attributes
    ----------
    num_observations : int
        ``N``, the number of observations.
    degrees_of_freedom : int
        ``r (m + n - r)`` at the rank checked; ``N`` below it is under-determined.
    underdetermined_rows, underdetermined_cols : numpy.ndarray or None
        Completion: the rows and columns with fewer than ``r`` observations (sorted indices;
        empty when there are none). None for problems that have no such notion (sensing).
    """

    num_observations: int
    degrees_of_freedom: int
    underdetermined_rows: np.ndarray | None = None
    underdetermined_cols: np.ndarray | None = None


@dataclass
class ValidationReport(_Report):
    """What :func:`~rankopt.solvers.noise.validated_rank_search` chose, and on what evidence.

    Attributes
    ----------
    rank_chosen : int
        Rank of the iterate with the smallest held-out error, 0 when nothing beats the zero
        matrix (then the result is a scaled fit, see ``shrinkage``).
    validation_rmse : float
        Held-out RMSE of the chosen iterate (``zero_rmse`` when ``rank_chosen`` is 0).
    zero_rmse : float
        Held-out RMSE of the zero matrix (the held-out RMS of the data).
    validation_history : list of float
        Held-out RMSE after every training iteration of the chosen fit.
    validation_fraction : float
        Fraction of the observations held out.
    weight_decay : float
        Weight decay (ridge) of the chosen fit.
    ridge_scan : list of (float, float or None, int)
        Per weight decay tried: ``(weight_decay, best held-out RMSE or None if nothing beat
        zero, its rank)``.
    shrinkage : float
        Scale applied to the returned point: 1, or the held-out least-squares factor when
        nothing beats zero.
    exact_fit : bool
        Whether a training fit reached exact-data level (then its converged point is chosen).
    train_iterations : int
        Iterations of all training fits together.
    train_stop : str
        Stop reason of the chosen training fit.
    best_train_iteration : int or None
        Training iteration of the chosen iterate; None when nothing beats zero.
    noise_estimate : float or None
        :func:`~rankopt.solvers.noise.noise_estimate` of the refit on all observations;
        None when nothing beats zero (no refit).
    """

    rank_chosen: int
    validation_rmse: float
    zero_rmse: float
    validation_history: list[float]
    validation_fraction: float
    weight_decay: float
    ridge_scan: list[tuple[float, float | None, int]]
    shrinkage: float
    exact_fit: bool
    train_iterations: int
    train_stop: str
    best_train_iteration: int | None = None
    noise_estimate: float | None = None


@dataclass
class DiscrepancyReport(_Report):
    """What :func:`~rankopt.solvers.noise.discrepancy_rank_search` chose.

    Attributes
    ----------
    rank_chosen : int
        Rank of the result: the first rank whose fit reached the discrepancy level (or the
        rank reached when the budget ran out).
    noise : float
        The known noise level ``sigma`` the search was given.
    noise_estimate : float
        :func:`~rankopt.solvers.noise.noise_estimate` at the result.
    """

    rank_chosen: int
    noise: float
    noise_estimate: float


@dataclass
class IdentifiabilityReport(_Report):
    """What :func:`~rankopt.solvers.noise.identifiability` found about a fixed-rank fit.

    Attributes
    ----------
    tail_components : int
        Singular values at round-off or noise level (not determined by the data).
    identifiable : bool or None
        False: a tail, or a lower-rank fit as good; True: the rank-adaptive check ran and found
        none; None: no tail and the check did not run (noisy data, budget, ``check_rank``).
    lower_rank_fit : int or None
        Rank of the lower-rank fit that is as good, if one was found.
    lower_rank_point : FixedRankPoint or None
        That fit (on the report only, not a key of ``result.info``).
    """

    tail_components: int
    identifiable: bool | None = None
    lower_rank_fit: int | None = None
    lower_rank_point: FixedRankPoint | None = field(default=None, metadata={"info": False})


@dataclass
class NoiseReport(_Report):
    """Everything :func:`rankopt.solve` checked, estimated and chose for a data problem:
    ``result.info["noise_report"]`` (built by :func:`~rankopt.solvers.noise.finish`).

    Attributes
    ----------
    noise_estimate : float
        :func:`~rankopt.solvers.noise.noise_estimate` at the result (of the fit it was
        computed from, for a result of phase 1 of "auto").
    rank_chosen : int
        The rank the search chose (0: nothing beats zero), else the rank of the solver's
        result (after a reduction by the identifiability check: the reduced rank, with the
        rank asked in ``rank_reduced_from``).
    data : DataCheck or None
        The pre-check of the observations (None when the rank exceeded ``min(m, n)``).
    search : ValidationReport, DiscrepancyReport or None
        The rank search's report, when the result comes from one.
    identifiability : IdentifiabilityReport or None
        The identifiability check of a fixed-rank result, when it ran.
    rank_reduced_from : int or None
        The rank asked, when "auto" returned the lower-rank fit that the check found instead.
    """

    noise_estimate: float
    rank_chosen: int
    data: DataCheck | None = None
    search: ValidationReport | DiscrepancyReport | None = None
    identifiability: IdentifiabilityReport | None = None
    rank_reduced_from: int | None = None

    def as_info(self) -> dict[str, Any]:
        """The flat ``result.info`` keys: those of ``data``, ``search`` and
        ``identifiability``, then ``noise_estimate``, ``rank_chosen`` and, if set,
        ``rank_reduced_from`` (this report's values win)."""
        out: dict[str, Any] = {}
        for part in (self.data, self.search, self.identifiability):
            if part is not None:
                out.update(part.as_info())
        out.update(noise_estimate=self.noise_estimate, rank_chosen=self.rank_chosen)
        if self.rank_reduced_from is not None:
            out["rank_reduced_from"] = self.rank_reduced_from
        return out
