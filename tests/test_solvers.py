"""Solvers: convergence, robustness to the condition number, stopping reasons, history."""

from __future__ import annotations

import math

import numpy as np
import pytest

import rankopt as ro
from rankopt.problems import MatrixCompletion, Problem, random_completion, random_sensing
from rankopt.solvers import (
    RCG,
    RGD,
    RGN,
    DLRAAdam,
    DLRAHeavyBall,
    RAdaGrad,
    RAdamW,
    RankAdaptive,
    RHeavyBall,
    StopReason,
)


@pytest.fixture(scope="module")
def easy():
    return random_completion(150, 120, 4, kappa=1.0, oversampling=4.0, seed=1)


@pytest.mark.parametrize("kappa", [1.0, 1e2, 1e4])
@pytest.mark.parametrize("seed", [0, 1])
def test_solve_auto_is_kappa_robust(kappa, seed):
    p = random_completion(300, 300, 6, kappa=kappa, oversampling=3.0, seed=seed)
    res = ro.solve(p, rank=6, tol=1e-12, seed=seed)
    assert p.relative_error(res.point) <= 1e-8, res
    assert res.converged and res.rank == 6


@pytest.mark.parametrize("kappa", [1.0, 1e3])
def test_sensing_recovers(kappa):
    p = random_sensing(50, 50, 5, kappa=kappa, seed=3)
    res = ro.solve(p, rank=5, tol=1e-12)
    assert p.relative_error(res.point) <= 1e-8, res


@pytest.mark.parametrize(
    "solver,tol",
    [
        (RGD(), 1e-11),
        (RCG(), 1e-11),
        (RCG(beta="HS+"), 1e-11),
        (RGN(), 1e-11),
        (RGD(step="bb"), 1e-11),
        (RGD(step="armijo"), 1e-6),  # plain backtracking: linear rate, slow
    ],
    ids=["rgd-exact", "rcg-pr", "rcg-hs", "rgn", "rgd-bb", "rgd-armijo"],
)
def test_line_search_solvers_converge(easy, solver, tol):
    x0 = easy.spectral_init(4, seed=0)
    solver.tol, solver.max_iter = tol, 3000
    res = solver.run(easy, x0)
    assert res.converged, res
    assert easy.relative_error(res.point) < 1e3 * tol
    # cost decreases monotonically for line-search methods
    c = np.array(res.history.cost)
    assert np.all(np.diff(c) <= 1e-12 * c[0])


@pytest.mark.parametrize(
    "metric",
    [ro.metrics.Preconditioned(core_weight=0.5), None],
)
def test_preconditioned_rcg(easy, metric):
    res = RCG(metric=metric, tol=1e-10, max_iter=2000).run(easy, easy.spectral_init(4, seed=0))
    assert res.converged and easy.relative_error(res.point) < 1e-7


@pytest.mark.parametrize(
    "solver",
    [
        RHeavyBall(lr=0.5, momentum=0.5),
        RAdaGrad(lr=0.05),
        RAdamW(lr=0.01),
        DLRAHeavyBall(lr=0.5, momentum=0.5, rank_tol=None),
        DLRAAdam(lr=0.01, rank_tol=None),
    ],
)
def test_rule_solvers_decrease_cost(easy, solver):
    x0 = easy.spectral_init(4, seed=0)
    solver.max_iter = 150
    res = solver.run(easy, x0)
    c = res.history.cost
    assert c[-1] < 0.05 * c[0], (solver.name, c[0], c[-1])


def test_dlra_grows_rank_up_to_cap():
    p = random_completion(120, 100, 3, kappa=1.0, oversampling=5.0, seed=2)
    x0 = p.spectral_init(1, seed=0)
    res = DLRAHeavyBall(lr=0.5, momentum=0.3, rank_tol=1e-3, max_rank=3, max_iter=200).run(p, x0)
    assert res.history.rank[0] == 1 and res.rank == 3
    assert res.history.cost[-1] < 1e-3 * res.history.cost[0]


def test_rank_adaptive_grows_from_rank_one():
    p = random_completion(200, 200, 5, kappa=1e3, oversampling=3.0, seed=4)
    x0 = p.spectral_init(1, seed=0)
    res = RankAdaptive(RGN(), max_rank=5, tol=1e-12).run(p, x0)
    ranks = res.history.rank
    assert ranks[0] == 1 and ranks[-1] == 5 and np.all(np.diff(ranks) >= 0)
    assert p.relative_error(res.point) < 1e-8


def test_rank_adaptive_truncates():
    p = random_completion(120, 100, 3, kappa=1.0, oversampling=5.0, seed=2)
    x3 = p.spectral_init(3, seed=0)
    # a rank-5 start whose two extra singular values are negligible
    M5 = p.manifold(5)
    rng = np.random.default_rng(0)
    extra = ro.LowRankMatrix(1e-9 * rng.standard_normal((120, 2)), rng.standard_normal((100, 2)))
    x0 = M5.from_matrix(x3.to_lowrank() + extra)
    res = RankAdaptive(RGN(), max_rank=5, rank_tol=1e-6, tol=1e-12).run(p, x0)
    assert x0.rank == 5 and res.rank == 3
    assert p.relative_error(res.point) < 1e-8


# ---------------------------------------------------------------- stopping reasons


def test_stop_gradient(easy):
    res = RGD(tol=1e-2).run(easy, easy.spectral_init(4, seed=0))
    assert res.stop_reason == StopReason.GRADIENT == "gradient" and res.converged
    assert res.history.grad_norm[-1] <= 1e-2 * res.history.grad_norm[0]


def test_stop_max_iter(easy):
    res = RGD(max_iter=3, tol=0).run(easy, easy.spectral_init(4, seed=0))
    assert res.stop_reason == "max-iter" and res.iterations == 3 and not res.converged
    assert len(res.history) == 4


def test_stop_max_time(easy):
    res = RGD(max_time=0.0, tol=0).run(easy, easy.spectral_init(4, seed=0))
    assert res.stop_reason == "max-time" and res.iterations == 0


def test_stop_target_cost(easy):
    x0 = easy.spectral_init(4, seed=0)
    target = 1e-3 * easy.cost(x0)
    res = RCG(target_cost=target, tol=0).run(easy, x0)
    assert res.stop_reason == "target-cost" and res.cost <= target and res.converged


def test_stop_cost_change(easy):
    res = RGD(ftol=0.5, patience=2, tol=0).run(easy, easy.spectral_init(4, seed=0))
    assert res.stop_reason == "cost-change"


def test_stop_callback(easy):
    seen = []

    def cb(info):
        seen.append(info.iteration)
        return info.iteration >= 2

    res = RGD(tol=0).run(easy, easy.spectral_init(4, seed=0), callback=cb)
    assert res.stop_reason == "callback" and seen == [1, 2]


def test_stop_min_step_with_wrong_gradient(easy):
    # an ascent "gradient": no step along -grad decreases the cost
    wrong = Problem(easy.cost, lambda x: -1.0 * easy.egrad(x), shape=easy.shape)
    res = RGD(tol=0, step="armijo").run(wrong, easy.spectral_init(4, seed=0))
    assert res.stop_reason == "min-step" and not res.converged


def test_stop_non_finite_keeps_last_good_point(easy):
    calls = {"n": 0}
    x0 = easy.spectral_init(4, seed=0)

    def cost(x):
        return easy.cost(x)

    def egrad(x):
        calls["n"] += 1
        g = easy.egrad(x)
        if calls["n"] >= 4:
            g = g.copy()
            g.data[0] = np.nan
        return g

    p = Problem(cost, egrad, shape=easy.shape)
    res = RHeavyBall(lr=0.5, momentum=0.0, tol=0, max_iter=50).run(p, x0)
    assert res.stop_reason == "non-finite" and not res.converged
    assert np.all(np.isfinite(res.point.U)) and np.all(np.isfinite(res.point.s))
    assert res.iterations == 2  # the third iterate had a nan gradient and was rejected
    assert math.isclose(res.cost, easy.cost(res.point))


def test_non_finite_start_raises(easy):
    p = Problem(lambda x: math.nan, easy.egrad, shape=easy.shape)
    with pytest.raises(ValueError, match="not finite"):
        RGD().run(p, easy.spectral_init(4, seed=0))


def test_history_and_progress_bar(easy, capsys):
    res = RCG(max_iter=5, tol=0, verbose=True, track_error=True).run(
        easy, easy.spectral_init(4, seed=0)
    )
    h = res.history.as_arrays()
    assert set(h) >= {"iteration", "cost", "grad_norm", "time", "step_size", "rank", "rel_error"}
    assert len(h["cost"]) == res.iterations + 1
    assert np.all(np.diff(h["time"]) >= 0) and np.all(np.isfinite(h["rel_error"]))
    assert "RCG" in capsys.readouterr().err  # tqdm writes to stderr


def test_bad_arguments(easy):
    with pytest.raises(ValueError, match="unknown method"):
        ro.solve(easy, rank=4, method="nope")
    with pytest.raises(ValueError, match="max_iter"):
        RGD(max_iter=-1)
    with pytest.raises(ValueError, match="step"):
        RGD(step="magic")
    with pytest.raises(ValueError, match="x0 or a rank"):
        RGD().run(easy)
    with pytest.raises(ValueError, match="rank"):
        ro.solve(easy, rank=200)


def test_completion_only_touches_observed_entries():
    # 10000 x 10000 would need 800 MB dense; the solver never forms it (O(|Omega| r) per step)
    p = random_completion(10000, 10000, 5, kappa=1.0, oversampling=3.0, seed=0)
    res = ro.solve(p, rank=5, tol=1e-10, max_iter=60)
    assert res.converged and p.relative_error(res.point) < 1e-6
    assert isinstance(p, MatrixCompletion)


def test_callback_counts_the_whole_run_across_stages():
    p = random_completion(300, 300, 5, kappa=1e3, oversampling=3.0, seed=0)
    its, ts = [], []

    def cb(info):
        its.append(info.iteration)
        ts.append(info.time)
        return False

    res = ro.solve(p, rank=5, callback=cb)
    assert res.info["phase"] == 2  # this case needs the rank-adaptive phase
    assert its == list(range(1, res.iterations + 1))
    assert np.all(np.diff(ts) >= 0)
    assert len(res.history) == res.iterations + 1
