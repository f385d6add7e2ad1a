"""Noise-aware solving (rankopt.solvers.noise), data checks, and the hangs of issue 11.

Every solve here runs under a time limit (pytest-timeout): a test that used to hang fails by
timing out instead of blocking the suite.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

import rankopt as ro
from rankopt.problems import MatrixCompletion, Problem, random_completion, random_sensing
from rankopt.solvers import RGN, RankAdaptive, Solver, SolverResult, StopReason
from rankopt.solvers.base import History
from rankopt.solvers.noise import (
    IdentifiabilityWarning,
    NoiseWarning,
    UnderdeterminedWarning,
    oracle_error,
    split,
)

pytestmark = pytest.mark.timeout(120)


def _solve(*args, **kw):
    """solve with every warning recorded: (result, list of warning categories, messages)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = ro.solve(*args, **kw)
    return res, [x.category for x in w], [str(x.message) for x in w]


# --------------------------------------------------------------------------- hangs (issue 11)
# (m, n, seed) draws on which solve(p, rank=6) of a rank-3 truth hung before the fix
HUNG = [(100, 100, 1), (100, 100, 2), (200, 150, 0), (200, 150, 5)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("m,n,seed", HUNG)
def test_rank_above_truth_terminates_and_finds_the_truth(m, n, seed):
    p = random_completion(m, n, 3, oversampling=3, seed=seed)
    t = time.perf_counter()
    res, cats, _ = _solve(p, rank=6, max_time=5, max_iter=50)
    assert time.perf_counter() - t < 30  # a budget check, not a speed claim
    assert res.iterations <= 50
    assert res.rank == 3 and res.converged
    assert p.relative_error(res.point) <= 1e-8
    assert IdentifiabilityWarning in cats  # rank 3 returned for rank=6: said so


@pytest.mark.timeout(60)
@pytest.mark.parametrize("m,n,seed", HUNG[:2])
def test_rank_adaptive_alone_honours_max_iter(m, n, seed):
    """The loop that spun forever: RankAdaptive itself, from its rank-1 start."""
    p = random_completion(m, n, 3, oversampling=3, seed=seed)
    solver = RankAdaptive(RGN(), max_rank=6, max_iter=50, max_time=5)
    res = solver.run(p, p.spectral_init(1, seed=0), seed=0)
    assert res.iterations <= 50 and res.time < 30
    assert p.relative_error(res.point) <= 1e-8


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectrum_down_to_1e15_terminates(seed):
    """Singular values from 1 to 1e-15: hung before the fix (and the spectral start of seed 2
    came back with non-orthonormal factors)."""
    p = random_completion(200, 150, 6, kappa=1e15, oversampling=3, seed=seed)
    res, _, _ = _solve(p, rank=6, max_time=5, max_iter=50)
    assert res.iterations <= 50 and res.converged
    assert p.relative_error(res.point) <= 1e-8


class _Stuck(Solver):
    """An inner solver that never makes an iteration (as when its line search fails)."""

    name = "stuck"

    def run(self, problem, x0=None, *, rank=None, seed=None, callback=None):
        f, _ = problem.cost_and_egrad(x0)
        h = History()
        h.append(0, f, 1.0, 0.0, 0.0, x0.rank, float("nan"))
        return SolverResult(x0, f, 1.0, 0, StopReason.MIN_STEP, False, h, 0.0, self.name)


@pytest.mark.timeout(30)
def test_rank_adaptive_stops_when_the_inner_solver_never_moves():
    p = random_completion(60, 50, 3, oversampling=3, seed=0)
    res = RankAdaptive(_Stuck(), max_rank=3, max_iter=10**9).run(p, p.spectral_init(1, seed=0))
    assert not res.converged and res.iterations == 0


@pytest.mark.timeout(30)
def test_rank_adaptive_honours_max_time_between_stages():
    p = random_completion(150, 150, 6, kappa=1e3, oversampling=3, seed=0)
    slow = {"n": 0}

    def cb(info):
        slow["n"] += 1
        time.sleep(0.02)

    solver = RankAdaptive(RGN(), max_rank=6, max_time=0.3)
    res = solver.run(p, p.spectral_init(1, seed=0), callback=cb)
    assert res.stop_reason == StopReason.MAX_TIME and not res.converged
    assert res.time < 5  # stopped within a stage or two of the budget, not at the end


# --------------------------------------------------------------------------- data checks
def test_fewer_observations_than_degrees_of_freedom_warns():
    p = random_completion(100, 100, 5, oversampling=0.5, seed=0)
    res, cats, msgs = _solve(p, rank=5)
    assert UnderdeterminedWarning in cats
    assert any(
        "975 observations for a rank-5 fit with 975" in m or "degrees of freedom" in m for m in msgs
    )
    assert res.info["num_observations"] < res.info["degrees_of_freedom"]


def test_rows_and_columns_with_too_few_observations_are_named():
    p0 = random_completion(80, 70, 3, oversampling=4, seed=1)
    rows, cols, vals = (np.asarray(a) for a in (p0.rows, p0.cols, p0.vals))
    keep = ~(((rows == 5) | (rows == 17)) & (cols > 3))  # rows 5, 17: at most 4 entries
    keep &= ~((cols == 9) & (rows > 0))  # column 9: at most 1 entry
    p = MatrixCompletion(rows[keep], cols[keep], vals[keep], p0.shape)
    under_r, under_c = p.underdetermined(3)
    assert 9 in under_c.tolist()
    res, cats, msgs = _solve(p, rank=3, check_rank=False)
    assert UnderdeterminedWarning in cats
    msg = next(m for m in msgs if "fewer than rank=3" in m)
    assert "columns [9" in msg or "9]" in msg or ", 9" in msg
    np.testing.assert_array_equal(res.info["underdetermined_cols"], under_c)
    rc, cc = p.observation_counts()
    assert rc.sum() == cc.sum() == p.nnz
    np.testing.assert_array_equal(under_r, np.flatnonzero(rc < 3))


# --------------------------------------------------------------------------- identifiability
def test_fixed_rank_above_the_truth_warns_not_identifiable():
    p = random_completion(100, 100, 3, oversampling=3, seed=0)
    res, cats, msgs = _solve(p, rank=6, method="rgn", max_iter=300)
    assert res.rank == 6  # a fixed-rank method keeps the rank asked ...
    assert p.relative_error(res.point) > 0.05  # ... whose fit is a wrong matrix here
    assert IdentifiabilityWarning in cats  # ... and says so
    assert res.info["identifiable"] is False and res.info["lower_rank_fit"] == 3


def test_fixed_rank_at_the_truth_rank_does_not_warn():
    p = random_completion(100, 100, 3, oversampling=3, seed=0)
    res, cats, _ = _solve(p, rank=3, method="rgn")
    assert IdentifiabilityWarning not in cats and NoiseWarning not in cats
    assert res.info["identifiable"] is True
    assert res.info["noise_estimate"] < 1e-8 * float(np.sqrt(np.mean(p.vals**2)))


def test_auto_returns_the_identifiable_rank():
    """30 x 30: phase 1 of 'auto' converges to a spurious rank-6 interpolant; the check finds
    the rank-3 fit and 'auto' (rank is its maximum) returns it, with a warning."""
    p = random_completion(30, 30, 3, oversampling=3, seed=0)
    res, cats, _ = _solve(p, rank=6)
    assert res.rank == 3 and p.relative_error(res.point) <= 1e-8
    assert IdentifiabilityWarning in cats and res.info["rank_reduced_from"] == 6
    report = res.info["noise_report"]  # the typed report, and the flat keys built from it
    assert report.rank_chosen == res.info["rank_chosen"] == res.rank
    assert report.identifiability is not None and report.identifiability.identifiable is False
    assert report.data is not None and report.data.num_observations == p.nnz
    assert set(report.as_info()) <= set(res.info)
    assert res.info["num_observations"] == report.data.num_observations


def test_noise_report_of_a_rank_search():
    """rank="auto" on noisy data: the report carries the validated search's report."""
    from rankopt.solvers.noise import NoiseReport, ValidationReport

    p = random_completion(60, 60, 3, oversampling=6, noise=1e-2, seed=1)
    res, _, _ = _solve(p, rank="auto")
    report = res.info["noise_report"]
    assert isinstance(report, NoiseReport) and isinstance(report.search, ValidationReport)
    assert report.search.rank_chosen == report.rank_chosen == res.rank
    assert report.search.validation_history and report.noise_estimate > 0


def test_check_rank_false_skips_the_check():
    p = random_completion(30, 30, 3, oversampling=3, seed=0)
    res, cats, _ = _solve(p, rank=6, method="rgn", check_rank=False)
    assert res.rank == 6 and "lower_rank_fit" not in res.info


def test_round_off_tail_is_flagged():
    """A fit whose last singular value is at round-off level is flagged without any solve."""
    p = random_completion(60, 50, 2, oversampling=5, seed=0)
    t = p.truth
    M = p.manifold(3)
    x = M.from_matrix(
        ro.LowRankMatrix(
            np.hstack([t.U * t.s, 1e-12 * np.ones((60, 1))]),
            np.hstack([t.V, np.ones((50, 1)) / np.sqrt(50)]),
        )
    )
    res, cats, _ = _solve(p, rank=3, method="rgd", x0=x, max_iter=1, check_rank=False)
    assert IdentifiabilityWarning in cats and res.info["tail_components"] >= 1


# --------------------------------------------------------------------------- noise
def test_noise_kappa100_sigma1e3_within_oracle():
    """The acceptance case of issue 12 at a smaller size (500 x 500, rank 6)."""
    p = random_completion(500, 500, 6, kappa=100.0, oversampling=3, seed=3, noise=1e-3)
    oracle = oracle_error(p)
    res, cats, _ = _solve(p, rank=6, seed=0)
    err = p.relative_error(res.point)
    assert err <= 1.5 * min(oracle, 1.0), (err, oracle)
    assert err < 1.0
    assert res.info["noise_estimate"] == pytest.approx(1e-3, rel=0.2)
    assert 1 <= res.info["rank_chosen"] <= 6 and "validation_rmse" in res.info
    assert res.info["validation_rmse"] < res.info["zero_rmse"]


def test_rank_auto_matches_noise_level_and_reports():
    p = random_completion(300, 300, 5, kappa=10.0, oversampling=3, seed=1, noise=1e-4)
    res, cats, _ = _solve(p, rank="auto", max_rank=8)
    assert res.rank <= 8 and res.info["rank_chosen"] == res.rank
    assert p.relative_error(res.point) <= 1.5 * oracle_error(p)
    assert res.info["noise_estimate"] == pytest.approx(1e-4, rel=0.2)
    assert min(res.info["validation_history"]) <= res.info["validation_rmse"]
    # rank="auto" on a problem without weight decay also scans the ridge grid
    assert len(res.info["ridge_scan"]) == len(ro.solvers.noise.RIDGE_GRID)
    assert res.info["weight_decay"] in [w for w, _, _ in res.info["ridge_scan"]]
    assert NoiseWarning not in cats  # rank="auto": a lower rank is what was asked for
    res0, _, _ = _solve(p, rank="auto", max_rank=8, ridge=None)  # the rank only
    assert len(res0.info["ridge_scan"]) == 1 and res0.info["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="ridge"):
        ro.solve(p, "auto", ridge=-1.0)


def test_rank_auto_on_exact_data_finds_the_rank():
    p = random_completion(200, 200, 4, kappa=1e3, oversampling=3, seed=2)
    res, cats, _ = _solve(p, rank="auto", max_rank=8)
    assert res.rank == 4 and p.relative_error(res.point) <= 1e-8 and res.converged


def test_known_noise_level_stops_at_the_discrepancy():
    sigma = 1e-3
    p = random_completion(400, 400, 5, kappa=1.0, oversampling=3, seed=4, noise=sigma)
    res, _, _ = _solve(p, rank=5, noise=sigma)
    assert res.stop_reason == StopReason.TARGET_COST and res.converged
    resid = float(np.sum(p.residual(res.point) ** 2))
    dof = 5 * (800 - 5)
    assert resid <= (1 + 2 * np.sqrt(2 / p.nnz)) * (p.nnz - dof) * sigma**2 * (1 + 1e-9)
    assert p.relative_error(res.point) <= 1.5 * oracle_error(p)


def test_noise_worse_than_zero_is_caught():
    """Noise far above the signal: nothing beats the zero matrix on held-out entries; the
    result is (numerically) zero and a NoiseWarning says so."""
    p = random_completion(300, 300, 5, oversampling=3, seed=0, noise=1e-1)
    res, cats, _ = _solve(p, rank=5)
    assert NoiseWarning in cats and res.info["rank_chosen"] == 0
    assert not res.converged
    assert p.relative_error(res.point) <= 1.0 + 1e-9


def test_exact_data_take_the_fast_path():
    p = random_completion(300, 300, 5, oversampling=3, seed=0)
    res, cats, _ = _solve(p, rank=5)
    assert res.info["phase"] == 1 and not cats
    assert res.info["noise_estimate"] <= 1e-9 * float(np.sqrt(np.mean(p.vals**2)))


def test_split_is_seeded_disjoint_and_complete():
    p = random_completion(50, 40, 2, oversampling=4, seed=0, noise=0.1)
    (t1, h1), (t2, _) = split(p, 0.2, seed=3), split(p, 0.2, seed=3)
    np.testing.assert_array_equal(t1.vals, t2.vals)
    assert t1.nnz + h1.problem.nnz == p.nnz and h1.problem.nnz == round(0.2 * p.nnz)
    lin = lambda q: set((np.asarray(q.rows) * 40 + np.asarray(q.cols)).tolist())  # noqa: E731
    assert lin(t1).isdisjoint(lin(h1.problem)) and lin(t1) | lin(h1.problem) == lin(p)
    assert h1.zero_rmse == pytest.approx(float(np.sqrt(np.mean(np.asarray(h1.problem.vals) ** 2))))


def test_sensing_subset_and_noise():
    p = random_sensing(20, 18, 3, kappa=10.0, seed=1, noise=1e-3)
    idx = np.arange(0, p.k, 3)
    q = p.subset(idx)
    x = p.manifold(3).random_point(seed=0)
    np.testing.assert_allclose(q.residual(x), p.residual(x)[idx], rtol=1e-12)
    res, _, _ = _solve(p, rank="auto", max_rank=5)
    assert res.info["noise_estimate"] == pytest.approx(1e-3, rel=0.3)
    assert p.relative_error(res.point) <= 1.5 * oracle_error(p)


def test_sensing_operator_subset_matches_dense():
    p = random_sensing(8, 9, 2, seed=2)
    Af = p.A.reshape(p.k, -1)
    op = ro.problems.MatrixSensing.from_operator(
        lambda D: Af @ (D.A @ D.B.T).reshape(-1), lambda y: (y @ Af).reshape(8, 9), p.b, (8, 9)
    )
    idx = np.array([0, 5, 7, 11])
    x = p.manifold(2).random_point(seed=1)
    a, b = op.subset(idx), p.subset(idx)
    assert a.cost(x) == pytest.approx(b.cost(x), rel=1e-12)
    np.testing.assert_allclose(a.egrad(x), b.egrad(x), atol=1e-12)


def test_bad_noise_options_are_refused():
    p = random_completion(40, 40, 2, seed=0)
    with pytest.raises(ValueError, match="noise must be"):
        ro.solve(p, 2, noise=-1.0)
    with pytest.raises(ValueError, match="validation"):
        ro.solve(p, 2, validation=0.7)
    with pytest.raises(TypeError, match="rank must be an integer or 'auto'"):
        ro.solve(p, "best")
    with pytest.raises(ValueError, match="check_rank"):
        ro.solve(p, 2, check_rank="maybe")
    with pytest.raises(ValueError, match="method='auto' only"):
        ro.solve(p, "auto", method="rgn")
    generic = Problem(lambda x: 0.0, lambda x: x.to_lowrank(), shape=(5, 5))
    with pytest.raises(ValueError, match="needs a data problem"):
        ro.solve(generic, "auto")
