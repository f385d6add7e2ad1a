"""Issue 23: ``solve``'s ``auto`` wastes no failing Gauss-Newton phase on ill-conditioned data.

Phase 1 (Gauss-Newton at the full rank from the spectral start) is skipped when the spectral
start is not separated from the sampling noise
(:meth:`~rankopt.problems.MatrixCompletion.spectral_init_if_separated`) and abandoned as soon
as the gradient rises or stops halving (:func:`~rankopt.solvers.rank_adaptive.outside_basin`);
the rank-adaptive stages below the final rank stop at a cost stall (``stage_ftol``). The
timings at 1e5 are in docs/completion.md; these tests check the logic and the errors only.
"""

from __future__ import annotations

import numpy as np
import pytest

import rankopt as ro
from rankopt.problems import MatrixCompletion, random_completion
from rankopt.solvers import RankAdaptive
from rankopt.solvers.rank_adaptive import BASIN_RATE, RISE_FLOOR, outside_basin


def test_outside_basin_fires_on_a_rise_or_two_slow_iterations():
    quadratic = [1.0, 0.3, 0.05, 2e-3, 4e-6, 1e-11]
    assert not any(outside_basin(quadratic[:k]) for k in range(1, len(quadratic) + 1))
    # one slow iteration after fast ones is allowed (measured on converging runs: 0.68)
    assert not outside_basin([1.0, 0.3, 0.2, 0.04])
    # a rise from the second iteration on fires at once
    assert not outside_basin([1.0])
    assert outside_basin([1.0, 1.01])
    assert outside_basin([1.0, 0.25, 0.375])  # the alternating pattern seen at 1e5, kappa 100
    # two iterations in a row that do not halve it
    slow = BASIN_RATE * 1.01
    assert not outside_basin([1.0, slow])
    assert outside_basin([1.0, slow, slow**2])
    # a rise at round-off level, far below the first gradient, is not a failure
    tiny = 0.1 * RISE_FLOOR
    assert not outside_basin([1.0, 1e-3, 1e-5, tiny, 1.5 * tiny])


def test_spectral_init_if_separated():
    """Ill-conditioned data at 2000 x 2000, rank 3: the top 3 singular values are in the noise
    bulk and PROPACK does not converge in its basis (None); well-conditioned: the spectral
    start itself, bit for bit (the same Lanczos run)."""
    p = random_completion(2000, 2000, 3, kappa=100.0, oversampling=3.0, seed=2)
    assert p.spectral_init_if_separated(3, seed=0) is None
    p = random_completion(2000, 2000, 3, kappa=1.0, oversampling=3.0, seed=1)
    x = p.spectral_init_if_separated(3, seed=0)
    y = p.spectral_init(3, seed=0)
    assert x is not None
    for a, b in zip((x.U, x.s, x.V), (y.U, y.s, y.V), strict=True):
        np.testing.assert_array_equal(a, b)


class _NotSeparated(MatrixCompletion):
    """A completion problem that reports its spectral start as not separated."""

    calls = 0

    def spectral_init_if_separated(self, rank, seed=None):
        type(self).calls += 1
        return None


def test_auto_skips_phase_one_when_the_start_is_not_separated():
    p = random_completion(300, 300, 6, kappa=100.0, oversampling=3.0, seed=0)
    q = _NotSeparated(p.rows, p.cols, p.vals, p.shape, truth=p.truth)
    res = ro.solve(q, 6, seed=0, noise=0)
    assert _NotSeparated.calls == 1
    assert res.info["first_phase_skipped"] == "spectral start not separated"
    assert res.info["phase"] == 2 and "first_phase" not in res.info
    assert res.history.rank[0] == 1  # the rank-adaptive path from its rank-1 start
    assert res.rank == 6 and q.relative_error(res.point) <= 1e-9


@pytest.mark.parametrize("kappa", [1e2, 1e4])
def test_auto_abandons_a_failing_phase_one_within_a_few_iterations(kappa):
    """At 300 x 300 the spectral start is separated (the Lanczos basis is a fifth of n), so
    phase 1 runs and fails; it must stop after at most 4 iterations (measured: 3-4), the
    error of its last iterate no more than twice its start's, and the result converge."""
    p = random_completion(300, 300, 6, kappa=kappa, oversampling=3.0, seed=0)
    errors = []
    res = ro.solve(
        p, 6, seed=0, noise=0, callback=lambda i: errors.append(p.relative_error(i.point))
    )
    first = res.info["first_phase"]
    assert first.iterations <= 4 and res.info["phase"] == 2
    phase1 = errors[: first.iterations]
    assert max(phase1) <= 2 * phase1[0]
    assert p.relative_error(res.point) <= 1e-9


def test_rank_adaptive_stage_ftol_is_checked():
    assert RankAdaptive().stage_ftol == "auto" and RankAdaptive(stage_ftol=0).stage_ftol == 0
    for bad in (-1.0, "fast", None):
        with pytest.raises(ValueError, match="stage_ftol"):
            RankAdaptive(stage_ftol=bad)
